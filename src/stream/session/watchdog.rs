//! The watchdogs armed while a step of the session waits on a server: the source
//! going silent, the target not answering or not progressing, and, above all, two of
//! walshuttle's own target sessions waiting on each other.
//!
//! A session applies its steps one after the other: while it awaits one connection
//! (the main one, or a streamed transaction's at its commit), every other
//! connection of its own is idle and will stay so until that step ends. So when the
//! awaited connection waits for a lock held by another of walshuttle's connections,
//! the wait can never end by itself: the holder needs the session to move on, and the
//! session needs the waiter to finish. PostgreSQL's lock manager cannot see the
//! second half of that cycle (it is in this process), so walshuttle looks for it:
//! `pg_blocking_pids` of its own backends, every probe. See `docs/design.md`,
//! "walshuttle never waits on itself".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

/// How often a step in progress is checked on the target.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// One of walshuttle's target sessions waits for a lock another one holds: a wait
/// that cannot end by itself (see the module documentation).
#[derive(Debug, thiserror::Error)]
#[error("walshuttle's apply session (pid {waiter}) waits for walshuttle's own session (pid {holder}) on the target, which cannot go on before it: a wait on itself")]
pub struct SelfWait {
    /// The backend that waits.
    pub waiter: i32,
    /// The backend holding the lock it waits for.
    pub holder: i32,
}

/// Resolves with why when the replication task reports the source silent or the
/// connection broken.
pub(super) async fn source_fault(mut fault: watch::Receiver<Option<String>>) -> anyhow::Error {
    loop {
        if let Some(why) = fault.borrow().clone() {
            return anyhow::anyhow!("{why}");
        }
        if fault.changed().await.is_err() {
            return anyhow::anyhow!("the replication connection ended");
        }
    }
}

/// Clears the wait `/healthz` reports when the watchdog ends with its step.
struct WaitReport;

impl WaitReport {
    fn set(&self, probe: &Probe) {
        let wait = match (&probe.self_wait, &probe.foreign_wait) {
            (Some((waiter, holder)), _) => Some(crate::observe::ApplyWait {
                waiter: *waiter,
                holders: vec![*holder],
                on_itself: true,
            }),
            (None, Some((waiter, holders))) => Some(crate::observe::ApplyWait {
                waiter: *waiter,
                holders: holders.clone(),
                on_itself: false,
            }),
            (None, None) => None,
        };
        crate::observe::apply_wait(wait);
    }
}

impl Drop for WaitReport {
    fn drop(&mut self) {
        crate::observe::apply_wait(None);
    }
}

/// What one probe saw of walshuttle's sessions on the target.
struct Probe {
    /// Sessions running a statement.
    active: i64,
    /// A session of ours waiting for another of ours: (waiter, holder).
    self_wait: Option<(i32, i32)>,
    /// A session of ours waiting for someone else's: (waiter, holders).
    foreign_wait: Option<(i32, Vec<i32>)>,
}

async fn probe(monitor: &Client, pids: &[i32]) -> Result<Probe, tokio_postgres::Error> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&pids];
    let rows = monitor
        .query(
            "SELECT pid, state = 'active', pg_blocking_pids(pid) FROM pg_stat_activity WHERE pid = ANY($1)",
            &params,
        )
        .await?;
    let mut seen = Probe {
        active: 0,
        self_wait: None,
        foreign_wait: None,
    };
    for row in rows {
        let pid: i32 = row.get(0);
        if row.get::<_, Option<bool>>(1) == Some(true) {
            seen.active += 1;
        }
        let blockers: Vec<i32> = row.get::<_, Option<Vec<i32>>>(2).unwrap_or_default();
        if let Some(holder) = blockers.iter().find(|b| pids.contains(b)) {
            seen.self_wait = Some((pid, *holder));
        } else if !blockers.is_empty() {
            seen.foreign_wait = Some((pid, blockers));
        }
    }
    Ok(seen)
}

/// Resolves with why when the target stops answering (a probe takes longer than
/// `limit`), when none of walshuttle's apply sessions on it (`pids`) has been active
/// for `limit` while a step waits for it (a stalled network), or when one of them
/// is seen waiting for another at two probes in a row ([`SelfWait`]). A step whose session works, or waits for
/// someone else's lock, is never cut short; a wait for someone else is logged.
pub(super) async fn watch_target(
    monitor: Arc<Client>,
    pids: Vec<i32>,
    progress: Arc<AtomicU64>,
    limit: Duration,
) -> anyhow::Error {
    let mut quiet_since: Option<Instant> = None;
    let mut seen = progress.load(Ordering::Relaxed);
    let mut foreign_logged = false;
    let mut last_self_wait: Option<(i32, i32)> = None;
    let report = WaitReport;
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let probe = match tokio::time::timeout(limit, probe(&monitor, &pids)).await {
            Err(_) => {
                return anyhow::anyhow!(
                    "the target did not answer a liveness check within {} s (stalled connection?): reconnecting",
                    limit.as_secs()
                )
            }
            Ok(Err(e)) => {
                return anyhow::anyhow!(
                    "checking the apply sessions on the target: {}",
                    crate::pg::connect::describe(&e)
                )
            }
            Ok(Ok(probe)) => probe,
        };
        report.set(&probe);
        // Seen at two probes in a row: a wait that cannot end lasts, while a
        // moment's wait (two lanes extending one table) is gone by the next probe.
        match (probe.self_wait, last_self_wait) {
            (Some(now), Some(before)) if now == before => {
                crate::observe::error("self_wait");
                let (waiter, holder) = now;
                return SelfWait { waiter, holder }.into();
            }
            (now, _) => last_self_wait = now,
        }
        if let (Some((waiter, holders)), false) = (&probe.foreign_wait, foreign_logged) {
            tracing::warn!(waiter, ?holders, "an apply session waits for a lock held by another session on the target (not walshuttle's): it goes on once that one ends");
            foreign_logged = true;
        }
        let now = progress.load(Ordering::Relaxed);
        if probe.active > 0 || now != seen {
            seen = now;
            quiet_since = None;
            continue;
        }
        // Quiet at two probes at least `limit` apart: a moment between two
        // statements does not count.
        let since = *quiet_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= limit {
            return anyhow::anyhow!(
                "a step on the target made no progress for {} s (no apply session active: stalled connection?): reconnecting",
                limit.as_secs()
            );
        }
    }
}
