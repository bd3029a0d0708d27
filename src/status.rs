//! `walshuttle status`: where every pipeline recorded on the target stands: phase,
//! positions and lag, the slot on the source, copy progress and watermarks, and the
//! tables on the source it does not carry but would if bootstrapped now (a table
//! created, or a partition attached, since: their rows are not replicated).
//!
//! Read-only on both sides. The JSON form is schema-stable: every key is always
//! present, `null` when unknown (e.g. the source is unreachable).

use std::collections::HashMap;

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::config::Endpoint;
use crate::pg::{connect, Lsn, PgResultExt, QualifiedName};
use crate::state::{Phase, Pipeline, Selection, StateStore, TableState};

/// Settings of `status`.
#[derive(Clone, Debug)]
pub struct StatusOptions {
    /// State schema on the target.
    pub state_schema: String,
    /// WAL retained by a slot above which a warning is printed.
    pub warn_retained_bytes: u64,
    /// Creation-time columns per table (`None` key: the default), else `created_at`.
    pub created_columns: HashMap<Option<QualifiedName>, String>,
    /// Update-time columns per table (`None` key: the default), else `updated_at`.
    pub updated_columns: HashMap<Option<QualifiedName>, String>,
}

/// The whole report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StatusReport {
    /// The source URL, password redacted; null when none was given.
    pub source: Option<String>,
    /// The target URL, password redacted.
    pub target: String,
    /// The state schema read.
    pub state_schema: String,
    /// The retained-WAL warning threshold in bytes.
    pub warn_retained_bytes: u64,
    /// Every pipeline recorded on the target, by name.
    pub pipelines: Vec<PipelineStatus>,
    /// Lock waits of walshuttle's apply sessions on the target now (which session
    /// waits, how long, on whom); empty when none waits.
    pub apply_waits: Vec<String>,
    /// Every warning, each naming its pipeline.
    pub warnings: Vec<String>,
}

/// One pipeline.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PipelineStatus {
    /// Pipeline (= slot) name.
    pub pipeline: String,
    /// Publication on the source.
    pub publication: String,
    /// What the pipeline is doing: the recorded phase, or `reconciling` (copied or
    /// streaming but not yet consistent), or `copying` (streaming while tables are
    /// copied, see `copy_progress`), or `stopped` (streaming recorded but no
    /// consumer on the slot).
    pub phase: String,
    /// While tables are copied as the pipeline streams (`copying`: an online
    /// bootstrap, or `tables add|resync`), how far: `3 of 10 tables copied`; null
    /// otherwise.
    pub copy_progress: Option<String>,
    /// The phase as recorded in the state schema.
    pub recorded_phase: String,
    /// Whether the target is a consistent copy (not still reconciling).
    pub consistent: bool,
    /// `pg_current_wal_lsn()` on the source.
    pub source_current_lsn: Option<Lsn>,
    /// The slot's `confirmed_flush_lsn`.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// The slot's `restart_lsn`.
    pub restart_lsn: Option<Lsn>,
    /// `progress.applied_lsn` on the target.
    pub applied_lsn: Option<Lsn>,
    /// Source current LSN minus the confirmed flush LSN.
    pub lag_confirmed_bytes: Option<u64>,
    /// Source current LSN minus the applied LSN.
    pub lag_applied_bytes: Option<u64>,
    /// Seconds since the source commit of the last applied transaction; 0 when the
    /// applied or confirmed position has reached the source's current LSN.
    pub lag_seconds: Option<f64>,
    /// Source commit time of the last applied transaction.
    pub last_commit_time: Option<String>,
    /// WAL the slot keeps on the source: current LSN minus `restart_lsn`.
    pub retained_wal_bytes: Option<u64>,
    /// The budget `run --max-retained-wal` drops the slot at (null without one).
    pub wal_budget_bytes: Option<u64>,
    /// Retained WAL as a share of the budget, 0–1 (null without a budget or source).
    pub wal_budget_used: Option<f64>,
    /// Whether the slot exists on the source (null when the source is unknown).
    pub slot_exists: Option<bool>,
    /// The slot's `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
    /// Whether a consumer is attached to the slot.
    pub slot_active: Option<bool>,
    /// Process id of the walsender serving the consumer.
    pub slot_active_pid: Option<i32>,
    /// Rows copied by the bootstrap, over every table.
    pub rows_copied: i64,
    /// Chunks copied.
    pub chunks_done: i64,
    /// Chunks planned.
    pub chunks_total: i64,
    /// Why `run` last stopped on an error retrying cannot fix (where, and what to
    /// do); null when it did not, and cleared when streaming starts again.
    pub stop_reason: Option<String>,
    /// The pipeline's `--schemas`/`--exclude-schemas`/`--exclude-tables`, as flags;
    /// null without any.
    pub table_filter: Option<String>,
    /// Each column list and row filter (`--columns`, `--row-filter`), as a
    /// publication names it: `public.orders ("id", "total") WHERE (total > 0)`.
    pub row_selection: Vec<String>,
    /// Why `run` is retrying (a server down or unreachable) while it retries, as
    /// `retrying: <reason> (for N s)`; null when it streams or is not running.
    pub retrying: Option<String>,
    /// The last `walshuttle switchover` of the pipeline (its phase while it runs,
    /// then `done` or `aborted`); null when none ran.
    pub switchover: Option<SwitchoverStatus>,
    /// Per table.
    pub tables: Vec<TableStatus>,
    /// Tables on the source (`schema.table`) the pipeline does not carry but would
    /// if bootstrapped now, by the same selection; null when the source is unknown.
    pub untracked_tables: Option<Vec<String>>,
    /// Warnings about this pipeline.
    pub warnings: Vec<String>,
}

/// The last switchover of a pipeline, as recorded.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwitchoverStatus {
    /// `fencing`, `draining`, `sequences`, `verifying`, `reversing`, `done` or
    /// `aborted`.
    pub phase: String,
    /// The fence LSN while draining, the summary when done, the reason when aborted.
    pub detail: Option<String>,
    /// When the phase was recorded (target clock).
    pub since: String,
}

/// One table of a pipeline.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TableStatus {
    /// `schema.table`.
    pub table: String,
    /// `copying`, `ready`, `held` (being copied by `walshuttle tables`: the stream
    /// holds its changes), `copied` (its held changes are being applied),
    /// `repairing` or `resync`.
    pub state: String,
    /// Rows copied by the bootstrap (sum of `chunks.rows_copied`).
    pub rows_copied: i64,
    /// Chunks copied.
    pub chunks_done: i64,
    /// Chunks planned.
    pub chunks_total: i64,
    /// `max(created_at)` on the target, as text; null without such a column.
    pub created_max: Option<String>,
    /// `max(updated_at)` on the target, as text; null without such a column.
    pub updated_max: Option<String>,
}

/// Facts about one slot from the source.
struct SlotFacts {
    current: Option<Lsn>,
    exists: bool,
    confirmed: Option<Lsn>,
    restart: Option<Lsn>,
    wal_status: Option<String>,
    active: Option<bool>,
    active_pid: Option<i32>,
    retained: Option<u64>,
}

fn parse_lsn(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

/// Gathers the report. Fails only when the target cannot be read or holds no
/// walshuttle state; an unreachable source becomes a warning and nulls.
pub async fn status(
    source: Option<&Endpoint>,
    target: &Endpoint,
    opts: &StatusOptions,
) -> Result<StatusReport> {
    let tgt = connect(target, "status").await?;
    let state = StateStore::new(&opts.state_schema);
    if state.installed_version(&tgt).await?.is_none() {
        bail!("no walshuttle pipeline on the target: run bootstrap");
    }
    state.check_current(&tgt).await?;
    let names: Vec<String> = state.pipeline_names(&tgt).await?;
    if names.is_empty() {
        bail!("no walshuttle pipeline on the target: run bootstrap");
    }
    let mut warnings = Vec::new();
    let src = match source {
        None => {
            warnings.push(
                "no source given (--source or WALSHUTTLE_SOURCE): source positions, lag and the slot are unknown"
                    .to_string(),
            );
            None
        }
        Some(endpoint) => match connect(endpoint, "status").await {
            Ok(c) => Some(c),
            Err(e) => {
                warnings.push(format!(
                    "{e:#}: source positions, lag and the slot are unknown"
                ));
                None
            }
        },
    };
    let mut pipelines = Vec::with_capacity(names.len());
    for name in names {
        let p = pipeline_status(src.as_ref(), &tgt, &state, &name, opts).await?;
        warnings.extend(p.warnings.iter().cloned());
        pipelines.push(p);
    }
    let apply_waits = crate::apply_waits::on_target(&tgt).await?;
    warnings.extend(apply_waits.iter().map(|w| format!("waiting: {w}")));
    Ok(StatusReport {
        source: source.map(|s| s.redacted.clone()),
        target: target.redacted.clone(),
        state_schema: opts.state_schema.clone(),
        warn_retained_bytes: opts.warn_retained_bytes,
        pipelines,
        apply_waits,
        warnings,
    })
}

async fn slot_facts(src: &Client, slot: &str) -> Result<SlotFacts> {
    let row = src
        .query_one(
            "SELECT pg_current_wal_lsn()::text, s.slot_name IS NOT NULL, s.confirmed_flush_lsn::text, \
                    s.restart_lsn::text, s.wal_status, s.active, s.active_pid, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint \
             FROM (VALUES (1)) v LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[&slot],
        )
        .await
        .pg_context(|| format!("reading replication slot {slot} on the source"))?;
    let exists: bool = row.get(1);
    Ok(SlotFacts {
        current: parse_lsn(row.get(0)),
        exists,
        confirmed: parse_lsn(row.get(2)),
        restart: parse_lsn(row.get(3)),
        wal_status: row.get(4),
        active: if exists { row.get(5) } else { Some(false) },
        active_pid: row.get(6),
        retained: row.get::<_, Option<i64>>(7).map(|v| v.max(0) as u64),
    })
}

async fn pipeline_status(
    src: Option<&Client>,
    tgt: &Client,
    state: &StateStore,
    name: &str,
    opts: &StatusOptions,
) -> Result<PipelineStatus> {
    let mut warnings = Vec::new();
    let Some(pipeline) = state.pipeline(tgt, name).await? else {
        bail!("pipeline {name} disappeared from the target while reading it: run status again");
    };
    // The source first, so the applied position read next is at least as new.
    let slot = match src {
        None => None,
        Some(src) => match slot_facts(src, name).await {
            Ok(f) => Some(f),
            Err(e) => {
                warnings.push(format!("pipeline {name}: {e:#}"));
                None
            }
        },
    };
    let (applied, commit_time, since_commit) = match state.progress_detail(tgt, name).await? {
        Some((applied, commit_time, since)) => (parse_lsn(applied), commit_time, since),
        None => (None, None, None),
    };
    // Ranges written outside the stream whose snapshot the stream has not passed.
    let pending_positions = state
        .live_positions(tgt, name, applied.unwrap_or_default())
        .await?
        .len();
    // A pipeline whose bootstrap has not finished is not a consistent copy either.
    let consistent = pending_positions == 0
        && !matches!(
            pipeline.phase,
            Phase::CatchingUp | Phase::CreatingSlot | Phase::Bootstrapping
        );

    let current = slot.as_ref().and_then(|s| s.current);
    let confirmed = slot.as_ref().and_then(|s| s.confirmed);
    let lag = |pos: Option<Lsn>| match (current, pos) {
        (Some(c), Some(p)) => Some(c.bytes_since(p)),
        _ => None,
    };
    let caught_up = current
        .is_some_and(|c| applied.is_some_and(|a| a >= c) || confirmed.is_some_and(|f| f >= c));
    let lag_seconds = if caught_up {
        Some(0.0)
    } else {
        since_commit.map(|s| s.max(0.0))
    };

    let active = slot.as_ref().and_then(|s| s.active);
    let recorded = pipeline.phase;
    let phase = if recorded == Phase::Streaming
        && slot.as_ref().is_some_and(|s| s.exists)
        && active == Some(false)
    {
        "stopped".to_string()
    } else if matches!(recorded, Phase::Streaming | Phase::Copied) && !consistent {
        "reconciling".to_string()
    } else {
        recorded.as_str().to_string()
    };

    if let Some(reason) = &pipeline.stop_reason {
        warnings.push(format!("pipeline {name}: run stopped: {reason}"));
    }
    // A bootstrap that stopped half-way (nobody holds its slot) keeps the slot's
    // WAL on the source until it is finished or removed.
    if matches!(recorded, Phase::CreatingSlot | Phase::Bootstrapping) {
        if let Some(s) = slot
            .as_ref()
            .filter(|s| s.exists && s.active == Some(false))
        {
            warnings.push(format!(
                "pipeline {name}: half-made (phase {}) and its replication slot holds {} of WAL on the source: finish it with `walshuttle bootstrap` (it resumes) or remove it with `walshuttle teardown --slot {name}`",
                recorded.as_str(),
                s.retained.map(human_bytes).unwrap_or_else(|| "an unknown amount".into())
            ));
        }
    }
    // A note left by a run that streams again (its slot active) is stale.
    let retrying = match state.retrying(tgt, name).await? {
        Some(_) if active == Some(true) => None,
        Some((reason, secs)) => Some(format!("retrying: {reason} (for {secs} s)")),
        None => None,
    };
    if let Some(r) = &retrying {
        warnings.push(format!("pipeline {name}: run is {r}"));
    }
    if let Some(s) = &slot {
        if !s.exists {
            if recorded != Phase::CreatingSlot {
                warnings.push(format!(
                    "pipeline {name}: replication slot {name} does not exist on the source: `walshuttle run` repairs the gap with catch-up, or run `walshuttle teardown` if the pipeline is retired"
                ));
            }
        } else {
            match s.wal_status.as_deref() {
                Some("lost") => warnings.push(format!(
                    "pipeline {name}: replication slot {name} lost the WAL it needed (wal_status lost): `walshuttle run` repairs the gap with catch-up"
                )),
                Some("unreserved") => warnings.push(format!(
                    "pipeline {name}: replication slot {name} is about to lose its WAL (wal_status unreserved, past max_wal_size): start `walshuttle run` or raise max_slot_wal_keep_size"
                )),
                _ => {}
            }
            if let Some(retained) = s.retained {
                if retained > opts.warn_retained_bytes {
                    warnings.push(format!(
                        "pipeline {name}: replication slot {name} retains {} of WAL on the source (more than --warn-retained-bytes {}){}",
                        human_bytes(retained),
                        human_bytes(opts.warn_retained_bytes),
                        if s.active == Some(true) {
                            ": the consumer is falling behind"
                        } else {
                            ": no consumer is attached; start `walshuttle run`, or `walshuttle teardown` a retired pipeline"
                        }
                    ));
                }
            }
        }
    }

    let wal_budget = state.wal_budget(tgt, name).await?;
    if let (Some(b), Some(r)) = (wal_budget, slot.as_ref().and_then(|s| s.retained)) {
        if r as f64 >= b as f64 * 0.8 {
            warnings.push(format!(
                "pipeline {name}: replication slot {name} holds {} of WAL, {:.0}% of its budget {} (run --max-retained-wal): at the budget run drops the slot and repairs the gap with catch-up",
                human_bytes(r),
                r as f64 / b as f64 * 100.0,
                human_bytes(b)
            ));
        }
    }
    let untracked = match src {
        None => None,
        Some(src) => match untracked_tables(src, tgt, state, &pipeline).await {
            Ok(list) => Some(list),
            Err(e) => {
                warnings.push(format!(
                    "pipeline {name}: could not list the source's tables it does not carry: {e:#}"
                ));
                None
            }
        },
    };
    for t in untracked.iter().flatten() {
        // A table without a usable replica identity is left out on purpose
        // (published, the source would refuse its UPDATEs and DELETEs): say so,
        // with the statement that fixes it.
        let problem = match src {
            Some(src) => crate::catalog::load_table(src, t)
                .await
                .ok()
                .flatten()
                .and_then(|table| table.replicability_problem()),
            None => None,
        };
        match problem {
            Some(problem) => warnings.push(format!(
                "pipeline {name}: table {t} on the source is not carried by this pipeline, which would carry it if bootstrapped now, and it is left out because {problem}; then add it with `walshuttle tables add {}` (with --capture-ddl it joins by itself)",
                t.quoted()
            )),
            None => warnings.push(format!(
                "pipeline {name}: table {t} on the source is not carried by this pipeline, which would carry it if bootstrapped now (created, or attached as a partition, after the bootstrap): its rows are not replicated; add it while the pipeline streams with `walshuttle tables add {}`",
                t.quoted()
            )),
        }
    }

    let tables = table_status(tgt, state, &pipeline.tables, name, opts).await?;
    // Tables being copied while the pipeline streams (an online bootstrap, `tables
    // add|resync`): the target is not a consistent copy until they are ready.
    let being_copied = tables
        .iter()
        .filter(|t| t.state == "held" || t.state == "copied")
        .count();
    let copy_progress = (being_copied > 0).then(|| {
        format!(
            "{} of {} tables copied",
            tables.len() - being_copied,
            tables.len()
        )
    });
    let consistent = consistent && being_copied == 0;
    let phase =
        if being_copied > 0 && matches!(phase.as_str(), "streaming" | "copied" | "reconciling") {
            "copying".to_string()
        } else {
            phase
        };
    let switchover = state
        .switchover(tgt, name)
        .await?
        .map(|(phase, detail, since)| SwitchoverStatus {
            phase,
            detail,
            since,
        });
    // A done switchover finishes the pipeline: `run` no longer streams it.
    let phase = match &switchover {
        Some(s) if s.phase == "done" => "switched_over".to_string(),
        _ => phase,
    };
    Ok(PipelineStatus {
        pipeline: name.to_string(),
        publication: pipeline.publication.clone(),
        phase,
        copy_progress,
        recorded_phase: recorded.as_str().to_string(),
        consistent,
        source_current_lsn: current,
        confirmed_flush_lsn: confirmed,
        restart_lsn: slot.as_ref().and_then(|s| s.restart),
        applied_lsn: applied,
        lag_confirmed_bytes: lag(confirmed),
        lag_applied_bytes: lag(applied),
        lag_seconds,
        last_commit_time: commit_time,
        retained_wal_bytes: slot.as_ref().and_then(|s| s.retained),
        wal_budget_bytes: wal_budget,
        wal_budget_used: match (slot.as_ref().and_then(|s| s.retained), wal_budget) {
            (Some(r), Some(b)) if b > 0 => Some(r as f64 / b as f64),
            _ => None,
        },
        slot_exists: slot.as_ref().map(|s| s.exists),
        wal_status: slot.as_ref().and_then(|s| s.wal_status.clone()),
        slot_active: active,
        slot_active_pid: slot.as_ref().and_then(|s| s.active_pid),
        rows_copied: tables.iter().map(|t| t.rows_copied).sum(),
        chunks_done: tables.iter().map(|t| t.chunks_done).sum(),
        chunks_total: tables.iter().map(|t| t.chunks_total).sum(),
        stop_reason: pipeline.stop_reason.clone(),
        table_filter: Some(state.table_filter(tgt, name).await?.describe())
            .filter(|d| !d.is_empty()),
        row_selection: {
            // As the publication holds them now when the source answers.
            let rows = match src {
                Some(src) => match crate::row_selection::current(src, tgt, state, name).await {
                    Ok(rows) => rows,
                    Err(_) => state.row_selection(tgt, name).await?,
                },
                None => state.row_selection(tgt, name).await?,
            };
            rows.names()
                .filter_map(|t| rows.describe(t).map(|d| format!("{t} {d}")))
                .collect()
        },
        retrying,
        switchover,
        tables,
        untracked_tables: untracked.map(|l| l.iter().map(|t| t.to_string()).collect()),
        warnings,
    })
}

/// The source's tables a bootstrap of this pipeline would carry now that it does
/// not: by its `--tables` (named tables and the partitions of named partitioned
/// ones), or every ordinary table. For a pipeline bootstrapped before the selection
/// was recorded, the partitions of partitioned tables it carries partitions of.
pub(crate) async fn untracked_tables(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    pipeline: &Pipeline,
) -> Result<Vec<QualifiedName>> {
    let wanted = match state.selection(tgt, &pipeline.name).await? {
        Selection::EveryTable => crate::catalog::every_table_name(src, state.schema()).await?,
        Selection::Named(list) => crate::catalog::selected_table_names(src, &list).await?,
        Selection::Unknown => {
            let carried: Vec<String> = pipeline.tables.iter().map(QualifiedName::quoted).collect();
            let parents: Vec<QualifiedName> = src
                .query(
                    "SELECT DISTINCT n.nspname, p.relname FROM unnest($1::text[]) AS s(name) \
                     CROSS JOIN LATERAL pg_partition_root(to_regclass(s.name)) AS r(root) \
                     JOIN pg_class p ON p.oid = r.root JOIN pg_namespace n ON n.oid = p.relnamespace \
                     WHERE p.relkind = 'p'",
                    &[&carried],
                )
                .await
                .pg_context(|| "reading the partitioned tables on the source".into())?
                .iter()
                .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect();
            crate::catalog::selected_table_names(src, &parents).await?
        }
    };
    Ok(wanted
        .into_iter()
        .filter(|t| !pipeline.tables.contains(t))
        .collect())
}

async fn table_status(
    tgt: &Client,
    state: &StateStore,
    tables: &[QualifiedName],
    pipeline: &str,
    opts: &StatusOptions,
) -> Result<Vec<TableStatus>> {
    let mut chunks: HashMap<QualifiedName, (i64, i64, i64)> = HashMap::new();
    for (table, rows, done, total) in state.chunk_progress(tgt, pipeline).await? {
        chunks.insert(table, (rows, done, total));
    }
    let states: HashMap<QualifiedName, TableState> = state
        .table_entries(tgt, pipeline)
        .await?
        .into_iter()
        .map(|e| (e.name, e.state))
        .collect();
    let mut out = Vec::with_capacity(tables.len());
    for table in tables {
        let (rows_copied, chunks_done, chunks_total) =
            chunks.get(table).copied().unwrap_or_default();
        let created = column_for(&opts.created_columns, table, "created_at");
        let updated = column_for(&opts.updated_columns, table, "updated_at");
        let (created_max, updated_max) = watermarks(tgt, table, &created, &updated).await?;
        out.push(TableStatus {
            table: table.to_string(),
            state: states
                .get(table)
                .map_or("ready", |s| s.as_str())
                .to_string(),
            rows_copied,
            chunks_done,
            chunks_total,
            created_max,
            updated_max,
        });
    }
    Ok(out)
}

fn column_for(
    map: &HashMap<Option<QualifiedName>, String>,
    table: &QualifiedName,
    default: &str,
) -> String {
    map.get(&Some(table.clone()))
        .or_else(|| map.get(&None))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// `max()` of the watermark columns on the target, each `None` when the table or
/// the column does not exist there.
async fn watermarks(
    tgt: &Client,
    table: &QualifiedName,
    created: &str,
    updated: &str,
) -> Result<(Option<String>, Option<String>)> {
    let present: Vec<String> = tgt
        .query(
            "SELECT a.attname::text FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
               AND a.attname::text = ANY($2)",
            &[
                &table.quoted(),
                &vec![created.to_string(), updated.to_string()],
            ],
        )
        .await
        .pg_context(|| format!("reading the columns of {table} on the target"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expr = |col: &str| {
        if present.iter().any(|p| p == col) {
            format!("max({})::text", crate::pg::quote_ident(col))
        } else {
            "NULL::text".to_string()
        }
    };
    if present.is_empty() {
        return Ok((None, None));
    }
    // A column type without ordering (say json) has no watermark: show none.
    match tgt
        .query_one(
            &format!(
                "SELECT {}, {} FROM {}",
                expr(created),
                expr(updated),
                table.quoted()
            ),
            &[],
        )
        .await
    {
        Ok(row) => Ok((row.get(0), row.get(1))),
        Err(e) => {
            tracing::debug!(table = %table, error = %crate::pg::connect::describe(&e), "no watermark");
            Ok((None, None))
        }
    }
}

/// Bytes for people: `512 B`, `3.4 MiB`, `1.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn or_unknown<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "unknown".into())
}

impl StatusReport {
    /// The report for people: a block per pipeline, then one `WARNING:` line each.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for p in &self.pipelines {
            out.push_str(&format!(
                "pipeline {} (publication {})\n",
                p.pipeline, p.publication
            ));
            out.push_str(&format!(
                "  phase            {}{}{}\n",
                p.phase,
                p.copy_progress
                    .as_deref()
                    .map(|c| format!("; {c}"))
                    .unwrap_or_default(),
                if p.phase != p.recorded_phase {
                    format!(" (recorded: {})", p.recorded_phase)
                } else {
                    String::new()
                }
            ));
            out.push_str(&format!(
                "  consistent       {}\n",
                if p.consistent { "yes" } else { "no" }
            ));
            if let Some(reason) = &p.stop_reason {
                out.push_str(&format!("  stopped by       {reason}\n"));
            }
            if let Some(f) = &p.table_filter {
                out.push_str(&format!("  selection        {f}\n"));
            }
            for r in &p.row_selection {
                out.push_str(&format!("  columns/rows     {r}\n"));
            }
            if let Some(r) = &p.retrying {
                out.push_str(&format!("  run              {r}\n"));
            }
            if let Some(s) = &p.switchover {
                out.push_str(&format!(
                    "  switchover       {} (since {}){}\n",
                    s.phase,
                    s.since,
                    s.detail
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ));
            }
            out.push_str(&format!(
                "  source LSN       {}\n",
                or_unknown(&p.source_current_lsn)
            ));
            out.push_str(&format!(
                "  confirmed flush  {} (lag {})\n",
                or_unknown(&p.confirmed_flush_lsn),
                p.lag_confirmed_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "unknown".into())
            ));
            out.push_str(&format!(
                "  applied          {} (lag {}, {})\n",
                or_unknown(&p.applied_lsn),
                p.lag_applied_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "unknown".into()),
                p.lag_seconds
                    .map(|s| format!("{s:.1} s"))
                    .unwrap_or_else(|| "time unknown".into())
            ));
            out.push_str(&format!(
                "  last commit      {}\n",
                p.last_commit_time.as_deref().unwrap_or("none yet")
            ));
            let slot = match (p.slot_exists, p.slot_active) {
                (None, _) => "unknown (source not read)".to_string(),
                (Some(false), _) => "missing on the source".to_string(),
                (Some(true), active) => format!(
                    "{}, wal_status {}, retains {}",
                    if active == Some(true) {
                        format!(
                            "active (pid {})",
                            p.slot_active_pid
                                .map(|x| x.to_string())
                                .unwrap_or_else(|| "?".into())
                        )
                    } else {
                        "inactive".to_string()
                    },
                    p.wal_status.as_deref().unwrap_or("unknown"),
                    p.retained_wal_bytes
                        .map(human_bytes)
                        .unwrap_or_else(|| "unknown".into())
                ),
            };
            out.push_str(&format!("  slot             {slot}\n"));
            if let Some(budget) = p.wal_budget_bytes {
                out.push_str(&format!(
                    "  WAL budget       {} ({})\n",
                    human_bytes(budget),
                    p.wal_budget_used
                        .map(|u| format!("{:.0}% used", u * 100.0))
                        .unwrap_or_else(|| "use unknown".into())
                ));
            }
            out.push_str(&format!(
                "  copied           {} rows, {}/{} chunks\n",
                p.rows_copied, p.chunks_done, p.chunks_total
            ));
            if let Some(untracked) = p.untracked_tables.as_ref().filter(|u| !u.is_empty()) {
                out.push_str(&format!(
                    "  not carried      {} (see the warnings)\n",
                    untracked.join(", ")
                ));
            }
            let width = p
                .tables
                .iter()
                .map(|t| t.table.len())
                .max()
                .unwrap_or(5)
                .max(5);
            out.push_str(&format!(
                "  {:<width$}  {:<9}  {:>12}  {:>9}  {:<32}  {}\n",
                "table", "state", "rows copied", "chunks", "created max", "updated max"
            ));
            for t in &p.tables {
                out.push_str(&format!(
                    "  {:<width$}  {:<9}  {:>12}  {:>9}  {:<32}  {}\n",
                    t.table,
                    t.state,
                    t.rows_copied,
                    format!("{}/{}", t.chunks_done, t.chunks_total),
                    t.created_max.as_deref().unwrap_or("-"),
                    t.updated_max.as_deref().unwrap_or("-")
                ));
            }
        }
        for w in &self.warnings {
            out.push_str(&format!("WARNING: {w}\n"));
        }
        out.trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }
}
