//! The fence: no write commits on the source after it, so the target can be proven
//! equal to the source at one WAL position, the fence LSN.
//!
//! A read-only default does not do it: a session may choose to write (`BEGIN READ
//! WRITE`, `SET SESSION CHARACTERISTICS … READ WRITE`, a role or role-in-database
//! setting, which outranks the database's). So the fence (`--fence read-only`)
//! leaves no session that could write, whatever it chooses:
//!
//! 1. `ALTER DATABASE … ALLOW_CONNECTIONS false`, from a session on another
//!    database of the source's cluster (PostgreSQL refuses it from inside): from
//!    its commit on, no backend can connect to the database, superusers,
//!    walsenders and background workers included (autovacuum alone may, and it
//!    writes no rows).
//! 2. Every backend of the database is ended except walshuttle's own, known by
//!    backend pid, never by name: the switchover's sessions (opened before the
//!    fence), the walsender streaming the pipeline's slot (the slot's
//!    `active_pid`) and `run`'s lookup session (the holder of the pipeline's
//!    advisory lock, see [`announce_run_session`]). A backend without a
//!    transaction id is ended at once (it has written nothing); one with an open
//!    write transaction gets `--fence-timeout` to commit, then is cancelled, then
//!    terminated. Background workers (pg_cron, other subscriptions' apply workers)
//!    and other walsenders are ended too. The wait ends when none is left.
//! 3. The fence LSN is the source's flushed WAL position once every commit
//!    inserted before it is flushed: every write transaction that committed is at
//!    or before it, and no other session exists that could commit after it.
//!
//! Then it is proven, not assumed: a temporary logical slot created before the fence
//! (so its decoding covers every transaction) is moved to the fence LSN; after the
//! verify, its changes are read with the pipeline's publication. Any change to a
//! replicated table committed after the fence LSN aborts the switchover.
//!
//! On abort the database takes connections again exactly as before; no session
//! could connect during the fence, so none is left with a fenced setting. At done,
//! the old source is left closed to the application: connections are allowed
//! again, but with `CONNECTION LIMIT 0` (only superusers connect) and
//! `default_transaction_read_only = on`; with `--reverse`, without the connection
//! limit, since the reverse stream's role (exempted from the read-only default)
//! must connect there.

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

/// What the proof found: changes to replicated tables committed on the source
/// after the fence LSN, read from a slot of the fence's own.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Proof {
    /// The proof read the source's WAL from the fence LSN to here.
    pub checked_to: Lsn,
    /// Row changes (insert, update, delete, truncate) of replicated tables
    /// committed after the fence LSN: 0 for a switchover that may be done.
    pub changes_after_fence: i64,
    /// Transactions they belong to.
    pub transactions_after_fence: i64,
}

/// The advisory lock `run`'s lookup session holds on the source (two keys: a fixed
/// one and the slot's hash), so the fence knows that session by pid.
const RUN_LOCK_KEY: i32 = 0x7773_6872;

/// Called by `run` on its source session: takes the pipeline's advisory lock, so
/// a switchover's fence keeps that session (by pid) instead of ending it. Best
/// effort: without it, the fence ends the session and `run` reconnects only once
/// the fence is lifted.
pub async fn announce_run_session(source: &Client, slot: &str) {
    let taken = source
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2) & 2147483647)",
            &[&RUN_LOCK_KEY, &slot],
        )
        .await
        .map(|r| r.get::<_, bool>(0));
    if !matches!(taken, Ok(true)) {
        tracing::debug!(slot, "could not take run's advisory lock on the source: a switchover's fence will end this session");
    }
}

/// The fence on one source database, and the sessions that raise and lift it.
pub struct Fence {
    endpoint: Endpoint,
    /// On the fenced database: takes the LSN, holds the proof slot.
    client: Client,
    /// On another database of the cluster: closes and opens the fenced one.
    admin: Option<Client>,
    method: FenceMethod,
    database: String,
    slot: String,
    publication: String,
    proof_slot: Option<String>,
    /// Backend pids of the switchover's own sessions.
    own: Vec<i32>,
    /// `datallowconn` and `datconnlimit` before the fence.
    before: (bool, i32),
    /// Whether connections are refused (the fence is up).
    raised: bool,
}

impl Fence {
    /// Opens the fence's sessions and creates its proof slot (before the fence, so
    /// the slot decodes every transaction that could commit after it).
    pub async fn open(
        source: &Endpoint,
        method: FenceMethod,
        slot: &str,
        publication: &str,
    ) -> Result<Fence> {
        let client = fence_session(source).await?;
        let row = client
            .query_one(
                "SELECT current_database()::text, pg_backend_pid(), d.datallowconn, d.datconnlimit \
                 FROM pg_database d WHERE d.datname = current_database()",
                &[],
            )
            .await
            .pg_context(|| "reading the source database".into())?;
        let (database, pid): (String, i32) = (row.get(0), row.get(1));
        let before = (row.get(2), row.get(3));
        let admin = match method {
            FenceMethod::ReadOnly => Some(admin_session(source, &database).await?),
            FenceMethod::None => None,
        };
        let mut fence = Fence {
            endpoint: source.clone(),
            client,
            admin,
            method,
            database,
            slot: slot.to_string(),
            publication: publication.to_string(),
            proof_slot: None,
            own: vec![pid],
            before,
            raised: false,
        };
        fence.create_proof_slot(pid).await?;
        Ok(fence)
    }

    /// Keeps `session` (a switchover session on the source) through the fence.
    pub async fn keep(&mut self, session: &Client) -> Result<()> {
        let pid: i32 = session
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .pg_context(|| "reading a session's backend pid on the source".into())?
            .get(0);
        self.own.push(pid);
        Ok(())
    }

    async fn create_proof_slot(&mut self, pid: i32) -> Result<()> {
        let name = format!("walshuttle_fence_{pid}");
        // A long transaction on the source holds slot creation up; nothing is
        // fenced yet, so giving up only ends the switchover.
        self.client
            .batch_execute("SET statement_timeout = '60s'")
            .await
            .pg_context(|| "preparing the fence session on the source".into())?;
        self.client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput', true)",
                &[&name],
            )
            .await
            .pg_context(|| {
                format!(
                    "creating the fence's temporary replication slot {name} on the source (it proves no write passed the fence; a transaction open for a minute holds its creation up: see pg_stat_activity)"
                )
            })?;
        self.client
            .batch_execute("RESET statement_timeout")
            .await
            .pg_context(|| "preparing the fence session on the source".into())?;
        self.proof_slot = Some(name);
        Ok(())
    }

    /// Raises the fence (see the module doc) and returns the fence LSN.
    pub async fn raise(&mut self, fence_timeout: Duration) -> Result<Raised> {
        let (mut ended, mut cancelled) = (0, 0);
        if let Some(admin) = &self.admin {
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE {} ALLOW_CONNECTIONS false",
                    quote_ident(&self.database)
                ))
                .await
                .pg_context(|| {
                    format!(
                        "fencing database {} on the source (ALTER DATABASE … ALLOW_CONNECTIONS false)",
                        self.database
                    )
                })?;
            self.raised = true;
            (ended, cancelled) = self.end_sessions(fence_timeout).await?;
        }
        let lsn = flushed_position(&self.client).await?;
        if let Some(slot) = &self.proof_slot {
            self.client
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[slot, &lsn.to_string()],
                )
                .await
                .pg_context(|| format!("moving the fence's slot {slot} to the fence LSN {lsn}"))?;
        }
        Ok(Raised {
            method: self.method,
            lsn,
            sessions_ended: ended,
            writes_cancelled: cancelled,
        })
    }

    /// Ends every backend of the database but walshuttle's own (by pid); returns
    /// (ended, cancelled mid-write).
    async fn end_sessions(&self, fence_timeout: Duration) -> Result<(usize, usize)> {
        let started = Instant::now();
        let mut signalled: std::collections::HashMap<i32, Instant> = Default::default();
        let mut cancelled = std::collections::HashSet::new();
        loop {
            let rows = self
                .client
                .query(
                    "SELECT a.pid, a.backend_xid IS NOT NULL FROM pg_stat_activity a \
                     WHERE a.datname = current_database() AND a.pid <> ALL($1::int4[]) \
                       AND a.backend_type IS DISTINCT FROM 'autovacuum worker' \
                       AND a.pid IS DISTINCT FROM \
                           (SELECT s.active_pid FROM pg_replication_slots s WHERE s.slot_name = $2) \
                       AND a.pid NOT IN (SELECT l.pid FROM pg_locks l \
                           WHERE l.locktype = 'advisory' AND l.granted AND l.pid IS NOT NULL AND l.objsubid = 2 \
                             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                             AND l.classid = $3::int4::oid \
                             AND l.objid = (hashtext($2) & 2147483647)::oid)",
                    &[&self.own, &self.slot, &RUN_LOCK_KEY],
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

    /// Reads the proof slot: changes to the replicated tables committed after the
    /// fence LSN.
    pub async fn prove(&self) -> Result<Option<Proof>> {
        let Some(slot) = &self.proof_slot else {
            return Ok(None);
        };
        let row = self
            .client
            .query_one(
                "SELECT pg_current_wal_lsn()::text, count(*), count(DISTINCT xid::text) \
                 FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
                      'proto_version', '1', 'publication_names', $2) \
                 WHERE get_byte(data, 0) IN (73, 85, 68, 84)",
                &[slot, &quote_ident(&self.publication)],
            )
            .await
            .pg_context(|| format!("reading the fence's slot {slot} on the source"))?;
        Ok(Some(Proof {
            checked_to: parse(row.get(0))?,
            changes_after_fence: row.get(1),
            transactions_after_fence: row.get(2),
        }))
    }

    /// Runs `sql` on the admin session, retrying once on a fresh one if it was lost.
    async fn admin(&mut self, sql: &str, what: &str) -> Result<()> {
        let Some(admin) = &self.admin else {
            return Ok(());
        };
        if admin.batch_execute(sql).await.is_err() {
            let fresh = admin_session(&self.endpoint, &self.database).await?;
            fresh
                .batch_execute(sql)
                .await
                .pg_context(|| format!("{what}: run {sql} on the source"))?;
            self.admin = Some(fresh);
        }
        Ok(())
    }

    /// Lifts the fence (when raised): the database takes connections and writes
    /// exactly as before.
    pub async fn lift(&mut self) -> Result<()> {
        self.drop_proof_slot().await;
        if !self.raised {
            return Ok(());
        }
        let db = quote_ident(&self.database);
        let sql = format!(
            "ALTER DATABASE {db} RESET default_transaction_read_only; \
             ALTER DATABASE {db} CONNECTION LIMIT {}; \
             ALTER DATABASE {db} ALLOW_CONNECTIONS {}",
            self.before.1, self.before.0
        );
        self.admin(
            &sql,
            &format!("lifting the fence of database {}", self.database),
        )
        .await?;
        self.raised = false;
        tracing::info!(database = %self.database, "fence lifted: the source takes connections and writes again");
        Ok(())
    }

    /// Leaves the old source closed to the application after a switchover that is
    /// done: connections allowed again, read-only by default, and (without
    /// `reverse`) for superusers only.
    pub async fn settle(&mut self, reverse: bool) -> Result<()> {
        self.drop_proof_slot().await;
        if !self.raised {
            return Ok(());
        }
        let db = quote_ident(&self.database);
        let mut sql = format!("ALTER DATABASE {db} SET default_transaction_read_only = on; ");
        if !reverse {
            sql.push_str(&format!("ALTER DATABASE {db} CONNECTION LIMIT 0; "));
        }
        sql.push_str(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"));
        self.admin(
            &sql,
            &format!(
                "leaving database {} read-only after the switchover",
                self.database
            ),
        )
        .await
    }

    async fn drop_proof_slot(&mut self) {
        if let Some(slot) = self.proof_slot.take() {
            // Temporary: it goes with the session anyway.
            let _ = self
                .client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await;
        }
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

/// A session on another database of the source's cluster (`postgres`, or
/// `template1` when `postgres` is the one fenced), from which the fenced database
/// is closed and opened.
async fn admin_session(source: &Endpoint, fenced: &str) -> Result<Client> {
    let other = if fenced == "postgres" {
        "template1"
    } else {
        "postgres"
    };
    let mut endpoint = source.clone();
    endpoint.config.dbname(other);
    connect(&endpoint, "switchover fence").await.with_context(|| {
        format!(
            "the fence closes database {fenced} from database {other} of the same server (PostgreSQL refuses it from inside): let the source role connect to {other}, or stop the application and pass --fence none"
        )
    })
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

/// The SQL that opens a database a switchover left closed (run from another
/// database of the server), for messages.
pub fn undo_sql(database: &str) -> String {
    let db = quote_ident(database);
    format!(
        "ALTER DATABASE {db} ALLOW_CONNECTIONS true; ALTER DATABASE {db} CONNECTION LIMIT -1; ALTER DATABASE {db} RESET default_transaction_read_only"
    )
}
