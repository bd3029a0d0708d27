//! A budget for the WAL the pipeline's slot holds back on the source.
//!
//! A slot keeps every WAL segment its consumer has not confirmed. While the target is
//! down or far behind, that grows until the source's disk fills, or until the server
//! invalidates the slot at its `max_slot_wal_keep_size`, at a moment nobody chose.
//! With `--max-retained-wal`, `run` watches the slot and, once the retained WAL
//! reaches the budget (or 95% of `max_slot_wal_keep_size`, whichever is lower), drops
//! the slot on purpose, so the source frees the WAL; the next start finds the slot
//! gone and repairs the gap with catch-up, as for any lost slot. A warning comes first,
//! at 80%.

use anyhow::Result;
use tokio_postgres::Client;

use crate::pg::PgResultExt;

/// Share of the limit at which a warning is logged.
const WARN_AT: f64 = 0.8;
/// Share of `max_slot_wal_keep_size` treated as the limit: the slot is released
/// before the server invalidates it.
const KEEP_SIZE_SHARE: f64 = 0.95;

/// The slot's WAL as measured on the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SlotWal {
    /// Bytes from the slot's restart position to the source's current WAL position.
    pub retained: u64,
    /// The source's `max_slot_wal_keep_size` in bytes; `None` when unlimited.
    pub keep_size: Option<u64>,
}

/// What to do about the slot's WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Well within the budget (or no budget).
    Fine,
    /// Past 80% of the limit.
    Warn,
    /// At the limit: drop the slot.
    Release,
}

/// Reads the slot's retained WAL and the server's limit; `None` when the slot does
/// not exist.
pub async fn measure(src: &Client, slot: &str) -> Result<Option<SlotWal>> {
    let row = src
        .query_opt(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint, \
                    (SELECT setting::bigint * 1024 * 1024 FROM pg_settings \
                      WHERE name = 'max_slot_wal_keep_size' AND setting::bigint >= 0) \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .pg_context(|| format!("reading the WAL slot {slot} holds on the source"))?;
    Ok(row.map(|r| SlotWal {
        retained: r.get::<_, i64>(0).max(0) as u64,
        keep_size: r.get::<_, Option<i64>>(1).map(|v| v.max(0) as u64),
    }))
}

/// The retained WAL at which the slot is released: the budget, or 95% of the
/// server's own limit, whichever is lower; `None` without either.
pub fn limit(budget: Option<u64>, keep_size: Option<u64>) -> Option<u64> {
    let server = keep_size.map(|k| (k as f64 * KEEP_SIZE_SHARE) as u64);
    match (budget, server) {
        (Some(b), Some(s)) => Some(b.min(s)),
        (b, s) => b.or(s),
    }
}

/// Judges `wal` against `budget` (`--max-retained-wal`). Without a budget the slot
/// is never released on purpose (the server's limit then decides, as before).
pub fn judge(wal: SlotWal, budget: Option<u64>) -> Verdict {
    let Some(budget) = budget else {
        return Verdict::Fine;
    };
    let Some(limit) = limit(Some(budget), wal.keep_size) else {
        return Verdict::Fine;
    };
    if wal.retained >= limit {
        Verdict::Release
    } else if wal.retained as f64 >= limit as f64 * WARN_AT {
        Verdict::Warn
    } else {
        Verdict::Fine
    }
}

/// The slot was released on purpose: its WAL reached the budget.
#[derive(Debug, thiserror::Error)]
#[error("replication slot {slot} holds {retained} bytes of WAL, at the budget of {limit} bytes (--max-retained-wal or 95% of max_slot_wal_keep_size)")]
pub struct OverBudget {
    /// The slot.
    pub slot: String,
    /// Bytes it retained.
    pub retained: u64,
    /// The limit it reached.
    pub limit: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lower_of_budget_and_server_limit_decides() {
        let wal = |retained, keep_size| SlotWal {
            retained,
            keep_size,
        };
        assert_eq!(judge(wal(10_000, None), None), Verdict::Fine);
        assert_eq!(judge(wal(700, None), Some(1000)), Verdict::Fine);
        assert_eq!(judge(wal(850, None), Some(1000)), Verdict::Warn);
        assert_eq!(judge(wal(1000, None), Some(1000)), Verdict::Release);
        // The server would invalidate at 1000: released at 950 even under a larger budget.
        assert_eq!(judge(wal(960, Some(1000)), Some(5000)), Verdict::Release);
        assert_eq!(limit(None, Some(1000)), Some(950));
        assert_eq!(limit(Some(100), Some(1000)), Some(100));
    }
}
