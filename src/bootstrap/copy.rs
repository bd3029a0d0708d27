//! Copy workers: each reads chunks under the exported snapshot and streams COPY
//! bytes from source to target without decoding rows. A chunk's rows and its `done`
//! mark commit in one target transaction: the saga step, whose rollback is its
//! compensation.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use super::plan::Chunk;
use super::progress::Progress;
use super::snapshot::SnapshotSession;
use crate::pg::{Lsn, PgResultExt, QualifiedName};
use crate::state::StateStore;

/// How one table's rows travel: the column list and the COPY format.
#[derive(Clone, Debug)]
pub struct CopySpec {
    /// Quoted column list (generated columns excluded).
    pub columns: String,
    /// Binary COPY when both sides have identical, portable types; text otherwise.
    pub binary: bool,
}

/// Work shared by all workers: the queue of chunks, and a flag that stops everyone
/// once one worker fails.
pub struct CopyJob {
    /// Chunks not yet taken.
    pub queue: Mutex<VecDeque<Chunk>>,
    /// Per-table copy settings.
    pub specs: HashMap<QualifiedName, CopySpec>,
    /// State store on the target.
    pub state: StateStore,
    /// Pipeline name.
    pub pipeline: String,
    /// LSN of the snapshot the chunks are read under, recorded with each chunk.
    pub snapshot_lsn: Lsn,
    /// Set when any worker failed: the others stop taking chunks.
    pub failed: AtomicBool,
    /// Progress counters.
    pub progress: Arc<Progress>,
}

impl CopyJob {
    fn next(&self) -> Option<Chunk> {
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
    chunk: &Chunk,
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
        chunk.ctid_predicate()
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
    tx.execute(
        &format!(
            "UPDATE {} SET rows_copied = $5, bytes_copied = $6, worker = $7, snapshot_lsn = $8::text::pg_lsn, \
               started_at = now(), done_at = clock_timestamp() \
             WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3 AND chunk_no = $4",
            job.state.table("chunks")
        ),
        &[
            &job.pipeline,
            &table.schema,
            &table.name,
            &chunk.chunk_no,
            &(rows as i64),
            &(bytes as i64),
            &worker,
            &job.snapshot_lsn.to_string(),
        ],
    )
    .await
    .pg_context(ctx)?;
    tx.commit().await.pg_context(ctx)?;
    job.progress.add_rows(table, rows);
    crate::observe::rows_copied(table, rows);
    tracing::debug!(table = %table, chunk = chunk.chunk_no, rows, bytes, worker, "chunk copied");
    Ok(())
}
