//! `walshuttle catch-up`: repairs a gap without a full recopy when the WAL is gone
//! (slot dropped or invalidated) or was never available (`wal_level = replica`).
//!
//! Under one consistent source snapshot (a new slot's exported snapshot where logical
//! decoding exists, a REPEATABLE READ snapshot otherwise) it upserts every row whose
//! `created_at`/`updated_at` is at or after the table's watermark minus a margin
//! (inclusive: millions of rows share one timestamp), finds rows deleted on the
//! source by comparing key hashes by range, deletes them on the target, and records
//! the new slot's position for `run` to stream from.
//!
//! Watermarks are derived from the target itself (`max(created_at)`,
//! `max(updated_at)` of the applied rows) rather than maintained per row on the
//! apply path; the margin is widened to the oldest source transaction that was open
//! while `run` last streamed, so a long transaction that began before the watermark
//! and committed after it is not missed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::bootstrap::snapshot::{ExportedSnapshot, SnapshotSession};
use crate::bootstrap::{self, drop_slot_if_exists, slot_info};
use crate::catalog::{self, Table, TargetFit};
use crate::compare::{self, Compared, CANONICAL_TEXT};
use crate::config::Endpoint;
use crate::pg::replication::ReplicationClient;
use crate::pg::{connect, quote_ident, Lsn, PgResultExt, QualifiedName};
use crate::state::{Phase, Pipeline, StateStore};

/// Settings of `catch-up`.
#[derive(Clone, Debug)]
pub struct CatchUpOptions {
    /// Slot (= pipeline) name.
    pub slot: String,
    /// Publication name; `None`: the one the pipeline's state records, else the
    /// slot's name.
    pub publication: Option<String>,
    /// Fire target foreign keys and triggers on repaired rows as for any writer.
    pub allow_target_triggers: bool,
    /// State schema on the target.
    pub state_schema: String,
    /// Tables; `None`: the pipeline's, else every source table.
    pub tables: Option<Vec<QualifiedName>>,
    /// Parallel workers.
    pub jobs: usize,
    /// Safety margin subtracted from the watermarks.
    pub margin: Duration,
    /// Per-table (or default, keyed by `None`) created-at column names.
    pub created_columns: HashMap<Option<QualifiedName>, String>,
    /// Per-table (or default) updated-at column names.
    pub updated_columns: HashMap<Option<QualifiedName>, String>,
    /// Repair from a plain snapshot without creating a slot (the polling mode).
    pub without_slot: bool,
}

impl CatchUpOptions {
    fn column(
        map: &HashMap<Option<QualifiedName>, String>,
        table: &QualifiedName,
        default: &str,
    ) -> String {
        map.get(&Some(table.clone()))
            .or_else(|| map.get(&None))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
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

/// What a catch-up did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CatchUpSummary {
    /// Why it ran.
    pub reason: GapReason,
    /// Tables looked at.
    pub tables: usize,
    /// Rows read from the source and upserted on the target (watermark window and
    /// rows found missing).
    pub rows_upserted: u64,
    /// Rows deleted on the target (deleted on the source).
    pub rows_deleted: u64,
    /// Tables without watermark columns: only `verify --repair` repairs them.
    pub tables_without_watermarks: Vec<QualifiedName>,
    /// The new slot's position, where `run` streams from.
    pub resume_lsn: Option<Lsn>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl CatchUpSummary {
    /// One line for a person (plus a line per table that could not be repaired).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.tables_without_watermarks {
            out.push_str(&format!(
                "warning: {t} has no created/updated columns: catch-up repaired only its deletes and missing rows; run `walshuttle verify --repair` for changed rows\n"
            ));
        }
        out.push_str(&format!(
            "catch-up finished ({:?}): {} tables, {} rows upserted, {} rows deleted in {:.1} s{}",
            self.reason,
            self.tables,
            self.rows_upserted,
            self.rows_deleted,
            self.seconds,
            self.resume_lsn
                .map(|l| format!("; streaming resumes at {l}"))
                .unwrap_or_default()
        ));
        out
    }
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

/// Runs one catch-up. With a healthy slot and a finished pipeline there is nothing to
/// repair and it says so.
pub async fn catch_up(
    source: &Endpoint,
    target: &Endpoint,
    opts: &CatchUpOptions,
) -> Result<CatchUpSummary> {
    let started = Instant::now();
    let src = connect(source, "catch-up").await?;
    let tgt = connect(target, "catch-up").await?;
    let state = StateStore::open(&tgt, &opts.state_schema).await?;
    let pipeline = state.existing_pipeline(&tgt, &opts.slot).await?;
    let detected = gap_reason(&src, &opts.slot).await?;
    let reason = match (&detected, &pipeline) {
        _ if opts.without_slot => GapReason::Polling,
        (Some(r), _) => r.clone(),
        (None, Some(p)) if p.phase == Phase::CatchingUp => GapReason::Resumed,
        (None, _) => {
            bail!(
                "replication slot {} is healthy: there is no gap to repair; `walshuttle run` streams from it",
                opts.slot
            )
        }
    };
    let use_slot = !matches!(reason, GapReason::NoLogicalDecoding | GapReason::Polling);
    if use_slot {
        bootstrap::preflight::check_source_replication(&src, &opts.slot).await?;
    }
    let tables =
        crate::verify::resolve_tables(&src, &tgt, &state, &opts.slot, opts.tables.as_deref())
            .await?;
    if tables.is_empty() {
        bail!("no tables to catch up: name them with --tables");
    }
    for t in &tables {
        if let Some(problem) = t.replicability_problem() {
            if use_slot {
                bail!(problem);
            }
        }
    }
    let oldest_xact = match &pipeline {
        Some(_) => read_oldest_xact(&tgt, &state, &opts.slot).await?,
        None => None,
    };
    let publication =
        crate::publication::plan(&src, &tgt, &state, &opts.slot, opts.publication.as_deref())
            .await?;
    let names = tables.iter().map(|t| &t.name);
    let target_setup =
        crate::target_checks::decide(&tgt, names, opts.allow_target_triggers).await?;
    state.migrate(&tgt).await?;
    let mut pipeline = pipeline.unwrap_or(Pipeline {
        name: opts.slot.clone(),
        publication: publication.name.clone(),
        phase: Phase::CatchingUp,
        consistent_lsn: None,
        snapshot_lsn: None,
        consistent: false,
        tables: tables.iter().map(|t| t.name.clone()).collect(),
    });

    // Missing target tables are created, as bootstrap would.
    let mut fits = Vec::with_capacity(tables.len());
    for t in &tables {
        let fit = catalog::check_target(&tgt, t).await?;
        if let TargetFit::Missing { .. } = fit {
            catalog::create_missing_types(&src, &tgt, t).await?;
            tgt.batch_execute(&catalog::create_table_sql(t))
                .await
                .pg_context(|| format!("creating table {} on the target", t.name))?;
            for sql in catalog::index_sql(&src, &tgt, t).await? {
                tgt.batch_execute(&sql)
                    .await
                    .pg_context(|| format!("building on the target: {sql}"))?;
            }
        }
        fits.push(fit);
    }

    // The snapshot, and where streaming continues.
    let snapshot = if use_slot && reason != GapReason::Resumed {
        pipeline.phase = Phase::CatchingUp;
        state.save_pipeline(&tgt, &pipeline).await?;
        let names: Vec<QualifiedName> = tables.iter().map(|t| t.name.clone()).collect();
        crate::publication::ensure(&src, &publication, &names).await?;
        drop_slot_if_exists(&src, &opts.slot).await?;
        let mut repl = ReplicationClient::connect(source, None)
            .await
            .with_context(|| format!("opening a replication connection to {}", source.redacted))?;
        let slot = repl
            .create_slot_exporting_snapshot(&opts.slot)
            .await
            .with_context(|| format!("creating replication slot {} on the source", opts.slot))?;
        tracing::info!(slot = %opts.slot, lsn = %slot.consistent_point, ?reason, "created a new slot for catch-up");
        pipeline.consistent_lsn = Some(slot.consistent_point);
        pipeline.snapshot_lsn = Some(slot.consistent_point);
        pipeline.consistent = true;
        ExportedSnapshot::from_slot(repl, slot)
    } else {
        let snapshot = ExportedSnapshot::export_new(source).await?;
        if reason == GapReason::Resumed {
            // The slot's snapshot died with the interrupted run: changes between the
            // slot and this snapshot are applied in reconcile mode.
            pipeline.snapshot_lsn = Some(snapshot.lsn);
            pipeline.consistent = false;
        }
        snapshot
    };
    if use_slot {
        state.save_pipeline(&tgt, &pipeline).await?;
    }

    let work: VecDeque<usize> = (0..tables.len()).collect();
    let tables = Arc::new(tables);
    let results = repair_tables(
        source,
        target,
        snapshot,
        &tables,
        &fits,
        work,
        opts,
        oldest_xact,
        &target_setup,
    )
    .await?;
    let mut summary = CatchUpSummary {
        reason,
        tables: tables.len(),
        rows_upserted: 0,
        rows_deleted: 0,
        tables_without_watermarks: Vec::new(),
        resume_lsn: None,
        seconds: 0.0,
    };
    for r in results {
        summary.rows_upserted += r.upserted;
        summary.rows_deleted += r.deleted;
        if r.no_watermarks {
            summary.tables_without_watermarks.push(r.table);
        }
    }
    if use_slot {
        pipeline.phase = Phase::Copied;
        let mut client = connect(target, "catch-up finish").await?;
        let tx = client
            .transaction()
            .await
            .pg_context(|| "finishing the catch-up".into())?;
        state.save_pipeline(&tx, &pipeline).await?;
        if let Some(lsn) = pipeline.consistent_lsn {
            state.set_progress(&tx, &pipeline.name, lsn).await?;
        }
        tx.commit()
            .await
            .pg_context(|| "finishing the catch-up".into())?;
        summary.resume_lsn = pipeline.consistent_lsn;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

struct TableResult {
    table: QualifiedName,
    upserted: u64,
    deleted: u64,
    no_watermarks: bool,
}

#[allow(clippy::too_many_arguments)]
async fn repair_tables(
    source: &Endpoint,
    target: &Endpoint,
    snapshot: ExportedSnapshot,
    tables: &Arc<Vec<Table>>,
    fits: &[TargetFit],
    work: VecDeque<usize>,
    opts: &CatchUpOptions,
    oldest_xact: Option<String>,
    target_setup: &crate::target_checks::TargetSetup,
) -> Result<Vec<TableResult>> {
    let workers = opts.jobs.max(1).min(work.len().max(1));
    let mut sessions = Vec::with_capacity(workers);
    for _ in 0..workers {
        let s = snapshot.import(source, "catch-up").await?;
        s.client
            .batch_execute(CANONICAL_TEXT)
            .await
            .pg_context(|| "preparing a catch-up session".into())?;
        sessions.push(s);
    }
    snapshot.release().await;
    let queue = Arc::new(Mutex::new(work));
    let fits = Arc::new(fits.to_vec());
    let mut handles = Vec::new();
    for session in sessions {
        let queue = Arc::clone(&queue);
        let tables = Arc::clone(tables);
        let fits = Arc::clone(&fits);
        let opts = opts.clone();
        let oldest_xact = oldest_xact.clone();
        let mut tgt = connect(target, "catch-up").await?;
        crate::target_checks::prepare_session(&tgt, target_setup).await?;
        tgt.batch_execute(CANONICAL_TEXT)
            .await
            .pg_context(|| "preparing a catch-up session".into())?;
        handles.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(i) = next else { break };
                let r = repair_table(
                    &session,
                    &mut tgt,
                    &tables[i],
                    fits[i].binary(),
                    &opts,
                    oldest_xact.as_deref(),
                )
                .await?;
                results.push(r);
            }
            let _ = session.client.batch_execute("COMMIT").await;
            Ok::<_, anyhow::Error>(results)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(
            h.await
                .map_err(|e| anyhow::anyhow!("a catch-up worker stopped: {e}"))??,
        );
    }
    Ok(all)
}

async fn repair_table(
    source: &SnapshotSession,
    tgt: &mut Client,
    table: &Table,
    binary: bool,
    opts: &CatchUpOptions,
    oldest_xact: Option<&str>,
) -> Result<TableResult> {
    let src = &source.client;
    let created = CatchUpOptions::column(&opts.created_columns, &table.name, "created_at");
    let updated = CatchUpOptions::column(&opts.updated_columns, &table.name, "updated_at");
    let has = |c: &str| table.columns.iter().any(|col| col.name == c);
    let watermark_cols: Vec<String> = [created, updated].into_iter().filter(|c| has(c)).collect();
    let mut upserted = 0u64;
    if !watermark_cols.is_empty() && !table.key.is_empty() {
        let condition =
            watermark_condition(tgt, table, &watermark_cols, opts.margin, oldest_xact).await?;
        upserted += upsert_where(src, tgt, table, binary, &condition).await?;
        tracing::info!(table = %table.name, rows = upserted, window = %condition, "upserted rows changed since the watermark");
    }
    // Deletes (and rows missing on the target): compare keys by range.
    let mut deleted = 0u64;
    let ranges = compare::plan_ranges(src, tgt, table, 1).await?;
    for range in ranges {
        let (s, t) = tokio::try_join!(
            compare::digest(src, table, &range, Compared::KeysOnly),
            compare::digest(tgt, table, &range, Compared::KeysOnly)
        )?;
        if s == t {
            continue;
        }
        let diff = compare::diff_keys(src, tgt, table, &range, Compared::KeysOnly, None).await?;
        let keys: Vec<String> = diff
            .to_copy
            .iter()
            .chain(&diff.to_delete)
            .cloned()
            .collect();
        let (d, c) = compare::repair_keys(src, tgt, table, &range, &keys).await?;
        // Keys to copy are absent on the target, so every deleted row was extra.
        deleted += d;
        upserted += c;
    }
    Ok(TableResult {
        table: table.name.clone(),
        upserted,
        deleted,
        no_watermarks: watermark_cols.is_empty() || table.key.is_empty(),
    })
}

/// `col >= watermark - margin OR …` for each watermark column, with the watermark
/// read from the target's applied rows and widened to the oldest source transaction
/// open while streaming last ran.
async fn watermark_condition(
    tgt: &Client,
    table: &Table,
    cols: &[String],
    margin: Duration,
    oldest_xact: Option<&str>,
) -> Result<String> {
    let mut conds = Vec::new();
    for c in cols {
        let q = quote_ident(c);
        let wm: Option<String> = tgt
            .query_one(
                &format!("SELECT max({q})::text FROM {}", table.name.quoted()),
                &[],
            )
            .await
            .pg_context(|| format!("reading the watermark of {}.{c} on the target", table.name))?
            .get(0);
        let Some(wm) = wm else {
            // Nothing applied yet: every row is in the window.
            return Ok("true".into());
        };
        let bound = match oldest_xact {
            Some(o) => format!(
                "least({}::timestamptz, {}::timestamptz) - interval '{} microseconds'",
                crate::pg::quote_literal(&wm),
                crate::pg::quote_literal(o),
                margin.as_micros()
            ),
            None => format!(
                "{}::timestamptz - interval '{} microseconds'",
                crate::pg::quote_literal(&wm),
                margin.as_micros()
            ),
        };
        conds.push(format!("{q} >= {bound}"));
    }
    Ok(conds.join(" OR "))
}

/// Copies the source rows matching `condition` into a temporary table on the target
/// and upserts them by key, in one target transaction.
async fn upsert_where(
    src: &Client,
    tgt: &mut Client,
    table: &Table,
    binary: bool,
    condition: &str,
) -> Result<u64> {
    let cols = table.copied_column_list();
    let ctx = || format!("upserting changed rows of {}", table.name);
    let tx = tgt.transaction().await.pg_context(ctx)?;
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE walshuttle_catchup ON COMMIT DROP AS SELECT {cols} FROM {} WITH NO DATA",
        table.name.quoted()
    ))
    .await
    .pg_context(ctx)?;
    let format = if binary { " (FORMAT binary)" } else { "" };
    let reader = src
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM {} WHERE {condition}) TO STDOUT{format}",
            table.name.quoted()
        ))
        .await
        .pg_context(ctx)?;
    let writer = tx
        .copy_in::<_, bytes::Bytes>(&format!(
            "COPY walshuttle_catchup ({cols}) FROM STDIN{format}"
        ))
        .await
        .pg_context(ctx)?;
    futures_util::pin_mut!(reader);
    futures_util::pin_mut!(writer);
    while let Some(chunk) = reader.next().await {
        writer.feed(chunk.pg_context(ctx)?).await.pg_context(ctx)?;
    }
    let rows = writer.finish().await.pg_context(ctx)?;
    let keys = table
        .key
        .iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    let sets: Vec<String> = table
        .copied_columns()
        .iter()
        .filter(|c| !table.key.contains(&c.name))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
        .collect();
    let action = if sets.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", sets.join(", "))
    };
    tx.batch_execute(&format!(
        "INSERT INTO {} ({cols}) SELECT {cols} FROM walshuttle_catchup ON CONFLICT ({keys}) {action}",
        table.name.quoted()
    ))
    .await
    .pg_context(ctx)?;
    tx.commit().await.pg_context(ctx)?;
    Ok(rows)
}

async fn read_oldest_xact(tgt: &Client, state: &StateStore, slot: &str) -> Result<Option<String>> {
    let row = tgt
        .query_opt(
            &format!(
                "SELECT oldest_xact_at::text FROM {} WHERE pipeline = $1",
                state.table("pipelines")
            ),
            &[&slot],
        )
        .await
        .pg_context(|| {
            "reading the oldest open source transaction recorded while streaming".into()
        })?;
    Ok(row.and_then(|r| r.get(0)))
}
