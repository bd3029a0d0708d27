//! `walshuttle catch-up`: repairs a gap without a full recopy when the WAL is gone
//! (slot dropped or invalidated) or was never available (`wal_level = replica`).
//!
//! Under one source snapshot (a new slot's exported snapshot where logical decoding
//! exists, a plain `REPEATABLE READ` snapshot otherwise) every table is made equal to
//! the source as of that snapshot, and this is proven, not hoped:
//!
//! 1. **Fast path.** Rows whose `created_at`/`updated_at` is at or after the table's
//!    watermark minus a margin (inclusive: millions of rows share one timestamp) are
//!    rewritten in bulk. Watermarks are derived from the target's own rows.
//! 2. **Proof.** Every row is compared by key range (count and hash of whole rows)
//!    under the same snapshot; whatever the window missed (an application that does
//!    not advance `updated_at`, a long transaction that stamped an old time, clock
//!    skew) is found and rewritten, with all of a table's differing keys in one
//!    transaction, deletes first, so no UNIQUE constraint can trip.
//!
//! Under the new slot's own snapshot the stream starts exactly after what was read,
//! so nothing more is needed. A catch-up interrupted after its slot was created
//! finishes under a plain snapshot, whose visibility becomes each repaired table's
//! copy position (see [`crate::positions`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::bootstrap::{self, create_slot_with_snapshot, drop_slot_if_exists};
use crate::catalog::{self, Table, TargetFit};
use crate::compare::{self, Compared, Key};
use crate::config::{Endpoint, Side};
use crate::pg::{connect, quote_ident, quote_literal, Lsn, PgResultExt, QualifiedName};
use crate::rewrite::{self, Rows};
pub use crate::slot::{gap_reason, GapReason, SlotGone};
use crate::snapshot::{SnapshotSession, SourceSnapshot};
use crate::state::{Phase, Pipeline, StateStore, StoredScope, TableEntry, TableState};

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
    /// `--schemas`/`--exclude-schemas`/`--exclude-tables`: tables left out.
    pub filter: crate::selection::TableFilter,
    /// Column lists and row filters (`--columns`, `--row-filter`): for a target
    /// without a pipeline (a pipeline has its own).
    pub rows: crate::row_selection::RowSelection,
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

/// What a catch-up did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CatchUpSummary {
    /// Why it ran.
    pub reason: GapReason,
    /// Tables looked at.
    pub tables: usize,
    /// Rows copied from the source to the target (window and proof).
    pub rows_upserted: u64,
    /// Rows deleted on the target (deleted on the source).
    pub rows_deleted: u64,
    /// Rows found different by the proof after the fast path (what the watermark
    /// window alone would have missed).
    pub rows_missed_by_window: u64,
    /// Tables without watermark columns: repaired by the comparison alone.
    pub tables_without_watermarks: Vec<QualifiedName>,
    /// The new slot's position, where `run` streams from.
    pub resume_lsn: Option<Lsn>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl CatchUpSummary {
    /// One line for a person (plus a line per table without watermark columns).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.tables_without_watermarks {
            out.push_str(&format!(
                "note: {t} has no created/updated columns: catch-up repaired it by comparing every row\n"
            ));
        }
        out.push_str(&format!(
            "catch-up finished ({:?}): {} tables, {} rows upserted, {} rows deleted ({} found only by the row comparison) in {:.1} s{}",
            self.reason,
            self.tables,
            self.rows_upserted,
            self.rows_deleted,
            self.rows_missed_by_window,
            self.seconds,
            self.resume_lsn
                .map(|l| format!("; streaming resumes at {l}"))
                .unwrap_or_default()
        ));
        out
    }
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
    // Never the source's own database (it would upsert rows onto themselves and
    // create a slot that waits on this session).
    bootstrap::preflight::refuse_same_database(&src, &tgt).await?;
    let state = StateStore::open_upgrading(&tgt, &opts.state_schema).await?;
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
    let mut tables =
        crate::verify::resolve_tables(&src, &tgt, &state, &opts.slot, opts.tables.as_deref())
            .await?;
    // A pipeline's tables are filtered already; without one (polling) the filter
    // leaves tables out here, before the keyless-table check.
    tables.retain(|t| opts.filter.keeps(&t.name));
    if tables.is_empty() {
        bail!("no tables to catch up: name them with --tables");
    }
    // A pipeline's lists and filters narrowed the tables already (and other ones
    // given now are refused); without a pipeline, the flags' apply.
    let new_pipeline = pipeline.is_none();
    if !new_pipeline {
        crate::row_selection::check_unchanged(&tgt, &state, &opts.slot, &opts.rows).await?;
    } else if !opts.rows.is_empty() {
        match use_slot {
            true => crate::row_selection::check_source(&src, &tables, &opts.rows).await?,
            false => crate::row_selection::check_named(&tables, &opts.rows)?,
        }
        opts.rows.narrow_all(&mut tables)?;
    }
    if use_slot {
        for t in &tables {
            if let Some(problem) = t.replicability_problem() {
                bail!(problem);
            }
        }
    }
    let publication =
        crate::publication::plan(&src, &tgt, &state, &opts.slot, opts.publication.as_deref())
            .await?;
    let target_setup = crate::target_checks::decide(
        &tgt,
        tables.iter().map(|t| &t.name),
        opts.allow_target_triggers,
    )
    .await?;
    state.migrate(&tgt).await?;
    let names: Vec<QualifiedName> = tables.iter().map(|t| t.name.clone()).collect();
    if use_slot {
        // A copy of a held table (`run`'s online copier, a `tables add|resync`) may
        // be in flight: it finishes before the tables are repaired, and no new one
        // starts while this session holds the tables' copy locks (to its end).
        for name in &names {
            crate::tables::lock_copy(&tgt, &state, &opts.slot, name, true).await?;
        }
    }
    let mut pipeline = pipeline.unwrap_or(Pipeline {
        name: opts.slot.clone(),
        publication: publication.name.clone(),
        phase: Phase::CatchingUp,
        stream_start_lsn: None,
        tables: names.clone(),
        stop_reason: None,
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

    // Which tables to repair, under which snapshot.
    let mut todo: Vec<usize> = (0..tables.len()).collect();
    let (snapshot, snapshot_id) = match reason {
        GapReason::Resumed => {
            // Tables the interrupted run finished are equal as of the slot's own
            // snapshot; the rest are repaired under a new one.
            let entries = state.table_entries(&tgt, &opts.slot).await?;
            // With no table marked as still repairing, nothing tells which were
            // finished: compare them all.
            if entries.iter().any(|e| e.state == TableState::Repairing) {
                todo.retain(|&i| {
                    entries
                        .iter()
                        .find(|e| e.name == tables[i].name)
                        .is_none_or(|e| e.state != TableState::Ready)
                });
            }
            let lock: Vec<QualifiedName> = todo.iter().map(|&i| tables[i].name.clone()).collect();
            let snapshot = SourceSnapshot::take(source, &lock).await?;
            let id = match &snapshot.view {
                Some(view) => Some(
                    state
                        .record_snapshot(&tgt, &opts.slot, view, "catch-up resume")
                        .await?,
                ),
                None => None,
            };
            (snapshot, id)
        }
        _ if use_slot => {
            pipeline.phase = Phase::CatchingUp;
            state.save_pipeline(&tgt, &pipeline).await?;
            if new_pipeline {
                // A pipeline begun here records the flags' lists and filters.
                state
                    .set_row_selection(&tgt, &opts.slot, &opts.rows)
                    .await?;
            }
            let entries: Vec<TableEntry> = names
                .iter()
                .map(|t| TableEntry {
                    name: t.clone(),
                    state: TableState::Repairing,
                    chunk_column: None,
                })
                .collect();
            state.set_tables(&tgt, &opts.slot, &entries).await?;
            let rows = match new_pipeline {
                true => opts.rows.clone(),
                false => crate::row_selection::current(&src, &tgt, &state, &opts.slot).await?,
            };
            crate::publication::ensure(&src, &publication, &names, &rows).await?;
            drop_slot_if_exists(&src, &opts.slot).await?;
            let snapshot = create_slot_with_snapshot(source, &src, &opts.slot, &names).await?;
            tracing::info!(slot = %opts.slot, lsn = %snapshot.lsn, ?reason, "created a new slot for catch-up");
            // The new slot streams everything after its snapshot: older positions
            // describe nothing it will send.
            pipeline.stream_start_lsn = Some(snapshot.lsn);
            state.clear_positions(&tgt, &opts.slot, None).await?;
            // Changes held for tables being copied came from the old slot: the
            // repair below makes those tables equal to the new slot's snapshot.
            state.clear_held(&tgt, &opts.slot).await?;
            state.save_pipeline(&tgt, &pipeline).await?;
            (snapshot, None)
        }
        _ => (SourceSnapshot::take(source, &names).await?, None),
    };

    let results = repair_tables(
        source,
        target,
        snapshot,
        &tables,
        &fits,
        todo.into_iter().collect(),
        opts,
        &state,
        if use_slot {
            Some(opts.slot.as_str())
        } else {
            None
        },
        snapshot_id,
        &target_setup,
    )
    .await?;
    let mut summary = CatchUpSummary {
        reason,
        tables: tables.len(),
        rows_upserted: 0,
        rows_deleted: 0,
        rows_missed_by_window: 0,
        tables_without_watermarks: Vec::new(),
        resume_lsn: None,
        seconds: 0.0,
    };
    for r in results {
        summary.rows_upserted += r.copied;
        summary.rows_deleted += r.deleted;
        summary.rows_missed_by_window += r.missed_by_window;
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
        state
            .set_table_state(&tx, &opts.slot, None, TableState::Ready)
            .await?;
        // The new slot streams from its start; a pipeline that had applied further
        // (an upgrade from the first release) goes on from there.
        if let Some(lsn) = pipeline.stream_start_lsn {
            let applied = state.progress(&tx, &pipeline.name).await?;
            state
                .set_progress(&tx, &pipeline.name, applied.unwrap_or(lsn).max(lsn))
                .await?;
        }
        tx.commit()
            .await
            .pg_context(|| "finishing the catch-up".into())?;
        summary.resume_lsn = pipeline.stream_start_lsn;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

struct TableResult {
    table: QualifiedName,
    copied: u64,
    deleted: u64,
    missed_by_window: u64,
    no_watermarks: bool,
}

/// Where a repaired table's copy position goes, if it needs one.
struct PositionTarget<'a> {
    state: &'a StateStore,
    pipeline: Option<&'a str>,
    snapshot_id: Option<i64>,
}

#[allow(clippy::too_many_arguments)]
async fn repair_tables(
    source: &Endpoint,
    target: &Endpoint,
    snapshot: SourceSnapshot,
    tables: &[Table],
    fits: &[TargetFit],
    work: VecDeque<usize>,
    opts: &CatchUpOptions,
    state: &StateStore,
    pipeline: Option<&str>,
    snapshot_id: Option<i64>,
    target_setup: &crate::target_checks::TargetSetup,
) -> Result<Vec<TableResult>> {
    let workers = opts.jobs.max(1).min(work.len().max(1));
    let sessions = snapshot.into_sessions(source, "catch-up", workers).await?;
    let queue = Arc::new(Mutex::new(work));
    let tables = Arc::new(tables.to_vec());
    let fits = Arc::new(fits.to_vec());
    let mut handles = Vec::new();
    for session in sessions {
        let queue = Arc::clone(&queue);
        let tables = Arc::clone(&tables);
        let fits = Arc::clone(&fits);
        let opts = opts.clone();
        let state = state.clone();
        let pipeline = pipeline.map(str::to_string);
        let mut tgt = connect(target, "catch-up").await?;
        crate::target_checks::prepare_session(&tgt, target_setup).await?;
        handles.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(i) = next else { break };
                let position = PositionTarget {
                    state: &state,
                    pipeline: pipeline.as_deref(),
                    snapshot_id,
                };
                let r = repair_table(
                    &session,
                    &mut tgt,
                    &tables[i],
                    fits[i].binary(),
                    &opts,
                    &position,
                )
                .await?;
                results.push(r);
            }
            let _ = session.client.batch_execute("COMMIT").await;
            Ok::<_, anyhow::Error>(results)
        }));
    }
    let mut all = Vec::new();
    let mut first_error = None;
    for h in handles {
        match h
            .await
            .map_err(|e| anyhow::anyhow!("a catch-up worker stopped: {e}"))
            .and_then(|r| r)
        {
            Ok(r) => all.extend(r),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(all),
    }
}

/// Makes one table equal to the source as of the session's snapshot, in one target
/// transaction: the watermark window first, then the proof by row comparison.
async fn repair_table(
    source: &SnapshotSession,
    tgt: &mut Client,
    table: &Table,
    binary: bool,
    opts: &CatchUpOptions,
    position: &PositionTarget<'_>,
) -> Result<TableResult> {
    let src = &source.client;
    let created = CatchUpOptions::column(&opts.created_columns, &table.name, "created_at");
    let updated = CatchUpOptions::column(&opts.updated_columns, &table.name, "updated_at");
    let has = |c: &str| table.columns.iter().any(|col| col.name == c);
    let watermark_cols: Vec<String> = [created, updated].into_iter().filter(|c| has(c)).collect();
    let ctx = || format!("repairing {} on the target", table.name);
    let tx = tgt.transaction().await.pg_context(ctx)?;
    let mut copied = 0u64;
    let windowed = !watermark_cols.is_empty() && !table.key.is_empty();
    if windowed {
        let (condition, marks) =
            watermark_condition(&tx, table, &watermark_cols, opts.margin).await?;
        let window = rewrite::unless_conflict(
            &tx,
            "walshuttle_window",
            rewrite::rewrite(src, &tx, table, &Rows::Where(condition.clone()), binary),
        )
        .await?;
        match window {
            Some((_, c)) => {
                copied += c;
                tracing::info!(table = %table.name, rows = c, window = %condition, "rewrote rows changed since the watermark");
            }
            None => {
                tracing::info!(table = %table.name, "the watermark window collides with rows changed outside it: leaving it to the row comparison");
            }
        }
        if let Some(pipeline) = position.pipeline {
            position
                .state
                .set_watermark(
                    &tx,
                    pipeline,
                    &table.name,
                    marks.0.as_deref(),
                    marks.1.as_deref(),
                )
                .await?;
        }
    }

    // The proof: every row compared under the same snapshot.
    let mut to_rewrite: Vec<Key> = Vec::new();
    let mut extra = 0u64;
    let mut keyless_differs = false;
    let mut compared = table.clone();
    compare::note_target_types(&tx, &mut compared).await?;
    let table = &compared;
    let ranges = compare::plan_ranges(src, &tx, table, 1).await?;
    for range in ranges {
        // A range of an integer key goes straight to its bucket digests (one pass
        // per side says both whether and where it differs); any other range is
        // hashed whole first, both sides at once.
        let bucketed = matches!(range, compare::KeyRange::Int { .. }) && table.key.len() == 1;
        if !bucketed {
            let (s, t) = tokio::try_join!(
                compare::digest(src, Side::Source, table, &range, Compared::WholeRows),
                compare::digest(&tx, Side::Target, table, &range, Compared::WholeRows)
            )?;
            if s == t {
                continue;
            }
        }
        if table.key.is_empty() {
            keyless_differs = true;
            break;
        }
        let diff = compare::diff_keys(src, &tx, table, &range, Compared::WholeRows, None).await?;
        extra += diff.to_delete.len() as u64;
        to_rewrite.extend(diff.keys());
    }
    let missed = to_rewrite.len() as u64;
    let mut deleted = 0u64;
    if keyless_differs {
        let before = rewrite::count_rows(&tx, &table.name).await?;
        let (_, c) = rewrite::rewrite(src, &tx, table, &Rows::All, binary).await?;
        copied += c;
        deleted += (before as u64).saturating_sub(c);
    } else if !to_rewrite.is_empty() {
        let (_, c) = rewrite::rewrite(src, &tx, table, &Rows::Keys(to_rewrite), binary).await?;
        copied += c;
        deleted += extra;
    }
    if let (Some(pipeline), Some(id)) = (position.pipeline, position.snapshot_id) {
        position
            .state
            .add_position(&tx, pipeline, &table.name, &StoredScope::Table, id)
            .await?;
    }
    if let Some(pipeline) = position.pipeline {
        position
            .state
            .set_table_state(&tx, pipeline, Some(&table.name), TableState::Ready)
            .await?;
    }
    tx.commit().await.pg_context(ctx)?;
    if missed > 0 {
        tracing::info!(table = %table.name, rows = missed, "the row comparison found rows the watermark window missed");
    }
    Ok(TableResult {
        table: table.name.clone(),
        copied,
        deleted,
        missed_by_window: if windowed || keyless_differs {
            missed
        } else {
            0
        },
        no_watermarks: !windowed,
    })
}

/// `col >= watermark - margin OR …` for each watermark column, with the watermark
/// read from the target's applied rows; also returns the watermarks.
async fn watermark_condition(
    tgt: &impl tokio_postgres::GenericClient,
    table: &Table,
    cols: &[String],
    margin: Duration,
) -> Result<(String, (Option<String>, Option<String>))> {
    let mut conds = Vec::new();
    let mut marks = Vec::new();
    let own = crate::own_rows::own_rows_on(tgt, &table.name).await?;
    for c in cols {
        let q = quote_ident(c);
        let wm: Option<String> = tgt
            .query_one(&format!("SELECT max({q})::text FROM {own}"), &[])
            .await
            .pg_context(|| format!("reading the watermark of {}.{c} on the target", table.name))?
            .get(0);
        let Some(wm) = wm else {
            // Nothing applied yet: every row is in the window.
            return Ok(("true".into(), (None, None)));
        };
        conds.push(format!(
            "{q} >= {}::timestamptz - interval '{} microseconds'",
            quote_literal(&wm),
            margin.as_micros()
        ));
        marks.push(Some(wm));
    }
    let mut marks = marks.into_iter();
    Ok((
        conds.join(" OR "),
        (marks.next().flatten(), marks.next().flatten()),
    ))
}
