//! Copy workers: each reads chunks under the copy's snapshot and streams COPY bytes
//! from source to target without decoding rows. A chunk's rows, its `done` mark and
//! (under a snapshot other than the slot's own) its copy position commit in one
//! target transaction: the saga step, whose rollback is its compensation.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use super::plan;
use super::progress::Progress;
use crate::pg::{Lsn, PgResultExt, QualifiedName};
use crate::snapshot::SnapshotSession;
use crate::state::{ChunkRange, ChunkRow, StateStore, StoredScope};

/// How one table's rows travel: the column list and the COPY format.
#[derive(Clone, Debug)]
pub struct CopySpec {
    /// Quoted column list (generated columns excluded).
    pub columns: String,
    /// The pipeline's row filter for the table (`--row-filter`), ANDed with each
    /// chunk's range.
    pub row_filter: Option<String>,
    /// Binary COPY when both sides have identical, portable types; text otherwise.
    pub binary: bool,
    /// The integer column key chunks are ranges of.
    pub chunk_column: Option<String>,
}

/// Work shared by all workers: the queue of chunks, and a flag that stops everyone
/// once one worker fails.
pub struct CopyJob {
    /// Chunks not yet taken.
    pub queue: Mutex<VecDeque<ChunkRow>>,
    /// Per-table copy settings.
    pub specs: HashMap<QualifiedName, CopySpec>,
    /// State store on the target.
    pub state: StateStore,
    /// Pipeline name.
    pub pipeline: String,
    /// LSN of the snapshot the chunks are read under, recorded with each chunk.
    pub snapshot_lsn: Lsn,
    /// The recorded snapshot (a plain one, whose visibility becomes each chunk's
    /// copy position); `None` for the slot's own snapshot.
    pub snapshot_id: Option<i64>,
    /// Set when any worker failed: the others stop taking chunks.
    pub failed: AtomicBool,
    /// Progress counters.
    pub progress: Arc<Progress>,
}

impl CopyJob {
    fn next(&self) -> Option<ChunkRow> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        self.queue.lock().ok()?.pop_front()
    }
}

/// Runs one worker until the queue is empty; returns rows and bytes copied.
pub async fn run_worker(
    job: Arc<CopyJob>,
    worker: i32,
    source: SnapshotSession,
    mut target: Client,
) -> Result<()> {
    let result = async {
        while let Some(chunk) = job.next() {
            copy_chunk(&job, worker, &source.client, &mut target, &chunk).await?;
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if result.is_err() {
        job.failed.store(true, Ordering::Relaxed);
    }
    // The source transaction only read; ending it releases the snapshot.
    let _ = source.client.batch_execute("COMMIT").await;
    result
}

async fn copy_chunk(
    job: &CopyJob,
    worker: i32,
    source: &Client,
    target: &mut Client,
    chunk: &ChunkRow,
) -> Result<()> {
    let table = &chunk.table;
    let Some(spec) = job.specs.get(table) else {
        anyhow::bail!(
            "no copy settings for {table}: the chunk plan names a table outside this pipeline"
        );
    };
    let ctx = || format!("copying chunk {} of {table}", chunk.chunk_no);
    let format = if spec.binary { " (FORMAT binary)" } else { "" };
    let copy_out = format!(
        "COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT{format}",
        spec.columns,
        table.quoted(),
        match &spec.row_filter {
            Some(f) => format!(
                "({}) AND ({f})",
                plan::predicate(&chunk.range, spec.chunk_column.as_deref())
            ),
            None => plan::predicate(&chunk.range, spec.chunk_column.as_deref()),
        }
    );
    let copy_in = format!(
        "COPY {} ({}) FROM STDIN{format}",
        table.quoted(),
        spec.columns
    );

    let tx = target.transaction().await.pg_context(ctx)?;
    // The chunk's done mark commits with its rows, so losing an unflushed commit in
    // a target crash loses both together: asynchronous commit is safe here.
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await
        .pg_context(ctx)?;
    let reader = source.copy_out(&copy_out).await.pg_context(ctx)?;
    let writer = tx
        .copy_in::<_, bytes::Bytes>(&copy_in)
        .await
        .pg_context(ctx)?;
    futures_util::pin_mut!(reader);
    futures_util::pin_mut!(writer);
    let mut bytes = 0u64;
    while let Some(data) = reader.next().await {
        let data = data.pg_context(ctx)?;
        bytes += data.len() as u64;
        job.progress.add_bytes(table, data.len() as u64);
        writer.feed(data).await.pg_context(ctx)?;
    }
    let rows = writer.finish().await.pg_context(ctx)?;
    job.state
        .mark_chunk_done(
            &tx,
            &job.pipeline,
            chunk,
            rows as i64,
            bytes as i64,
            worker,
            job.snapshot_id,
            job.snapshot_lsn,
        )
        .await?;
    if let Some(snapshot_id) = job.snapshot_id {
        let scope = match (&chunk.range, &spec.chunk_column) {
            (ChunkRange::Keys { lo, hi }, Some(column)) => StoredScope::Range {
                column: column.clone(),
                lo: *lo,
                hi: *hi,
            },
            // Block chunks of one table are all copied under one snapshot.
            _ => StoredScope::Table,
        };
        job.state
            .add_position(&tx, &job.pipeline, table, &scope, snapshot_id)
            .await?;
    }
    tx.commit().await.pg_context(ctx)?;
    job.progress.add_rows(table, rows);
    job.progress.chunk_done(table);
    crate::observe::rows_copied(table, rows);
    tracing::debug!(table = %table, chunk = chunk.chunk_no, rows, bytes, worker, "chunk copied");
    Ok(())
}
