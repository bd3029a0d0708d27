//! The slot's restart point at a clean stop.
//!
//! A logical slot keeps two positions: what the client confirmed, and where decoding
//! must start again (`restart_lsn`), which can be far older. The restart point moves
//! only when the walsender decodes a record of the source's running transactions
//! (`xl_running_xacts`) at or before the confirmed position. The source logs one every
//! 15 s while it writes (the background writer), at each checkpoint, and on request
//! with `pg_log_standby_snapshot()` (PostgreSQL 16+). A `run` stopped within 15 s of a
//! large transaction's commit therefore left the restart point before that
//! transaction, and the next start made the source read and decode all of it again
//! (spilling it to disk, since it is skipped only at its commit) before sending
//! anything new: 2,000,000 inserted rows doubled the next backlog drain
//! (bench/results/arena2m.md). A clean stop now waits, bounded, for the point to move.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use crate::pg::Lsn;

/// How far the restart point may lag the confirmed position at a clean stop without
/// a wait: decoding that much again at the next start is cheap.
pub const WORTH_WAITING: u64 = 64 << 20;

/// Longest a clean stop waits for the restart point: the background writer logs the
/// running transactions every 15 s (`LOG_SNAPSHOT_INTERVAL_MS`), and the walsender
/// decodes the record a moment later.
pub const WAIT: Duration = Duration::from_secs(17);

/// How long one question to the source may take while stopping: a source that does
/// not answer ends the wait (nothing depends on it).
const QUERY_LIMIT: Duration = Duration::from_secs(2);

/// The slot's restart point, or `None` when it cannot be read now (no slot, no
/// answer): the caller then simply does not wait.
pub async fn read(source: &Client, slot: &str) -> Option<Lsn> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
    let query = source.query_opt(
        "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        &params,
    );
    match tokio::time::timeout(QUERY_LIMIT, query).await {
        Ok(Ok(Some(row))) => row.get::<_, Option<String>>(0)?.parse().ok(),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "could not read the slot's restart point");
            None
        }
        Err(_) => None,
    }
}

/// Asks the source to log its running transactions now, where it can
/// (`pg_log_standby_snapshot()`, PostgreSQL 16+, superusers or roles granted
/// EXECUTE on it). Returns whether it did; otherwise the background writer's next
/// record (within 15 s) serves.
pub async fn request_running_xacts(source: &Client) -> bool {
    let allowed = source.query_one(
        "SELECT current_setting('server_version_num')::int >= 160000
                AND NOT pg_is_in_recovery()
                AND has_function_privilege('pg_catalog.pg_log_standby_snapshot()', 'EXECUTE')",
        &[],
    );
    // On a server without the function `has_function_privilege` fails (SQL does
    // not promise to test the version first): a failure means "not available".
    match tokio::time::timeout(QUERY_LIMIT, allowed).await {
        Ok(Ok(row)) if row.get::<_, bool>(0) => {}
        _ => return false,
    }
    let logged = source.query_one("SELECT pg_catalog.pg_log_standby_snapshot()", &[]);
    match tokio::time::timeout(QUERY_LIMIT, logged).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "pg_log_standby_snapshot() failed");
            false
        }
        Err(_) => false,
    }
}

/// Lets the session lengthen `run`'s stop deadline while it waits for the restart
/// point, and only then: a stop with a server that does not answer keeps its short
/// deadline (the wait starts only after the source answered).
#[derive(Clone, Debug, Default)]
pub struct StopExtension(Arc<Mutex<Option<Instant>>>);

impl StopExtension {
    /// The stop may go on until `until`.
    pub fn extend_until(&self, until: Instant) {
        if let Ok(mut at) = self.0.lock() {
            *at = Some(at.map_or(until, |t| t.max(until)));
        }
    }

    /// Until when the stop was allowed to go on, if it was.
    pub fn until(&self) -> Option<Instant> {
        self.0.lock().ok().and_then(|at| *at)
    }
}

/// Whether a restart point `behind` the confirmed position `confirmed` is worth a
/// wait at a clean stop.
pub fn worth_waiting(restart: Lsn, confirmed: Lsn) -> bool {
    confirmed.0.saturating_sub(restart.0) >= WORTH_WAITING
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_large_lag_is_worth_a_wait() {
        assert!(!worth_waiting(Lsn(1000), Lsn(1000 + WORTH_WAITING - 1)));
        assert!(worth_waiting(Lsn(1000), Lsn(1000 + WORTH_WAITING)));
        // A restart point past the confirmed position (never expected) is no lag.
        assert!(!worth_waiting(Lsn(5000), Lsn(1000)));
    }
}
