//! Streamed transactions kept on local disk until they commit.
//!
//! A streamed (in-progress) transaction is applied as it arrives on a target
//! connection of its own, so memory stays bounded however large it is; but the
//! source may stream many at once, and one connection each would exhaust the
//! target's `max_connections`. Past a cap, a streamed transaction's change messages
//! are appended, exactly as received, to a temporary file instead, and applied
//! through the main session when it commits (as PostgreSQL's own apply worker does
//! with its stream files). An aborted subtransaction truncates the file back to
//! where it began.
//!
//! Relation messages are kept too, in memory (a few per transaction), each at the
//! place it arrived among the changes, so that a table whose definition changes
//! inside the transaction changes on the target at the same point. They survive
//! the abort of the subtransaction they arrived in: the source describes a table
//! once per transaction and relies on it for every change after.
//!
//! The framing (a 4-byte big-endian length before each message) is written by hand:
//! it is ten lines, and no crate would make it shorter or safer.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result};
use bytes::Bytes;

/// A spool file that cannot be created or written (no such or no writable
/// `TMPDIR`, a full disk) fails the same way on every retry: `run` stops and says
/// what to fix instead of retrying (see [`crate::stream::faults`]).
fn local_error(what: &str, e: &std::io::Error) -> anyhow::Error {
    super::faults::Fatal(format!(
        "cannot {what} a spool file for a streamed transaction in {}: {e}; set TMPDIR to a writable directory with room for the largest source transaction (or raise --max-stream-connections), then start `walshuttle run` again",
        std::env::temp_dir().display()
    ))
    .into()
}

/// One spooled transaction's messages on disk.
pub struct Spool {
    writer: BufWriter<File>,
    len: u64,
    /// Where each subtransaction's first message begins, in order of appearance.
    subxacts: Vec<(u32, u64)>,
    /// Bytes spooled, for logs.
    messages: u64,
    /// Relation messages, each with the file offset it comes before.
    relations: Vec<(u64, Bytes)>,
}

impl Spool {
    /// A new, empty spool in the system's temporary directory (removed when
    /// dropped, also if the process dies: the file is unlinked at once).
    pub fn new() -> Result<Spool> {
        let file = tempfile::tempfile().map_err(|e| local_error("create", &e))?;
        Ok(Spool {
            writer: BufWriter::with_capacity(256 * 1024, file),
            len: 0,
            subxacts: Vec::new(),
            messages: 0,
            relations: Vec::new(),
        })
    }

    /// Appends one message of subtransaction `subxid`.
    pub fn append(&mut self, subxid: u32, message: &[u8]) -> Result<()> {
        if !self.subxacts.iter().any(|(x, _)| *x == subxid) {
            self.subxacts.push((subxid, self.len));
        }
        let len = u32::try_from(message.len()).context("a replication message over 4 GiB")?;
        self.writer
            .write_all(&len.to_be_bytes())
            .and_then(|_| self.writer.write_all(message))
            .map_err(|e| local_error("write", &e))?;
        self.len += 4 + u64::from(len);
        self.messages += 1;
        Ok(())
    }

    /// Keeps a Relation message at the current place.
    pub fn append_relation(&mut self, message: &[u8]) {
        self.relations
            .push((self.len, Bytes::copy_from_slice(message)));
    }

    /// Forgets an aborted subtransaction and every one that began after it.
    pub fn abort_subxact(&mut self, subxid: u32) -> Result<()> {
        let Some(pos) = self.subxacts.iter().position(|(x, _)| *x == subxid) else {
            return Ok(());
        };
        let offset = self.subxacts[pos].1;
        self.subxacts.truncate(pos);
        self.writer
            .flush()
            .context("writing a streamed transaction to its spool file")?;
        let file = self.writer.get_mut();
        file.set_len(offset)
            .and_then(|_| file.seek(SeekFrom::Start(offset)).map(|_| ()))
            .context("rolling back a subtransaction in its spool file")?;
        self.len = offset;
        for (at, _) in &mut self.relations {
            *at = (*at).min(offset);
        }
        Ok(())
    }

    /// Messages appended so far (including any rolled back).
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Reads the messages back, in order.
    pub fn into_reader(self) -> Result<SpoolReader> {
        let mut file = self
            .writer
            .into_inner()
            .map_err(|e| e.into_error())
            .context("writing a streamed transaction to its spool file")?;
        file.seek(SeekFrom::Start(0))
            .context("reading a streamed transaction's spool file")?;
        Ok(SpoolReader {
            reader: BufReader::with_capacity(256 * 1024, file),
            left: self.len,
            at: 0,
            relations: self.relations.into(),
        })
    }
}

/// The messages of a spool, read back one at a time (memory: one message).
pub struct SpoolReader {
    reader: BufReader<File>,
    left: u64,
    /// Offset of the next message in the file.
    at: u64,
    relations: VecDeque<(u64, Bytes)>,
}

impl SpoolReader {
    /// The next message, `None` at the end.
    pub fn next_message(&mut self) -> Result<Option<Bytes>> {
        if self.relations.front().is_some_and(|(at, _)| *at <= self.at) || self.left == 0 {
            return Ok(self.relations.pop_front().map(|(_, m)| m));
        }
        let mut len = [0u8; 4];
        self.reader
            .read_exact(&mut len)
            .context("reading a streamed transaction's spool file")?;
        let len = u32::from_be_bytes(len) as usize;
        let mut buf = vec![0u8; len];
        self.reader
            .read_exact(&mut buf)
            .context("reading a streamed transaction's spool file")?;
        self.left = self.left.saturating_sub(4 + len as u64);
        self.at += 4 + len as u64;
        Ok(Some(Bytes::from(buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_back_in_order_without_aborted_subtransactions() {
        let mut s = Spool::new().unwrap();
        s.append(1, b"a").unwrap();
        s.append(2, b"bb").unwrap();
        s.append(3, b"ccc").unwrap();
        s.append(2, b"dd").unwrap();
        s.abort_subxact(2).unwrap();
        s.append(1, b"e").unwrap();
        let mut r = s.into_reader().unwrap();
        let mut got = Vec::new();
        while let Some(m) = r.next_message().unwrap() {
            got.push(m);
        }
        assert_eq!(
            got,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"e")]
        );
    }

    #[test]
    fn relations_come_back_at_their_place_and_survive_an_aborted_subtransaction() {
        let mut s = Spool::new().unwrap();
        s.append_relation(b"R1");
        s.append(1, b"a").unwrap();
        s.append(2, b"b").unwrap();
        s.append_relation(b"R2");
        s.append(2, b"c").unwrap();
        s.abort_subxact(2).unwrap();
        s.append(1, b"d").unwrap();
        s.append_relation(b"R3");
        let mut r = s.into_reader().unwrap();
        let mut got = Vec::new();
        while let Some(m) = r.next_message().unwrap() {
            got.push(m);
        }
        let want: Vec<Bytes> = ["R1", "a", "R2", "d", "R3"]
            .iter()
            .map(|m| Bytes::copy_from_slice(m.as_bytes()))
            .collect();
        assert_eq!(got, want);
    }
}
