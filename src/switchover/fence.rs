//! The fence: no write commits on the source after it, so the target can be proven
//! equal to the source at one WAL position, the fence LSN.
//!
//! `ALTER DATABASE … SET default_transaction_read_only = on` reaches only sessions
//! that start after it: a session reads the database's settings once, when it
//! connects. So the fence is provably closed by this sequence:
//!
//! 1. Set the database default and commit; then read the clock (`T`). Every
//!    session forked after `T` reads the new default and starts read-only.
//! 2. Every other client session of the database that started at or before `T`
//!    is ended: at once when it has no transaction id (it has written nothing
//!    yet, so ending it loses nothing), after `--fence-timeout` when it has one
//!    (an open write transaction gets that long to commit; then it is cancelled,
//!    and terminated if it is still there a second later). The wait ends when
//!    none is left: their commits, if any, are in the WAL by then.
//! 3. The fence LSN is the source's flushed WAL position once every commit
//!    inserted before it is flushed: every write transaction that committed is
//!    at or before it, and none can commit after it.
//!
//! walshuttle's own sessions (`application_name` `walshuttle …`) are left alone:
//! they never write rows on the source, and ending `run`'s would stall the drain.
//! What a read-only default cannot stop: a new session that opts out on purpose
//! (`SET default_transaction_read_only = off`, `BEGIN READ WRITE`), and
//! `COMMIT PREPARED` (the preflight refuses while prepared transactions exist).
//!
//! Lifting the fence is `ALTER DATABASE … RESET default_transaction_read_only`,
//! from the fence's own session, which opted out of the read-only default.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_postgres::Client;

use super::FenceMethod;
use crate::config::Endpoint;
use crate::pg::{connect, quote_ident, Lsn, PgResultExt};

/// What raising the fence did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Raised {
    /// The method.
    pub method: FenceMethod,
    /// Every write that committed on the source is at or before this position.
    pub lsn: Lsn,
    /// Sessions that started before the fence and were ended.
    pub sessions_ended: usize,
    /// Of those, sessions whose write transaction was still open after
    /// `--fence-timeout` (cancelled or terminated mid-transaction).
    pub writes_cancelled: usize,
}

/// The fence on one source database, and the session that raises and lifts it.
pub struct Fence {
    endpoint: Endpoint,
    client: Client,
    method: FenceMethod,
    database: String,
    raised: bool,
}

impl Fence {
    /// Opens the fence's session (read-write whatever the database default).
    pub async fn open(source: &Endpoint, method: FenceMethod) -> Result<Fence> {
        let client = fence_session(source).await?;
        let database: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .pg_context(|| "reading the source database".into())?
            .get(0);
        Ok(Fence {
            endpoint: source.clone(),
            client,
            method,
            database,
            raised: false,
        })
    }

    /// Raises the fence (see the module doc) and returns the fence LSN.
    pub async fn raise(&mut self, fence_timeout: Duration) -> Result<Raised> {
        let (mut ended, mut cancelled) = (0, 0);
        if self.method == FenceMethod::ReadOnly {
            self.client
                .batch_execute(&format!(
                    "ALTER DATABASE {} SET default_transaction_read_only = on",
                    quote_ident(&self.database)
                ))
                .await
                .pg_context(|| {
                    format!(
                        "fencing database {} on the source (ALTER DATABASE … SET default_transaction_read_only = on)",
                        self.database
                    )
                })?;
            self.raised = true;
            let since: String = self
                .client
                .query_one("SELECT clock_timestamp()::text", &[])
                .await
                .pg_context(|| "reading the source's clock".into())?
                .get(0);
            (ended, cancelled) = self.end_sessions(&since, fence_timeout).await?;
        }
        let lsn = flushed_position(&self.client).await?;
        Ok(Raised {
            method: self.method,
            lsn,
            sessions_ended: ended,
            writes_cancelled: cancelled,
        })
    }

    /// Ends every other client session of the database that started at or before
    /// `since` (its text form); returns (ended, cancelled mid-write).
    async fn end_sessions(&self, since: &str, fence_timeout: Duration) -> Result<(usize, usize)> {
        let started = Instant::now();
        let mut signalled: std::collections::HashMap<i32, Instant> = Default::default();
        let mut cancelled = std::collections::HashSet::new();
        loop {
            let rows = self
                .client
                .query(
                    "SELECT pid, backend_xid IS NOT NULL FROM pg_stat_activity \
                     WHERE datname = current_database() AND backend_type = 'client backend' \
                       AND pid <> pg_backend_pid() AND backend_start <= $1::text::timestamptz \
                       AND coalesce(application_name, '') NOT LIKE 'walshuttle %'",
                    &[&since],
                )
                .await
                .pg_context(|| "listing the sessions of the source database".into())?;
            if rows.is_empty() {
                return Ok((signalled.len(), cancelled.len()));
            }
            let timed_out = started.elapsed() >= fence_timeout;
            for r in rows {
                let (pid, writing): (i32, bool) = (r.get(0), r.get(1));
                if writing && !timed_out {
                    continue;
                }
                let function = match signalled.get(&pid) {
                    // A transaction cancelled a second ago and still there (idle in
                    // transaction ignores a cancel): terminate it.
                    Some(at) if at.elapsed() >= Duration::from_secs(1) => "pg_terminate_backend",
                    Some(_) => continue,
                    None if writing => {
                        cancelled.insert(pid);
                        "pg_cancel_backend"
                    }
                    None => "pg_terminate_backend",
                };
                self.client
                    .execute(&format!("SELECT {function}($1)"), &[&pid])
                    .await
                    .pg_context(|| {
                        format!("ending session {pid} on the source ({function}) to fence it")
                    })?;
                signalled.insert(pid, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lifts the fence (when raised): the source database takes writes again in
    /// new sessions. Retries once on a fresh session if the fence's own was lost.
    pub async fn lift(&mut self) -> Result<()> {
        if !self.raised {
            return Ok(());
        }
        let sql = format!(
            "ALTER DATABASE {} RESET default_transaction_read_only",
            quote_ident(&self.database)
        );
        if self.client.batch_execute(&sql).await.is_err() {
            self.client = fence_session(&self.endpoint).await?;
            self.client.batch_execute(&sql).await.pg_context(|| {
                format!(
                    "lifting the fence of database {} on the source: run {sql} there",
                    self.database
                )
            })?;
        }
        self.raised = false;
        tracing::info!(database = %self.database, "fence lifted: the source takes writes again");
        Ok(())
    }
}

/// A source session that writes despite a read-only database default.
async fn fence_session(source: &Endpoint) -> Result<Client> {
    let client = connect(source, "switchover fence").await?;
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .pg_context(|| "preparing the fence session on the source".into())?;
    Ok(client)
}

/// The source's flushed WAL position once everything inserted so far is flushed:
/// a commit waiting for the WAL writer (`synchronous_commit = off`) is flushed
/// within three `wal_writer_delay`s. A position that never gets flushed (the insert
/// position just past a page header) is waited for that long at most.
async fn flushed_position(src: &Client) -> Result<Lsn> {
    let row = src
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, \
                    (SELECT setting::int FROM pg_settings WHERE name = 'wal_writer_delay')",
            &[],
        )
        .await
        .pg_context(|| "reading the source's WAL position".into())?;
    let inserted: Lsn = parse(row.get(0))?;
    let delay_ms: i32 = row.get(1);
    let deadline = Instant::now() + Duration::from_millis(3 * delay_ms.max(1) as u64 + 200);
    loop {
        let flushed: Lsn = parse(
            src.query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                .await
                .pg_context(|| "reading the source's WAL position".into())?
                .get(0),
        )?;
        if flushed >= inserted || Instant::now() >= deadline {
            return Ok(flushed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn parse(text: String) -> Result<Lsn> {
    text.parse::<Lsn>()
        .with_context(|| format!("the source reported WAL position {text:?}"))
}
