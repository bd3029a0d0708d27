//! Turns raw pgoutput logical-replication messages into typed values, so the
//! streaming apply path never touches protocol bytes itself.
//!
//! The decoder is pure: a byte buffer in, a [`LogicalMessage`] or a
//! [`DecodeError`] out. It never panics, whatever the input, and never allocates
//! more than the input could describe (counts read from the wire are capped by
//! the bytes that remain).
//!
//! Protocol versions 1 to 3 are decoded in full (PostgreSQL 15's maximum), plus
//! the abort LSN and timestamp that protocol 4 appends to Stream Abort.
//!
//! The two-phase-commit messages (Begin Prepare `b`, Prepare `P`, Commit
//! Prepared `K`, Rollback Prepared `r`, Stream Prepare `p`) are answered with
//! [`DecodeError::UnsupportedMessage`]: walshuttle never asks for `two_phase`,
//! so a server that sends them is misconfigured, and failing loudly beats
//! applying a prepared transaction as if it had committed.
//!
//! Every message must be consumed exactly: bytes left over after a message's
//! last field are an error ([`DecodeError::TrailingBytes`]), which catches
//! framing mistakes and a protocol version the caller did not negotiate.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::pg::lsn::Lsn;

mod tuple;

pub use crate::pg::{TupleData, TupleValue};

/// Why a buffer is not a well-formed pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ended before a field that the message must carry.
    #[error("pgoutput message truncated: ended before {what}")]
    Truncated {
        /// The field that was cut off.
        what: &'static str,
    },
    /// The first byte names no pgoutput message.
    #[error("unknown pgoutput message tag {}", Tag(*.0))]
    UnknownMessage(u8),
    /// The tag names a message walshuttle does not decode (two-phase commit).
    #[error("unsupported pgoutput message tag {} (two-phase commit is not enabled by walshuttle)", Tag(*.0))]
    UnsupportedMessage(u8),
    /// A tuple column's kind byte is not `n`, `u`, `t` or `b`.
    #[error("unknown tuple column kind {}", Tag(*.0))]
    UnknownTupleKind(u8),
    /// A marker byte (`N`, `K`, `O`) was expected but another byte was found.
    #[error("expected {expected} but found byte {}", Tag(*.found))]
    UnexpectedMarker {
        /// What the decoder was looking for.
        expected: &'static str,
        /// The byte that was there instead.
        found: u8,
    },
    /// A Relation message's replica identity is not `d`, `n`, `f` or `i`.
    #[error("unknown replica identity {}", Tag(*.0))]
    UnknownReplicaIdentity(u8),
    /// A column count read from the wire is negative.
    #[error("negative {what} count {count}")]
    NegativeCount {
        /// What was being counted.
        what: &'static str,
        /// The count as sent.
        count: i16,
    },
    /// A name or prefix string is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field that held the bad bytes.
        what: &'static str,
    },
    /// Bytes remained after the message's last field.
    #[error("{count} unexpected trailing byte(s) after {what} message")]
    TrailingBytes {
        /// The message that was decoded.
        what: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
}

/// Shows a tag byte as `'B' (0x42)` when printable, else `0x07`.
struct Tag(u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02x})", char::from(self.0), self.0)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// A PostgreSQL timestamp as sent on the wire: microseconds since 2000-01-01 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Seconds from the Unix epoch to the PostgreSQL epoch (2000-01-01).
    pub const POSTGRES_EPOCH_UNIX_SECS: i64 = 946_684_800;

    /// Microseconds since the Unix epoch, saturating at the `i64` range.
    pub fn unix_micros(self) -> i64 {
        self.0
            .saturating_add(Self::POSTGRES_EPOCH_UNIX_SECS.saturating_mul(1_000_000))
    }

    /// The same instant as a [`SystemTime`], never panicking: a value the
    /// platform cannot represent (none on Linux) is pulled toward the Unix
    /// epoch, by halving, until it can be.
    pub fn to_system_time(self) -> SystemTime {
        let micros = self.unix_micros();
        let mut span = Duration::from_micros(micros.unsigned_abs());
        loop {
            let at = if micros >= 0 {
                UNIX_EPOCH.checked_add(span)
            } else {
                UNIX_EPOCH.checked_sub(span)
            };
            match at {
                Some(at) => return at,
                None if span.is_zero() => return UNIX_EPOCH,
                // Halve until representable: a close saturation in few steps.
                None => span = span.checked_div(2).unwrap_or(Duration::ZERO),
            }
        }
    }
}

/// Any message pgoutput sends inside a replication stream's XLogData.
#[derive(Debug, Clone, PartialEq)]
pub enum LogicalMessage {
    /// `B`: a transaction starts.
    Begin(Begin),
    /// `C`: the transaction opened by the last Begin commits.
    Commit(Commit),
    /// `O`: the changes that follow came from another replication origin.
    Origin(Origin),
    /// `R`: describes a table before the first change to it.
    Relation(Relation),
    /// `Y`: describes a non-built-in data type used by a later Relation.
    Type(TypeMessage),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: one or more tables were truncated.
    Truncate(Truncate),
    /// `M`: a message written with `pg_logical_emit_message`.
    Message(LogicalDecodingMessage),
    /// `S`: a block of an in-progress (streamed) transaction starts.
    StreamStart(StreamStart),
    /// `E`: the current streamed block ends.
    StreamStop,
    /// `c`: a streamed transaction commits.
    StreamCommit(StreamCommit),
    /// `A`: a streamed transaction or subtransaction aborts.
    StreamAbort(StreamAbort),
}

/// The start of a transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// When the transaction committed.
    pub commit_time: PgTimestamp,
    /// The transaction id.
    pub xid: u32,
}

/// The commit of the transaction opened by the last Begin.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// Flags; currently always zero.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: where to confirm flush up to.
    pub end_lsn: Lsn,
    /// When the transaction committed.
    pub commit_time: PgTimestamp,
}

/// The replication origin of the changes that follow.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// The commit LSN on the origin server.
    pub commit_lsn: Lsn,
    /// The origin's name.
    pub name: String,
}

/// How the source logs a table's old row on update and delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity key.
    pub is_key: bool,
    /// The column's name.
    pub name: String,
    /// The column type's OID.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

/// A table's description, sent before the first change to it in a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// The streamed transaction's id, when sent inside a stream block.
    pub xid: Option<u32>,
    /// The table's OID on the source.
    pub oid: u32,
    /// The schema; `pg_catalog` when PostgreSQL sent the empty string for it.
    pub namespace: String,
    /// The table's name.
    pub name: String,
    /// How old rows are identified.
    pub replica_identity: ReplicaIdentity,
    /// The published columns, in order.
    pub columns: Vec<RelationColumn>,
}

/// A data type's description (`Y`).
#[derive(Debug, Clone, PartialEq)]
pub struct TypeMessage {
    /// The streamed transaction's id, when sent inside a stream block.
    pub xid: Option<u32>,
    /// The type's OID on the source.
    pub oid: u32,
    /// The schema; `pg_catalog` when PostgreSQL sent the empty string for it.
    pub namespace: String,
    /// The type's name.
    pub name: String,
}

/// An inserted row.
#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    /// The streamed transaction's id, when sent inside a stream block.
    pub xid: Option<u32>,
    /// The OID of the table, as described by an earlier Relation.
    pub relation_oid: u32,
    /// The new row.
    pub new: TupleData,
}

/// The old row carried by an Update or Delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns are set; others are null.
    Key(TupleData),
    /// `O`: the whole old row (replica identity full).
    Full(TupleData),
}

impl OldTuple {
    /// The tuple, whichever kind it is.
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// An updated row.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The streamed transaction's id, when sent inside a stream block.
    pub xid: Option<u32>,
    /// The OID of the table, as described by an earlier Relation.
    pub relation_oid: u32,
    /// The old row or key, when the key changed or replica identity is full.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: TupleData,
}

/// A deleted row.
#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    /// The streamed transaction's id, when sent inside a stream block.
    pub xid: Option<u32>,
    /// The OID of the table, as described by an earlier Relation.
    pub relation_oid: u32,
    /// The deleted row's key or whole row.
    pub old: OldTuple,
}

/// A TRUNCATE of one or more tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Truncate {
    /// The streamed transaction's id, when sent inside a stream block.
    pub xid: Option<u32>,
    /// `TRUNCATE ... CASCADE` (option bit 1).
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY` (option bit 2).
    pub restart_identity: bool,
    /// The truncated tables' OIDs.
    pub relation_oids: Vec<u32>,
}

/// A message from `pg_logical_emit_message` (`M`).
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalDecodingMessage {
    /// The streamed transaction's id, when sent inside a stream block.
    pub xid: Option<u32>,
    /// Whether the message is part of a transaction (flag bit 1).
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The prefix it was emitted with.
    pub prefix: String,
    /// The message's content.
    pub content: Bytes,
}

/// The start of a block of a streamed transaction (`S`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamStart {
    /// The streamed transaction's id.
    pub xid: u32,
    /// Whether this is the transaction's first block.
    pub first_segment: bool,
}

/// The commit of a streamed transaction (`c`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamCommit {
    /// The transaction id.
    pub xid: u32,
    /// Flags; currently always zero.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// When the transaction committed.
    pub commit_time: PgTimestamp,
}

/// The abort of a streamed transaction or one of its subtransactions (`A`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAbort {
    /// The top-level transaction id.
    pub xid: u32,
    /// The aborted subtransaction; equal to `xid` when the whole transaction aborts.
    pub subxid: u32,
    /// LSN of the abort record (protocol 4 only; both or neither are set).
    pub abort_lsn: Option<Lsn>,
    /// When the abort happened (protocol 4 only).
    pub abort_time: Option<PgTimestamp>,
}

/// Decodes one pgoutput message, copying it once into a [`Bytes`].
///
/// `in_stream` says the message arrived between Stream Start and Stream Stop,
/// where row, relation, type and message records carry a transaction id.
pub fn decode(buf: &[u8], in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    decode_bytes(&Bytes::copy_from_slice(buf), in_stream)
}

/// Decodes one pgoutput message; column values and message content are
/// zero-copy slices of `buf`.
pub fn decode_bytes(buf: &Bytes, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    let mut r = Reader::new(buf);
    let tag = r.u8("message tag")?;
    let stream_xid = |r: &mut Reader<'_>| -> Result<Option<u32>, DecodeError> {
        if in_stream {
            r.u32("streamed transaction id").map(Some)
        } else {
            Ok(None)
        }
    };
    let (what, msg) = match tag {
        b'B' => (
            "Begin",
            LogicalMessage::Begin(Begin {
                final_lsn: r.lsn("Begin final LSN")?,
                commit_time: r.timestamp("Begin commit timestamp")?,
                xid: r.u32("Begin xid")?,
            }),
        ),
        b'C' => (
            "Commit",
            LogicalMessage::Commit(Commit {
                flags: r.u8("Commit flags")?,
                commit_lsn: r.lsn("Commit LSN")?,
                end_lsn: r.lsn("Commit end LSN")?,
                commit_time: r.timestamp("Commit timestamp")?,
            }),
        ),
        b'O' => (
            "Origin",
            LogicalMessage::Origin(Origin {
                commit_lsn: r.lsn("Origin commit LSN")?,
                name: r.cstring("Origin name")?,
            }),
        ),
        b'R' => {
            let xid = stream_xid(&mut r)?;
            ("Relation", decode_relation(&mut r, xid)?)
        }
        b'Y' => (
            "Type",
            LogicalMessage::Type(TypeMessage {
                xid: stream_xid(&mut r)?,
                oid: r.u32("Type OID")?,
                namespace: namespace(r.cstring("Type namespace")?),
                name: r.cstring("Type name")?,
            }),
        ),
        b'I' => {
            let xid = stream_xid(&mut r)?;
            let relation_oid = r.u32("Insert relation OID")?;
            expect_marker(&mut r, b'N', "'N' before Insert new tuple")?;
            let new = TupleData::decode(&mut r)?;
            let insert = Insert {
                xid,
                relation_oid,
                new,
            };
            ("Insert", LogicalMessage::Insert(insert))
        }
        b'U' => {
            let xid = stream_xid(&mut r)?;
            let relation_oid = r.u32("Update relation OID")?;
            let old = match r.u8("Update tuple marker")? {
                b'N' => None,
                b'K' => Some(OldTuple::Key(TupleData::decode(&mut r)?)),
                b'O' => Some(OldTuple::Full(TupleData::decode(&mut r)?)),
                found => {
                    let expected = "'K', 'O' or 'N' in Update";
                    return Err(DecodeError::UnexpectedMarker { expected, found });
                }
            };
            if old.is_some() {
                expect_marker(&mut r, b'N', "'N' before Update new tuple")?;
            }
            let new = TupleData::decode(&mut r)?;
            let update = Update {
                xid,
                relation_oid,
                old,
                new,
            };
            ("Update", LogicalMessage::Update(update))
        }
        b'D' => {
            let xid = stream_xid(&mut r)?;
            let relation_oid = r.u32("Delete relation OID")?;
            let old = match r.u8("Delete tuple marker")? {
                b'K' => OldTuple::Key(TupleData::decode(&mut r)?),
                b'O' => OldTuple::Full(TupleData::decode(&mut r)?),
                found => {
                    let expected = "'K' or 'O' in Delete";
                    return Err(DecodeError::UnexpectedMarker { expected, found });
                }
            };
            let delete = Delete {
                xid,
                relation_oid,
                old,
            };
            ("Delete", LogicalMessage::Delete(delete))
        }
        b'T' => {
            let xid = stream_xid(&mut r)?;
            let count = r.u32("Truncate relation count")?;
            let options = r.u8("Truncate options")?;
            let cap = usize::try_from(count)
                .unwrap_or(usize::MAX)
                .min(r.remaining() / 4);
            let mut relation_oids = Vec::with_capacity(cap);
            for _ in 0..count {
                relation_oids.push(r.u32("Truncate relation OID")?);
            }
            let truncate = Truncate {
                xid,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_oids,
            };
            ("Truncate", LogicalMessage::Truncate(truncate))
        }
        b'M' => {
            let xid = stream_xid(&mut r)?;
            let flags = r.u8("Message flags")?;
            let lsn = r.lsn("Message LSN")?;
            let prefix = r.cstring("Message prefix")?;
            let len = r.u32("Message content length")?;
            let content = r.bytes(len, "Message content")?;
            let message = LogicalDecodingMessage {
                xid,
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            };
            ("Message", LogicalMessage::Message(message))
        }
        b'S' => (
            "Stream Start",
            LogicalMessage::StreamStart(StreamStart {
                xid: r.u32("Stream Start xid")?,
                first_segment: r.u8("Stream Start first-segment flag")? == 1,
            }),
        ),
        b'E' => ("Stream Stop", LogicalMessage::StreamStop),
        b'c' => (
            "Stream Commit",
            LogicalMessage::StreamCommit(StreamCommit {
                xid: r.u32("Stream Commit xid")?,
                flags: r.u8("Stream Commit flags")?,
                commit_lsn: r.lsn("Stream Commit LSN")?,
                end_lsn: r.lsn("Stream Commit end LSN")?,
                commit_time: r.timestamp("Stream Commit timestamp")?,
            }),
        ),
        b'A' => {
            let xid = r.u32("Stream Abort xid")?;
            let subxid = r.u32("Stream Abort subxid")?;
            let (abort_lsn, abort_time) = if r.remaining() == 0 {
                (None, None)
            } else {
                let lsn = r.lsn("Stream Abort LSN")?;
                (Some(lsn), Some(r.timestamp("Stream Abort timestamp")?))
            };
            let abort = StreamAbort {
                xid,
                subxid,
                abort_lsn,
                abort_time,
            };
            ("Stream Abort", LogicalMessage::StreamAbort(abort))
        }
        b'b' | b'P' | b'K' | b'r' | b'p' => return Err(DecodeError::UnsupportedMessage(tag)),
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    match r.remaining() {
        0 => Ok(msg),
        count => Err(DecodeError::TrailingBytes { what, count }),
    }
}

fn decode_relation(r: &mut Reader<'_>, xid: Option<u32>) -> Result<LogicalMessage, DecodeError> {
    let oid = r.u32("Relation OID")?;
    let namespace = namespace(r.cstring("Relation namespace")?);
    let name = r.cstring("Relation name")?;
    let replica_identity = match r.u8("Relation replica identity")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        other => return Err(DecodeError::UnknownReplicaIdentity(other)),
    };
    let count = r.count("Relation column")?;
    // Each column takes at least 10 bytes: flags, empty name, type OID, typmod.
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        columns.push(RelationColumn {
            is_key: r.u8("Relation column flags")? & 1 != 0,
            name: r.cstring("Relation column name")?,
            type_oid: r.u32("Relation column type OID")?,
            type_modifier: r.i32("Relation column type modifier")?,
        });
    }
    Ok(LogicalMessage::Relation(Relation {
        xid,
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    }))
}

/// pgoutput sends an empty namespace for `pg_catalog`.
fn namespace(sent: String) -> String {
    if sent.is_empty() {
        "pg_catalog".to_owned()
    } else {
        sent
    }
}

fn expect_marker(r: &mut Reader<'_>, want: u8, expected: &'static str) -> Result<(), DecodeError> {
    match r.u8(expected)? {
        found if found == want => Ok(()),
        found => Err(DecodeError::UnexpectedMarker { expected, found }),
    }
}

/// A bounds-checked cursor over a message; every read fails rather than panics.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not yet read.
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let end = self
            .pos
            .checked_add(N)
            .ok_or(DecodeError::Truncated { what })?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated { what })?;
        let out = <[u8; N]>::try_from(bytes).map_err(|_| DecodeError::Truncated { what })?;
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.array(what).map(i16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.array(what).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn timestamp(&mut self, what: &'static str) -> Result<PgTimestamp, DecodeError> {
        self.array(what).map(|b| PgTimestamp(i64::from_be_bytes(b)))
    }

    /// An `i16` count that must not be negative.
    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let count = self.i16(what)?;
        usize::try_from(count).map_err(|_| DecodeError::NegativeCount { what, count })
    }

    /// `len` bytes as a zero-copy slice of the message.
    fn bytes(&mut self, len: u32, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = usize::try_from(len).map_err(|_| DecodeError::Truncated { what })?;
        if len > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        let end = self
            .pos
            .checked_add(len)
            .ok_or(DecodeError::Truncated { what })?;
        let out = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string.
    fn cstring(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self
            .buf
            .get(self.pos..)
            .ok_or(DecodeError::Truncated { what })?;
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { what })?;
        let text = rest.get(..len).ok_or(DecodeError::Truncated { what })?;
        let text = std::str::from_utf8(text).map_err(|_| DecodeError::InvalidUtf8 { what })?;
        let text = text.to_owned();
        self.pos = self.pos.saturating_add(len).saturating_add(1);
        Ok(text)
    }
}

#[cfg(test)]
mod tests;
