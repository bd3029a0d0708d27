//! `walshuttle verify`: proves source and target hold the same rows, by key ranges
//! hashed on both sides in parallel, narrowed down to the differing keys, and
//! optionally repairs them. While `run` streams, a differing range is checked again
//! after the target has applied past the source's position at the first check, so
//! changes in flight are not reported as differences. A source column the target
//! does not have yet (added on the source, not yet followed by `run`) is reported as
//! a difference, and the other columns are compared.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::catalog::{self, Table};
use crate::compare::{self, Compared, Key, KeyRange, CANONICAL_TEXT};
use crate::config::{Endpoint, Side};
use crate::pg::{connect, Lsn, PgResultExt, QualifiedName};
use crate::rewrite::{self, Rows};
use crate::state::StateStore;

/// Settings of `verify`.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Tables to compare; `None`: the pipeline's tables, or every source table.
    pub tables: Option<Vec<QualifiedName>>,
    /// Pipeline (slot) whose tables and stream position to use.
    pub slot: String,
    /// State schema on the target.
    pub state_schema: String,
    /// Parallel workers.
    pub jobs: usize,
    /// Fix differing rows on the target.
    pub repair: bool,
    /// With `repair`: fire target foreign keys and triggers as for any writer.
    pub allow_target_triggers: bool,
}

/// One range that differs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RangeReport {
    /// Which keys the range spans.
    pub range: String,
    /// Rows missing or different on the target.
    pub missing_or_changed: usize,
    /// Rows only on the target.
    pub extra: usize,
    /// A few differing keys.
    pub sample_keys: Vec<String>,
}

/// The outcome for one table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TableReport {
    /// The table.
    pub table: QualifiedName,
    /// Rows on the source.
    pub source_rows: i64,
    /// Rows on the target.
    pub target_rows: i64,
    /// Ranges compared.
    pub ranges: usize,
    /// Ranges that differ (after any repair, those that still differ).
    pub differences: Vec<RangeReport>,
    /// Rows deleted and copied by `--repair`.
    pub repaired: (u64, u64),
    /// Set when the table is missing on the target.
    pub missing_on_target: bool,
    /// Source columns missing on the target (the rest are compared).
    pub missing_columns: Vec<String>,
}

impl TableReport {
    /// Whether the table is the same on both sides.
    fn equal(&self) -> bool {
        self.differences.is_empty() && !self.missing_on_target && self.missing_columns.is_empty()
    }
}

/// The outcome of a verify run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifyReport {
    /// Per table.
    pub tables: Vec<TableReport>,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Rows read on the source side.
    pub rows_read: i64,
}

impl VerifyReport {
    /// Whether every table is equal.
    pub fn equal(&self) -> bool {
        self.tables.iter().all(TableReport::equal)
    }

    /// Lines for a person.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            if t.missing_on_target {
                out.push_str(&format!("{}: DIFFERENT: missing on the target\n", t.table));
                continue;
            }
            if !t.missing_columns.is_empty() {
                out.push_str(&format!(
                    "{}: DIFFERENT: column{} {} missing on the target (`walshuttle run` adds a column added on the source with the next change of the table)\n",
                    t.table,
                    if t.missing_columns.len() == 1 { "" } else { "s" },
                    t.missing_columns.join(", ")
                ));
            }
            if t.repaired != (0, 0) {
                out.push_str(&format!(
                    "{}: repaired: {} rows deleted, {} rows copied on the target\n",
                    t.table, t.repaired.0, t.repaired.1
                ));
            }
            if t.differences.is_empty() {
                out.push_str(&format!(
                    "{}: {}equal ({} rows)\n",
                    t.table,
                    if t.missing_columns.is_empty() {
                        ""
                    } else {
                        "the other columns "
                    },
                    t.source_rows
                ));
            } else {
                out.push_str(&format!(
                    "{}: DIFFERENT: {} source rows, {} target rows, {} of {} ranges differ\n",
                    t.table,
                    t.source_rows,
                    t.target_rows,
                    t.differences.len(),
                    t.ranges
                ));
                for d in t.differences.iter().take(10) {
                    out.push_str(&format!(
                        "  {}: {} missing or changed on the target, {} extra; keys {}\n",
                        d.range,
                        d.missing_or_changed,
                        d.extra,
                        d.sample_keys.join(" ")
                    ));
                }
            }
        }
        let equal = self.tables.iter().filter(|t| t.equal()).count();
        out.push_str(&format!(
            "verify: {equal} of {} tables equal; {} rows per side in {:.1} s ({:.0} rows/s)",
            self.tables.len(),
            self.rows_read,
            self.seconds,
            self.rows_read as f64 / self.seconds.max(0.001)
        ));
        out
    }
}

/// Opens a session with deterministic value text, for hashing.
pub async fn hashing_session(endpoint: &Endpoint, purpose: &str) -> Result<Client> {
    let client = connect(endpoint, purpose).await?;
    client
        .batch_execute(CANONICAL_TEXT)
        .await
        .pg_context(|| "preparing a comparison session".into())?;
    Ok(client)
}

/// The tables a command works on: given, else the pipeline's, else every table;
/// narrowed to the pipeline's column lists and row filters.
pub async fn resolve_tables(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    slot: &str,
    given: Option<&[QualifiedName]>,
) -> Result<Vec<Table>> {
    let from_state = match given {
        None => state.existing_pipeline(tgt, slot).await?.map(|p| p.tables),
        Some(_) => None,
    };
    let selection = given.map(|g| g.to_vec()).or(from_state);
    let mut tables = catalog::list_tables(src, selection.as_deref(), state.schema()).await?;
    // Only the columns and source rows the pipeline replicates are compared.
    if state.installed_version(tgt).await?.is_some() {
        crate::row_selection::current(src, tgt, state, slot)
            .await?
            .narrow_all(&mut tables)?;
    }
    Ok(tables)
}

/// Runs the comparison (and repair).
pub async fn verify(
    source: &Endpoint,
    target: &Endpoint,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    verify_with(source, Vec::new(), target, opts).await
}

/// [`verify`] on source sessions opened beforehand ([`hashing_session`]s; one more
/// than `jobs` covers every need) before new ones are opened: a fenced source
/// takes no new connection.
pub async fn verify_with(
    source: &Endpoint,
    mut source_sessions: Vec<Client>,
    target: &Endpoint,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let src = match source_sessions.pop() {
        Some(c) => c,
        None => hashing_session(source, "verify").await?,
    };
    let tgt = hashing_session(target, "verify").await?;
    let state = StateStore::open_upgrading(&tgt, &opts.state_schema).await?;
    let mut tables = resolve_tables(&src, &tgt, &state, &opts.slot, opts.tables.as_deref()).await?;
    // What the user named: a carried partitioned table means all its partitions,
    // also one attached after the bootstrap that the pipeline has not taken in yet
    // (missing on the target, or missing rows, is then a difference).
    if opts.tables.is_none() {
        if let Some(pipeline) = state.existing_pipeline(&tgt, &opts.slot).await? {
            let new = crate::partitions::untracked(&src, &tgt, &state, &pipeline).await?;
            if !new.is_empty() {
                tables.extend(catalog::list_tables(&src, Some(&new), state.schema()).await?);
            }
        }
    }
    if tables.is_empty() {
        bail!("no tables to verify: name them with --tables");
    }
    let repair_setup = match opts.repair {
        true => {
            let names = tables.iter().map(|t| &t.name);
            crate::target_checks::decide(&tgt, names, opts.allow_target_triggers).await?
        }
        false => Default::default(),
    };
    let mut reports = Vec::with_capacity(tables.len());
    let mut work = VecDeque::new();
    for (i, table) in tables.iter_mut().enumerate() {
        let on_target = catalog::load_table(&tgt, &table.name).await?;
        let missing = on_target.is_none();
        // Compare the columns both sides have; the others are a difference of
        // their own.
        if let Some(t) = &on_target {
            table.target_types = t
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.type_sql.clone()))
                .collect();
            // A table partitioned on the target is read whole (crate::own_rows).
            table.target_partitioned = crate::own_rows::is_partitioned(&tgt, &table.name).await?;
        }
        let missing_columns: Vec<String> = on_target
            .map(|t| {
                let absent: Vec<String> = table
                    .copied_columns()
                    .iter()
                    .filter(|c| !t.columns.iter().any(|tc| tc.name == c.name))
                    .map(|c| c.name.clone())
                    .collect();
                table.columns.retain(|c| !absent.contains(&c.name));
                absent
            })
            .unwrap_or_default();
        let key_missing = table.key.iter().any(|k| missing_columns.contains(k));
        reports.push(TableReport {
            table: table.name.clone(),
            source_rows: 0,
            target_rows: 0,
            ranges: 0,
            differences: Vec::new(),
            repaired: (0, 0),
            missing_on_target: missing,
            missing_columns,
        });
        if missing || key_missing {
            continue;
        }
        let ranges = compare::plan_ranges(&src, &tgt, table, opts.jobs).await?;
        reports[i].ranges = ranges.len();
        work.extend(ranges.into_iter().map(|r| (i, r)));
    }
    let tables = Arc::new(tables);
    let mismatched = compare_all(
        source,
        source_sessions,
        target,
        &tables,
        work,
        opts.jobs,
        &mut reports,
    )
    .await?;

    // Changes in flight: wait until the target has applied past where the source is
    // now, then look again at what differed.
    // Changes in flight: while the pipeline streams, wait until the target has
    // applied past where the source is now, then look again at what differed (a few
    // rounds, since writes may go on meanwhile).
    let mut mismatched = mismatched;
    for _ in 0..5 {
        if mismatched.is_empty() || !wait_for_stream(&src, &opts.slot).await? {
            break;
        }
        let mut still = Vec::new();
        for (i, range) in mismatched {
            let table = &tables[i];
            let (s, t) = tokio::try_join!(
                compare::digest(&src, Side::Source, table, &range, Compared::WholeRows),
                compare::digest(&tgt, Side::Target, table, &range, Compared::WholeRows)
            )?;
            if s != t {
                still.push((i, range));
            }
        }
        mismatched = still;
    }

    let mut to_repair: Vec<(usize, Vec<Key>)> = Vec::new();
    for (i, range) in mismatched {
        let table = &tables[i];
        let mut diff =
            compare::diff_keys(&src, &tgt, table, &range, Compared::WholeRows, None).await?;
        // Keys written again since the digests: look at just those once the stream
        // has caught up, until they settle.
        for _ in 0..5 {
            if diff.is_empty() || !wait_for_stream(&src, &opts.slot).await? {
                break;
            }
            let keys = diff.keys();
            diff = compare::diff_keys(&src, &tgt, table, &range, Compared::WholeRows, Some(&keys))
                .await?;
        }
        if diff.is_empty() {
            continue;
        }
        if opts.repair {
            match to_repair.iter_mut().find(|(t, _)| *t == i) {
                Some((_, keys)) => keys.extend(diff.keys()),
                None => to_repair.push((i, diff.keys())),
            }
        }
        let sample: Vec<String> = diff
            .to_copy
            .iter()
            .chain(&diff.to_delete)
            .take(5)
            .map(compare::show_key)
            .collect();
        reports[i].differences.push(RangeReport {
            range: range.describe(table),
            missing_or_changed: diff.to_copy.len(),
            extra: diff.to_delete.len(),
            sample_keys: sample,
        });
    }
    for (i, keys) in to_repair {
        let table = &tables[i];
        let (deleted, copied) = repair(
            source,
            target,
            &state,
            &opts.slot,
            table,
            keys,
            &repair_setup,
        )
        .await?;
        reports[i].repaired.0 += deleted;
        reports[i].repaired.1 += copied;
        // Whatever still differs after the repair is reported; the rest was fixed.
        let equal = table_equal(&src, &tgt, table, opts.jobs).await?
            || (wait_for_stream(&src, &opts.slot).await?
                && table_equal(&src, &tgt, table, opts.jobs).await?);
        if equal {
            reports[i].differences.clear();
        }
    }
    let rows_read = reports.iter().map(|r| r.source_rows).sum();
    Ok(VerifyReport {
        tables: reports,
        seconds: started.elapsed().as_secs_f64(),
        rows_read,
    })
}

/// Rewrites `keys` of `table` on the target from the source (a keyless table
/// whole), safely whether `run` is stopped, lagging or streaming (see
/// [`rewrite::rewrite_now`]). Returns (deleted, copied).
async fn repair(
    source: &Endpoint,
    target: &Endpoint,
    state: &StateStore,
    pipeline: &str,
    table: &Table,
    keys: Vec<Key>,
    setup: &crate::target_checks::TargetSetup,
) -> Result<(u64, u64)> {
    let mut client = hashing_session(target, "verify repair").await?;
    crate::target_checks::prepare_session(&client, setup).await?;
    let has_pipeline = state.existing_pipeline(&client, pipeline).await?.is_some();
    let binary = catalog::check_target(&client, table).await?.binary();
    let rows = if table.key.is_empty() {
        Rows::All
    } else {
        Rows::Keys(keys)
    };
    rewrite::rewrite_now(
        source,
        &mut client,
        state,
        has_pipeline.then_some(pipeline),
        table,
        rows,
        binary,
        "verify --repair",
        &|_| {},
    )
    .await
}

/// Whether every range of a table hashes the same on both sides.
async fn table_equal(src: &Client, tgt: &Client, table: &Table, jobs: usize) -> Result<bool> {
    for range in compare::plan_ranges(src, tgt, table, jobs).await? {
        let (s, t) = tokio::try_join!(
            compare::digest(src, Side::Source, table, &range, Compared::WholeRows),
            compare::digest(tgt, Side::Target, table, &range, Compared::WholeRows)
        )?;
        if s != t {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Hashes every (table, range) on both sides with `jobs` workers; returns the ranges
/// that differ and fills in row counts.
async fn compare_all(
    source: &Endpoint,
    mut source_sessions: Vec<Client>,
    target: &Endpoint,
    tables: &Arc<Vec<Table>>,
    work: VecDeque<(usize, KeyRange)>,
    jobs: usize,
    reports: &mut [TableReport],
) -> Result<Vec<(usize, KeyRange)>> {
    let queue = Arc::new(Mutex::new(work));
    let mut handles = Vec::new();
    for _ in 0..jobs.max(1) {
        let src = match source_sessions.pop() {
            Some(c) => c,
            None => hashing_session(source, "verify").await?,
        };
        let tgt = hashing_session(target, "verify").await?;
        let queue = Arc::clone(&queue);
        let tables = Arc::clone(tables);
        handles.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some((i, range)) = next else { break };
                let table = &tables[i];
                let (s, t) = tokio::try_join!(
                    compare::digest(&src, Side::Source, table, &range, Compared::WholeRows),
                    compare::digest(&tgt, Side::Target, table, &range, Compared::WholeRows)
                )?;
                results.push((i, range, s, t));
            }
            Ok::<_, anyhow::Error>(results)
        }));
    }
    let mut mismatched = Vec::new();
    for h in handles {
        let results = h
            .await
            .map_err(|e| anyhow::anyhow!("a verify worker stopped: {e}"))??;
        for (i, range, s, t) in results {
            reports[i].source_rows += s.rows;
            reports[i].target_rows += t.rows;
            if s != t {
                mismatched.push((i, range));
            }
        }
    }
    Ok(mismatched)
}

/// When the pipeline's slot is being consumed, waits (up to 30 s) until it has
/// confirmed the source's current position; returns whether a stream is active.
async fn wait_for_stream(src: &Client, slot: &str) -> Result<bool> {
    let row = src
        .query_opt(
            "SELECT active, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .pg_context(|| "reading the slot position".into())?;
    let Some(row) = row else { return Ok(false) };
    if !row.get::<_, bool>(0) {
        return Ok(false);
    }
    let wanted: Lsn = row.get::<_, String>(1).parse().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let confirmed: Option<String> = src
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .pg_context(|| "reading the slot position".into())?
            .get(0);
        if confirmed
            .and_then(|c| c.parse::<Lsn>().ok())
            .is_some_and(|c| c >= wanted)
        {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::warn!(
        slot,
        "the stream did not reach the source's position within 30 s; reporting what differs now"
    );
    Ok(true)
}
