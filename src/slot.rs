//! What the source says about a replication slot: its facts in
//! `pg_replication_slots`, and whether it can still be streamed from. Shared by
//! bootstrap, the stream, catch-up and teardown, below all of them.

use anyhow::Result;
use tokio_postgres::Client;

use crate::pg::PgResultExt;

/// Slot facts from `pg_replication_slots`.
pub struct SlotInfo {
    /// Whether a walsender holds it now.
    pub active: bool,
    /// Process id of the holder.
    pub active_pid: Option<i32>,
    /// `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
    /// The plugin of the slot (`pgoutput` for walshuttle's).
    pub plugin: Option<String>,
}

/// Looks up a slot on the source.
pub async fn slot_info(src: &Client, slot: &str) -> Result<Option<SlotInfo>> {
    let row = src
        .query_opt(
            "SELECT active, active_pid, wal_status, plugin::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .pg_context(|| format!("looking up replication slot {slot} on the source"))?;
    Ok(row.map(|r| SlotInfo {
        active: r.get(0),
        active_pid: r.get(1),
        wal_status: r.get(2),
        plugin: r.get(3),
    }))
}

/// Why the gap exists.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The slot does not exist (dropped by an operator, or never created).
    SlotMissing,
    /// The slot exists but its WAL was removed (`wal_status = 'lost'`).
    SlotInvalidated,
    /// The source has no logical decoding (`wal_level` below `logical`).
    NoLogicalDecoding,
    /// Polling mode: no slot is used.
    Polling,
    /// A catch-up was interrupted and is being finished.
    Resumed,
}

/// The slot `run` streams from is gone: catch-up repairs the gap, then streaming
/// goes on from a new slot.
#[derive(Debug, thiserror::Error)]
#[error("replication slot {slot} cannot be streamed from: {reason:?}")]
pub struct SlotGone {
    /// The slot.
    pub slot: String,
    /// What happened to it.
    pub reason: GapReason,
}

/// Why a slot cannot be streamed from, or `None` when it is healthy.
pub async fn gap_reason(src: &Client, slot: &str) -> Result<Option<GapReason>> {
    let wal_level: String = src
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .pg_context(|| "reading wal_level on the source".into())?
        .get(0);
    if wal_level != "logical" {
        return Ok(Some(GapReason::NoLogicalDecoding));
    }
    Ok(match slot_info(src, slot).await? {
        None => Some(GapReason::SlotMissing),
        Some(info) if info.wal_status.as_deref() == Some("lost") => {
            Some(GapReason::SlotInvalidated)
        }
        Some(_) => None,
    })
}
