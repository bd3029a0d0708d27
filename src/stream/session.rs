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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_postgres::Client;

use super::apply::{Op, TargetSession, FLUSH_BYTES};
use super::batch_age::BatchAgeCap;
use super::copy_positions::{Decision, StreamPositions};
use super::decoder::{self, LogicalMessage, PgTimestamp, Relation};
use super::durability::Durability;
use super::io::{Incoming, StreamIo};
use super::joining::TableJoins;
use super::lanes::{Batch, ConflictKeys, Lanes};
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
mod commits;
mod event_loop;
mod held_tables;
mod refetched;
mod relation_changes;
mod spooled;
mod start;
mod stopping;
mod watchdog;

use start::{backend_pid, binary_capable, held_sets, start};

pub use watchdog::SelfWait;
use watchdog::{source_fault, watch_target};

/// Most source transactions coalesced into one target transaction.
const MAX_BATCH_TXNS: usize = 20_000;
/// Most source transactions in one batch when several lanes apply at once: small
/// enough that batches of changes to random rows of a large table rarely share one.
const MAX_LANE_BATCH_TXNS: usize = 500;
/// Held changes (see [`super::held`]) written to the target in one statement.
const HELD_BATCH: usize = 1000;
/// Held changes read back at a time.
const REPLAY_CHUNK: i64 = 2000;
/// How long one target transaction spends applying a table's held changes: the
/// other tables stream in between, while a long copy's backlog drains.
const REPLAY_SLICE: Duration = Duration::from_millis(150);
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
    /// Target connections applying committed transactions at once (see
    /// [`super::lanes`]); 1 applies on the main connection alone.
    pub apply_lanes: usize,
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
    source_sql: Client,
    /// Shared with the lanes sending a batch's statements (changed only when none is
    /// in flight).
    relations: Arc<Relations>,
    relation_cache: HashMap<u32, Relation>,
    /// Relation messages of transactions already applied (skipped): taken in at the
    /// next change of their table that is applied, without running any DDL for
    /// the skipped transaction.
    pending_relations: HashMap<u32, Relation>,
    main: TargetSession,
    /// Batches finishing on connections of their own (see [`super::lanes`]).
    lanes: Lanes,
    /// The rows the complete source transactions in the open main transaction touch.
    main_keys: ConflictKeys,
    /// The rows the current source transaction touched so far.
    txn_keys: ConflictKeys,
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
    /// Oldest a batch may get while the stream never goes quiet, learnt from the
    /// target's commit durations.
    batch_age: BatchAgeCap,
    applied: Lsn,
    /// Which applied transactions the target has flushed (what may be confirmed).
    durability: Durability,
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
    /// Tables joining the stream (held, replaying) or to be copied again.
    joins: TableJoins,
    /// Relation oids of tables removed from the pipeline: their changes still in
    /// flight are not applied.
    ignored: HashSet<u32>,
    /// Silence from the source after which its connection is considered dead: the
    /// source's own `wal_sender_timeout`, within [5 s, 60 s]. walshuttle asks for a
    /// reply every status interval, so a live source is never silent that long.
    receive_timeout: Duration,
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

impl Session<'_> {
    fn is_idle(&self) -> bool {
        self.current.is_none()
            && self.streams.is_empty()
            && self.spooled.is_empty()
            && self.batch_txns == 0
            && self.lanes.is_empty()
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
                self.main_keys.extend(std::mem::take(&mut self.txn_keys));
                self.batch_txns += 1;
                self.batch_last = Some((c.end_lsn, c.commit_time));
                if !self.io.has_waiting() {
                    self.commit_all().await?;
                } else if self.batch_txns >= self.max_batch_txns()
                    || self.main.buffered_bytes() >= FLUSH_BYTES
                    || self.batch_started.elapsed() >= self.batch_age.cap(self.io.is_behind())
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
                self.commit_all().await?;
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
                self.commit_all().await?;
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
                self.commit_all().await?;
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

    /// Applies the copy positions to a change of transaction `xid`: `None` when the
    /// copies holding its rows already reflect it. A key change the copies cannot
    /// complete is read again from the source (see `refetched`), except in a
    /// streamed transaction not yet committed: that one is received again and
    /// applied whole at its commit.
    async fn filter(&mut self, xid: u32, op: Op, streamed: bool) -> Result<Option<Op>> {
        // An INSERT lacking unchanged TOASTed values (a row moved into a row
        // filter) is read again even with no copy positions.
        let lacks =
            matches!(&op, Op::Insert { new, .. } if super::copy_positions::lacks_toast(new));
        if self.positions.is_empty() && !lacks {
            return Ok(Some(op));
        }
        let shape = self.relations.get(op.rel())?;
        match self
            .positions
            .decide(&shape.name, &shape.column_names, xid, op)
        {
            Decision::Apply(op) => Ok(Some(op)),
            Decision::Skip => Ok(None),
            Decision::Refetch { .. } if streamed => {
                self.cfg.memory.apply_whole(xid);
                anyhow::bail!(
                    "streamed transaction {xid} moved a row with unchanged TOASTed values into a range copied earlier: reconnecting to receive it again and apply it whole at its commit, when its row can be read again from the source"
                )
            }
            Decision::Refetch { rel, new } => {
                let (op, position) = self.refetch(xid, rel, new).await?;
                self.positions.add(position);
                Ok(op)
            }
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
            let Some(op) = self.filter(top, op, true).await? else {
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
        let Some(op) = self.filter(xid, op, false).await? else {
            return Ok(());
        };
        // The lane rule: a change touching a row of a batch in flight is sent only
        // once that batch (and every one before it) has committed. Buffered
        // changes are checked when they are sent (see `send_main`); one with
        // nothing buffered before it may be sent at once.
        if self.lanes.parallel() {
            let keys = ConflictKeys::of_op(self.relations.get(op.rel())?, &op);
            if self.main.buffered() == 0 {
                self.commit_lanes(self.lanes.must_commit_before(&keys))
                    .await?;
            }
            self.txn_keys.extend(keys);
        }
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
            self.send_main().await?;
            self.main_mark = 0;
            self.main_has_partial = true;
        }
        Ok(())
    }
}
