//! `walshuttle run`: the sidecar. Bootstraps when there is no state, then streams
//! forever, riding through restarts and dropped connections with capped exponential
//! backoff, until SIGTERM/SIGINT. An error that retrying cannot fix (see
//! [`crate::stream::faults`]) stops it with one line, recorded for `status`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;

use crate::bootstrap::{self, BootstrapOptions};
use crate::config::Endpoint;
use crate::observe::{self, RunPhase};
use crate::pg::connect;
use crate::state::{Phase, StateStore};
use crate::stream::faults::{self, Class, Fatal};
use crate::stream::session::{self, StreamConfig};
use crate::target_checks::{self, TargetSetup};

/// Settings of `run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Bootstrap settings (used when the pipeline has no finished bootstrap).
    pub bootstrap: BootstrapOptions,
    /// Catch-up settings, for when the slot is found lost.
    pub catch_up: crate::catchup::CatchUpOptions,
    /// Interval of standby status updates to the source.
    pub status_interval: Duration,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Lag above which `/healthz` answers 503.
    pub healthz_max_lag: Duration,
    /// Streamed transactions applied at once on connections of their own.
    pub max_stream_connections: usize,
    /// Keep columns dropped on the source on the target, made nullable where new
    /// rows would not fit (`--keep-dropped-columns`).
    pub keep_dropped_columns: bool,
}

impl RunOptions {
    /// Defaults for a pipeline (what `run` uses without flags): demo and tests.
    pub fn for_pipeline(bootstrap: BootstrapOptions) -> Self {
        RunOptions {
            catch_up: crate::catchup::CatchUpOptions {
                slot: bootstrap.slot.clone(),
                publication: bootstrap.publication.clone(),
                allow_target_triggers: bootstrap.allow_target_triggers,
                state_schema: bootstrap.state_schema.clone(),
                tables: bootstrap.tables.clone(),
                jobs: bootstrap.jobs,
                margin: Duration::from_secs(300),
                created_columns: Default::default(),
                updated_columns: Default::default(),
                without_slot: false,
            },
            bootstrap,
            status_interval: Duration::from_secs(1),
            metrics_addr: None,
            healthz_max_lag: Duration::from_secs(60),
            max_stream_connections: 4,
            keep_dropped_columns: false,
        }
    }
}

/// How long a stop may take before walshuttle exits without finishing it (a server
/// that stopped answering must not keep SIGTERM from working).
const STOP_GRACE: Duration = Duration::from_secs(8);

/// Resolves `STOP_GRACE` after a stop was requested.
async fn stop_deadline(watcher: &mut watch::Receiver<bool>) {
    while !*watcher.borrow() {
        if watcher.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
    tokio::time::sleep(STOP_GRACE).await;
}

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs the pipeline until `shutdown` turns true (Ok) or a fatal error.
pub async fn run(
    source: &Endpoint,
    target: &Endpoint,
    opts: &RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let state = StateStore::new(&opts.bootstrap.state_schema);
    if let Some(addr) = opts.metrics_addr {
        observe::serve(addr, &opts.bootstrap.slot, opts.healthz_max_lag).await?;
    }
    observe::set_phase(RunPhase::Starting, None);
    let result = run_pipeline(source, target, opts, state, &mut shutdown).await;
    let reason = match &result {
        Ok(()) => "stopped on request".to_string(),
        Err(e) => {
            observe::error("fatal");
            // `/healthz` answers 503 with it until the process exits.
            match e.downcast_ref::<Fatal>() {
                Some(fatal) => fatal.0.clone(),
                None => format!("stopped: {e:#}"),
            }
        }
    };
    observe::set_phase(RunPhase::Stopped, Some(reason));
    result
}

async fn run_pipeline(
    source: &Endpoint,
    target: &Endpoint,
    opts: &RunOptions,
    state: StateStore,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<()> {
    ensure_bootstrapped(source, target, &opts.bootstrap, &state).await?;
    let (publication, target_setup) = stream_preflight(target, &opts.bootstrap, &state).await?;
    let cfg = StreamConfig {
        slot: opts.bootstrap.slot.clone(),
        publication,
        state,
        status_interval: opts.status_interval,
        target: target_setup,
        max_stream_connections: opts.max_stream_connections,
        keep_dropped_columns: opts.keep_dropped_columns,
        memory: Default::default(),
    };
    let mut backoff = BACKOFF_START;
    let mut last_error: Option<String> = None;
    let mut slot_busy_since: Option<Instant> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let streamed = AtomicBool::new(false);
        let mut watcher = shutdown.clone();
        let outcome = tokio::select! {
            outcome = session::stream(source, target, &cfg, shutdown, &streamed) => outcome,
            _ = stop_deadline(&mut watcher) => {
                tracing::warn!("the stop did not finish within {} s (a server is not answering): exiting anyway; nothing is lost, unconfirmed changes are sent again", STOP_GRACE.as_secs());
                return Ok(());
            }
        };
        if streamed.load(Ordering::Relaxed) {
            // It got as far as streaming: the next fault starts the backoff afresh.
            backoff = BACKOFF_START;
        }
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if e.downcast_ref::<crate::catchup::SlotGone>().is_some() => {
                let reason = e
                    .downcast_ref::<crate::catchup::SlotGone>()
                    .map(|g| g.reason.clone());
                if reason == Some(crate::catchup::GapReason::NoLogicalDecoding) {
                    return Err(Fatal(
                        "the source has no logical decoding (wal_level below logical): `run` cannot stream; use `walshuttle catch-up --poll INTERVAL`, or set wal_level = logical and restart the source".into(),
                    )
                    .into());
                }
                tracing::warn!(slot = %cfg.slot, ?reason, "the replication slot is gone and its WAL with it: repairing the gap from watermarks instead of recopying");
                observe::set_phase(
                    RunPhase::CatchingUp,
                    Some("the replication slot is gone: repairing the gap from watermarks".into()),
                );
                let summary = crate::catchup::catch_up(source, target, &opts.catch_up).await?;
                tracing::warn!(
                    rows_upserted = summary.rows_upserted,
                    rows_deleted = summary.rows_deleted,
                    resume_lsn = ?summary.resume_lsn,
                    "gap repaired; streaming resumes from the new slot"
                );
                eprintln!("{}", summary.render());
            }
            Err(e) if faults::classify(&e) == Class::Fatal => {
                return Err(stop_for_good(target, &cfg, &e).await);
            }
            Err(e) => {
                let text = format!("{e:#}");
                observe::set_phase(
                    RunPhase::Reconnecting,
                    Some(format!("replication interrupted, retrying: {text}")),
                );
                observe::reconnect();
                if let Some(holder) = slot_held_by_other(source, &cfg.slot, &e).await {
                    observe::error("slot_busy");
                    let since = *slot_busy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(90) {
                        return Err(Fatal(format!(
                            "replication slot {} is held by another consumer ({holder}) for more than 90 s: stop it, or give this pipeline its own --slot",
                            cfg.slot
                        ))
                        .into());
                    }
                    if last_error.as_deref() != Some("slot busy") {
                        tracing::warn!(slot = %cfg.slot, holder = %holder, "replication slot is in use; waiting for it to be released");
                        last_error = Some("slot busy".into());
                    }
                } else {
                    slot_busy_since = None;
                    observe::error("stream");
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(error = %text, "replication interrupted; retrying with backoff");
                        last_error = Some(text);
                    } else {
                        tracing::debug!(error = %text, "still failing");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Stops the pipeline on an error retrying cannot fix: one line saying where and
/// what to do, recorded in the state (best effort) so `status` shows it.
async fn stop_for_good(target: &Endpoint, cfg: &StreamConfig, e: &anyhow::Error) -> anyhow::Error {
    let message = faults::stop_message(e);
    tracing::error!(slot = %cfg.slot, error = %format!("{e:#}"), "stopping: retrying cannot fix this");
    let record = async {
        let client = connect(target, "run").await?;
        cfg.state
            .set_stop_reason(&client, &cfg.slot, Some(&message))
            .await
    };
    match tokio::time::timeout(Duration::from_secs(10), record).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::warn!(error = %format!("{err:#}"), "could not record why run stopped")
        }
        Err(_) => tracing::warn!("could not record why run stopped: the target did not answer"),
    }
    Fatal(message).into()
}

/// Bootstraps unless a finished bootstrap is recorded.
async fn ensure_bootstrapped(
    source: &Endpoint,
    target: &Endpoint,
    opts: &BootstrapOptions,
    state: &StateStore,
) -> Result<()> {
    let client = connect(target, "run").await?;
    // A state schema of an older release is upgraded before it is read.
    StateStore::open_upgrading(&client, state.schema()).await?;
    let phase = state
        .existing_pipeline(&client, &opts.slot)
        .await?
        .map(|p| p.phase);
    if matches!(
        phase,
        Some(Phase::Copied | Phase::Streaming | Phase::CatchingUp)
    ) {
        return Ok(());
    }
    tracing::info!(slot = %opts.slot, "no finished bootstrap: bootstrapping first");
    observe::set_phase(
        RunPhase::Bootstrapping,
        Some("bootstrapping: copying the tables".into()),
    );
    let summary = bootstrap::bootstrap(source, target, opts).await?;
    eprintln!("{}", summary.render());
    Ok(())
}

/// Checks before streaming: the pipeline's publication (the recorded one; an explicit
/// `--publication` naming another is refused) and how apply sessions must treat
/// foreign keys and triggers on the target tables.
async fn stream_preflight(
    target: &Endpoint,
    opts: &BootstrapOptions,
    state: &StateStore,
) -> Result<(String, TargetSetup)> {
    let client = connect(target, "run").await?;
    let pipeline = state.existing_pipeline(&client, &opts.slot).await?;
    let recorded = pipeline.as_ref().map(|p| p.publication.as_str());
    let publication =
        crate::publication::resolve(opts.publication.as_deref(), &opts.slot, recorded)?;
    let tables = pipeline.iter().flat_map(|p| p.tables.iter());
    let setup = target_checks::decide(&client, tables, opts.allow_target_triggers).await?;
    Ok((publication, setup))
}

/// When `error` says the slot is active elsewhere, who holds it (pid and address).
async fn slot_held_by_other(
    source: &Endpoint,
    slot: &str,
    error: &anyhow::Error,
) -> Option<String> {
    let in_use = error.chain().any(|c| {
        c.downcast_ref::<crate::pg::replication::ReplicationError>()
            .and_then(|r| r.code())
            .is_some_and(|code| *code == tokio_postgres::error::SqlState::OBJECT_IN_USE)
    });
    if !in_use {
        return None;
    }
    let client = connect(source, "slot check").await.ok()?;
    let row = client
        .query_opt(
            "SELECT s.active_pid, coalesce(host(r.client_addr), 'local socket'), coalesce(r.application_name, '') \
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .ok()??;
    let pid: Option<i32> = row.get(0);
    let addr: String = row.get(1);
    let app: String = row.get(2);
    Some(format!(
        "pid {}, client {addr}, application {app:?}",
        pid.unwrap_or_default()
    ))
}
