//! A source MVCC snapshot as the copy positions record it, and which transactions
//! it sees. Below the state store, the copies and the stream, which all read it.

use anyhow::{bail, Context, Result};

use crate::pg::Lsn;

/// A source MVCC snapshot as `pg_current_snapshot()` prints it, with the WAL insert
/// position read after it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotView {
    /// Every transaction below this id had ended when the snapshot was taken.
    pub xmin: u64,
    /// No transaction at or above this id had ended.
    pub xmax: u64,
    /// Transactions in `[xmin, xmax)` still in progress, sorted.
    pub xip: Vec<u64>,
    /// The source's WAL insert position read after the snapshot: every transaction
    /// committing at or after it is invisible to the snapshot.
    pub lsn: Lsn,
}

impl SnapshotView {
    /// Parses `pg_current_snapshot()::text` (`xmin:xmax:xip,xip,…`).
    pub fn parse(text: &str, lsn: Lsn) -> Result<SnapshotView> {
        let mut parts = text.trim().splitn(3, ':');
        let mut next = |what: &str| {
            parts
                .next()
                .with_context(|| format!("snapshot `{text}` has no {what}"))
        };
        let xmin: u64 = next("xmin")?.parse().context("snapshot xmin")?;
        let xmax: u64 = next("xmax")?.parse().context("snapshot xmax")?;
        let list = parts.next().unwrap_or("");
        let mut xip = Vec::new();
        for x in list.split(',').filter(|x| !x.is_empty()) {
            xip.push(x.parse::<u64>().context("snapshot xip")?);
        }
        xip.sort_unstable();
        if xmin > xmax {
            bail!("snapshot `{text}` has xmin above xmax");
        }
        Ok(SnapshotView {
            xmin,
            xmax,
            xip,
            lsn,
        })
    }

    /// Widens a 32-bit transaction id (as pgoutput sends it) to the 64-bit id closest
    /// to this snapshot's `xmax` (ids wrap around every 2^32).
    pub fn full_xid(&self, xid: u32) -> u64 {
        let epoch_base = self.xmax & !0xFFFF_FFFF;
        let candidate = epoch_base | u64::from(xid);
        let half = 1u64 << 31;
        if candidate > self.xmax + half && candidate >= 1 << 32 {
            candidate - (1 << 32)
        } else if candidate + half < self.xmax {
            candidate + (1 << 32)
        } else {
            candidate
        }
    }

    /// Whether the snapshot sees the (committed) transaction `xid`: its changes are
    /// already in anything copied under this snapshot.
    pub fn sees(&self, xid: u32) -> bool {
        let x = self.full_xid(xid);
        if x < self.xmin {
            return true;
        }
        if x >= self.xmax {
            return false;
        }
        self.xip.binary_search(&x).is_err()
    }
}
