//! One replication session: from `START_REPLICATION` to a clean stop or an error.
//!
//! Source transactions are applied in commit order. Small ones are coalesced into
//! one target transaction, committed at a source commit boundary together with the
//! progress row; the session keeps coalescing while more messages are already
//! buffered and commits as soon as the stream goes quiet. Streamed (in-progress)
//! transactions are applied as they arrive, each on its own target connection, with
//! a savepoint per subtransaction, and committed at Stream Commit. The flush position
//! reported to the source covers only source transactions whose target commit is
//! durable (the target's WAL is flushed past it), because apply commits
//! asynchronously.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_postgres::Client;

use super::apply::{Op, TargetSession, FLUSH_BYTES};
use super::copy_positions::{Decision, StreamPositions};
use super::decoder::{self, LogicalMessage, PgTimestamp, Relation};
use super::io::{Incoming, StreamIo};
use super::memory::StreamMemory;
use super::relations::{Fatal, Relations};
use super::restart_point;
use super::spool::Spool;
use crate::config::Endpoint;
use crate::pg::replication::ReplicationClient;
use crate::pg::{connect, quote_ident, Lsn, PgResultExt, QualifiedName};
use crate::state::{Phase, StateStore, TableState};
use crate::wal_budget;

mod captured_ddl;

/// Most source transactions coalesced into one target transaction.
const MAX_BATCH_TXNS: usize = 20_000;
/// Held changes (see [`super::held`]) written to the target in one statement.
const HELD_BATCH: usize = 1000;
/// Held changes read back at a time.
const REPLAY_CHUNK: i64 = 250;
/// How long one target transaction spends applying a table's held changes: the
/// other tables stream in between, while a long copy's backlog drains.
const REPLAY_SLICE: Duration = Duration::from_millis(150);
/// Oldest a coalesced batch may get before it is committed.
const MAX_BATCH_AGE: Duration = Duration::from_millis(500);
/// Longest a clean stop waits for the target.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What woke the session loop.
enum Event {
    Message(Incoming),
    Tick,
}

/// Times the loop keeps across events.
struct Clocks {
    last_expiry: Instant,
    last_switchover: Instant,
}

/// Settings of a replication session.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// Slot (= pipeline) name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// State store on the target.
    pub state: StateStore,
    /// Interval of standby status updates.
    pub status_interval: Duration,
    /// What apply sessions must do about target foreign keys and triggers.
    pub target: crate::target_checks::TargetSetup,
    /// Streamed transactions applied at once on connections of their own; more are
    /// spooled to local disk until they commit.
    pub max_stream_connections: usize,
    /// WAL the slot may hold back on the source before it is released on purpose.
    pub max_retained_wal: Option<u64>,
    /// Keep columns dropped on the source on the target (`--keep-dropped-columns`).
    pub keep_dropped_columns: bool,
    /// What this process learnt in earlier sessions (shared by them).
    pub memory: Arc<StreamMemory>,
    /// Lengthens `run`'s stop deadline while a clean stop waits for the slot's
    /// restart point.
    pub stop_extension: restart_point::StopExtension,
}

/// The transaction being received (between Begin and Commit).
struct CurrentTxn {
    /// Already applied before this session (its end is not past the progress row).
    skip: bool,
    /// Its transaction id, for the copy positions.
    xid: u32,
    /// Its commit LSN (the Begin message's final LSN).
    commit_lsn: Lsn,
}

/// An in-progress streamed transaction and its target connection.
struct StreamedTxn {
    session: TargetSession,
    /// Its backend process id on the target.
    pid: i32,
    savepoints: Vec<u32>,
    current_sub: u32,
    /// Relations it has changed (its connection may hold their locks).
    tables: HashSet<u32>,
}

/// Where a Relation message arrived, which decides where the schema change it
/// shows runs on the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RelationAt {
    /// In a source transaction received whole, applied on the main connection.
    Transaction,
    /// In a streamed transaction applied on a connection of its own.
    Stream(u32),
    /// In a spooled streamed transaction, applied at its commit on the main
    /// connection.
    Replay,
}

struct Session<'a> {
    cfg: &'a StreamConfig,
    source: &'a Endpoint,
    target: &'a Endpoint,
    /// Tables whose rows must be copied again before more of their changes are
    /// trusted (a column added with a volatile default rewrote them on the source).
    pending_resync: Vec<QualifiedName>,
    source_sql: Client,
    relations: Relations,
    relation_cache: HashMap<u32, Relation>,
    /// Relation messages of transactions already applied (skipped): taken in at the
    /// next change of their table that is applied, without running any DDL for
    /// the skipped transaction.
    pending_relations: HashMap<u32, Relation>,
    main: TargetSession,
    streams: HashMap<u32, StreamedTxn>,
    /// Streamed transactions past the connection cap, on disk until they commit.
    spooled: HashMap<u32, Spool>,
    in_stream: Option<u32>,
    current: Option<CurrentTxn>,
    /// Buffered main ops before this index belong to complete source transactions.
    main_mark: usize,
    /// The open main target transaction holds flushed ops of the current, incomplete
    /// source transaction (so it cannot be committed before that one ends).
    main_has_partial: bool,
    batch_txns: usize,
    batch_last: Option<(Lsn, PgTimestamp)>,
    batch_started: Instant,
    applied: Lsn,
    durable: Lsn,
    pending_durable: VecDeque<(Lsn, Lsn)>,
    received: Lsn,
    idle_wal_end: Lsn,
    /// Ranges written outside the stream that it has not passed yet.
    positions: StreamPositions,
    /// A second target connection for position checks, flags and liveness probes.
    monitor: Arc<Client>,
    /// The replication connection, read and answered by its own task.
    io: StreamIo,
    /// Backend process id of the main apply connection on the target.
    main_pid: i32,
    /// Whether values arrive in binary format.
    binary: bool,
    /// Whether the WAL budget warning was logged (until the slot is back under 80%).
    budget_warned: bool,
    /// Bumped by work that is not visible on the target's apply sessions (a table
    /// copied again): the watchdog counts it as progress.
    progress: Arc<std::sync::atomic::AtomicU64>,
    /// Tables being copied while the pipeline streams (`walshuttle tables
    /// add|resync`): their changes are held on the target until the copy is in.
    /// Tables copied again while the source had columns the target had not yet
    /// (see `resync_pending`): copied once more when their shape arrives.
    resync_on_shape: HashSet<QualifiedName>,
    held_tables: HashSet<QualifiedName>,
    /// Held changes not yet written, as `held_changes` rows.
    held_rows: Vec<String>,
    /// Held tables whose copy is in: their held changes are applied next.
    replay_tables: HashSet<QualifiedName>,
    /// Relation oids of tables removed from the pipeline: their changes still in
    /// flight are not applied.
    ignored: HashSet<u32>,
    /// When the target's flushed position was last read.
    last_durable_check: Instant,
    /// Silence from the source after which its connection is considered dead: the
    /// source's own `wal_sender_timeout`, within [5 s, 60 s]. walshuttle asks for a
    /// reply every status interval, so a live source is never silent that long.
    receive_timeout: Duration,
    /// `SELECT pg_current_wal_flush_lsn()`, prepared once on `monitor`.
    flush_lsn_query: tokio_postgres::Statement,
    /// The prefix of the DDL capture trigger's messages, when the pipeline captures
    /// DDL (`--capture-ddl`, see [`crate::ddl_capture`]).
    ddl_prefix: Option<String>,
}

/// Streams changes from the slot into the target until `shutdown` turns true (Ok)
/// or something fails (Err; a [`Fatal`] error must not be retried).
pub async fn stream(
    source: &Endpoint,
    target: &Endpoint,
    cfg: &StreamConfig,
    shutdown: &mut watch::Receiver<bool>,
    streamed: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    // Starting is quick when both sides answer; a side that stopped answering
    // half-way (a network cut while connecting) must not hold it forever.
    let mut session = tokio::time::timeout(START_TIMEOUT, start(source, target, cfg))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "starting the stream took longer than {} s (a server not answering?): reconnecting",
                START_TIMEOUT.as_secs()
            )
        })??;
    streamed.store(true, std::sync::atomic::Ordering::Relaxed);
    let result = session.run(shutdown).await;
    // Best effort, and bounded: a server that stopped answering must not hold us.
    if result.is_err() {
        let cleanup = async {
            for (_, mut st) in session.streams.drain() {
                let _ = st.session.rollback().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), cleanup).await;
    }
    result
}

/// Longest the start of a replication session may take.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything before the first message: state, positions, the replication
/// connection and the session that applies what it sends.
async fn start<'a>(
    source: &'a Endpoint,
    target: &'a Endpoint,
    cfg: &'a StreamConfig,
) -> Result<Session<'a>> {
    let target_client = connect(target, "apply").await?;
    let state = &cfg.state;
    let pipeline = state
        .pipeline(&target_client, &cfg.slot)
        .await?
        .ok_or_else(|| {
            Fatal(format!(
                "pipeline {} has no state on the target: run bootstrap first",
                cfg.slot
            ))
        })?;
    let applied = state
        .progress(&target_client, &cfg.slot)
        .await?
        .or(pipeline.stream_start_lsn)
        .unwrap_or_default();
    let source_sql = connect(source, "lookup").await?;
    crate::switchover::fence::announce_run_session(&source_sql, &cfg.slot).await;
    if let Some(reason) = crate::catchup::gap_reason(&source_sql, &cfg.slot).await? {
        return Err(crate::catchup::SlotGone {
            slot: cfg.slot.clone(),
            reason,
        }
        .into());
    }
    if pipeline.phase == Phase::CatchingUp {
        // A catch-up was interrupted: its new slot is healthy but the repair is not
        // done, so finish it before streaming from that slot.
        return Err(crate::catchup::SlotGone {
            slot: cfg.slot.clone(),
            reason: crate::catchup::GapReason::Resumed,
        }
        .into());
    }
    // Tables being copied while the pipeline streams (their changes are held).
    let entries = state.table_entries(&target_client, &cfg.slot).await?;
    let (held_tables, replay_tables) = held_sets(&entries);
    crate::observe::tables_copying(held_tables.len());
    let binary = !cfg.memory.text_only()
        && binary_capable(&source_sql, &target_client, &pipeline.tables).await?;

    let mut repl = ReplicationClient::connect(source, None)
        .await
        .with_context(|| format!("opening a replication connection to {}", source.redacted))?;
    let _ = repl.simple_query("IDENTIFY_SYSTEM").await?;
    let mut options = vec![
        ("proto_version", "2".to_string()),
        ("publication_names", quote_ident(&cfg.publication)),
        ("binary", if binary { "true" } else { "false" }.to_string()),
        ("streaming", "on".to_string()),
    ];
    let ddl_prefix = if state.capture_ddl(&target_client, &cfg.slot).await? {
        options.push(("messages", "true".to_string()));
        Some(crate::ddl_capture::prefix(&cfg.slot))
    } else {
        None
    };
    let replication = match repl.start_replication(&cfg.slot, applied, &options).await {
        Ok(r) => r,
        Err(e) => {
            // Dropped or invalidated between the check and the start.
            let gone = matches!(e.code().map(|c| c.code()), Some("42704") | Some("55000"));
            if gone {
                if let Some(reason) = crate::catchup::gap_reason(&source_sql, &cfg.slot).await? {
                    return Err(crate::catchup::SlotGone {
                        slot: cfg.slot.clone(),
                        reason,
                    }
                    .into());
                }
            }
            return Err(e.into());
        }
    };
    if pipeline.phase != Phase::Streaming {
        let mut p = pipeline.clone();
        p.phase = Phase::Streaming;
        state.save_pipeline(&target_client, &p).await?;
    }
    if pipeline.stop_reason.is_some() {
        // Streaming again: whatever stopped the last `run` is behind us.
        state
            .set_stop_reason(&target_client, &cfg.slot, None)
            .await?;
    }
    let positions = StreamPositions::load(
        state,
        &target_client,
        &source_sql,
        &cfg.slot,
        applied,
        binary,
    )
    .await?;
    state
        .expire_positions(&target_client, &cfg.slot, applied)
        .await?;
    tracing::info!(slot = %cfg.slot, start = %applied, binary, copy_positions = !positions.is_empty(), "streaming changes");
    crate::observe::set_phase(crate::observe::RunPhase::Streaming, None);

    // Position checks and flags go through their own connection: the apply
    // connection may be in the middle of a COPY.
    let monitor = connect(target, "apply monitor").await?;
    let flush_lsn_query = monitor
        .prepare("SELECT pg_current_wal_flush_lsn()::text")
        .await
        .pg_context(|| "preparing on the target".into())?;
    // If this process vanishes behind a stalled network, the server ends the
    // abandoned apply transaction and frees its locks for the next session.
    target_client
        .batch_execute("SET idle_in_transaction_session_timeout = '5min'")
        .await
        .pg_context(|| "configuring the apply session on the target".into())?;
    // The progress row read at start may not be on the target's disk yet (apply
    // commits asynchronously, and a restart of walshuttle does not flush it): it is
    // confirmed to the source only once the target has flushed past it, like every
    // later commit. Until then the slot stays where it was confirmed before.
    let confirmed: Option<String> = source_sql
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .pg_context(|| "reading the slot's confirmed position on the source".into())?
        .and_then(|r| r.get(0));
    let confirmed: Lsn = confirmed
        .and_then(|c| c.parse::<Lsn>().ok())
        .unwrap_or_default()
        .min(applied);
    let target_insert: String = monitor
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .pg_context(|| "reading the target's WAL position".into())?
        .get(0);
    let mut pending_durable = VecDeque::new();
    if confirmed < applied {
        pending_durable.push_back((applied, target_insert.parse().unwrap_or(Lsn(u64::MAX))));
    }
    let wal_sender_timeout_ms: i64 = source_sql
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .pg_context(|| "reading wal_sender_timeout on the source".into())?
        .get(0);
    let receive_timeout = if wal_sender_timeout_ms <= 0 {
        Duration::from_secs(30)
    } else {
        Duration::from_millis(wal_sender_timeout_ms as u64)
            .clamp(Duration::from_secs(5), Duration::from_secs(60))
    };
    // Tables a previous session found to need copying again, and did not finish.
    let pending_resync: Vec<QualifiedName> = entries
        .iter()
        .filter(|t| t.state == TableState::Resync)
        .map(|t| t.name.clone())
        .collect();
    let main_pid = backend_pid(&target_client).await?;
    let io = StreamIo::start(
        replication,
        applied,
        confirmed,
        cfg.status_interval,
        receive_timeout,
    );
    let session = Session {
        io,
        main_pid,
        binary,
        budget_warned: false,
        progress: Arc::default(),
        held_tables,
        held_rows: Vec::new(),
        resync_on_shape: HashSet::new(),
        replay_tables,
        ignored: HashSet::new(),
        last_durable_check: Instant::now(),
        receive_timeout,
        monitor: Arc::new(monitor),
        flush_lsn_query,
        ddl_prefix,
        cfg,
        source,
        target,
        pending_resync,
        source_sql,
        relations: Relations::new(binary, pipeline.tables.clone()),
        relation_cache: HashMap::new(),
        pending_relations: HashMap::new(),
        main: TargetSession::new(target_client, &cfg.target, state.apply_begin_sql(&cfg.slot))
            .await?,
        streams: HashMap::new(),
        spooled: HashMap::new(),
        in_stream: None,
        current: None,
        main_mark: 0,
        main_has_partial: false,
        batch_txns: 0,
        batch_last: None,
        batch_started: Instant::now(),
        applied,
        durable: confirmed,
        pending_durable,
        received: applied,
        idle_wal_end: Lsn::ZERO,
        positions,
    };
    Ok(session)
}

/// The tables whose changes are held (being copied, or copied with held changes
/// still to apply), and those of them whose copy is in.
fn held_sets(
    entries: &[crate::state::TableEntry],
) -> (HashSet<QualifiedName>, HashSet<QualifiedName>) {
    let held = entries
        .iter()
        .filter(|e| matches!(e.state, TableState::Held | TableState::Copied))
        .map(|e| e.name.clone())
        .collect();
    let replay = entries
        .iter()
        .filter(|e| e.state == TableState::Copied)
        .map(|e| e.name.clone())
        .collect();
    (held, replay)
}

/// The backend process id of a target connection (for liveness probes).
async fn backend_pid(client: &Client) -> Result<i32> {
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .pg_context(|| "reading the apply session's process id on the target".into())?
        .get(0))
}

/// Resolves with why when the replication task reports the source silent or the
/// connection broken.
async fn source_fault(mut fault: watch::Receiver<Option<String>>) -> anyhow::Error {
    loop {
        if let Some(why) = fault.borrow().clone() {
            return anyhow::anyhow!("{why}");
        }
        if fault.changed().await.is_err() {
            return anyhow::anyhow!("the replication connection ended");
        }
    }
}

/// How often a step in progress is checked on the target.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Resolves with why when the target stops answering (a probe takes longer than
/// `limit`) or none of walshuttle's apply sessions on it (`pids`) has been active
/// for `limit` while a step waits for it: a stalled network. A step whose session
/// works, or waits for a lock, is never cut short.
async fn watch_target(
    monitor: Arc<Client>,
    pids: Vec<i32>,
    progress: Arc<std::sync::atomic::AtomicU64>,
    limit: Duration,
) -> anyhow::Error {
    let mut quiet_since: Option<Instant> = None;
    let mut seen = progress.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&pids];
        let probe = monitor.query_one(
            "SELECT count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity WHERE pid = ANY($1)",
            &params,
        );
        let active: i64 = match tokio::time::timeout(limit, probe).await {
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
            Ok(Ok(row)) => row.get(0),
        };
        let now = progress.load(std::sync::atomic::Ordering::Relaxed);
        if active > 0 || now != seen {
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

/// The subtransaction of a change message inside a streamed block (`None` for any
/// other message).
fn change_subxid(message: &LogicalMessage) -> Option<u32> {
    match message {
        LogicalMessage::Insert(m) => m.xid,
        LogicalMessage::Update(m) => m.xid,
        LogicalMessage::Delete(m) => m.xid,
        LogicalMessage::Truncate(t) => t.xid,
        _ => None,
    }
}

/// Whether every pipeline table can take pgoutput's binary values: identical,
/// database-independent types on both sides.
async fn binary_capable(
    source: &Client,
    target: &Client,
    tables: &[QualifiedName],
) -> Result<bool> {
    use futures_util::{StreamExt, TryStreamExt};
    // The futures are made first: a closure inside the stream would not be `Send`
    // for every lifetime, which `tokio::spawn` of `run` needs.
    let checks: Vec<_> = tables
        .iter()
        .map(|name| table_binary_capable(source, target, name))
        .collect();
    let each: Vec<bool> = futures_util::stream::iter(checks)
        .buffered(crate::catalog::PIPELINE_DEPTH)
        .try_collect()
        .await?;
    Ok(each.into_iter().all(|b| b))
}

/// [`binary_capable`] for one table.
async fn table_binary_capable(
    source: &Client,
    target: &Client,
    name: &QualifiedName,
) -> Result<bool> {
    let Some(mut table) = crate::catalog::load_table(source, name).await? else {
        return Err(Fatal(format!(
            "table {name} of this pipeline no longer exists on the source"
        ))
        .into());
    };
    // Columns added on the source since the target table was made are added by
    // the stream when their first change arrives (see `added_columns`).
    if let Some(existing) = crate::catalog::load_table(target, name).await? {
        let (present, added): (Vec<_>, Vec<_>) = table
            .columns
            .into_iter()
            .partition(|c| existing.columns.iter().any(|t| t.name == c.name));
        table.columns = present;
        if added.iter().any(|c| !c.binary_portable) {
            return Ok(false);
        }
    }
    match crate::catalog::check_target(target, &table).await {
        Ok(fit) => Ok(fit.binary()),
        // A lost connection is retried; an incompatible table is not.
        Err(e) if source.is_closed() || target.is_closed() => Err(e),
        Err(e) => Err(Fatal(e.to_string()).into()),
    }
}

impl Session<'_> {
    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        let mut tick = tokio::time::interval(self.cfg.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut clocks = Clocks {
            last_expiry: Instant::now(),
            last_switchover: Instant::now(),
        };
        loop {
            if *shutdown.borrow() {
                // A stalled target must not keep a stop from finishing: what was
                // not confirmed is simply streamed again next time.
                match tokio::time::timeout(STOP_TIMEOUT, self.stop()).await {
                    Ok(result) => result?,
                    Err(_) => {
                        tracing::warn!("the target did not answer while stopping; stopping anyway (nothing is lost: unconfirmed changes are sent again)");
                        return Ok(());
                    }
                }
                self.settle_restart_point().await;
                // The replication task sends the final position, asks for a reply
                // and waits for it: the walsender answers after it has taken the
                // position in, so the slot shows it once this process is gone.
                self.publish_flush();
                self.io.stop_gracefully().await;
                tracing::info!(applied = %self.applied, flushed = %self.flush_position(), "stopped cleanly");
                return Ok(());
            }
            let event = tokio::select! {
                message = self.io.recv() => Event::Message(message?),
                _ = tick.tick() => Event::Tick,
                _ = shutdown.changed() => continue,
            };
            // A step may take long (a large keyless update, a table copied again)
            // and is never cut short while it works; it is abandoned when the source
            // goes silent (the replication task notices) or the target stops
            // answering or making progress.
            let fault = self.io.fault_watch();
            let watchdog = watch_target(
                Arc::clone(&self.monitor),
                self.backend_pids(),
                Arc::clone(&self.progress),
                self.receive_timeout,
            );
            let mut step = std::pin::pin!(self.on_event(event, &mut clocks));
            // Most messages are handled without waiting for anything (a change is
            // buffered for the next flush): those never arm the watchdogs (a timer
            // and a watch per message were about a quarter of walshuttle's CPU in a
            // backlog of single-row transactions, bench/backlog.sh).
            if let Some(done) = futures_util::FutureExt::now_or_never(step.as_mut()) {
                done?;
                continue;
            }
            tokio::select! {
                done = step => done?,
                why = source_fault(fault) => return Err(why),
                why = watchdog => return Err(why),
            }
        }
    }

    /// Reads how much WAL the slot holds back on the source (for `/metrics`), and
    /// ends the session with [`wal_budget::OverBudget`] once it reaches the budget.
    async fn record_slot_wal(&mut self) -> Result<()> {
        let Some(wal) = wal_budget::measure(&self.source_sql, &self.cfg.slot).await? else {
            return Ok(());
        };
        let limit = wal_budget::limit(self.cfg.max_retained_wal, wal.keep_size);
        crate::observe::slot_wal(wal.retained, wal.keep_size, limit);
        match wal_budget::judge(wal, self.cfg.max_retained_wal) {
            wal_budget::Verdict::Release => Err(wal_budget::OverBudget {
                slot: self.cfg.slot.clone(),
                retained: wal.retained,
                limit: limit.unwrap_or(wal.retained),
            }
            .into()),
            wal_budget::Verdict::Warn => {
                if !self.budget_warned {
                    tracing::warn!(slot = %self.cfg.slot, retained = wal.retained, limit = ?limit, "the slot holds over 80% of its WAL budget: at the budget it is dropped and the gap later repaired by catch-up");
                    self.budget_warned = true;
                }
                Ok(())
            }
            wal_budget::Verdict::Fine => {
                self.budget_warned = false;
                Ok(())
            }
        }
    }

    /// Backend process ids of every apply connection on the target.
    fn backend_pids(&self) -> Vec<i32> {
        let mut pids = vec![self.main_pid];
        pids.extend(self.streams.values().map(|s| s.pid));
        pids
    }

    async fn on_event(&mut self, event: Event, clocks: &mut Clocks) -> Result<()> {
        match event {
            Event::Message(Incoming::Data {
                wal_start, data, ..
            }) => {
                self.received = self.received.max(wal_start);
                let message =
                    decoder::decode_bytes(&data, self.in_stream.is_some()).map_err(|e| {
                        anyhow::anyhow!("malformed replication message at {wal_start}: {e}")
                    })?;
                // A spooled transaction's changes go to disk as they came.
                // Captured DDL is kept like a change of its subtransaction.
                let sub = change_subxid(&message).or_else(|| match &message {
                    LogicalMessage::Message(m) if self.ddl_prefix.as_deref() == Some(&m.prefix) => {
                        m.xid
                    }
                    _ => None,
                });
                let spool = self.in_stream.and_then(|top| self.spooled.get_mut(&top));
                match (spool, sub) {
                    (Some(spool), Some(sub)) => spool.append(sub, &data)?,
                    // Its shape changes are applied at their place when it commits.
                    (Some(spool), None) if matches!(message, LogicalMessage::Relation(_)) => {
                        spool.append_relation(&data)
                    }
                    _ => self.handle(message).await?,
                }
            }
            Event::Message(Incoming::Keepalive { wal_end }) => {
                self.received = self.received.max(wal_end);
                if self.is_idle() {
                    self.idle_wal_end = self.idle_wal_end.max(wal_end);
                    self.publish_flush();
                }
                let applied = self.flush_position().max(self.applied);
                crate::observe::stream_position(wal_end, applied, self.is_idle());
            }
            Event::Tick => self.on_tick(clocks).await?,
        }
        // Coalesce while more is already waiting; commit as soon as the stream
        // goes quiet, whatever message came last.
        if self.batch_txns > 0
            && self.current.is_none()
            && self.in_stream.is_none()
            && !self.io.has_waiting()
        {
            self.commit_batch().await?;
        }
        Ok(())
    }

    /// The periodic work: commit a waiting batch, learn what is durable, report to
    /// the source, record the oldest open source transaction.
    async fn on_tick(&mut self, clocks: &mut Clocks) -> Result<()> {
        if self.batch_txns > 0 && self.current.is_none() {
            self.commit_batch().await?;
        }
        if self.is_idle() && self.tables_changing().await? {
            // A copy by `walshuttle tables` is running or just in: its held changes
            // are applied, and the table joins, without waiting for the next source
            // transaction.
            loop {
                let version = self.main.begin().await?;
                self.refresh_positions(version).await?;
                self.replay_held().await?;
                self.main.commit("SELECT 1").await?;
                if self.replay_tables.is_empty() || self.io.has_waiting() {
                    break;
                }
            }
        }
        self.resync_pending().await?;
        self.check_durable().await?;
        self.publish_flush();
        let applied = self.flush_position().max(self.applied);
        crate::observe::stream_position(self.received, applied, self.is_idle());
        if clocks.last_switchover.elapsed() >= Duration::from_secs(1) {
            // A `walshuttle switchover` records its phase on the target; /metrics
            // shows it while it runs.
            clocks.last_switchover = Instant::now();
            match self
                .cfg
                .state
                .switchover(&*self.monitor, &self.cfg.slot)
                .await
            {
                Ok(s) => crate::observe::switchover_phase(s.as_ref().map(|(p, _, _)| p.as_str())),
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "could not read the switchover phase")
                }
            }
        }
        if clocks.last_expiry.elapsed() >= Duration::from_secs(10) {
            // Copy positions the stream has passed are forgotten on the target too.
            self.cfg
                .state
                .expire_positions(&*self.monitor, &self.cfg.slot, self.durable)
                .await?;
            self.record_slot_wal().await?;
            clocks.last_expiry = Instant::now();
        }
        Ok(())
    }

    /// Whether a `walshuttle tables` command may be waiting on this session: a table
    /// is held or copied, or the pipeline's tables or positions changed since they
    /// were read.
    async fn tables_changing(&self) -> Result<bool> {
        if !(self.held_tables.is_empty() && self.replay_tables.is_empty()) {
            return Ok(true);
        }
        let version = self
            .cfg
            .state
            .positions_version(&*self.monitor, &self.cfg.slot)
            .await?;
        Ok(version != self.positions.version())
    }

    fn is_idle(&self) -> bool {
        self.current.is_none()
            && self.streams.is_empty()
            && self.spooled.is_empty()
            && self.batch_txns == 0
            && !self.main.in_txn()
            && self.main.buffered() == 0
    }

    async fn handle(&mut self, message: LogicalMessage) -> Result<()> {
        match message {
            LogicalMessage::Begin(b) => {
                if self.batch_txns == 0 {
                    self.batch_started = Instant::now();
                }
                let skip = b.final_lsn < self.applied;
                self.main.note_source_txn(b.final_lsn);
                self.current = Some(CurrentTxn {
                    skip,
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                });
            }
            LogicalMessage::Commit(c) => {
                let Some(txn) = self.current.take() else {
                    anyhow::bail!("Commit without Begin at {}", c.commit_lsn);
                };
                if txn.skip {
                    return Ok(());
                }
                self.main_mark = self.main.buffered();
                self.main_has_partial = false;
                self.batch_txns += 1;
                self.batch_last = Some((c.end_lsn, c.commit_time));
                if !self.io.has_waiting()
                    || self.batch_txns >= MAX_BATCH_TXNS
                    || self.main.buffered_bytes() >= FLUSH_BYTES
                    || self.batch_started.elapsed() >= MAX_BATCH_AGE
                {
                    self.commit_batch().await?;
                }
            }
            LogicalMessage::Relation(rel) => {
                let at = match (self.in_stream, rel.xid) {
                    (Some(top), Some(_)) => RelationAt::Stream(top),
                    _ => RelationAt::Transaction,
                };
                self.on_relation(rel, at).await?
            }
            LogicalMessage::Insert(m) => {
                self.on_change(
                    m.xid,
                    Op::Insert {
                        rel: m.relation_oid,
                        new: m.new,
                    },
                )
                .await?
            }
            LogicalMessage::Update(m) => {
                self.on_change(
                    m.xid,
                    Op::Update {
                        rel: m.relation_oid,
                        old: m.old,
                        new: m.new,
                    },
                )
                .await?
            }
            LogicalMessage::Delete(m) => {
                self.on_change(
                    m.xid,
                    Op::Delete {
                        rel: m.relation_oid,
                        old: m.old,
                    },
                )
                .await?
            }
            LogicalMessage::Truncate(t) => {
                self.on_truncate(t.xid, &t.relation_oids, t.restart_identity)
                    .await?
            }
            LogicalMessage::StreamStart(s) => {
                // The main batch commits first: it must not hold locks a streamed
                // transaction waits for.
                self.commit_batch().await?;
                // A transaction that changed a table's definition after writing to
                // it is kept on disk and applied whole at its commit (see
                // `on_relation`).
                let whole = self.cfg.memory.is_whole(s.xid);
                if !self.streams.contains_key(&s.xid)
                    && !self.spooled.contains_key(&s.xid)
                    && (whole || self.streams.len() >= self.cfg.max_stream_connections)
                {
                    if !s.first_segment {
                        anyhow::bail!(
                            "streamed transaction {} continued without its first segment",
                            s.xid
                        );
                    }
                    tracing::debug!(xid = s.xid, "more streamed transactions than --max-stream-connections: spooling this one to disk until it commits");
                    self.spooled.insert(s.xid, Spool::new()?);
                }
                if !self.streams.contains_key(&s.xid) && !self.spooled.contains_key(&s.xid) {
                    if !s.first_segment {
                        anyhow::bail!(
                            "streamed transaction {} continued without its first segment",
                            s.xid
                        );
                    }
                    let client = connect(self.target, "apply stream").await?;
                    let pid = backend_pid(&client).await?;
                    let mut session = TargetSession::new(
                        client,
                        &self.cfg.target,
                        self.cfg.state.apply_begin_sql(&self.cfg.slot),
                    )
                    .await?;
                    session.note_streamed(s.xid);
                    let version = session.begin().await?;
                    self.refresh_positions(version).await?;
                    self.streams.insert(
                        s.xid,
                        StreamedTxn {
                            session,
                            pid,
                            savepoints: Vec::new(),
                            current_sub: s.xid,
                            tables: HashSet::new(),
                        },
                    );
                }
                self.in_stream = Some(s.xid);
            }
            LogicalMessage::StreamStop => {
                if let Some(xid) = self.in_stream.take() {
                    if let Some(st) = self.streams.get_mut(&xid) {
                        st.session.flush(&self.relations).await?;
                    }
                }
            }
            LogicalMessage::StreamAbort(a) if self.spooled.contains_key(&a.xid) => {
                if a.subxid == a.xid {
                    self.spooled.remove(&a.xid);
                    self.cfg.memory.forget_whole(a.xid);
                } else if let Some(spool) = self.spooled.get_mut(&a.xid) {
                    spool.abort_subxact(a.subxid)?;
                }
            }
            LogicalMessage::StreamCommit(c) if self.spooled.contains_key(&c.xid) => {
                self.commit_batch().await?;
                if let Some(spool) = self.spooled.remove(&c.xid) {
                    let xid = c.xid;
                    self.apply_spooled(spool, c).await?;
                    self.cfg.memory.forget_whole(xid);
                }
            }
            LogicalMessage::StreamAbort(a) => {
                if a.subxid == a.xid {
                    if let Some(mut st) = self.streams.remove(&a.xid) {
                        st.session.rollback().await?;
                    }
                } else if let Some(st) = self.streams.get_mut(&a.xid) {
                    if let Some(pos) = st.savepoints.iter().position(|s| *s == a.subxid) {
                        st.session.flush(&self.relations).await?;
                        st.session
                            .execute_in_txn(&format!("ROLLBACK TO SAVEPOINT s{}", a.subxid))
                            .await?;
                        st.savepoints.truncate(pos + 1);
                    }
                }
            }
            LogicalMessage::StreamCommit(c) => {
                self.commit_batch().await?;
                let Some(mut st) = self.streams.remove(&c.xid) else {
                    return Ok(());
                };
                if c.commit_lsn < self.applied {
                    st.session.rollback().await?;
                    return Ok(());
                }
                st.session.flush(&self.relations).await?;
                let sql = self.progress_sql(c.end_lsn, c.commit_time);
                let target_lsn = st.session.commit(&sql).await?;
                self.committed(c.end_lsn, target_lsn);
                crate::observe::transactions_applied(1, c.commit_time);
                self.report_after_commit().await?;
            }
            LogicalMessage::Message(m) => self.on_message(m).await?,
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) => {}
        }
        Ok(())
    }

    /// Applies a spooled streamed transaction that committed, through the main
    /// session, reading its messages back one at a time.
    async fn apply_spooled(&mut self, spool: Spool, c: decoder::StreamCommit) -> Result<()> {
        if c.commit_lsn < self.applied {
            return Ok(());
        }
        let messages = spool.messages();
        let mut reader = spool.into_reader()?;
        self.main.note_source_txn(c.commit_lsn);
        let version = self.main.begin().await?;
        self.refresh_positions(version).await?;
        self.replay_held().await?;
        while let Some(data) = reader.next_message()? {
            let message = decoder::decode_bytes(&data, true).map_err(|e| {
                anyhow::anyhow!("malformed spooled message of transaction {}: {e}", c.xid)
            })?;
            let op = match message {
                LogicalMessage::Insert(m) => Op::Insert {
                    rel: m.relation_oid,
                    new: m.new,
                },
                LogicalMessage::Update(m) => Op::Update {
                    rel: m.relation_oid,
                    old: m.old,
                    new: m.new,
                },
                LogicalMessage::Delete(m) => Op::Delete {
                    rel: m.relation_oid,
                    old: m.old,
                },
                LogicalMessage::Truncate(t) => {
                    for oid in &t.relation_oids {
                        self.ensure_relation(*oid, RelationAt::Replay).await?;
                    }
                    self.truncate_on_main(
                        c.commit_lsn,
                        c.xid,
                        &t.relation_oids,
                        t.restart_identity,
                    )
                    .await?;
                    continue;
                }
                // A shape change inside the transaction: at its place.
                LogicalMessage::Relation(rel) => {
                    self.on_relation(rel, RelationAt::Replay).await?;
                    continue;
                }
                LogicalMessage::Message(m) => {
                    self.on_captured_ddl(&m, RelationAt::Replay).await?;
                    continue;
                }
                _ => continue,
            };
            self.ensure_relation(op.rel(), RelationAt::Replay).await?;
            if self.ignored.contains(&op.rel()) || self.hold(c.commit_lsn, c.xid, &op).await? {
                continue;
            }
            let Some(op) = self.filter(c.xid, op)? else {
                continue;
            };
            self.main.push(op);
            if self.main.buffered_bytes() >= FLUSH_BYTES {
                self.main.flush(&self.relations).await?;
            }
        }
        self.main.flush(&self.relations).await?;
        self.flush_held().await?;
        let sql = self.progress_sql(c.end_lsn, c.commit_time);
        let target_lsn = self.main.commit(&sql).await?;
        self.committed(c.end_lsn, target_lsn);
        crate::observe::transactions_applied(1, c.commit_time);
        tracing::debug!(
            xid = c.xid,
            messages,
            "applied a spooled streamed transaction"
        );
        self.report_after_commit().await
    }

    /// Reloads the copy positions when a transaction just opened (`version` is
    /// what it read under the positions lock) sees a newer version than the session
    /// holds: a rewrite outside the stream committed meanwhile.
    async fn refresh_positions(&mut self, version: Option<i64>) -> Result<()> {
        let Some(version) = version else {
            return Ok(());
        };
        if version == self.positions.version() {
            return Ok(());
        }
        // The tables first, then the positions: a copy commits its table's state and
        // its positions together, so positions read after the states hold those of
        // every table seen copied. (Read the other way round, a copy committing
        // between the two reads left a table replayed and joined to the stream with
        // no positions to skip what its snapshot saw: a duplicate row.)
        self.reload_tables().await?;
        self.positions = StreamPositions::load(
            &self.cfg.state,
            &self.monitor,
            &self.source_sql,
            &self.cfg.slot,
            self.applied,
            self.binary,
        )
        .await?;
        Ok(())
    }

    /// Reads the pipeline's tables again (`walshuttle tables add|remove|resync`
    /// changed them): which are carried, and whose changes are held.
    async fn reload_tables(&mut self) -> Result<()> {
        let entries = self
            .cfg
            .state
            .table_entries(&*self.monitor, &self.cfg.slot)
            .await?;
        let (held, replay) = held_sets(&entries);
        let joining: Vec<QualifiedName> = held
            .iter()
            .filter(|t| !self.relations.is_allowed(t))
            .cloned()
            .collect();
        if self.binary
            && !joining.is_empty()
            && !binary_capable(&self.source_sql, &self.monitor, &joining).await?
        {
            anyhow::bail!(
                "a table joining the pipeline has values that cannot be received in binary: reconnecting to receive every value as text"
            );
        }
        let names: Vec<QualifiedName> = entries.into_iter().map(|e| e.name).collect();
        for oid in self.relations.set_allowed(names) {
            // Removed from the pipeline: its changes still in flight are not applied.
            self.ignored.insert(oid);
            self.relation_cache.remove(&oid);
        }
        crate::observe::tables_copying(held.len());
        self.held_tables = held;
        self.replay_tables = replay;
        Ok(())
    }

    /// Whether the pipeline's publication on the source carries `table`.
    async fn in_publication(&self, table: &QualifiedName) -> Result<bool> {
        Ok(self
            .source_sql
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&self.cfg.publication, &table.schema, &table.name],
            )
            .await
            .pg_context(|| format!("looking up {table} in the publication"))?
            .is_some())
    }

    /// The table of relation `oid` when its changes are held (its copy is running).
    fn held_table(&self, oid: u32) -> Result<Option<QualifiedName>> {
        if self.held_tables.is_empty() {
            return Ok(None);
        }
        let table = &self.relations.get(oid)?.name;
        Ok(self.held_tables.contains(table).then(|| table.clone()))
    }

    /// Whether changes of relation `oid` cannot be applied on a streamed
    /// transaction's own connection now: its table's copy is running, or is in with
    /// held changes still to apply first (both happen on the main connection).
    fn held_or_replaying(&self, oid: u32) -> Result<bool> {
        if self.held_tables.is_empty() && self.replay_tables.is_empty() {
            return Ok(false);
        }
        let table = &self.relations.get(oid)?.name;
        Ok(self.held_tables.contains(table) || self.replay_tables.contains(table))
    }

    /// Holds `op` when its table is being copied (see [`super::held`]): written to
    /// `held_changes` in the open main transaction instead of applied. Returns
    /// whether it was held.
    async fn hold(&mut self, commit_lsn: Lsn, xid: u32, op: &Op) -> Result<bool> {
        let Some(table) = self.held_table(op.rel())? else {
            return Ok(false);
        };
        self.hold_change(&table, commit_lsn, xid, &super::held::encode(op))
            .await?;
        Ok(true)
    }

    async fn hold_change(
        &mut self,
        table: &QualifiedName,
        commit_lsn: Lsn,
        xid: u32,
        change: &[u8],
    ) -> Result<()> {
        let row =
            self.cfg
                .state
                .held_row(&self.cfg.slot, table, commit_lsn, xid, self.binary, change);
        self.held_rows.push(row);
        if self.held_rows.len() >= HELD_BATCH {
            self.flush_held().await?;
        }
        Ok(())
    }

    /// Writes the held changes buffered so far, in the open main transaction: before
    /// it commits, and before held changes are read back.
    async fn flush_held(&mut self) -> Result<()> {
        if self.held_rows.is_empty() {
            return Ok(());
        }
        let sql = self.cfg.state.hold_sql(&self.held_rows);
        self.held_rows.clear();
        self.main.execute_in_txn(&sql).await
    }

    /// Applies, in the open main transaction, a TRUNCATE of a source transaction
    /// (`xid`, committing at `commit_lsn`): tables removed from the pipeline are left
    /// alone, those being copied hold it, the copy positions decide the rest.
    async fn truncate_on_main(
        &mut self,
        commit_lsn: Lsn,
        xid: u32,
        oids: &[u32],
        restart_identity: bool,
    ) -> Result<()> {
        let mut apply = Vec::with_capacity(oids.len());
        for oid in oids {
            if self.ignored.contains(oid) {
                continue;
            }
            if let Some(table) = self.held_table(*oid)? {
                let change = super::held::encode_truncate(*oid, restart_identity);
                self.hold_change(&table, commit_lsn, xid, &change).await?;
                continue;
            }
            let table = &self.relations.get(*oid)?.name;
            if self.positions.is_empty() || self.positions.truncate(table, xid)? {
                apply.push(*oid);
            }
        }
        if let Some(sql) = self.truncate_sql(&apply, restart_identity)? {
            self.main.flush(&self.relations).await?;
            self.main.execute_in_txn(&sql).await?;
        }
        Ok(())
    }

    /// Applies, in the open main transaction, changes held for tables whose copy is
    /// in (through its copy position: what its snapshot saw is skipped), for at most
    /// [`REPLAY_SLICE`] per table and transaction, so the other tables keep
    /// streaming while a long copy's backlog drains; the table's new changes are held
    /// behind it meanwhile. A table whose backlog is drained joins the stream.
    async fn replay_held(&mut self) -> Result<()> {
        if self.replay_tables.is_empty() {
            return Ok(());
        }
        self.flush_held().await?;
        let tables: Vec<QualifiedName> = self.replay_tables.iter().cloned().collect();
        for table in tables {
            // Its shape: from this session's Relation message, or as pgoutput would
            // describe it now.
            let oid = match self.relations.oid_of(&table) {
                Some(oid) => oid,
                None => {
                    let rel = super::drift::catalog_relation(&self.source_sql, &table).await?;
                    let oid = rel.oid;
                    self.on_relation(rel, RelationAt::Transaction).await?;
                    oid
                }
            };
            // What the table's copies saw (one snapshot, or one per key range),
            // however far the stream is past them now.
            let copies = StreamPositions::for_table(
                &self.cfg.state,
                &self.main.client,
                &self.source_sql,
                &self.cfg.slot,
                &table,
                self.binary,
            )
            .await?;
            if copies.is_empty() {
                return Err(Fatal(format!(
                    "{table} is marked copied but its copy position is missing: run `walshuttle tables resync {}`",
                    table.quoted()
                ))
                .into());
            }
            let started = Instant::now();
            let drained = loop {
                let drained = self.replay_chunk(&table, oid, &copies).await?;
                if drained || started.elapsed() >= REPLAY_SLICE {
                    break drained;
                }
            };
            if self.current.is_some() {
                self.main_mark = 0;
                self.main_has_partial = true;
            }
            if !drained {
                tracing::debug!(table = %table, "applied held changes of a copied table; more are held");
                continue;
            }
            self.cfg
                .state
                .set_table_state(
                    &self.main.client,
                    &self.cfg.slot,
                    Some(&table),
                    TableState::Ready,
                )
                .await?;
            self.held_tables.remove(&table);
            self.replay_tables.remove(&table);
            crate::observe::tables_copying(self.held_tables.len());
            // From here its changes are decided by the copies its held changes were
            // replayed through, until the stream passes them.
            self.positions.adopt(&table, &copies, self.applied);
            tracing::info!(table = %table, "the table's copy is in and the changes held meanwhile are applied: it streams with the others now");
        }
        Ok(())
    }

    /// Applies the oldest [`REPLAY_CHUNK`] changes held for `table` (relation `oid`)
    /// that `snapshot` did not see, and forgets them; returns whether none are left.
    async fn replay_chunk(
        &mut self,
        table: &QualifiedName,
        oid: u32,
        copies: &StreamPositions,
    ) -> Result<bool> {
        let held = self
            .cfg
            .state
            .held_changes(&self.main.client, &self.cfg.slot, table, REPLAY_CHUNK)
            .await?;
        let drained = (held.len() as i64) < REPLAY_CHUNK;
        let mut seqs = Vec::with_capacity(held.len());
        for (seq, xid, binary, change) in held {
            seqs.push(seq);
            if binary != self.binary {
                return Err(Fatal(format!(
                    "changes of {table} were held with values in {} but the stream now receives them in {} (the pipeline's tables changed meanwhile): run `walshuttle tables resync {}`",
                    if binary { "binary" } else { "text" },
                    if self.binary { "binary" } else { "text" },
                    table.quoted()
                ))
                .into());
            }
            let message = decoder::decode_bytes(&bytes::Bytes::from(change), false)
                .map_err(|e| anyhow::anyhow!("malformed held change of {table}: {e}"))?;
            let op = match message {
                LogicalMessage::Insert(m) => Op::Insert {
                    rel: oid,
                    new: m.new,
                },
                LogicalMessage::Update(m) => Op::Update {
                    rel: oid,
                    old: m.old,
                    new: m.new,
                },
                LogicalMessage::Delete(m) => Op::Delete {
                    rel: oid,
                    old: m.old,
                },
                LogicalMessage::Truncate(t) => {
                    // Skipped when the copies saw it, applied when none did.
                    if !copies.truncate(table, xid)? {
                        continue;
                    }
                    if let Some(sql) = self.truncate_sql(&[oid], t.restart_identity)? {
                        self.main.flush(&self.relations).await?;
                        self.main.execute_in_txn(&sql).await?;
                    }
                    continue;
                }
                _ => continue,
            };
            // What the copy holding the row saw, the copy holds already.
            let columns = &self.relations.get(oid)?.column_names;
            let op = match copies.decide(table, columns, xid, op) {
                Decision::Apply(op) => op,
                Decision::Skip => continue,
                Decision::Refetch => {
                    return Err(Fatal(format!(
                        "a key change in {table} moved a row with unchanged TOASTed values between key ranges copied under different snapshots: run `walshuttle tables resync {}`",
                        table.quoted()
                    ))
                    .into())
                }
            };
            self.main.push(op);
            if self.main.buffered_bytes() >= FLUSH_BYTES {
                self.main.flush(&self.relations).await?;
            }
        }
        self.main.flush(&self.relations).await?;
        self.cfg
            .state
            .forget_held(&self.main.client, &self.cfg.slot, table, &seqs)
            .await?;
        Ok(drained)
    }

    /// Applies the copy positions to a change of transaction `xid`: `None` when the
    /// copies holding its rows already reflect it.
    fn filter(&self, xid: u32, op: Op) -> Result<Option<Op>> {
        if self.positions.is_empty() {
            return Ok(Some(op));
        }
        let shape = self.relations.get(op.rel())?;
        match self
            .positions
            .decide(&shape.name, &shape.column_names, xid, op)
        {
            Decision::Apply(op) => Ok(Some(op)),
            Decision::Skip => Ok(None),
            Decision::Refetch => Err(Fatal(format!(
                "a key change in {} moved a row with unchanged TOASTed values from a range copied later into one copied earlier, inside the window of a resumed copy: run `walshuttle verify --repair --tables {}` and then `walshuttle run` again",
                shape.name,
                shape.name.quoted()
            ))
            .into()),
        }
    }

    async fn on_change(&mut self, xid: Option<u32>, op: Op) -> Result<()> {
        if let (Some(top), Some(sub)) = (self.in_stream, xid) {
            self.ensure_relation(op.rel(), RelationAt::Stream(top))
                .await?;
            if self.ignored.contains(&op.rel()) {
                return Ok(());
            }
            if self.held_or_replaying(op.rel())? {
                self.cfg.memory.apply_whole(top);
                anyhow::bail!(
                    "streamed transaction {top} writes a table whose copy is running: reconnecting to receive it again and apply it whole at its commit, after the table's held changes"
                );
            }
            if let Some(st) = self.streams.get_mut(&top) {
                st.tables.insert(op.rel());
            }
            let Some(op) = self.filter(top, op)? else {
                return Ok(());
            };
            let Some(st) = self.streams.get_mut(&top) else {
                anyhow::bail!("change for unknown streamed transaction {top}");
            };
            if sub != st.current_sub {
                if sub != top && !st.savepoints.contains(&sub) {
                    st.session.flush(&self.relations).await?;
                    st.session
                        .execute_in_txn(&format!("SAVEPOINT s{sub}"))
                        .await?;
                    st.savepoints.push(sub);
                }
                st.current_sub = sub;
            }
            // Streamed (large) transactions buffer and flush in 8 MiB batches: measured
            // faster than feeding an open COPY row by row when both servers share the
            // CPU with walshuttle.
            st.session.push(op);
            if st.session.buffered_bytes() >= FLUSH_BYTES {
                st.session.flush(&self.relations).await?;
            }
            return Ok(());
        }
        let Some(txn) = &self.current else {
            anyhow::bail!("change outside a transaction");
        };
        if txn.skip {
            return Ok(());
        }
        let (xid, commit_lsn) = (txn.xid, txn.commit_lsn);
        self.ensure_relation(op.rel(), RelationAt::Transaction)
            .await?;
        if self.ignored.contains(&op.rel()) {
            return Ok(());
        }
        // The target transaction opens (under the positions lock) before deciding
        // what the copies already hold.
        let version = self.main.begin().await?;
        self.refresh_positions(version).await?;
        if version.is_some() {
            self.replay_held().await?;
        }
        if self.hold(commit_lsn, xid, &op).await? {
            self.main_mark = 0;
            self.main_has_partial = true;
            return Ok(());
        }
        let Some(op) = self.filter(xid, op)? else {
            return Ok(());
        };
        if self.main.push_or_stream(op, &self.relations).await? {
            // Rows of this unfinished transaction are in the target transaction now.
            self.main_mark = 0;
            self.main_has_partial = true;
            return Ok(());
        }
        if self.main.buffered_bytes() >= FLUSH_BYTES {
            // A large transaction: commit the complete ones before it, then let it
            // have the target transaction to itself.
            if self.batch_txns > 0 && !self.main_has_partial {
                let tail = self.main.split_off(self.main_mark);
                self.commit_batch().await?;
                self.main.restore(tail);
            }
            self.main.flush(&self.relations).await?;
            self.main_mark = 0;
            self.main_has_partial = true;
        }
        Ok(())
    }

    /// The TRUNCATE of the replicated tables among `oids`, if any.
    fn truncate_sql(&self, oids: &[u32], restart_identity: bool) -> Result<Option<String>> {
        let mut names = Vec::with_capacity(oids.len());
        for oid in oids {
            names.push(self.relations.get(*oid)?.name.quoted());
        }
        if names.is_empty() {
            return Ok(None);
        }
        Ok(Some(format!(
            "TRUNCATE {}{}",
            names.join(", "),
            if restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            }
        )))
    }

    async fn on_truncate(
        &mut self,
        xid: Option<u32>,
        oids: &[u32],
        restart_identity: bool,
    ) -> Result<()> {
        if let (Some(top), Some(_)) = (self.in_stream, xid) {
            let mut live = Vec::with_capacity(oids.len());
            for oid in oids {
                if self.ignored.contains(oid) {
                    continue;
                }
                if self.held_or_replaying(*oid)? || !self.positions.is_empty() {
                    // Held tables and copy positions are decided on the main
                    // connection, at the transaction's commit.
                    self.cfg.memory.apply_whole(top);
                    anyhow::bail!(
                        "streamed transaction {top} truncates a table whose copy is running or recent: reconnecting to receive it again and apply it whole at its commit"
                    );
                }
                live.push(*oid);
            }
            let Some(sql) = self.truncate_sql(&live, restart_identity)? else {
                return Ok(());
            };
            if let Some(st) = self.streams.get_mut(&top) {
                st.tables.extend(live.iter().copied());
                st.session.flush(&self.relations).await?;
                st.session.execute_in_txn(&sql).await?;
            }
            return Ok(());
        }
        let Some(txn) = &self.current else {
            return Ok(());
        };
        if txn.skip {
            return Ok(());
        }
        let (xid, commit_lsn) = (txn.xid, txn.commit_lsn);
        for oid in oids {
            self.ensure_relation(*oid, RelationAt::Transaction).await?;
        }
        let version = self.main.begin().await?;
        self.refresh_positions(version).await?;
        self.replay_held().await?;
        self.truncate_on_main(commit_lsn, xid, oids, restart_identity)
            .await?;
        self.main_mark = 0;
        self.main_has_partial = true;
        Ok(())
    }

    /// Takes in a Relation message received earlier in a skipped transaction, before
    /// the first change of its table that is applied.
    async fn ensure_relation(&mut self, oid: u32, at: RelationAt) -> Result<()> {
        if let Some(rel) = self.pending_relations.remove(&oid) {
            self.on_relation(rel, at).await?;
        }
        Ok(())
    }

    /// A table's description: when it differs from what the target has, the change
    /// the source made is made on the target, on the main connection, at the
    /// message's place in commit order:
    /// - inside a transaction received whole, in its target transaction, after the
    ///   transactions batched before it committed (and within it, after its changes
    ///   under the old shape);
    /// - inside a spooled streamed transaction, the same, when it commits;
    /// - inside a streamed transaction applied on its own connection, at once in a
    ///   transaction of its own, when the change is committed on the source and this
    ///   transaction has not written the table: nothing else can hold the table then
    ///   (the source serialises writers and the DDL by lock, so every transaction that
    ///   wrote it under the old shape has committed). Otherwise the change is the
    ///   transaction's own, made after it wrote the table, whose lock on the target
    ///   would make the main connection wait behind it for good: the session
    ///   reconnects, and the source sends the transaction again from its start, to
    ///   be kept on disk and applied whole at its commit (`StreamMemory`).
    async fn on_relation(&mut self, rel: Relation, at: RelationAt) -> Result<()> {
        let name = QualifiedName::new(rel.namespace.clone(), rel.name.clone());
        if !self.relations.is_allowed(&name) {
            // `walshuttle tables add|remove` may have changed the pipeline's tables.
            self.reload_tables().await?;
        }
        if !self.relations.is_allowed(&name) {
            if self.in_publication(&name).await? {
                return Err(Fatal(format!(
                    "the publication sends table {name}, which is not part of this pipeline: the publication was edited by hand; add the table with `walshuttle tables add {}` or restore the publication (ALTER PUBLICATION … SET TABLE)",
                    name.quoted()
                ))
                .into());
            }
            // Removed from the pipeline: changes committed before it left the
            // publication are still on their way, and are not applied.
            self.ignored.insert(rel.oid);
            self.pending_relations.remove(&rel.oid);
            return Ok(());
        }
        self.ignored.remove(&rel.oid);
        let unchanged = self.relation_cache.get(&rel.oid).is_some_and(|known| {
            known.namespace == rel.namespace
                && known.name == rel.name
                && known.replica_identity == rel.replica_identity
                && known.columns.len() == rel.columns.len()
                && known.columns.iter().zip(&rel.columns).all(|(a, b)| {
                    a.name == b.name
                        && a.type_oid == b.type_oid
                        && a.type_modifier == b.type_modifier
                        && a.is_key == b.is_key
                })
        });
        if unchanged {
            self.pending_relations.remove(&rel.oid);
            return Ok(());
        }
        if at == RelationAt::Transaction && self.current.as_ref().is_some_and(|t| t.skip) {
            self.pending_relations.insert(rel.oid, rel);
            return Ok(());
        }
        self.pending_relations.remove(&rel.oid);
        if at == RelationAt::Transaction && self.batch_txns > 0 && !self.main_has_partial {
            // The transactions batched before this one commit before the table's
            // shape can change.
            let tail = self.main.split_off(self.main_mark);
            self.commit_batch().await?;
            self.main.restore(tail);
        }
        // Ops buffered under the old shape go out before the shape changes.
        // Flushing also ends an open COPY, which must not be left open while the
        // catalog is read on this connection.
        let had_work = self.main.buffered() > 0;
        self.main.flush(&self.relations).await?;
        if had_work {
            self.main_mark = 0;
            if self.current.is_some() {
                self.main_has_partial = true;
            }
        }
        for st in self.streams.values_mut() {
            st.session.flush(&self.relations).await?;
        }
        let memory = Arc::clone(&self.cfg.memory);
        let change = self
            .relations
            .plan(
                &rel,
                &self.source_sql,
                &self.main.client,
                &memory,
                self.cfg.keep_dropped_columns,
            )
            .await?;
        if !change.statements.is_empty() {
            let sql = format!(
                "SET LOCAL lock_timeout = '10s'; {}",
                change.statements.join("; ")
            );
            match at {
                RelationAt::Transaction | RelationAt::Replay => {
                    let version = self.main.begin().await?;
                    self.refresh_positions(version).await?;
                    self.main
                        .execute_in_txn(&sql)
                        .await
                        .with_context(|| format!("changing {} on the target", change.table))?;
                    if self.current.is_some() {
                        self.main_has_partial = true;
                    }
                }
                RelationAt::Stream(xid) => {
                    let wrote = self
                        .streams
                        .get(&xid)
                        .is_some_and(|st| st.tables.contains(&rel.oid));
                    if wrote || !change.committed {
                        memory.apply_whole(xid);
                        tracing::info!(table = %change.table, xid, "a streamed transaction changes the table's definition after writing to it: receiving it again, to apply it whole at its commit");
                        anyhow::bail!(
                            "streamed transaction {xid} changes the definition of {} after writing to it: reconnecting to receive it again from its start and apply it whole at its commit",
                            change.table
                        );
                    }
                    self.commit_batch().await?;
                    self.main.begin().await?;
                    self.main
                        .execute_in_txn(&sql)
                        .await
                        .with_context(|| format!("changing {} on the target", change.table))?;
                    self.main.commit("SELECT 1").await?;
                }
            }
        }
        let changed = self
            .relations
            .install(&rel, &self.main.client, change, &memory)
            .await?;
        if changed && self.resync_on_shape.remove(&name) && !self.pending_resync.contains(&name) {
            self.pending_resync.push(name.clone());
        }
        if changed {
            self.main.forget_statements();
            for st in self.streams.values_mut() {
                st.session.forget_statements();
            }
        }
        for t in self.relations.take_resync() {
            if !self.pending_resync.contains(&t) {
                self.pending_resync.push(t);
            }
        }
        self.relation_cache.insert(rel.oid, rel);
        Ok(())
    }

    /// Commits the coalesced complete source transactions of the main session.
    async fn commit_batch(&mut self) -> Result<()> {
        if self.batch_txns == 0 {
            return Ok(());
        }
        let Some((end_lsn, commit_time)) = self.batch_last else {
            return Ok(());
        };
        self.main.flush(&self.relations).await?;
        self.main.begin().await?;
        self.flush_held().await?;
        let sql = self.progress_sql(end_lsn, commit_time);
        let target_lsn = self.main.commit(&sql).await?;
        self.committed(end_lsn, target_lsn);
        crate::observe::transactions_applied(self.batch_txns, commit_time);
        self.batch_txns = 0;
        self.main_mark = 0;
        self.main_has_partial = false;
        self.batch_last = None;
        self.report_after_commit().await?;
        self.resync_pending().await
    }

    /// Copies again, each under a new snapshot recorded as its copy position, the
    /// tables whose rows cannot be derived from the stream (see `added_columns`).
    /// Runs between transactions, with no streamed transaction open (those hold the
    /// positions lock the rewrite needs).
    async fn resync_pending(&mut self) -> Result<()> {
        if self.pending_resync.is_empty()
            || self.current.is_some()
            || !self.streams.is_empty()
            || self.main.in_txn()
        {
            return Ok(());
        }
        let progress = Arc::clone(&self.progress);
        for name in std::mem::take(&mut self.pending_resync) {
            let Some(mut table) = crate::catalog::load_table(&self.source_sql, &name).await? else {
                continue;
            };
            // Columns the stream has not brought to the target yet are filled in
            // by it when their Relation message arrives.
            let on_target = crate::catalog::load_table(&self.main.client, &name).await?;
            if let Some(on_target) = &on_target {
                table
                    .columns
                    .retain(|c| on_target.columns.iter().any(|t| t.name == c.name));
            }
            let binary = crate::catalog::check_target(&self.main.client, &table)
                .await?
                .binary();
            let (_, copied) = crate::rewrite::rewrite_now(
                self.source,
                &mut self.main.client,
                &self.cfg.state,
                Some(&self.cfg.slot),
                &table,
                crate::rewrite::Rows::All,
                binary,
                "resync",
                &|n| {
                    progress.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                },
            )
            .await?;
            // Rows this copy holds that were written after a column the target
            // lacks was added have values of their own in it, which the column's
            // `ADD` on the target cannot know: copied once more when it arrives.
            // The source's columns are read again after the copy's snapshot, so a
            // column added between the first read and the snapshot counts too.
            if let (Some(now), Some(on_target)) = (
                crate::catalog::load_table(&self.source_sql, &name).await?,
                &on_target,
            ) {
                if now
                    .columns
                    .iter()
                    .any(|c| !on_target.columns.iter().any(|t| t.name == c.name))
                {
                    self.resync_on_shape.insert(name.clone());
                }
            }
            self.cfg
                .state
                .set_table_state(
                    &self.main.client,
                    &self.cfg.slot,
                    Some(&name),
                    TableState::Ready,
                )
                .await?;
            tracing::info!(table = %name, rows = copied, "copied the table again: what its rows hold on the source cannot be derived from the stream (a column added with a volatile default, or a rename that the messages leave open)");
        }
        Ok(())
    }

    /// After a commit: learn what has become durable (at most every 100 ms, since the
    /// target flushes asynchronous commits in the background) and tell the source.
    async fn report_after_commit(&mut self) -> Result<()> {
        if self.last_durable_check.elapsed() >= Duration::from_millis(100) {
            self.check_durable().await?;
        }
        self.send_status(false).await
    }

    fn committed(&mut self, end_lsn: Lsn, target_lsn: Option<Lsn>) {
        self.applied = self.applied.max(end_lsn);
        if !self.positions.is_empty() {
            self.positions.expire(self.applied);
            if self.positions.is_empty() {
                tracing::info!(lsn = %end_lsn, "the stream has passed every range copied outside it");
            }
        }
        self.pending_durable
            .push_back((end_lsn, target_lsn.unwrap_or(Lsn(u64::MAX))));
    }

    /// SQL run inside each apply transaction before COMMIT: the progress row, and
    /// the tables that must be copied again (so that need survives a crash).
    fn progress_sql(&self, end_lsn: Lsn, commit_time: PgTimestamp) -> String {
        let mut sql =
            self.cfg
                .state
                .progress_sql(&self.cfg.slot, end_lsn, commit_time.unix_micros());
        if !self.pending_resync.is_empty() {
            sql.push_str("; ");
            sql.push_str(
                &self
                    .cfg
                    .state
                    .resync_sql(&self.cfg.slot, &self.pending_resync),
            );
        }
        sql
    }

    /// Moves `durable` forward over commits the target has flushed.
    async fn check_durable(&mut self) -> Result<()> {
        self.last_durable_check = Instant::now();
        if self.pending_durable.is_empty() {
            return Ok(());
        }
        let flushed: String = self
            .monitor
            .query_one(&self.flush_lsn_query, &[])
            .await
            .pg_context(|| "reading the target's flushed WAL position".into())?
            .get(0);
        let flushed: Lsn = flushed.parse().unwrap_or_default();
        while let Some(&(source_lsn, target_lsn)) = self.pending_durable.front() {
            if target_lsn > flushed {
                break;
            }
            self.durable = self.durable.max(source_lsn);
            self.pending_durable.pop_front();
        }
        Ok(())
    }

    /// The position the source may free WAL up to.
    fn flush_position(&self) -> Lsn {
        if self.pending_durable.is_empty() && self.is_idle() {
            self.durable.max(self.idle_wal_end)
        } else {
            self.durable
        }
    }

    /// Publishes the flush position to the replication task, which reports it with
    /// every status update.
    fn publish_flush(&self) {
        self.io.set_flush(self.flush_position());
    }

    /// Publishes the flush position and sends a status update now.
    async fn send_status(&mut self, ask_reply: bool) -> Result<()> {
        self.publish_flush();
        self.io.send_status(ask_reply).await
    }

    /// Clean stop: commit complete work, drop partial work (the source re-sends it),
    /// make every commit durable, report the final position.
    async fn stop(&mut self) -> Result<()> {
        if self.current.is_some() {
            if self.main_has_partial {
                self.held_rows.clear();
                self.main.rollback().await?;
                self.batch_txns = 0;
            } else {
                let _partial = self.main.split_off(self.main_mark);
            }
            self.current = None;
        }
        self.commit_batch().await?;
        for (_, mut st) in self.streams.drain() {
            st.session.rollback().await?;
        }
        // A synchronous commit that writes WAL flushes the target's WAL up to and
        // past every asynchronous commit before it (a transaction that writes no WAL
        // commits asynchronously whatever the setting); then wait for it to show.
        let touch = format!(
            "BEGIN; SET LOCAL synchronous_commit = on; {}; COMMIT",
            self.cfg.state.progress_touch_sql(&self.cfg.slot)
        );
        self.main
            .client
            .batch_execute(&touch)
            .await
            .pg_context(|| "flushing the target's WAL before stopping".into())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            self.check_durable().await?;
            if self.pending_durable.is_empty() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// After a clean stop's last commit: when the slot's restart point lags what is
    /// confirmed by more than [`restart_point::WORTH_WAITING`] (a large transaction
    /// committed moments ago), keeps confirming the source's keepalives until the
    /// walsender decodes a record of running transactions and moves the point, at
    /// most [`restart_point::WAIT`]. Best effort: a new transaction arriving, or a
    /// source that does not answer, ends the wait.
    async fn settle_restart_point(&mut self) {
        if !(self.is_idle() && self.pending_durable.is_empty()) {
            return;
        }
        let confirmed = self.flush_position();
        let Some(first) = restart_point::read(&self.source_sql, &self.cfg.slot).await else {
            return;
        };
        if !restart_point::worth_waiting(first, confirmed) {
            return;
        }
        // The source answered: `run`'s stop deadline now covers the request, the
        // wait and the final status update.
        self.cfg.stop_extension.extend_until(
            tokio::time::Instant::now() + restart_point::WAIT + Duration::from_secs(10),
        );
        let behind_mib = (confirmed.0 - first.0) >> 20;
        let requested = restart_point::request_running_xacts(&self.source_sql).await;
        tracing::info!(
            restart = %first,
            behind_mib,
            requested,
            "waiting (at most {} s) for the source to move the slot's restart point past what was applied, so that the next start does not decode it again",
            restart_point::WAIT.as_secs()
        );
        let deadline = tokio::time::Instant::now() + restart_point::WAIT;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = self.io.recv() => match message {
                    Ok(Incoming::Keepalive { wal_end }) => {
                        // Idle: everything up to the walsender's position is applied.
                        self.idle_wal_end = self.idle_wal_end.max(wal_end);
                        if self.send_status(false).await.is_err() {
                            return;
                        }
                    }
                    // A new transaction: it is not applied while stopping, so
                    // nothing past it can be confirmed.
                    Ok(Incoming::Data { .. }) | Err(_) => {
                        tracing::info!("the source sent a new transaction; stopping without waiting for the restart point");
                        return;
                    }
                },
                _ = poll.tick() => match restart_point::read(&self.source_sql, &self.cfg.slot).await {
                    Some(now) if now > first => {
                        tracing::info!(restart = %now, "the slot's restart point moved");
                        return;
                    }
                    Some(_) => {}
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!(restart = %first, "the slot's restart point did not move in time; the next start decodes from it");
                    return;
                }
            }
        }
    }
}
