//! `walshuttle tables add|remove|resync`: change the tables of a live pipeline while
//! `run` keeps streaming the others.
//!
//! An added or resynced table is copied under a snapshot of its own, as PostgreSQL's
//! tablesync does for a table added to a subscription, but without a slot per table:
//!
//! 1. The table is marked `held`: from the next apply transaction on, the running
//!    stream writes the table's changes to `walshuttle.held_changes` instead of
//!    applying them (see [`crate::stream::held`]).
//! 2. (add) The table joins the publication; then the command waits until every
//!    source transaction open at that moment has ended, since changes made before
//!    the table joined are not decoded for it and only the snapshot can carry them.
//! 3. A barrier: the positions lock is taken once, when no apply transaction is open,
//!    so every change the stream applied to the table without holding it is on the
//!    target and committed on the source.
//! 4. A plain snapshot S, with the table locked against DDL; in one target
//!    transaction the table's rows are replaced by S's, S is recorded as the table's
//!    copy position and the table is marked `copied`.
//! 5. The stream applies the held changes that S did not see, in commit order, and
//!    marks the table `ready`; later changes go through the copy position until the
//!    stream passes S.
//!
//! Every other table streams throughout. A removed table leaves the publication first
//! and the pipeline second, so nothing it sends is mistaken for a hand-edited
//! publication; changes already in flight for it are not applied.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use crate::catalog::{self, Table, TargetFit};
use crate::config::Endpoint;
use crate::pg::{connect, PgResultExt, QualifiedName};
use crate::state::{Pipeline, Selection, StateStore, TableState};

/// How long the command waits for source transactions open when a table joined the
/// publication, and for a moment between two apply transactions.
const WAIT: Duration = Duration::from_secs(600);

/// What `walshuttle tables` does to each named table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TablesAction {
    /// Add tables to the pipeline: copy each under its own snapshot, then stream it.
    Add,
    /// Remove tables from the pipeline: they leave the publication and stop being
    /// applied; their target tables are left as they are.
    Remove,
    /// Copy tables again under a new snapshot, while the others stream.
    Resync,
}

/// Options of `walshuttle tables`.
#[derive(Clone, Debug)]
pub struct TablesOptions {
    /// What to do.
    pub action: TablesAction,
    /// The tables.
    pub tables: Vec<QualifiedName>,
    /// The pipeline (slot name).
    pub slot: String,
    /// The state schema on the target.
    pub state_schema: String,
    /// Replace rows an added table already holds on the target.
    pub truncate_target: bool,
    /// Fire target foreign keys and triggers on copied rows.
    pub allow_target_triggers: bool,
    /// add: the added tables' column lists and row filters.
    pub rows: crate::row_selection::RowSelection,
}

/// Changes the pipeline's tables as `opts` says; returns one line per table for the
/// user.
pub async fn change(
    source: &Endpoint,
    target: &Endpoint,
    opts: &TablesOptions,
) -> Result<Vec<String>> {
    let src = connect(source, "tables").await?;
    let mut tgt = connect(target, "tables").await?;
    let state = StateStore::open_upgrading(&tgt, &opts.state_schema).await?;
    let Some(pipeline) = state.existing_pipeline(&tgt, &opts.slot).await? else {
        bail!(
            "there is no pipeline {} on the target: bootstrap it first (`walshuttle bootstrap` or `walshuttle run`)",
            opts.slot
        );
    };
    if !pipeline.phase.copied() {
        bail!(
            "pipeline {} has not finished its bootstrap: let `walshuttle run` (or `walshuttle bootstrap`) finish it first",
            opts.slot
        );
    }
    if !opts.rows.is_empty() {
        if opts.action != TablesAction::Add {
            bail!("--columns and --row-filter go with `walshuttle tables add` (a table's list and filter are fixed once it is carried)");
        }
        let lists = opts
            .rows
            .names()
            .any(|t| opts.rows.get(t).is_some_and(|r| r.columns.is_some()));
        if lists && state.capture_ddl(&tgt, &pipeline.name).await? {
            bail!("--columns does not work with a pipeline that captures DDL yet (captured DDL on a column left out, e.g. an index, could not be applied on the target): --row-filter does");
        }
        if let Some(other) = opts.rows.names().find(|n| !opts.tables.contains(n)) {
            bail!(
                "--columns/--row-filter name table {other}, which is not among the tables to add"
            );
        }
    }
    // One copier per table: `run` copies the held tables of an online bootstrap
    // (or of an interrupted `tables add`) that no command is working on.
    for name in &opts.tables {
        lock_copy(&tgt, &state, &pipeline.name, name, true).await?;
    }
    match opts.action {
        TablesAction::Remove => remove(&src, &tgt, &state, &pipeline, opts).await,
        TablesAction::Add | TablesAction::Resync => {
            let todo = prepare_copies(&src, &tgt, &state, &pipeline, opts).await?;
            let mut lines = todo.notes;
            let setup = crate::target_checks::decide(
                &tgt,
                todo.tables.iter().map(|t| &t.name),
                opts.allow_target_triggers,
            )
            .await?;
            crate::target_checks::prepare_session(&tgt, &setup).await?;
            for table in &todo.tables {
                let (rows, lsn) = copy_held(source, &mut tgt, &state, &opts.slot, table).await?;
                lines.push(format!(
                    "{} {}: {rows} rows copied under a snapshot at {lsn}; the stream applies its changes since and carries it on",
                    if opts.action == TablesAction::Add { "added" } else { "resynced" },
                    table.name
                ));
            }
            Ok(lines)
        }
    }
}

/// The tables to copy, checked and marked `held`, and notes about tables skipped.
struct Copies {
    tables: Vec<Table>,
    notes: Vec<String>,
}

/// Checks the tables to add or resync, creates missing target tables, marks them
/// `held` and (add) puts them in the publication.
async fn prepare_copies(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    pipeline: &Pipeline,
    opts: &TablesOptions,
) -> Result<Copies> {
    let entries = state.table_entries(tgt, &pipeline.name).await?;
    let mut tables = Vec::new();
    let mut notes = Vec::new();
    let mut rows = crate::row_selection::current(src, tgt, state, &pipeline.name).await?;
    // The record keeps the names given at creation (`check_unchanged` compares
    // flags with it); added tables join it.
    let mut record = state.row_selection(tgt, &pipeline.name).await?;
    for name in &opts.tables {
        let entry = entries.iter().find(|e| &e.name == name);
        match (opts.action, entry) {
            (TablesAction::Resync, None) => bail!(
                "{name} is not part of pipeline {}: add it with `walshuttle tables add {}`",
                pipeline.name,
                name.quoted()
            ),
            // A copy that did not finish is done again.
            (TablesAction::Add, Some(e)) if e.state != TableState::Held => {
                notes.push(format!(
                    "{name} is already part of the pipeline: nothing to do"
                ));
                continue;
            }
            _ => {}
        }
        let mut table = catalog::load_table(src, name)
            .await?
            .with_context(|| format!("table {name} does not exist on the source"))?;
        // An added table takes its list and filter (checked as bootstrap checks
        // them); a resync copies what the pipeline replicates of it.
        if opts.rows.get(name).is_some() {
            if entry.is_some_and(|e| e.state != TableState::Held) {
                bail!("{name} is already part of the pipeline: its column list and row filter are fixed");
            }
            let mut one = opts.rows.clone();
            one.retain(|n| n == name);
            crate::row_selection::check_source(src, std::slice::from_ref(&table), &one).await?;
            rows.merge(&one);
            record.merge(&one);
        }
        rows.narrow(&mut table)?;
        if let Some(problem) = table.replicability_problem() {
            bail!(problem);
        }
        let fit = catalog::check_target(tgt, &table).await?;
        match fit {
            TargetFit::Missing { .. } => {
                catalog::create_missing_types(src, tgt, &table).await?;
                tgt.batch_execute(&catalog::create_table_sql(&table))
                    .await
                    .pg_context(|| format!("creating table {name} on the target"))?;
                for sql in catalog::index_sql(src, tgt, &table).await? {
                    tgt.batch_execute(&sql)
                        .await
                        .pg_context(|| format!("building on the target: {sql}"))?;
                }
                tracing::info!(table = %name, "created table on the target");
            }
            TargetFit::Exists { .. } if entry.is_none() => {
                crate::bootstrap::preflight::target_key(tgt, &table).await?;
                if !opts.truncate_target && has_rows(tgt, name).await? {
                    bail!(
                        "table {name} already holds rows on the target that walshuttle did not copy: empty it, or pass --truncate-target to replace them with the source's rows"
                    );
                }
            }
            TargetFit::Exists { .. } => {}
        }
        tables.push(table);
    }
    if tables.is_empty() {
        return Ok(Copies { tables, notes });
    }
    // Held from the next apply transaction on.
    let mut carried = pipeline.tables.clone();
    let selection = state.selection(tgt, &pipeline.name).await?;
    in_transaction(tgt, async {
        for t in &tables {
            state
                .put_table(tgt, &pipeline.name, &t.name, TableState::Held)
                .await?;
            if !carried.contains(&t.name) {
                carried.push(t.name.clone());
            }
        }
        // A pipeline of named tables now names these too; one that carries every
        // table carries them anyway.
        if let Selection::Named(mut named) = selection {
            for t in &tables {
                if !named.contains(&t.name) {
                    named.push(t.name.clone());
                }
            }
            state
                .set_selection(tgt, &pipeline.name, Some(&named))
                .await?;
        }
        if !opts.rows.is_empty() {
            state
                .set_row_selection(tgt, &pipeline.name, &record)
                .await?;
        }
        state.bump_positions_version(tgt, &pipeline.name).await
    })
    .await?;
    if opts.action == TablesAction::Add {
        let plan = crate::publication::plan(src, tgt, state, &pipeline.name, None).await?;
        crate::publication::ensure(src, &plan, &carried, &rows).await?;
        follow_ddl(src, tgt, state, &pipeline.name).await?;
        wait_for_open_transactions(src).await?;
    }
    Ok(Copies { tables, notes })
}

/// With `--capture-ddl`, points the pipeline's event trigger on the source at its
/// tables as they are now, so DDL on a table that joined is captured (and on one
/// that left is not).
async fn follow_ddl(src: &Client, tgt: &Client, state: &StateStore, pipeline: &str) -> Result<()> {
    if !state.capture_ddl(tgt, pipeline).await? {
        return Ok(());
    }
    let Some(p) = state.pipeline(tgt, pipeline).await? else {
        return Ok(());
    };
    let every_table = state.selection(tgt, pipeline).await? == Selection::EveryTable;
    crate::ddl_capture::enable(
        src,
        tgt,
        state,
        pipeline,
        &p.publication,
        every_table,
        &p.tables,
    )
    .await
}

/// Runs `work` (state writes through `tgt`) in one target transaction: committed
/// when it succeeds, rolled back otherwise.
async fn in_transaction(
    tgt: &Client,
    work: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    tgt.batch_execute("BEGIN")
        .await
        .pg_context(|| "opening a state transaction on the target".into())?;
    match work.await {
        Ok(()) => tgt
            .batch_execute("COMMIT")
            .await
            .pg_context(|| "committing the pipeline's tables on the target".into()),
        Err(e) => {
            let _ = tgt.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Whether `table` has any row on the target.
async fn has_rows(tgt: &Client, table: &QualifiedName) -> Result<bool> {
    let own = crate::own_rows::own_rows_on(tgt, table).await?;
    Ok(tgt
        .query_opt(&format!("SELECT 1 FROM {own} LIMIT 1"), &[])
        .await
        .pg_context(|| format!("checking whether {table} is empty on the target"))?
        .is_some())
}

/// Waits until every source transaction open now has ended. Changes a transaction
/// made before a table joined the publication are not decoded for that table (the
/// catalog as of each change decides), so a copy must see every such transaction:
/// its snapshot is taken only after they end.
pub(crate) async fn wait_for_open_transactions(src: &Client) -> Result<()> {
    let ctx = || "reading the source's open transactions".to_string();
    let horizon: i64 = src
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await
        .pg_context(ctx)?
        .get(0);
    let deadline = Instant::now() + WAIT;
    let mut told = false;
    loop {
        let oldest: i64 = src
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await
            .pg_context(ctx)?
            .get(0);
        if oldest >= horizon {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "a source transaction open when the table joined the publication is still open after {} s: end it (see pg_stat_activity) and run the command again",
                WAIT.as_secs()
            );
        }
        if !told {
            tracing::info!(
                "waiting for source transactions open when the table joined the publication to end"
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The SQL key of the advisory lock a copier of `table` holds on the target.
fn copy_lock_key(state: &StateStore, pipeline: &str, table: &QualifiedName) -> String {
    format!(
        "hashtextextended({}, 7082)",
        crate::pg::quote_literal(&format!(
            "walshuttle copy {}.{pipeline} {}",
            state.schema(),
            table.quoted()
        ))
    )
}

/// Takes the session lock that makes this target session the only copier of
/// `table` (held until [`unlock_copy`] or the session ends, so a crash frees it);
/// with `wait`, waits for another copier to finish, else returns false at once.
pub async fn lock_copy(
    tgt: &Client,
    state: &StateStore,
    pipeline: &str,
    table: &QualifiedName,
    wait: bool,
) -> Result<bool> {
    let key = copy_lock_key(state, pipeline, table);
    let ctx = || format!("locking {table} for its copy on the target");
    let got: bool = tgt
        .query_one(&format!("SELECT pg_try_advisory_lock({key})"), &[])
        .await
        .pg_context(ctx)?
        .get(0);
    if got || !wait {
        return Ok(got);
    }
    tracing::info!(table = %table, "another walshuttle process is copying the table (`run` copying it online, or another `tables` command): waiting for it to finish");
    tgt.batch_execute(&format!("SELECT pg_advisory_lock({key})"))
        .await
        .pg_context(ctx)?;
    Ok(true)
}

/// Releases the lock [`lock_copy`] took.
pub async fn unlock_copy(
    tgt: &Client,
    state: &StateStore,
    pipeline: &str,
    table: &QualifiedName,
) -> Result<()> {
    tgt.batch_execute(&format!(
        "SELECT pg_advisory_unlock({})",
        copy_lock_key(state, pipeline, table)
    ))
    .await
    .pg_context(|| format!("unlocking {table} after its copy on the target"))
}

/// Copies `table`, which is `held`, under a new snapshot of its own while the stream
/// holds its changes: barrier, snapshot, then in one target transaction its rows
/// replaced by the snapshot's, the snapshot recorded as its copy position and the
/// table marked `copied` (a crash before the commit leaves it `held`, to copy
/// again). Returns the rows copied and the snapshot's WAL position. The caller
/// holds the table's copy lock ([`lock_copy`]) and has prepared `tgt` for writing
/// replicated rows.
pub async fn copy_held(
    source: &Endpoint,
    tgt: &mut Client,
    state: &StateStore,
    pipeline: &str,
    table: &Table,
) -> Result<(u64, crate::pg::Lsn)> {
    barrier(tgt, state, pipeline).await?;
    tracing::info!(table = %table.name, "the stream holds the table's changes now: copying it");
    // A large table with an integer key is copied range by range, each under a
    // short snapshot of its own; any other in one range, the whole table.
    let src = connect(source, "tables").await?;
    let plan = crate::range_copy::plan(&src, table).await?;
    drop(src);
    let (column, slices) = match plan {
        Some((column, slices)) => {
            tracing::info!(table = %table.name, ranges = slices.len(), "copying by key ranges, each under its own snapshot");
            (Some(column), slices)
        }
        None => (None, vec![crate::range_copy::Slice::WHOLE]),
    };
    let (copied, lsn) = crate::range_copy::copy(
        source,
        tgt,
        state,
        pipeline,
        table,
        column.as_deref(),
        &slices,
    )
    .await?;
    tracing::info!(table = %table.name, rows = copied, "copied; the stream applies the changes it held");
    Ok((copied, lsn))
}

/// Waits for a moment when no apply transaction of the pipeline is open (taking the
/// positions lock once, never queueing for it): every transaction that began before
/// the table was marked `held` has committed, so whatever the stream applied to the
/// table without holding it is committed on the source before the copy's snapshot.
async fn barrier(tgt: &mut Client, state: &StateStore, pipeline: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    let ctx = || "waiting for the pipeline's apply transactions".to_string();
    loop {
        let tx = tgt.transaction().await.pg_context(ctx)?;
        let locked = state.try_lock_positions(&tx, pipeline).await?;
        tx.commit().await.pg_context(ctx)?;
        if locked {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "pipeline {pipeline} kept an apply transaction open for {} s: run the command again",
                WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes tables out of the pipeline: out of the publication first, then out of the
/// state, so changes still in flight for them are recognised and dropped.
async fn remove(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    pipeline: &Pipeline,
    opts: &TablesOptions,
) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut gone = Vec::new();
    for name in &opts.tables {
        if pipeline.tables.contains(name) {
            gone.push(name.clone());
        } else {
            lines.push(format!("{name} is not part of the pipeline: nothing to do"));
        }
    }
    if gone.is_empty() {
        return Ok(lines);
    }
    let kept: Vec<QualifiedName> = pipeline
        .tables
        .iter()
        .filter(|t| !gone.contains(t))
        .cloned()
        .collect();
    if kept.is_empty() {
        bail!(
            "that would leave pipeline {} with no tables: retire it with `walshuttle teardown` instead",
            pipeline.name
        );
    }
    let plan = crate::publication::plan(src, tgt, state, &pipeline.name, None).await?;
    let mut rows = crate::row_selection::current(src, tgt, state, &pipeline.name).await?;
    rows.retain(|t| !gone.contains(t));
    let mut record = state.row_selection(tgt, &pipeline.name).await?;
    record.retain(|t| !gone.contains(t));
    crate::publication::ensure(src, &plan, &kept, &rows).await?;
    in_transaction(tgt, async {
        for t in &gone {
            state.remove_table(tgt, &pipeline.name, t).await?;
        }
        // A table added again later starts without its old list and filter.
        state
            .set_row_selection(tgt, &pipeline.name, &record)
            .await?;
        // The pipeline no longer carries every table, nor these by name.
        let named = match state.selection(tgt, &pipeline.name).await? {
            Selection::Named(named) => named.into_iter().filter(|t| !gone.contains(t)).collect(),
            _ => kept.clone(),
        };
        state
            .set_selection(tgt, &pipeline.name, Some(&named))
            .await?;
        state.bump_positions_version(tgt, &pipeline.name).await
    })
    .await?;
    follow_ddl(src, tgt, state, &pipeline.name).await?;
    for t in gone {
        lines.push(format!(
            "removed {t}: it left the publication and is no longer applied; its table on the target is left as it is"
        ));
    }
    Ok(lines)
}
