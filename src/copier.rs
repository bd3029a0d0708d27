//! `run`'s copier: copies the pipeline's `held` tables that no other walshuttle
//! process is copying, while the stream runs.
//!
//! After an online bootstrap (see [`crate::bootstrap::online`]) every table is
//! `held`; a `walshuttle tables add` that was interrupted leaves its table `held`
//! too. Each is copied as `tables add` copies a table ([`crate::tables::copy_held`]),
//! under a short snapshot of its own, `--jobs` at a time. A target session lock per
//! table ([`crate::tables::lock_copy`]) keeps two copiers apart: a `tables` command
//! holds it from before it marks its tables `held` until their copies are in, and
//! this copier skips a table whose lock it does not get at once. A crash mid-copy
//! rolls the copy back and frees the lock; the table stays `held` and is copied
//! again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;

use crate::catalog;
use crate::config::Endpoint;
use crate::pg::{connect, PgResultExt, QualifiedName};
use crate::state::{StateStore, TableState};
use crate::target_checks::TargetSetup;

/// How often the pipeline's tables are looked at when nothing is held.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// The longest wait before a failed round is tried again.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The copier task of `run`, ended when dropped (a copy in flight is rolled back
/// on the target and its table stays `held`).
pub struct Copier(tokio::task::JoinHandle<()>);

impl Drop for Copier {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the copier needs to know.
#[derive(Clone)]
struct Job {
    source: Endpoint,
    target: Endpoint,
    state: StateStore,
    pipeline: String,
    setup: TargetSetup,
    jobs: usize,
}

impl Copier {
    /// Starts copying the held tables of `pipeline`, `jobs` at a time; a failed
    /// round is logged and tried again with backoff.
    pub fn start(
        source: &Endpoint,
        target: &Endpoint,
        state: &StateStore,
        pipeline: &str,
        setup: &TargetSetup,
        jobs: usize,
    ) -> Copier {
        let job = Job {
            source: source.clone(),
            target: target.clone(),
            state: state.clone(),
            pipeline: pipeline.to_string(),
            setup: setup.clone(),
            jobs: jobs.max(1),
        };
        Copier(tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            // The session that looks at the tables, kept across rounds.
            let mut lister: Option<Client> = None;
            loop {
                let pass = async {
                    let client = match lister.take() {
                        Some(c) if !c.is_closed() => c,
                        _ => connect(&job.target, "online copy").await?,
                    };
                    let copied = round(&job, &client).await;
                    lister = Some(client);
                    copied
                };
                match pass.await {
                    Ok(0) => {
                        backoff = Duration::from_secs(1);
                        tokio::time::sleep(IDLE_POLL).await;
                    }
                    Ok(_) => backoff = Duration::from_secs(1),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "copying held tables failed; trying again (the stream goes on, the tables stay held)");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }))
    }
}

/// One pass: copies every held table nobody else copies; returns how many.
async fn round(job: &Job, tgt: &Client) -> Result<usize> {
    let held: Vec<QualifiedName> = job
        .state
        .table_entries(tgt, &job.pipeline)
        .await?
        .into_iter()
        .filter(|e| e.state == TableState::Held)
        .map(|e| e.name)
        .collect();
    if held.is_empty() {
        return Ok(0);
    }
    let Some(pipeline) = job.state.pipeline(tgt, &job.pipeline).await? else {
        return Ok(0);
    };
    if !pipeline.phase.copied() {
        return Ok(0);
    }
    let src = connect(&job.source, "online copy").await?;
    // A table not (yet) in the publication sends no changes: copying it would lose
    // them. Only a `tables add` interrupted before it published the table leaves
    // one so; running that command again finishes it.
    let mut todo = VecDeque::new();
    for table in held {
        if in_publication(&src, &pipeline.publication, &table).await? {
            todo.push_back(table);
        } else {
            tracing::warn!(table = %table, "the table is held but not in the publication (an interrupted `walshuttle tables add`?): not copying it; run `walshuttle tables add {}` again", table.quoted());
        }
    }
    if todo.is_empty() {
        return Ok(0);
    }
    // Changes made before a table joined the publication are not decoded for it:
    // its snapshot must come after every transaction open since (see `tables add`).
    crate::tables::wait_for_open_transactions(&src).await?;
    tracing::info!(
        tables = todo.len(),
        jobs = job.jobs,
        "copying held tables while the stream runs, each under a snapshot of its own"
    );
    let queue = Arc::new(Mutex::new(todo));
    let workers = job.jobs.min(queue.lock().map(|q| q.len()).unwrap_or(1));
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (job, queue) = (job.clone(), Arc::clone(&queue));
        handles.push(tokio::spawn(async move { worker(&job, &queue).await }));
    }
    let mut copied = 0;
    let mut first_error = None;
    for h in handles {
        match h.await {
            Ok(Ok(n)) => copied += n,
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(anyhow::anyhow!("a copy worker stopped: {e}"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(copied),
    }
}

/// Copies tables from `queue` until it is empty, on a target session of its own;
/// returns how many it copied.
async fn worker(job: &Job, queue: &Mutex<VecDeque<QualifiedName>>) -> Result<usize> {
    let mut tgt = connect(&job.target, "online copy").await?;
    crate::target_checks::prepare_session(&tgt, &job.setup).await?;
    let src = connect(&job.source, "online copy").await?;
    let mut copied = 0;
    loop {
        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
        let Some(name) = next else {
            return Ok(copied);
        };
        if !crate::tables::lock_copy(&tgt, &job.state, &job.pipeline, &name, false).await? {
            tracing::debug!(table = %name, "another walshuttle process copies the table");
            continue;
        }
        let result = copy_one(job, &src, &mut tgt, &name).await;
        // A failed copy leaves the session in whatever state: it is dropped, which
        // frees the lock too.
        let done = result?;
        crate::tables::unlock_copy(&tgt, &job.state, &job.pipeline, &name).await?;
        copied += usize::from(done);
    }
}

/// Copies `name` if it is still held (another copier may have finished it between
/// the listing and the lock); returns whether it copied.
async fn copy_one(job: &Job, src: &Client, tgt: &mut Client, name: &QualifiedName) -> Result<bool> {
    let still_held = job
        .state
        .table_entries(&*tgt, &job.pipeline)
        .await?
        .iter()
        .any(|e| &e.name == name && e.state == TableState::Held);
    if !still_held {
        return Ok(false);
    }
    let Some(mut table) = catalog::load_table(src, name).await? else {
        tracing::warn!(table = %name, "the held table no longer exists on the source: not copying it; remove it with `walshuttle tables remove {}`", name.quoted());
        return Ok(false);
    };
    // What the pipeline replicates of it (`--columns`, `--row-filter`).
    crate::row_selection::current(src, &*tgt, &job.state, &job.pipeline)
        .await?
        .narrow(&mut table)?;
    let (rows, lsn) =
        crate::tables::copy_held(&job.source, tgt, &job.state, &job.pipeline, &table).await?;
    tracing::info!(table = %name, rows, snapshot = %lsn, "copied online; the stream applies the changes it held meanwhile");
    Ok(true)
}

/// Whether publication `publication` on the source carries `table`.
async fn in_publication(src: &Client, publication: &str, table: &QualifiedName) -> Result<bool> {
    Ok(src
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema, &table.name],
        )
        .await
        .pg_context(|| format!("looking up {table} in publication {publication}"))?
        .is_some())
}
