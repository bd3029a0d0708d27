//! Lock waits of walshuttle's apply sessions on the target, as `status` shows them:
//! which apply session waits, for how long, and on whose session (walshuttle's own,
//! which `run` resolves by itself, or another application's, which `run` waits out).
//!
//! Read from the target's `pg_stat_activity` and `pg_locks`, so `status` sees a wait
//! whether or not it can reach the running `run`.

use anyhow::Result;
use tokio_postgres::Client;

use crate::pg::PgResultExt;

/// One apply session waiting for a lock on the target, described for a person.
pub async fn on_target(target: &Client) -> Result<Vec<String>> {
    // `waitstart` (PostgreSQL 14+) says how long the lock is awaited; before it,
    // the statement's start is the nearest bound.
    let rows = target
        .query(
            "SELECT w.pid, w.application_name,
                    extract(epoch FROM now() - coalesce(
                        (SELECT min(l.waitstart) FROM pg_locks l WHERE l.pid = w.pid AND NOT l.granted),
                        w.query_start))::bigint,
                    h.pid, coalesce(h.application_name, ''), coalesce(h.usename::text, ''),
                    coalesce(h.state, ''), h.application_name LIKE 'walshuttle %'
               FROM pg_stat_activity w
               CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS b(pid)
               JOIN pg_stat_activity h ON h.pid = b.pid
              WHERE w.application_name LIKE 'walshuttle apply%'
                AND w.datname = current_database()
              ORDER BY w.pid, h.pid",
            &[],
        )
        .await
        .or_else(|e| {
            // `waitstart` is new in PostgreSQL 14: older targets name no wait time.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) {
                Ok(Vec::new())
            } else {
                Err(e)
            }
        })
        .pg_context(|| "reading the lock waits of walshuttle's apply sessions on the target".to_string())?;
    Ok(rows
        .iter()
        .map(|r| {
            let (waiter, waiter_app, secs): (i32, String, Option<i64>) =
                (r.get(0), r.get(1), r.get(2));
            let (holder, holder_app, user, state, own): (i32, String, String, String, bool) =
                (r.get(3), r.get(4), r.get(5), r.get(6), r.get(7));
            let secs = secs.unwrap_or(0);
            if own {
                format!(
                    "{waiter_app} (pid {waiter}) has waited {secs} s for walshuttle's own session {holder_app} (pid {holder}): a wait on itself, which run resolves (applying the holder's transaction after the others) within seconds"
                )
            } else {
                format!(
                    "{waiter_app} (pid {waiter}) has waited {secs} s for a lock held by pid {holder} (application '{holder_app}', role '{user}', {state}) on the target: it goes on once that session ends its transaction"
                )
            }
        })
        .collect())
}
