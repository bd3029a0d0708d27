//! The last stage: which applied source transactions are durable on the target, so
//! the source may free their WAL.
//!
//! Apply commits asynchronously (`synchronous_commit = off` on the apply sessions), so
//! a commit that returned may still be lost in a target crash. Each commit is
//! remembered with the target's WAL position after it; it becomes durable once the
//! target has flushed past that position. Only durable positions are confirmed to the
//! slot: a crash of the target never loses a transaction the source has let go.
//!
//! States of one applied source transaction: *pending* (committed on the target, not
//! yet flushed there) → *durable* (flushed; its end LSN may be confirmed upstream).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_postgres::{Client, Statement};

use crate::pg::{Lsn, PgResultExt};

/// How often, at most, the target's flushed position is read after commits.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Applied source transactions waiting for the target to flush them, and the
/// furthest one known durable.
pub struct Durability {
    /// The target session position checks go through (never the apply sessions,
    /// which may be in a COPY).
    monitor: Arc<Client>,
    /// `SELECT pg_current_wal_flush_lsn()`, prepared on `monitor`.
    flush_query: Statement,
    /// (source end LSN, target WAL position after its commit), in commit order.
    pending: VecDeque<(Lsn, Lsn)>,
    /// The furthest source position whose target commit is flushed.
    durable: Lsn,
    last_check: Instant,
}

impl Durability {
    /// Starts from `confirmed` (what the slot holds as confirmed); when the target's
    /// progress row is ahead of it (`applied`), that row is pending until the target
    /// has flushed past its insert position now.
    pub async fn start(monitor: Arc<Client>, confirmed: Lsn, applied: Lsn) -> Result<Durability> {
        let flush_query = monitor
            .prepare("SELECT pg_current_wal_flush_lsn()::text")
            .await
            .pg_context(|| "preparing on the target".into())?;
        let mut pending = VecDeque::new();
        if confirmed < applied {
            let target_insert: String = monitor
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .pg_context(|| "reading the target's WAL position".into())?
                .get(0);
            pending.push_back((applied, target_insert.parse().unwrap_or(Lsn(u64::MAX))));
        }
        Ok(Durability {
            monitor,
            flush_query,
            pending,
            durable: confirmed,
            last_check: Instant::now(),
        })
    }

    /// Records a target commit of source transactions up to `end_lsn`, with the
    /// target's WAL position after it (`None`: unknown, durable only once the target
    /// has flushed everything).
    pub fn committed(&mut self, end_lsn: Lsn, target_lsn: Option<Lsn>) {
        self.pending
            .push_back((end_lsn, target_lsn.unwrap_or(Lsn(u64::MAX))));
    }

    /// Whether every applied commit is known durable.
    pub fn all_durable(&self) -> bool {
        self.pending.is_empty()
    }

    /// The furthest source position known durable on the target.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// Whether a check is due (at most one every [`CHECK_EVERY`]).
    pub fn check_due(&self) -> bool {
        self.last_check.elapsed() >= CHECK_EVERY
    }

    /// Reads the target's flushed position and moves `durable` over the commits it
    /// covers.
    pub async fn check(&mut self) -> Result<()> {
        self.last_check = Instant::now();
        if self.pending.is_empty() {
            return Ok(());
        }
        let flushed: String = self
            .monitor
            .query_one(&self.flush_query, &[])
            .await
            .pg_context(|| "reading the target's flushed WAL position".into())?
            .get(0);
        let flushed: Lsn = flushed.parse().unwrap_or_default();
        while let Some(&(source_lsn, target_lsn)) = self.pending.front() {
            if target_lsn > flushed {
                break;
            }
            self.durable = self.durable.max(source_lsn);
            self.pending.pop_front();
        }
        Ok(())
    }
}
