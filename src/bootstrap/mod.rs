//! The initial copy: a consistent, parallel, resumable snapshot of the source tables
//! on the target, and the slot position streaming continues from.
//!
//! Steps: preflight (nothing written until it passes) → publication and slot with an
//! exported snapshot → missing target tables created → chunk plan recorded → workers
//! copy chunks under the snapshot → keys and indexes built → consistent LSN recorded.
//! A rerun after a crash copies only the chunks not marked done, under a fresh
//! snapshot, and records the reconcile window (see `docs/design.md`).

pub mod copy;
pub mod plan;
pub mod preflight;
pub mod progress;
pub mod snapshot;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use crate::catalog::{self, Table, TargetFit};
use crate::config::Endpoint;
use crate::pg::replication::ReplicationClient;
use crate::pg::{connect, Lsn, PgResultExt, QualifiedName};
use crate::state::{Phase, Pipeline, StateStore};
use copy::{CopyJob, CopySpec};
use plan::Chunk;
use progress::Progress;
use snapshot::ExportedSnapshot;

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
    /// The slot's consistent point, where streaming starts.
    pub consistent_lsn: Option<Lsn>,
    /// Whether the target is already consistent (false after a resumed bootstrap
    /// until streaming passes the resume snapshot).
    pub consistent: bool,
}

impl BootstrapSummary {
    /// The summary as lines for a person: one per table, then the totals.
    pub fn render(&self) -> String {
        if self.already_done {
            return format!(
                "bootstrap already finished (consistent LSN {}); nothing copied",
                self.consistent_lsn
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
            self.consistent_lsn.map(|l| l.to_string()).unwrap_or_default(),
            if self.consistent { "" } else { " (reconciling until the stream passes the resume snapshot)" }
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
    let state = StateStore::open(&tgt, &opts.state_schema).await?;
    let existing = state.existing_pipeline(&tgt, &opts.slot).await?;
    match existing {
        Some(p)
            if matches!(
                p.phase,
                Phase::Copied | Phase::Streaming | Phase::CatchingUp
            ) =>
        {
            Ok(BootstrapSummary {
                already_done: true,
                resumed: false,
                chunks_copied: 0,
                tables: table_totals(&tgt, &state, &opts.slot).await?,
                seconds: started.elapsed().as_secs_f64(),
                consistent_lsn: p.consistent_lsn,
                consistent: p.consistent,
            })
        }
        Some(p) if p.phase == Phase::Bootstrapping => {
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
        consistent_lsn: None,
        snapshot_lsn: None,
        consistent: false,
        tables: table_names.clone(),
    };
    state.save_pipeline(tgt, &pipeline).await?;
    crate::publication::ensure(src, &checked.publication, &table_names).await?;
    if half_created {
        drop_slot_if_exists(src, &opts.slot).await?;
    }
    let mut repl = ReplicationClient::connect(source, None)
        .await
        .with_context(|| format!("opening a replication connection to {}", source.redacted))?;
    let slot = repl
        .create_slot_exporting_snapshot(&opts.slot)
        .await
        .with_context(|| format!("creating replication slot {} on the source", opts.slot))?;
    tracing::info!(slot = %opts.slot, lsn = %slot.consistent_point, "created replication slot");
    let snapshot = ExportedSnapshot::from_slot(repl, slot);

    for (table, fit) in checked.tables.iter().zip(&checked.fits) {
        match fit {
            TargetFit::Missing { .. } => {
                catalog::create_missing_types(src, tgt, table).await?;
                tgt.batch_execute(&catalog::create_table_sql(table))
                    .await
                    .pg_context(|| format!("creating table {} on the target", table.name))?;
                tracing::info!(table = %table.name, "created table on the target");
            }
            TargetFit::Exists { .. } if opts.truncate_target => {
                tgt.batch_execute(&format!("TRUNCATE {}", table.name.quoted()))
                    .await
                    .pg_context(|| format!("truncating {} on the target", table.name))?;
                tracing::info!(table = %table.name, "truncated target table (--truncate-target)");
            }
            TargetFit::Exists { .. } => {}
        }
    }

    let total_blocks: i64 = checked.tables.iter().map(|t| t.blocks).sum();
    let size = plan::chunk_blocks(total_blocks, opts.jobs);
    let mut by_size: Vec<&Table> = checked.tables.iter().collect();
    by_size.sort_by_key(|t| std::cmp::Reverse(t.blocks));
    let chunks: Vec<Chunk> = by_size
        .iter()
        .flat_map(|t| plan::split_table(&t.name, t.blocks, size))
        .collect();

    pipeline.phase = Phase::Bootstrapping;
    pipeline.consistent_lsn = Some(snapshot.lsn);
    pipeline.snapshot_lsn = Some(snapshot.lsn);
    {
        let mut tgt_tx = connect(target, "bootstrap plan").await?;
        let tx = tgt_tx
            .transaction()
            .await
            .pg_context(|| "recording the plan".into())?;
        state.save_pipeline(&tx, &pipeline).await?;
        plan::record(&tx, state, &opts.slot, &chunks).await?;
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
        source, target, src, tgt, state, opts, snapshot, &checked, chunks, pipeline, false, started,
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
    mut pipeline: Pipeline,
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
    let snapshot = ExportedSnapshot::export_new(source).await?;
    let consistent = pipeline.consistent_lsn.unwrap_or(snapshot.lsn);
    pipeline.snapshot_lsn = Some(
        snapshot
            .lsn
            .max(pipeline.snapshot_lsn.unwrap_or(consistent)),
    );
    state.save_pipeline(tgt, &pipeline).await?;
    let chunks = plan::remaining(tgt, state, &opts.slot).await?;
    tracing::info!(
        remaining_chunks = chunks.len(),
        consistent_lsn = %consistent,
        snapshot_lsn = %snapshot.lsn,
        "resuming an interrupted bootstrap under a new snapshot; streaming reconciles until it passes the snapshot"
    );
    copy_and_finish(
        source, target, src, tgt, state, opts, snapshot, &checked, chunks, pipeline, true, started,
    )
    .await
}

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
    snapshot: ExportedSnapshot,
    checked: &preflight::Checked,
    chunks: Vec<Chunk>,
    mut pipeline: Pipeline,
    resumed: bool,
    started: Instant,
) -> Result<BootstrapSummary> {
    let copied = copy_chunks(source, target, snapshot, checked, chunks, opts, state).await?;
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
        consistent_lsn: pipeline.consistent_lsn,
        consistent: pipeline.consistent,
    })
}

async fn copy_chunks(
    source: &Endpoint,
    target: &Endpoint,
    snapshot: ExportedSnapshot,
    checked: &preflight::Checked,
    chunks: Vec<Chunk>,
    opts: &BootstrapOptions,
    state: &StateStore,
) -> Result<usize> {
    let count = chunks.len();
    let workers = opts.jobs.max(1).min(count.max(1));
    // Every worker imports the snapshot before the exporting session is released.
    let mut sessions = Vec::with_capacity(workers);
    for _ in 0..workers {
        sessions.push(snapshot.import(source, "copy").await?);
    }
    let snapshot_lsn = snapshot.lsn;
    snapshot.release().await;

    let specs: HashMap<QualifiedName, CopySpec> = checked
        .tables
        .iter()
        .zip(&checked.fits)
        .map(|(t, fit)| {
            (
                t.name.clone(),
                CopySpec {
                    columns: t.copied_column_list(),
                    binary: fit.binary(),
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
    let job = Arc::new(CopyJob {
        queue: Mutex::new(VecDeque::from(chunks)),
        specs,
        state: state.clone(),
        pipeline: opts.slot.clone(),
        snapshot_lsn,
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
    let mut statements = Vec::new();
    for t in tables {
        statements.extend(catalog::index_sql(src, tgt, t).await?);
    }
    let queue = Arc::new(Mutex::new(VecDeque::from(statements)));
    let mut handles = Vec::new();
    for _ in 0..opts.jobs.max(1) {
        let client = connect(target, "index build").await?;
        let queue = Arc::clone(&queue);
        handles.push(tokio::spawn(async move {
            client
                .batch_execute("SET maintenance_work_mem = '256MB'")
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
    pipeline.consistent = pipeline.snapshot_lsn <= pipeline.consistent_lsn;
    let mut client = connect(target, "bootstrap finish").await?;
    let tx = client
        .transaction()
        .await
        .pg_context(|| "finishing the bootstrap".into())?;
    state.save_pipeline(&tx, pipeline).await?;
    if state.progress(&tx, &pipeline.name).await?.is_none() {
        state
            .set_progress(
                &tx,
                &pipeline.name,
                pipeline.consistent_lsn.unwrap_or_default(),
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
    let rows = tgt
        .query(
            &format!(
                "SELECT t.schema_name, t.table_name, coalesce(sum(c.rows_copied), 0)::bigint, coalesce(sum(c.bytes_copied), 0)::bigint \
                 FROM {} t LEFT JOIN {} c USING (pipeline, schema_name, table_name) \
                 WHERE t.pipeline = $1 GROUP BY t.schema_name, t.table_name, t.position ORDER BY t.position",
                state.table("pipeline_tables"),
                state.table("chunks")
            ),
            &[&pipeline],
        )
        .await
        .pg_context(|| "summing the copy".into())?;
    Ok(rows
        .iter()
        .map(|r| TableSummary {
            table: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            rows: r.get(2),
            bytes: r.get(3),
        })
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
