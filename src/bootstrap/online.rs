//! The online bootstrap (`--online`): no snapshot is held for the whole copy.
//!
//! A one-snapshot bootstrap copies every table under the slot's exported snapshot,
//! which the source keeps open (holding back vacuum everywhere) and the slot keeps
//! WAL for (nothing is confirmed until streaming starts) for as long as the copy
//! takes. The online bootstrap instead reuses what `walshuttle tables add` does for
//! one table, for every table:
//!
//! - the slot is created without a snapshot: its consistent point is where the
//!   stream starts;
//! - the target tables are created with their keys and indexes, and every table is
//!   recorded `held`: the stream keeps each table's changes in `held_changes` on the
//!   target (and confirms them to the source) instead of applying them;
//! - the pipeline is recorded as copied from the consistent point, so `run` streams
//!   at once, and its copier ([`crate::copier`]) copies the held tables one by one,
//!   each under a short snapshot of its own recorded as the table's copy position;
//!   the stream then applies the held changes that snapshot did not see and the
//!   table is `ready`.
//!
//! Every change committed after the consistent point is decoded and held; one
//! committed before it is in every later snapshot, so in the copy. The copy's own
//! snapshot decides, per transaction, whether the copy or the stream carries it.

use std::time::Instant;

use anyhow::{Context, Result};
use tokio_postgres::Client;

use super::{preflight, table_totals, BootstrapOptions, BootstrapSummary};
use crate::catalog::{self, TargetFit};
use crate::config::Endpoint;
use crate::pg::replication::ReplicationClient;
use crate::pg::PgResultExt;
use crate::state::{Phase, Pipeline, StateStore, TableEntry, TableState};

/// Creates the slot without a snapshot, the target tables with their keys and
/// indexes, and records every table `held` and the pipeline as streaming from the
/// slot's consistent point. Called by a fresh bootstrap once the preflight passed,
/// the pipeline is recorded and the publication exists.
#[allow(clippy::too_many_arguments)]
pub(super) async fn start(
    source: &Endpoint,
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    opts: &BootstrapOptions,
    checked: &preflight::Checked,
    mut pipeline: Pipeline,
    started: Instant,
) -> Result<BootstrapSummary> {
    let mut repl = ReplicationClient::connect(source, None)
        .await
        .with_context(|| format!("opening a replication connection to {}", source.redacted))?;
    let lsn = repl
        .create_slot_without_snapshot(&opts.slot)
        .await
        .with_context(|| format!("creating replication slot {} on the source", opts.slot))?;
    repl.close().await;
    tracing::info!(slot = %opts.slot, %lsn, "created replication slot (no snapshot: each table is copied under its own)");

    let entries: Vec<TableEntry> = checked
        .tables
        .iter()
        .map(|t| TableEntry {
            name: t.name.clone(),
            state: TableState::Held,
            chunk_column: None,
        })
        .collect();
    pipeline.phase = Phase::Copied;
    pipeline.stream_start_lsn = Some(lsn);
    // One target transaction, tables included: a crash before it commits leaves
    // the pipeline in `creating_slot` and no table behind, and the next bootstrap
    // starts again.
    let tx_client = tgt;
    tx_client
        .batch_execute("BEGIN")
        .await
        .pg_context(|| "recording the online bootstrap".into())?;
    let recorded = async {
        for (table, fit) in checked.tables.iter().zip(&checked.fits) {
            if let TargetFit::Missing { .. } = fit {
                catalog::create_missing_types(src, tx_client, table).await?;
                tx_client
                    .batch_execute(&catalog::create_table_sql(table))
                    .await
                    .pg_context(|| format!("creating table {} on the target", table.name))?;
                tracing::info!(table = %table.name, "created table on the target");
            }
            // The key the held changes are applied through; the other indexes are built
            // in the table's copy transaction, after its rows are in (an existing
            // table's rows are replaced by its copy there too).
            for sql in catalog::identity_index_sql(src, tx_client, table).await? {
                tx_client
                    .batch_execute(&sql)
                    .await
                    .pg_context(|| format!("building on the target: {sql}"))?;
            }
        }
        let names: Vec<_> = checked.tables.iter().map(|t| t.name.clone()).collect();
        crate::sequences::mirror(src, tx_client, &names).await?;
        state.save_pipeline(tx_client, &pipeline).await?;
        // With a filter, the pipeline carries the tables it matched (named), so
        // nothing joins it by itself that the filter would leave out.
        let named = (!opts.filter.is_empty()).then(|| pipeline.tables.clone());
        state
            .set_selection(
                tx_client,
                &pipeline.name,
                named.as_deref().or(opts.tables.as_deref()),
            )
            .await?;
        state
            .set_table_filter(tx_client, &pipeline.name, &opts.filter)
            .await?;
        state
            .set_tables(tx_client, &pipeline.name, &entries)
            .await?;
        state.set_progress(tx_client, &pipeline.name, lsn).await?;
        state
            .bump_positions_version(tx_client, &pipeline.name)
            .await
    }
    .await;
    match recorded {
        Ok(()) => tx_client
            .batch_execute("COMMIT")
            .await
            .pg_context(|| "recording the online bootstrap".into())?,
        Err(e) => {
            let _ = tx_client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    }
    Ok(BootstrapSummary {
        already_done: false,
        resumed: false,
        chunks_copied: 0,
        tables: table_totals(tgt, state, &opts.slot).await?,
        seconds: started.elapsed().as_secs_f64(),
        stream_start_lsn: Some(lsn),
        copy_positions: 0,
        online_tables: entries.len(),
    })
}

/// How many tables of a pipeline are still `held`, waiting for `run` to copy them.
pub async fn tables_to_copy(tgt: &Client, state: &StateStore, pipeline: &str) -> Result<usize> {
    Ok(state
        .table_entries(tgt, pipeline)
        .await?
        .iter()
        .filter(|e| e.state == TableState::Held)
        .count())
}

/// The summary of a bootstrap that left tables for `run` to copy.
pub(super) fn render(summary: &BootstrapSummary) -> String {
    let total = summary.tables.len();
    let lsn = summary
        .stream_start_lsn
        .map(|l| l.to_string())
        .unwrap_or_default();
    if summary.already_done {
        format!(
            "online bootstrap recorded (streaming starts at {lsn}); {} of {total} tables still to copy: `walshuttle run` copies them while it streams",
            summary.online_tables
        )
    } else {
        format!(
            "online bootstrap ready in {:.1} s: {total} tables created on the target, none copied yet; streaming starts at {lsn}. `walshuttle run` copies the tables, each under a short snapshot of its own, while it streams",
            summary.seconds
        )
    }
}
