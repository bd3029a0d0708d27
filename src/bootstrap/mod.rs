//! The initial copy: a consistent, parallel, resumable snapshot of the source tables
//! on the target, and the slot position streaming continues from.
//!
//! Steps: preflight (nothing written until it passes) → publication and slot with an
//! exported snapshot, every table locked under it → missing target tables created →
//! chunk plan recorded → workers copy chunks under the snapshot → keys and indexes
//! built → the pipeline is `copied`. A rerun after a crash copies only what is
//! missing under a new snapshot, whose visibility becomes the copy position of every
//! range it copies (see [`crate::positions`]).

pub mod copy;
pub mod online;
pub mod plan;
pub mod preflight;
pub mod progress;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use tokio_postgres::Client;

use crate::catalog::{self, Table, TargetFit};
use crate::config::Endpoint;
use crate::pg::replication::ReplicationClient;
use crate::pg::{connect, Lsn, PgResultExt, QualifiedName};
use crate::snapshot::{self, SourceSnapshot};
use crate::state::{ChunkRange, ChunkRow, Phase, Pipeline, StateStore, TableEntry, TableState};
use copy::{CopyJob, CopySpec};
use progress::Progress;

/// Settings of a bootstrap, from the command line.
#[derive(Clone, Debug)]
pub struct BootstrapOptions {
    /// Parallel copy workers.
    pub jobs: usize,
    /// Tables to replicate; `None` for every ordinary table outside system schemas.
    pub tables: Option<Vec<QualifiedName>>,
    /// Replication slot name, also the pipeline's name.
    pub slot: String,
    /// Publication name on the source; `None`: the one the pipeline's state
    /// records, else the slot's name.
    pub publication: Option<String>,
    /// Schema on the target holding walshuttle's state.
    pub state_schema: String,
    /// Empty target tables that hold rows walshuttle did not copy.
    pub truncate_target: bool,
    /// Fire foreign keys and triggers of existing target tables on replicated rows
    /// as for any writer (see `target_checks`).
    pub allow_target_triggers: bool,
    /// Capture DDL on the source (`--capture-ddl`, see [`crate::ddl_capture`]).
    pub capture_ddl: bool,
    /// Online bootstrap (`--online`, see [`online`]): no snapshot held for the whole
    /// copy; `run` copies each table under its own while it streams.
    pub online: bool,
    /// Tables left out of (or schemas kept in) the selection: `--schemas`,
    /// `--exclude-schemas`, `--exclude-tables`.
    pub filter: crate::selection::TableFilter,
    /// Column lists and row filters (`--columns`, `--row-filter`).
    pub rows: crate::row_selection::RowSelection,
}

/// Rows and bytes copied into one table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TableSummary {
    /// The table.
    pub table: QualifiedName,
    /// Rows copied (over every run of this bootstrap).
    pub rows: i64,
    /// COPY bytes streamed.
    pub bytes: i64,
}

/// What a bootstrap did, for the summary line and for tests.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BootstrapSummary {
    /// True when the bootstrap had already finished and nothing was copied.
    pub already_done: bool,
    /// True when this run resumed an interrupted bootstrap.
    pub resumed: bool,
    /// Chunks copied by this run.
    pub chunks_copied: usize,
    /// Per-table totals.
    pub tables: Vec<TableSummary>,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
    /// Where streaming starts: the slot's consistent point.
    pub stream_start_lsn: Option<Lsn>,
    /// Ranges copied under a later snapshot than the slot's (a resumed bootstrap):
    /// the stream skips what their snapshot already saw.
    pub copy_positions: usize,
    /// Tables an online bootstrap left for `run` to copy while it streams (those
    /// still `held`); 0 for a one-snapshot bootstrap.
    pub online_tables: usize,
}

impl BootstrapSummary {
    /// The summary as lines for a person: one per table, then the totals.
    pub fn render(&self) -> String {
        if self.online_tables > 0 {
            return online::render(self);
        }
        if self.already_done {
            return format!(
                "bootstrap already finished (streaming starts at {}); nothing copied",
                self.stream_start_lsn
                    .map(|l| l.to_string())
                    .unwrap_or_default()
            );
        }
        let mut out = String::new();
        let (mut rows, mut bytes) = (0i64, 0i64);
        for t in &self.tables {
            out.push_str(&format!(
                "  {:<40} {:>12} rows {:>10.1} MB\n",
                t.table.to_string(),
                t.rows,
                t.bytes as f64 / 1e6
            ));
            rows += t.rows;
            bytes += t.bytes;
        }
        let secs = self.seconds.max(0.001);
        out.push_str(&format!(
            "bootstrap {}: {} tables, {rows} rows, {:.1} MB in {:.1} s ({:.1} MB/s); streaming starts at {}{}",
            if self.resumed { "resumed and finished" } else { "finished" },
            self.tables.len(),
            bytes as f64 / 1e6,
            self.seconds,
            bytes as f64 / 1e6 / secs,
            self.stream_start_lsn.map(|l| l.to_string()).unwrap_or_default(),
            if self.copy_positions == 0 {
                String::new()
            } else {
                format!(
                    " ({} ranges copied under a later snapshot: the stream skips what they already hold)",
                    self.copy_positions
                )
            }
        ));
        out
    }
}

/// Runs (or resumes, or recognises as finished) the bootstrap of one pipeline.
pub async fn bootstrap(
    source: &Endpoint,
    target: &Endpoint,
    opts: &BootstrapOptions,
) -> Result<BootstrapSummary> {
    let started = Instant::now();
    let src = connect(source, "bootstrap").await?;
    let tgt = connect(target, "bootstrap").await?;
    // Before anything is read or written: never the source's own database.
    preflight::refuse_same_database(&src, &tgt).await?;
    // A state schema of an older release is upgraded before it is read.
    let state = StateStore::open_upgrading(&tgt, &opts.state_schema).await?;
    crate::row_selection::check_unchanged(&tgt, &state, &opts.slot, &opts.rows).await?;
    let existing = state.existing_pipeline(&tgt, &opts.slot).await?;
    match existing {
        Some(p) if p.phase.copied() => Ok(BootstrapSummary {
            already_done: true,
            resumed: false,
            chunks_copied: 0,
            tables: table_totals(&tgt, &state, &opts.slot).await?,
            seconds: started.elapsed().as_secs_f64(),
            stream_start_lsn: p.stream_start_lsn,
            copy_positions: 0,
            online_tables: online::tables_to_copy(&tgt, &state, &opts.slot).await?,
        }),
        Some(p) if p.phase == Phase::Bootstrapping => {
            if opts.online {
                tracing::warn!(slot = %opts.slot, "an interrupted one-snapshot bootstrap of this pipeline is resumed as it was begun (--online applies to a new pipeline)");
            }
            resume(source, target, &src, &tgt, &state, opts, p, started).await
        }
        other => {
            let half_created = other.is_some();
            fresh(
                source,
                target,
                &src,
                &tgt,
                &state,
                opts,
                half_created,
                started,
            )
            .await
        }
    }
}

pub use crate::slot::{slot_info, SlotInfo};

/// How many times a new slot is created when a table was rewritten between the
/// slot's snapshot and the lock on it.
const SLOT_ATTEMPTS: usize = 5;

/// Creates the pipeline's slot with an exported snapshot and locks `tables` under
/// it, taking a new slot while a table turns out rewritten in between (its rows
/// would be invisible to the snapshot).
pub async fn create_slot_with_snapshot(
    source: &Endpoint,
    src: &Client,
    slot_name: &str,
    tables: &[QualifiedName],
) -> Result<SourceSnapshot> {
    for attempt in 1..=SLOT_ATTEMPTS {
        let before = snapshot::file_nodes(src, tables).await?;
        let mut repl = ReplicationClient::connect(source, None)
            .await
            .with_context(|| format!("opening a replication connection to {}", source.redacted))?;
        let slot = repl
            .create_slot_exporting_snapshot(slot_name)
            .await
            .with_context(|| format!("creating replication slot {slot_name} on the source"))?;
        let lsn = slot.consistent_point;
        match SourceSnapshot::from_slot(source, repl, slot, tables, &before).await? {
            Ok(snapshot) => {
                tracing::info!(slot = %slot_name, %lsn, "created replication slot");
                return Ok(snapshot);
            }
            Err(rewritten) => {
                tracing::warn!(slot = %slot_name, table = %rewritten, attempt, "a table was rewritten on the source while the slot was created: taking a new slot");
                drop_slot_if_exists(src, slot_name).await?;
            }
        }
    }
    Err(RewrittenEveryTime.into())
}

/// Tables were rewritten on the source each time a slot was created: a burst of
/// TRUNCATE or DDL that passes, so trying again later can succeed (`run` retries
/// with backoff; other commands exit with the transient code).
#[derive(Debug, thiserror::Error)]
#[error("tables on the source were rewritten (TRUNCATE, ALTER TABLE, VACUUM FULL, CLUSTER) every time a slot was created, {SLOT_ATTEMPTS} times in a row: trying again later")]
pub struct RewrittenEveryTime;

#[allow(clippy::too_many_arguments)]
async fn fresh(
    source: &Endpoint,
    target: &Endpoint,
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    opts: &BootstrapOptions,
    half_created: bool,
    started: Instant,
) -> Result<BootstrapSummary> {
    let checked = preflight::check(
        src,
        tgt,
        state,
        opts,
        opts.tables.as_deref(),
        &[],
        opts.truncate_target,
    )
    .await?;
    if let Some(slot) = slot_info(src, &opts.slot).await? {
        if !half_created {
            bail!(
                "replication slot {} already exists on the source but the target has no walshuttle state for it: another pipeline may use it; choose another --slot, or drop it with `walshuttle teardown --slot {}`",
                opts.slot,
                opts.slot
            );
        }
        if slot.active {
            bail!(
                "replication slot {} is in use by process {} on the source: stop that consumer first",
                opts.slot,
                slot.active_pid.unwrap_or_default()
            );
        }
    }
    // Everything checked: from here on walshuttle writes.
    state.migrate(tgt).await?;
    let table_names: Vec<QualifiedName> = checked.tables.iter().map(|t| t.name.clone()).collect();
    let mut pipeline = Pipeline {
        name: opts.slot.clone(),
        publication: checked.publication.name.clone(),
        phase: Phase::CreatingSlot,
        stream_start_lsn: None,
        tables: table_names.clone(),
        stop_reason: None,
    };
    state.save_pipeline(tgt, &pipeline).await?;
    crate::publication::ensure(src, &checked.publication, &table_names, &checked.rows).await?;
    if opts.capture_ddl {
        let (every, publication) = (opts.tables.is_none(), &checked.publication.name);
        crate::ddl_capture::enable(
            src,
            tgt,
            state,
            &opts.slot,
            publication,
            every,
            &table_names,
        )
        .await?;
    }
    if half_created {
        drop_slot_if_exists(src, &opts.slot).await?;
    }
    if opts.online {
        return online::start(source, src, tgt, state, opts, &checked, pipeline, started).await;
    }
    let snapshot = create_slot_with_snapshot(source, src, &opts.slot, &table_names).await?;

    let total_blocks: i64 = checked.tables.iter().map(|t| t.blocks).sum();
    let size = plan::chunk_blocks(total_blocks, opts.jobs);
    let mut by_size: Vec<&Table> = checked.tables.iter().collect();
    by_size.sort_by_key(|t| std::cmp::Reverse(t.blocks));
    let mut chunks = Vec::new();
    let mut columns: HashMap<QualifiedName, Option<String>> = HashMap::new();
    // One query per table, pipelined on the snapshot's session (the futures are
    // made first: a closure inside the stream would not be `Send` for every
    // lifetime).
    let plans: Vec<_> = by_size
        .iter()
        .map(|t| plan::plan_table(snapshot.holder(), t, size))
        .collect();
    let planned: Vec<(Vec<ChunkRow>, Option<String>)> = futures_util::stream::iter(plans)
        .buffered(catalog::PIPELINE_DEPTH)
        .try_collect()
        .await?;
    for (t, (c, column)) in by_size.iter().zip(planned) {
        chunks.extend(c);
        columns.insert(t.name.clone(), column);
    }
    let entries: Vec<TableEntry> = table_names
        .iter()
        .map(|t| TableEntry {
            name: t.clone(),
            state: TableState::Copying,
            chunk_column: columns.get(t).cloned().flatten(),
        })
        .collect();

    pipeline.phase = Phase::Bootstrapping;
    pipeline.stream_start_lsn = Some(snapshot.lsn);
    {
        let mut tgt_tx = connect(target, "bootstrap plan").await?;
        let tx = tgt_tx
            .transaction()
            .await
            .pg_context(|| "recording the plan".into())?;
        // Tables are created in the transaction that records the plan: a bootstrap
        // killed before it commits leaves no table behind that a rerun would have
        // to tell apart from the user's own (created without their keys, which
        // are built after the copy).
        // The CREATE TABLEs go out in batches of statements (one round trip each),
        // after every type they use exists.
        let mut creates: Vec<(&QualifiedName, String)> = Vec::new();
        for (table, fit) in checked.tables.iter().zip(&checked.fits) {
            match fit {
                TargetFit::Missing { .. } => {
                    catalog::create_missing_types(src, &tx, table).await?;
                    creates.push((&table.name, catalog::create_table_sql(table)));
                }
                TargetFit::Exists { .. } if opts.truncate_target => {
                    let own = crate::own_rows::own_rows_on(&tx, &table.name).await?;
                    tx.batch_execute(&format!("TRUNCATE {own}"))
                        .await
                        .pg_context(|| format!("truncating {} on the target", table.name))?;
                    tracing::info!(table = %table.name, "truncated target table (--truncate-target)");
                }
                TargetFit::Exists { .. } => {}
            }
        }
        for batch in creates.chunks(CREATE_BATCH) {
            let sql: Vec<&str> = batch.iter().map(|(_, sql)| sql.as_str()).collect();
            tx.batch_execute(&sql.join(";\n")).await.pg_context(|| {
                format!(
                    "creating tables {} to {} on the target",
                    batch[0].0,
                    batch[batch.len() - 1].0
                )
            })?;
            for (name, _) in batch {
                tracing::info!(table = %name, "created table on the target");
            }
        }
        // Every sequence the tables' columns call or their schemas hold, with the
        // columns' `nextval` defaults (from the catalog only: their values are set
        // by `switchover` and `run --sync-sequences`, which may read them).
        crate::sequences::mirror(src, &tx, &table_names).await?;
        state.save_pipeline(&tx, &pipeline).await?;
        // With a filter, the pipeline carries the tables it matched (named), so
        // nothing joins it by itself that the filter would leave out.
        let named = (!opts.filter.is_empty()).then(|| pipeline.tables.clone());
        state
            .set_selection(
                &tx,
                &pipeline.name,
                named.as_deref().or(opts.tables.as_deref()),
            )
            .await?;
        state
            .set_table_filter(&tx, &pipeline.name, &opts.filter)
            .await?;
        state
            .set_row_selection(&tx, &pipeline.name, &checked.rows)
            .await?;
        state.set_tables(&tx, &pipeline.name, &entries).await?;
        state.record_plan(&tx, &opts.slot, &chunks).await?;
        tx.commit()
            .await
            .pg_context(|| "recording the plan".into())?;
    }
    tracing::info!(
        tables = checked.tables.len(),
        chunks = chunks.len(),
        chunk_blocks = size,
        "planned the copy"
    );
    copy_and_finish(
        source, target, src, tgt, state, opts, snapshot, None, &checked, &entries, chunks,
        pipeline, false, started,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn resume(
    source: &Endpoint,
    target: &Endpoint,
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    opts: &BootstrapOptions,
    pipeline: Pipeline,
    started: Instant,
) -> Result<BootstrapSummary> {
    if let Some(wanted) = &opts.tables {
        let mut a = wanted.clone();
        let mut b = pipeline.tables.clone();
        a.sort();
        b.sort();
        if a != b {
            bail!(
                "pipeline {} is resuming a bootstrap of other tables ({}): rerun without --tables, or tear it down with `walshuttle teardown` and start again",
                pipeline.name,
                pipeline.tables.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let checked = preflight::check(
        src,
        tgt,
        state,
        opts,
        Some(&pipeline.tables),
        &pipeline.tables,
        false,
    )
    .await?;
    if slot_info(src, &opts.slot).await?.is_none() {
        bail!(
            "replication slot {} disappeared from the source while the bootstrap was interrupted: run `walshuttle teardown --slot {}` and bootstrap again",
            opts.slot,
            opts.slot
        );
    }
    let all_chunks = state.chunks(tgt, &opts.slot).await?;
    let mut entries = state.table_entries(tgt, &opts.slot).await?;

    // Per table: keep what stays valid, plan again what does not.
    let mut remaining = Vec::new();
    let mut restart: Vec<&Table> = Vec::new();
    for table in &checked.tables {
        let mine: Vec<&ChunkRow> = all_chunks
            .iter()
            .filter(|c| c.table == table.name)
            .collect();
        let any_done = mine.iter().any(|c| c.done);
        let all_done = !mine.is_empty() && mine.iter().all(|c| c.done);
        let exact = mine.iter().all(|c| !c.inexact);
        let by_key = !mine.is_empty()
            && mine
                .iter()
                .all(|c| matches!(c.range, ChunkRange::Keys { .. }));
        if all_done && exact {
            continue;
        }
        if by_key && exact {
            // A key range copied under any snapshot stays valid: copy only the rest.
            remaining.extend(mine.into_iter().filter(|c| !c.done).cloned());
        } else if any_done || !exact || mine.is_empty() {
            // Block ranges are valid only within the snapshot that is gone.
            restart.push(table);
        } else {
            remaining.extend(mine.into_iter().cloned());
        }
    }
    let mut to_lock: Vec<QualifiedName> = remaining.iter().map(|c| c.table.clone()).collect();
    to_lock.extend(restart.iter().map(|t| t.name.clone()));
    to_lock.sort();
    to_lock.dedup();
    let snapshot = SourceSnapshot::take(source, &to_lock).await?;

    if !restart.is_empty() {
        let total_blocks: i64 = restart.iter().map(|t| t.blocks).sum();
        let size = plan::chunk_blocks(total_blocks, opts.jobs);
        let mut client = connect(target, "bootstrap plan").await?;
        let tx = client
            .transaction()
            .await
            .pg_context(|| "planning the tables to copy again".into())?;
        for table in &restart {
            let (chunks, column) = plan::plan_table(snapshot.holder(), table, size).await?;
            let own = crate::own_rows::own_rows_on(&tx, &table.name).await?;
            tx.batch_execute(&format!("TRUNCATE {own}"))
                .await
                .pg_context(|| format!("emptying {} on the target to copy it again", table.name))?;
            state
                .replace_table_plan(&tx, &opts.slot, &table.name, &chunks)
                .await?;
            state
                .clear_positions(&tx, &opts.slot, Some(&table.name))
                .await?;
            if let Some(e) = entries.iter_mut().find(|e| e.name == table.name) {
                e.chunk_column = column;
                e.state = TableState::Copying;
            }
            tracing::info!(table = %table.name, "the table was partly copied under a snapshot that is gone: copying it again whole");
            remaining.extend(chunks);
        }
        state.set_tables(&tx, &opts.slot, &entries).await?;
        tx.commit()
            .await
            .pg_context(|| "planning the tables to copy again".into())?;
    }
    let view = snapshot
        .view
        .clone()
        .context("a resumed copy needs a snapshot with recorded visibility")?;
    let snapshot_id = state
        .record_snapshot(tgt, &opts.slot, &view, "bootstrap resume")
        .await?;
    tracing::info!(
        remaining_chunks = remaining.len(),
        stream_start = %pipeline.stream_start_lsn.unwrap_or_default(),
        snapshot = %snapshot.lsn,
        "resuming an interrupted bootstrap under a new snapshot; the stream skips what it already holds"
    );
    copy_and_finish(
        source,
        target,
        src,
        tgt,
        state,
        opts,
        snapshot,
        Some(snapshot_id),
        &checked,
        &entries,
        remaining,
        pipeline,
        true,
        started,
    )
    .await
}

/// How many CREATE TABLE statements go to the target in one round trip.
const CREATE_BATCH: usize = 200;

/// The steps every bootstrap ends with, fresh or resumed: copy the chunks, build keys
/// and indexes, record the finish, and sum up.
#[allow(clippy::too_many_arguments)]
async fn copy_and_finish(
    source: &Endpoint,
    target: &Endpoint,
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    opts: &BootstrapOptions,
    snapshot: SourceSnapshot,
    snapshot_id: Option<i64>,
    checked: &preflight::Checked,
    entries: &[TableEntry],
    chunks: Vec<ChunkRow>,
    mut pipeline: Pipeline,
    resumed: bool,
    started: Instant,
) -> Result<BootstrapSummary> {
    let positions = if snapshot_id.is_some() {
        chunks.len()
    } else {
        0
    };
    let copied = copy_chunks(
        source,
        target,
        snapshot,
        snapshot_id,
        checked,
        entries,
        chunks,
        opts,
        state,
    )
    .await?;
    finish(
        target,
        src,
        tgt,
        state,
        opts,
        &checked.tables,
        &mut pipeline,
    )
    .await?;
    Ok(BootstrapSummary {
        already_done: false,
        resumed,
        chunks_copied: copied,
        tables: table_totals(tgt, state, &opts.slot).await?,
        seconds: started.elapsed().as_secs_f64(),
        stream_start_lsn: pipeline.stream_start_lsn,
        copy_positions: positions,
        online_tables: 0,
    })
}

#[allow(clippy::too_many_arguments)]
async fn copy_chunks(
    source: &Endpoint,
    target: &Endpoint,
    snapshot: SourceSnapshot,
    snapshot_id: Option<i64>,
    checked: &preflight::Checked,
    entries: &[TableEntry],
    chunks: Vec<ChunkRow>,
    opts: &BootstrapOptions,
    state: &StateStore,
) -> Result<usize> {
    let count = chunks.len();
    let workers = opts.jobs.max(1).min(count.max(1));
    let snapshot_lsn = snapshot.lsn;
    // Every worker reads under the snapshot, holding its locks until it is done.
    let sessions = snapshot.into_sessions(source, "copy", workers).await?;

    let columns: HashMap<&QualifiedName, Option<String>> = entries
        .iter()
        .map(|e| (&e.name, e.chunk_column.clone()))
        .collect();
    let specs: HashMap<QualifiedName, CopySpec> = checked
        .tables
        .iter()
        .zip(&checked.fits)
        .map(|(t, fit)| {
            (
                t.name.clone(),
                CopySpec {
                    columns: t.copied_column_list(),
                    row_filter: t.row_filter.clone(),
                    binary: fit.binary(),
                    chunk_column: columns.get(&t.name).cloned().flatten(),
                },
            )
        })
        .collect();
    let progress = Progress::new(
        &checked
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.estimated_rows.max(0) as u64))
            .collect::<Vec<_>>(),
    );
    progress.expect_chunks(chunks.iter().map(|c| &c.table));
    let job = Arc::new(CopyJob {
        queue: Mutex::new(VecDeque::from(chunks)),
        specs,
        state: state.clone(),
        pipeline: opts.slot.clone(),
        snapshot_lsn,
        snapshot_id,
        failed: AtomicBool::new(false),
        progress: Arc::clone(&progress),
    });
    let display = progress.display();
    let mut handles = Vec::with_capacity(workers);
    for (i, session) in sessions.into_iter().enumerate() {
        let target_client = connect(target, "copy").await?;
        crate::target_checks::prepare_session(&target_client, &checked.target).await?;
        handles.push(tokio::spawn(copy::run_worker(
            Arc::clone(&job),
            i as i32,
            session,
            target_client,
        )));
    }
    let mut first_error = None;
    for h in handles {
        let result = h
            .await
            .map_err(|e| anyhow::anyhow!("a copy worker stopped unexpectedly: {e}"));
        if let Err(e) = result.and_then(|r| r) {
            first_error.get_or_insert(e);
        }
    }
    display.abort();
    match first_error {
        Some(e) => Err(e),
        None => Ok(count),
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    target: &Endpoint,
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    opts: &BootstrapOptions,
    tables: &[Table],
    pipeline: &mut Pipeline,
) -> Result<()> {
    // Pipelined like the plan: one at a time, the reads were two round trips per
    // table before the first build (2,000 tables: 4,000 in a row).
    let reads: Vec<_> = tables
        .iter()
        .map(|t| catalog::index_sql(src, tgt, t))
        .collect();
    let statements: Vec<Vec<String>> = futures_util::stream::iter(reads)
        .buffered(catalog::PIPELINE_DEPTH)
        .try_collect()
        .await?;
    let queue = Arc::new(Mutex::new(VecDeque::from_iter(
        statements.into_iter().flatten(),
    )));
    let mut handles = Vec::new();
    for _ in 0..opts.jobs.max(1) {
        let client = connect(target, "index build").await?;
        let queue = Arc::clone(&queue);
        handles.push(tokio::spawn(async move {
            // Each build commits by itself; waiting for its WAL flush (one per
            // table, thousands with many small tables) protects nothing: the
            // synchronous commit that records the bootstrap finished below flushes
            // every build before it, and after a crash before that, the rerun
            // builds whatever is missing (the statements skip existing indexes).
            client
                .batch_execute("SET maintenance_work_mem = '256MB'; SET synchronous_commit = off")
                .await
                .pg_context(|| "preparing an index build".into())?;
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(sql) = next else { break };
                client
                    .batch_execute(&sql)
                    .await
                    .pg_context(|| format!("building on the target: {sql}"))?;
                tracing::debug!(statement = %sql, "built index on the target");
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for h in handles {
        h.await
            .map_err(|e| anyhow::anyhow!("an index build stopped unexpectedly: {e}"))??;
    }

    pipeline.phase = Phase::Copied;
    let mut client = connect(target, "bootstrap finish").await?;
    let tx = client
        .transaction()
        .await
        .pg_context(|| "finishing the bootstrap".into())?;
    // Flushes the target's WAL past every asynchronous commit before it (the
    // chunks' and the index builds'), whatever the database's default.
    tx.batch_execute("SET LOCAL synchronous_commit = on")
        .await
        .pg_context(|| "finishing the bootstrap".into())?;
    state.save_pipeline(&tx, pipeline).await?;
    state
        .set_table_state(&tx, &pipeline.name, None, TableState::Ready)
        .await?;
    if state.progress(&tx, &pipeline.name).await?.is_none() {
        state
            .set_progress(
                &tx,
                &pipeline.name,
                pipeline.stream_start_lsn.unwrap_or_default(),
            )
            .await?;
    }
    tx.commit()
        .await
        .pg_context(|| "finishing the bootstrap".into())?;
    Ok(())
}

async fn table_totals(
    tgt: &Client,
    state: &StateStore,
    pipeline: &str,
) -> Result<Vec<TableSummary>> {
    Ok(state
        .table_totals(tgt, pipeline)
        .await?
        .into_iter()
        .map(|(table, rows, bytes)| TableSummary { table, rows, bytes })
        .collect())
}

/// Drops a slot, waiting for a just-stopped consumer to release it.
pub async fn drop_slot_if_exists(src: &Client, slot: &str) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let Some(info) = slot_info(src, slot).await? else {
            return Ok(());
        };
        if !info.active {
            match src
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
            {
                Ok(_) => return Ok(()),
                Err(e)
                    if Instant::now() < deadline
                        && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {}
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "cannot drop replication slot {slot} on the source: {}",
                        crate::pg::connect::describe(&e)
                    ))
                }
            }
        } else if Instant::now() >= deadline {
            bail!(
                "replication slot {slot} is in use by process {} on the source: stop that consumer first",
                info.active_pid.unwrap_or_default()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
