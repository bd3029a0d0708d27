//! Writing decoded changes into a target transaction, batched.
//!
//! A [`TargetSession`] is one target connection with at most one open transaction.
//! Changes are buffered as [`Op`]s and flushed in batches: per table, in source
//! order within the table (tables are independent on the target: walshuttle creates
//! no foreign keys), runs of inserts go through one COPY, runs of deletes through one
//! set-based `DELETE … IN (unnest(…))`, and updates through prepared statements
//! pipelined on the connection, or one set-based `UPDATE … FROM unnest(…)` where
//! that is provably what one statement per row would do (see [`TableShape::set_guarded`]).
//!
//! Rows are found as the source identifies them: by the replica identity's columns,
//! or for `REPLICA IDENTITY FULL` by identical values of the whole old row (the text
//! form, so `1.0` and `1.00` are told apart), changing exactly one row and skipping
//! rows another apply session holds. Deferrable constraints are checked at commit,
//! against a state the source committed.
//!
//! Every apply transaction begins by taking the shared side of the pipeline's
//! positions lock and reading the positions version (see
//! [`crate::state::StateStore::apply_begin_sql`]), so no rewrite outside the stream
//! can commit while the session decides which changes its copies already hold.

use std::collections::HashMap;

use anyhow::Result;
use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::types::{Kind, ToSql};
use tokio_postgres::{Client, Statement};

use super::decoder::{OldTuple, TupleData, TupleValue};
use super::faults::{ApplyContext, Fatal, SourceTxns};
use super::relations::{Relations, TableShape};
use super::values::{CopyEncoder, RawArray, RawValue, TEXT_OID};
use crate::observe::{self, RowOp};
use crate::pg::{Lsn, PgResultExt, QualifiedName};

mod statements;

/// Buffered bytes after which a session flushes its ops to the target.
pub const FLUSH_BYTES: usize = 8 * 1024 * 1024;
/// Statements sent at once in one pipeline.
const PIPELINE_DEPTH: usize = 1000;
/// Most set-based updates guarded by a savepoint in one target transaction: each
/// takes a subtransaction id, and more than 64 overflow PostgreSQL's per-backend
/// cache (slower snapshots for every session, and on standbys). The guard only
/// matters when the target's constraints changed after they were read (the rule
/// that allows a set-based update already excludes conflicts), so past it runs go
/// unguarded.
const GUARDED_RUNS_PER_TXN: usize = 32;
/// The savepoint around a set-based update.
const SET_BASED_SAVEPOINT: &str = "walshuttle_set_based";

/// One row change, in the relation's tuple order.
#[derive(Debug, Clone)]
pub enum Op {
    /// A new row.
    Insert {
        /// Relation oid.
        rel: u32,
        /// The row.
        new: TupleData,
    },
    /// A changed row; `old` is the old key (key change) or old row (identity full).
    Update {
        /// Relation oid.
        rel: u32,
        /// Old key or row, when sent.
        old: Option<OldTuple>,
        /// The new row; unchanged TOAST values are marked, not sent.
        new: TupleData,
    },
    /// A removed row, identified by its old key or old row.
    Delete {
        /// Relation oid.
        rel: u32,
        /// Old key or row.
        old: OldTuple,
    },
}

impl Op {
    /// The relation the change belongs to.
    pub fn rel(&self) -> u32 {
        match self {
            Op::Insert { rel, .. } | Op::Update { rel, .. } | Op::Delete { rel, .. } => *rel,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Op::Insert { .. } => 0,
            Op::Update { .. } => 1,
            Op::Delete { .. } => 2,
        }
    }

    /// Rough memory held by the op, for the flush threshold.
    pub fn approx_bytes(&self) -> usize {
        let tuple = |t: &TupleData| {
            t.columns
                .iter()
                .map(|v| match v {
                    TupleValue::Text(b) | TupleValue::Binary(b) => b.len() + 24,
                    _ => 24,
                })
                .sum::<usize>()
        };
        64 + match self {
            Op::Insert { new, .. } => tuple(new),
            Op::Update { old, new, .. } => {
                tuple(new) + old.as_ref().map(|o| tuple(o.tuple())).unwrap_or(0)
            }
            Op::Delete { old, .. } => tuple(old.tuple()),
        }
    }
}

/// Rows applied, by operation, for logs and metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyCounts {
    /// Rows inserted.
    pub inserted: u64,
    /// Rows updated.
    pub updated: u64,
    /// Rows deleted.
    pub deleted: u64,
    /// Updates and deletes that found no row on the target (strict mode).
    pub missing: u64,
}

/// One target connection with its open transaction, buffered ops and statements.
pub struct TargetSession {
    /// The connection.
    pub client: Client,
    /// SQL that opens a transaction (BEGIN, the positions lock, the version).
    begin_sql: String,
    in_txn: bool,
    ops: Vec<Op>,
    /// For each buffered op, the commit LSN of its source transaction (when known).
    op_txns: Vec<Option<Lsn>>,
    /// The source transaction whose changes are arriving: its commit LSN.
    current_txn: Option<Lsn>,
    /// The streamed source transaction this session applies, if it is one.
    streamed_xid: Option<u32>,
    /// First and last commit LSN of the source transactions with changes in the open
    /// target transaction, for messages.
    open_txns: Option<(Lsn, Lsn)>,
    /// Set-based updates guarded by a savepoint in the open target transaction.
    guarded_runs: usize,
    /// Tables (relation oids) where a set-based update conflicted all the same:
    /// updated one statement per row from then on.
    conflicted: std::collections::HashSet<u32>,
    bytes: usize,
    statements: HashMap<String, Statement>,
    /// Totals since the session started.
    pub counts: ApplyCounts,
    /// Rows per table and operation in the open transaction, reported to metrics
    /// when it commits.
    uncommitted: HashMap<(QualifiedName, RowOp), u64>,
    /// A COPY left open while inserts into one table keep arriving with nothing
    /// else buffered: rows stream to the target as they are decoded, overlapping
    /// the target's work with the source's.
    open_copy: Option<OpenCopy>,
    /// How long the last commit took, its round trip included (see
    /// [`super::batch_age`]).
    last_commit_took: Option<std::time::Duration>,
}

/// An open `COPY … FROM STDIN` fed row by row.
struct OpenCopy {
    rel: u32,
    table: QualifiedName,
    /// First and last commit LSN of the source transactions of its rows.
    txns: Option<(Lsn, Lsn)>,
    sink: std::pin::Pin<Box<tokio_postgres::CopyInSink<Bytes>>>,
    encoder: CopyEncoder,
}

/// Encoded bytes gathered before they are handed to the connection.
const COPY_CHUNK: usize = 128 * 1024;

impl TargetSession {
    /// Wraps a connection, configuring it for apply (replica mode as `setup` says);
    /// `begin_sql` opens each transaction and returns the positions version as its
    /// one row.
    pub async fn new(
        client: Client,
        setup: &crate::target_checks::TargetSetup,
        begin_sql: String,
    ) -> Result<Self> {
        // Durability is tracked separately: the flush position reported to the source
        // only covers commits the target has flushed (see `session.rs`).
        // Generic plans: statements here find rows by key (or by a whole old row),
        // the same plan for any values, while a custom plan of a set-based statement
        // is planned again at each bind around its arrays of thousands of values
        // (12-27 ms a batch, measured on 15 and 17).
        client
            .batch_execute("SET synchronous_commit = off; SET plan_cache_mode = force_generic_plan")
            .await
            .pg_context(|| "configuring the apply session on the target".into())?;
        // Like native apply when the target has foreign keys or triggers: replica
        // mode, decided (and refused without it) by `target_checks`.
        crate::target_checks::prepare_session(&client, setup).await?;
        Ok(TargetSession {
            client,
            // Deferrable constraints are checked at commit, against the state after
            // a source commit (which the source checked): applying one row at a time
            // must not trip over what the source checked per statement or deferred.
            begin_sql: format!("{begin_sql}; SET CONSTRAINTS ALL DEFERRED"),
            in_txn: false,
            ops: Vec::new(),
            op_txns: Vec::new(),
            current_txn: None,
            streamed_xid: None,
            open_txns: None,
            guarded_runs: 0,
            conflicted: Default::default(),
            bytes: 0,
            statements: HashMap::new(),
            counts: ApplyCounts::default(),
            uncommitted: HashMap::new(),
            open_copy: None,
            last_commit_took: None,
        })
    }

    /// Whether a target transaction is open.
    pub fn in_txn(&self) -> bool {
        self.in_txn
    }

    /// Notes that the changes pushed next belong to the source transaction that
    /// commits at `commit_lsn` (its Begin's final LSN), for error messages.
    pub fn note_source_txn(&mut self, commit_lsn: Lsn) {
        self.current_txn = Some(commit_lsn);
    }

    /// Notes that this session applies streamed transaction `xid` (its commit LSN is
    /// not known before it commits), for error messages.
    pub fn note_streamed(&mut self, xid: u32) {
        self.streamed_xid = Some(xid);
    }

    /// The source transactions spanning commit LSNs `lsns`.
    fn txns(&self, lsns: impl IntoIterator<Item = Option<Lsn>>) -> Option<SourceTxns> {
        if let Some(xid) = self.streamed_xid {
            return Some(SourceTxns::Streamed(xid));
        }
        SourceTxns::spanning(lsns.into_iter().flatten())
    }

    /// Adds where an error happened (unless a closer look already did).
    fn locate(
        &self,
        e: anyhow::Error,
        lsns: impl IntoIterator<Item = Option<Lsn>>,
        table: Option<&QualifiedName>,
    ) -> anyhow::Error {
        if e.downcast_ref::<ApplyContext>().is_some() {
            return e;
        }
        let txns = self.txns(lsns);
        e.context(ApplyContext {
            txns,
            table: table.cloned(),
        })
    }

    /// Buffered ops not yet sent.
    pub fn buffered(&self) -> usize {
        self.ops.len()
    }

    /// Bytes of buffered ops.
    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    /// Opens the target transaction if none is open; returns the positions version
    /// read inside it when it opened one.
    pub async fn begin(&mut self) -> Result<Option<i64>> {
        if self.in_txn {
            return Ok(None);
        }
        let messages = self
            .client
            .simple_query(&self.begin_sql)
            .await
            .pg_context(|| "beginning an apply transaction on the target".into())?;
        self.in_txn = true;
        self.guarded_runs = 0;
        let version = messages.iter().rev().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        });
        Ok(Some(version.unwrap_or(0)))
    }

    /// Buffers one change (of the source transaction noted last).
    pub fn push(&mut self, op: Op) {
        self.bytes += op.approx_bytes();
        self.ops.push(op);
        self.op_txns.push(self.current_txn);
        widen(&mut self.open_txns, self.current_txn);
    }

    /// Applies a change: in strict mode, an insert with nothing buffered before it
    /// streams straight into an open COPY (returns true: it is in the target
    /// transaction now); anything else is buffered for the next flush (false).
    pub async fn push_or_stream(&mut self, op: Op, relations: &Relations) -> Result<bool> {
        // Only while one table's inserts run uninterrupted: interleaved tables go to
        // the buffer, which groups them per table at the next flush.
        let fast = self.ops.is_empty()
            && matches!(&op, Op::Insert { rel, .. } if self.open_copy.as_ref().is_none_or(|c| c.rel == *rel));
        let Op::Insert { rel, new } = op else {
            self.push(op);
            return Ok(false);
        };
        if !fast {
            self.push(Op::Insert { rel, new });
            return Ok(false);
        }
        if self.open_copy.is_none() {
            self.begin().await?;
            let shape = relations.get(rel)?;
            let format = if shape.binary { " (FORMAT binary)" } else { "" };
            let sql = format!(
                "COPY {} ({}) FROM STDIN{format}",
                shape.name.quoted(),
                shape.column_list()
            );
            let stmt = self.statement(sql).await?;
            let sink = self
                .client
                .copy_in::<_, Bytes>(&stmt)
                .await
                .pg_context(|| format!("inserting into {} on the target", shape.name))
                .map_err(|e| self.locate(e, [self.current_txn], Some(&shape.name)))?;
            self.open_copy = Some(OpenCopy {
                rel,
                table: shape.name.clone(),
                txns: None,
                sink: Box::pin(sink),
                encoder: CopyEncoder::new(shape.binary),
            });
        }
        widen(&mut self.open_txns, self.current_txn);
        let mut failed = None;
        if let Some(copy) = self.open_copy.as_mut() {
            copy.encoder.push_row(new.columns.iter());
            widen(&mut copy.txns, self.current_txn);
            if copy.encoder.len() >= COPY_CHUNK {
                let chunk = copy.encoder.take();
                if let Err(e) = copy
                    .sink
                    .as_mut()
                    .feed(chunk)
                    .await
                    .pg_context(|| format!("inserting into {} on the target", copy.table))
                {
                    failed = Some((e, copy.txns, copy.table.clone()));
                }
            }
        }
        if let Some((e, txns, table)) = failed {
            return Err(self.locate(e, span_lsns(txns), Some(&table)));
        }
        Ok(true)
    }

    /// Ends the open COPY, if any, so other statements can run.
    async fn finish_copy(&mut self) -> Result<()> {
        let Some(mut copy) = self.open_copy.take() else {
            return Ok(());
        };
        let rows = copy.encoder.rows() as u64;
        let ctx = || format!("inserting {rows} rows into {} on the target", copy.table);
        let sent = match copy
            .sink
            .as_mut()
            .send(copy.encoder.finish())
            .await
            .pg_context(ctx)
        {
            Ok(()) => copy.sink.as_mut().finish().await.pg_context(ctx),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            return Err(self.locate(e, span_lsns(copy.txns), Some(&copy.table)));
        }
        self.counts.inserted += rows;
        self.note_applied(&copy.table, RowOp::Insert, rows);
        Ok(())
    }

    /// Splits off the ops buffered after position `at` (to commit what came before).
    pub fn split_off(&mut self, at: usize) -> Vec<Op> {
        let tail = self.ops.split_off(at.min(self.ops.len()));
        self.op_txns.truncate(self.ops.len());
        self.bytes = self.ops.iter().map(Op::approx_bytes).sum();
        tail
    }

    /// Puts back ops taken with [`TargetSession::split_off`].
    pub fn restore(&mut self, ops: Vec<Op>) {
        for op in ops {
            self.push(op);
        }
    }

    /// Forgets cached statements (after a table's shape changed).
    pub fn forget_statements(&mut self) {
        self.statements.clear();
    }

    /// Runs SQL inside the open transaction (opening one if needed).
    pub async fn execute_in_txn(&mut self, sql: &str) -> Result<()> {
        self.begin().await?;
        self.finish_copy().await?;
        widen(&mut self.open_txns, self.current_txn);
        self.client
            .batch_execute(sql)
            .await
            .pg_context(|| format!("applying on the target: {sql}"))
            .map_err(|e| self.locate(e, [self.current_txn], None))
    }

    /// Sends every buffered op to the target, inside the open transaction.
    pub async fn flush(&mut self, relations: &Relations) -> Result<()> {
        self.finish_copy().await?;
        if self.ops.is_empty() {
            return Ok(());
        }
        self.begin().await?;
        let ops = std::mem::take(&mut self.ops);
        let lsns = std::mem::take(&mut self.op_txns);
        self.bytes = 0;
        // Group per table, keeping source order within each table.
        let mut order: Vec<u32> = Vec::new();
        let mut per_table: HashMap<u32, (Vec<Op>, Vec<Option<Lsn>>)> = HashMap::new();
        for (op, lsn) in ops.into_iter().zip(lsns) {
            let rel = op.rel();
            let entry = per_table.entry(rel).or_insert_with(|| {
                order.push(rel);
                (Vec::new(), Vec::new())
            });
            entry.0.push(op);
            entry.1.push(lsn);
        }
        for rel in order {
            let Some((ops, lsns)) = per_table.remove(&rel) else {
                continue;
            };
            let shape = relations.get(rel)?;
            let mut start = 0;
            while start < ops.len() {
                let kind = ops[start].kind();
                let end = ops[start..]
                    .iter()
                    .position(|o| o.kind() != kind)
                    .map(|p| start + p)
                    .unwrap_or(ops.len());
                let (run, run_lsns) = (&ops[start..end], &lsns[start..end]);
                let applied = match kind {
                    0 => self.copy_inserts(shape, run).await,
                    1 => self.updates(shape, run, run_lsns).await,
                    _ => self.deletes(shape, run, run_lsns).await,
                };
                applied.map_err(|e| self.locate(e, run_lsns.iter().copied(), Some(&shape.name)))?;
                start = end;
            }
        }
        Ok(())
    }

    /// Commits the open transaction after running `extra_sql` in it (the progress
    /// row), and returns the target's WAL insert position after the commit, which
    /// bounds the commit record for durability tracking.
    pub async fn commit(&mut self, extra_sql: &str) -> Result<Option<crate::pg::Lsn>> {
        if !self.in_txn {
            return Ok(None);
        }
        self.finish_copy().await?;
        let sql = format!("{extra_sql}; COMMIT; SELECT pg_current_wal_insert_lsn()::text");
        self.in_txn = false;
        let span = self.open_txns.take();
        let rows = std::mem::take(&mut self.uncommitted);
        let started = std::time::Instant::now();
        let messages = self
            .client
            .simple_query(&sql)
            .await
            .pg_context(|| "committing an apply transaction on the target".into())
            // Deferred constraints are checked here: the server names the table.
            .map_err(|e| self.locate(e, span_lsns(span), None))?;
        let took = started.elapsed();
        self.last_commit_took = Some(took);
        observe::apply_commit_duration(took);
        for ((table, op), n) in rows {
            observe::rows_applied(&table, op, n);
        }
        let lsn = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|s| s.parse().ok()),
            _ => None,
        });
        Ok(lsn)
    }

    /// How long the last commit took, its round trip included; `None` before one.
    pub fn last_commit_took(&self) -> Option<std::time::Duration> {
        self.last_commit_took
    }

    /// Rolls the open transaction back and drops buffered ops.
    pub async fn rollback(&mut self) -> Result<()> {
        // Dropping an unfinished COPY makes the connection abandon it.
        self.open_copy = None;
        self.ops.clear();
        self.op_txns.clear();
        self.open_txns = None;
        self.bytes = 0;
        self.uncommitted.clear();
        if self.in_txn {
            self.in_txn = false;
            self.client
                .batch_execute("ROLLBACK")
                .await
                .pg_context(|| "rolling back an apply transaction on the target".into())?;
        }
        Ok(())
    }

    async fn statement(&mut self, sql: String) -> Result<Statement> {
        if let Some(s) = self.statements.get(&sql) {
            return Ok(s.clone());
        }
        let stmt = self
            .client
            .prepare(&sql)
            .await
            .pg_context(|| format!("preparing on the target: {sql}"))?;
        self.statements.insert(sql, stmt.clone());
        Ok(stmt)
    }
}

/// Fewest consecutive updates worth one set-based statement.
const SET_BASED_MIN: usize = 8;

/// Widens a span of commit LSNs by `lsn`.
fn widen(span: &mut Option<(Lsn, Lsn)>, lsn: Option<Lsn>) {
    if let Some(lsn) = lsn {
        *span = Some(match *span {
            None => (lsn, lsn),
            Some((lo, hi)) => (lo.min(lsn), hi.max(lsn)),
        });
    }
}

/// The ends of a span, for [`SourceTxns::spanning`].
fn span_lsns(span: Option<(Lsn, Lsn)>) -> [Option<Lsn>; 2] {
    match span {
        Some((lo, hi)) => [Some(lo), Some(hi)],
        None => [None, None],
    }
}
