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
use crate::stream::restart_point::StopExtension;
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
    /// Target connections applying committed transactions at once (`--apply-lanes`).
    pub apply_lanes: usize,
    /// WAL the slot may hold back before it is released on purpose.
    pub max_retained_wal: Option<u64>,
    /// How often the target's sequences are brought up to the source's.
    pub sync_sequences: Option<Duration>,
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
                filter: bootstrap.filter.clone(),
                rows: bootstrap.rows.clone(),
            },
            bootstrap,
            status_interval: Duration::from_secs(1),
            metrics_addr: None,
            healthz_max_lag: Duration::from_secs(60),
            max_stream_connections: 4,
            apply_lanes: DEFAULT_APPLY_LANES,
            max_retained_wal: None,
            sync_sequences: None,
            keep_dropped_columns: false,
        }
    }
}

/// Target connections applying committed transactions at once unless
/// `--apply-lanes` says otherwise (see `stream::lanes`). One: on the 2-core machine
/// where source, target and walshuttle share the CPU, 2 and 4 lanes drained the
/// benchmark backlogs no faster than one (bench/results/issue20-*.md), so lanes are
/// for targets with cores to spare, asked for.
pub const DEFAULT_APPLY_LANES: usize = 1;

/// How long a stop may take before walshuttle exits without finishing it (a server
/// that stopped answering must not keep SIGTERM from working).
const STOP_GRACE: Duration = Duration::from_secs(8);

/// Resolves `STOP_GRACE` after a stop was requested, or later when the session
/// lengthened it (it waits for the slot's restart point, `stream::restart_point`,
/// which it does only with a source that answers).
async fn stop_deadline(watcher: &mut watch::Receiver<bool>, extension: &StopExtension) {
    while !*watcher.borrow() {
        if watcher.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
    let mut deadline = tokio::time::Instant::now() + STOP_GRACE;
    loop {
        tokio::time::sleep_until(deadline).await;
        match extension.until() {
            Some(later) if later > deadline => deadline = later,
            _ => return,
        }
    }
}

/// Longest `run` keeps serving `/metrics` after a stop on an error, waiting for
/// one scrape to see it (a scrape interval of 15 s is common).
const STOPPED_GRACE: Duration = Duration::from_secs(20);

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
    // The deadline covers every step, start-up included: a server that accepts the
    // connection and then says nothing must not keep SIGTERM from working.
    let mut watcher = shutdown.clone();
    let extension = StopExtension::default();
    let result = tokio::select! {
        result = run_pipeline(source, target, opts, state, &mut shutdown, &extension) => result,
        _ = stop_deadline(&mut watcher, &extension) => {
            tracing::warn!("the stop did not finish within {} s (a server is not answering): exiting anyway; nothing is lost, unconfirmed changes are sent again", STOP_GRACE.as_secs());
            Ok(())
        }
    };
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
    if result.is_err() {
        observe::stopped_on_error(STOPPED_GRACE, &mut shutdown).await;
    }
    result
}

async fn run_pipeline(
    source: &Endpoint,
    target: &Endpoint,
    opts: &RunOptions,
    state: StateStore,
    shutdown: &mut watch::Receiver<bool>,
    stop_extension: &StopExtension,
) -> Result<()> {
    let mut retry = Retrying::new(target, state.clone(), &opts.bootstrap.slot);
    // A server down at start (a boot where the database comes up after walshuttle)
    // is waited for like one that goes down later; anything else stops here.
    let mut backoff = BACKOFF_START;
    let ready = loop {
        if *shutdown.borrow() {
            retry.clear_if_noted().await;
            return Ok(());
        }
        match start_up(source, target, opts, &state).await {
            Ok(ready) => break ready,
            Err(e) if crate::exit::is_transient(&e) => {
                retry.note(&e).await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => {
                retry.clear_if_noted().await;
                return Err(e);
            }
        }
    };
    // A switchover done while this `run` streams finishes the pipeline: the stream
    // stops (the source is fenced, so nothing past the fence LSN is left to apply).
    let (stop_tx, mut stop) = watch::channel(*shutdown.borrow());
    let finished = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let _watcher = SwitchoverWatch(tokio::spawn(watch_switchover(
        target.clone(),
        state.clone(),
        opts.bootstrap.slot.clone(),
        shutdown.clone(),
        stop_tx,
        std::sync::Arc::clone(&finished),
    )));
    let shutdown = &mut stop;
    let result = stream_pipeline(
        source,
        target,
        opts,
        state,
        ready,
        retry,
        shutdown,
        stop_extension,
    )
    .await;
    let why = finished.lock().ok().and_then(|f| f.clone());
    match why {
        Some(why) if result.is_ok() => {
            tracing::warn!(slot = %opts.bootstrap.slot, "{why}");
            eprintln!("{why}");
            observe::set_phase(RunPhase::Stopped, Some(why));
            Ok(())
        }
        _ => result,
    }
}

/// Aborts the switchover watch with `run`.
struct SwitchoverWatch(tokio::task::JoinHandle<()>);

impl Drop for SwitchoverWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The message when the pipeline's switchover is done (the pipeline is finished).
async fn switched_over(
    client: &tokio_postgres::Client,
    state: &StateStore,
    slot: &str,
) -> Result<Option<String>> {
    Ok(match state.switchover(client, slot).await? {
        Some((phase, detail, at)) if phase == "done" => Some(format!(
            "pipeline {slot} was switched over ({at}{}): the target is the primary now and this pipeline is finished; retire it with `walshuttle teardown --slot {slot}` (or stream back with the reverse pipeline)",
            detail
                .as_deref()
                .and_then(crate::switchover::fence_lsn_of)
                .map(|l| format!(", fence LSN {l}"))
                .unwrap_or_default()
        )),
        _ => None,
    })
}

/// Polls the target's state every second; when the pipeline's switchover is done,
/// records why and asks the stream to stop. Also passes SIGTERM/SIGINT on.
async fn watch_switchover(
    target: Endpoint,
    state: StateStore,
    slot: String,
    mut outer: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    finished: std::sync::Arc<std::sync::Mutex<Option<String>>>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut forwarding = true;
    loop {
        // A target that is slow or unreachable must not hold up a stop: the poll is
        // dropped as soon as SIGTERM/SIGINT arrives.
        let poll = async {
            tick.tick().await;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = connect(&target, "run").await.ok();
            }
            match &client {
                Some(c) => switched_over(c, &state, &slot).await.ok().flatten(),
                None => None,
            }
        };
        let stopping = async {
            if !forwarding {
                return std::future::pending::<Option<bool>>().await;
            }
            Some(outer.changed().await.is_ok())
        };
        tokio::select! {
            changed = stopping => match changed {
                Some(true) if *outer.borrow() => {
                    let _ = stop.send(true);
                    return;
                }
                Some(true) => {}
                // The sender is gone: nothing more to pass on.
                _ => forwarding = false,
            },
            found = poll => {
                if let Some(why) = found {
                    if let Ok(mut f) = finished.lock() {
                        *f = Some(why);
                    }
                    let _ = stop.send(true);
                    return;
                }
            }
        }
    }
}

/// Streams the pipeline until `shutdown` (see [`run_pipeline`]), from what
/// [`start_up`] made `ready`.
#[allow(clippy::too_many_arguments)]
async fn stream_pipeline(
    source: &Endpoint,
    target: &Endpoint,
    opts: &RunOptions,
    state: StateStore,
    ready: (String, TargetSetup),
    mut retry: Retrying<'_>,
    shutdown: &mut watch::Receiver<bool>,
    stop_extension: &StopExtension,
) -> Result<()> {
    let (publication, target_setup) = ready;
    let cfg = StreamConfig {
        slot: opts.bootstrap.slot.clone(),
        publication,
        state,
        status_interval: opts.status_interval,
        target: target_setup,
        max_stream_connections: opts.max_stream_connections,
        apply_lanes: opts.apply_lanes,
        max_retained_wal: opts.max_retained_wal,
        keep_dropped_columns: opts.keep_dropped_columns,
        memory: Default::default(),
        stop_extension: stop_extension.clone(),
    };
    record_wal_budget(target, &cfg).await;
    // Held tables (an online bootstrap's, an interrupted `tables add`'s) are copied
    // while the stream runs.
    let _copier = crate::copier::Copier::start(
        source,
        target,
        &cfg.state,
        &cfg.slot,
        &cfg.target,
        opts.bootstrap.jobs,
    );
    // Partitions created or attached under a carried partitioned table join as
    // `tables add` makes them (with --capture-ddl, the trigger does it).
    let _partitions = crate::partitions::PartitionWatch::start(
        source,
        target,
        &cfg.state,
        &cfg.slot,
        opts.bootstrap.allow_target_triggers,
    );
    let _sequences = opts
        .sync_sequences
        .map(|every| SequenceSync::start(source, target, &cfg, every));
    // The slot's WAL against the budget right away, not 10 s into streaming: a
    // slot far over it is released before streaming from it, and `/healthz`
    // knows the retained WAL from the start.
    if let Err(e) = release_if_over_budget(source, &cfg).await {
        tracing::debug!(error = %format!("{e:#}"), "could not check the WAL budget");
    }
    let mut backoff = BACKOFF_START;
    let mut last_error: Option<String> = None;
    let mut slot_busy_since: Option<Instant> = None;
    loop {
        if *shutdown.borrow() {
            retry.clear_if_noted().await;
            return Ok(());
        }
        let streamed = AtomicBool::new(false);
        let outcome = {
            let stream = session::stream(source, target, &cfg, shutdown, &streamed);
            // Once it streams again, the note for `status` goes.
            let clear = async {
                if retry.noted {
                    while !streamed.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    retry.clear().await;
                }
                std::future::pending::<Result<()>>().await
            };
            tokio::select! {
                outcome = stream => outcome,
                never = clear => never,
            }
        };
        if streamed.load(Ordering::Relaxed) {
            // It got as far as streaming: the next fault starts the backoff afresh.
            backoff = BACKOFF_START;
        }
        match outcome {
            Ok(()) => {
                retry.clear_if_noted().await;
                return Ok(());
            }
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
            Err(e) if e.downcast_ref::<crate::wal_budget::OverBudget>().is_some() => {
                if let Some(why) = e.downcast_ref::<crate::wal_budget::OverBudget>() {
                    let src = connect(source, "wal budget").await?;
                    release_slot(&src, &cfg.slot, why).await?;
                }
            }
            Err(e) if faults::classify(&e) == Class::Fatal => {
                retry.clear_if_noted().await;
                return Err(stop_for_good(target, &cfg, &e).await);
            }
            Err(e) => {
                let text = format!("{e:#}");
                observe::set_phase(
                    RunPhase::Reconnecting,
                    Some(format!("replication interrupted, retrying: {text}")),
                );
                retry.record(&text).await;
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
                // The stream cannot run: the slot may be piling up WAL meanwhile.
                if let Err(e) = release_if_over_budget(source, &cfg).await {
                    tracing::debug!(error = %format!("{e:#}"), "could not check the WAL budget");
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

/// Everything before the stream: a bootstrap when none finished, the refusal of a
/// pipeline already switched over, DDL capture, and the stream's preflight.
async fn start_up(
    source: &Endpoint,
    target: &Endpoint,
    opts: &RunOptions,
    state: &StateStore,
) -> Result<(String, TargetSetup)> {
    ensure_bootstrapped(source, target, &opts.bootstrap, state).await?;
    {
        let client = connect(target, "run").await?;
        if let Some(why) = switched_over(&client, state, &opts.bootstrap.slot).await? {
            return Err(Fatal(why).into());
        }
    }
    if opts.bootstrap.capture_ddl {
        crate::ddl_capture::enable_for_pipeline(source, target, state, &opts.bootstrap.slot)
            .await?;
    }
    stream_preflight(target, &opts.bootstrap, state).await
}

/// What `run` tells about its retries: the log (once per distinct reason),
/// `/healthz` and `/metrics`, and `status` (through the state, best effort: the
/// target may be the server that is down).
struct Retrying<'a> {
    target: &'a Endpoint,
    state: StateStore,
    slot: &'a str,
    last: Option<String>,
    /// The reason last recorded in the state.
    recorded: Option<String>,
    /// Whether a reason may be recorded in the state (cleared once streaming).
    noted: bool,
}

impl<'a> Retrying<'a> {
    fn new(target: &'a Endpoint, state: StateStore, slot: &'a str) -> Self {
        Retrying {
            target,
            state,
            slot,
            last: None,
            recorded: None,
            noted: false,
        }
    }

    /// A transient error at start-up: says so everywhere and records it.
    async fn note(&mut self, e: &anyhow::Error) {
        let text = format!("{e:#}");
        observe::set_phase(RunPhase::Reconnecting, Some(format!("retrying: {text}")));
        observe::reconnect();
        observe::error("connect");
        if self.last.as_deref() != Some(text.as_str()) {
            tracing::warn!(error = %text, "a server is down or unreachable: retrying with backoff");
            self.last = Some(text.clone());
        } else {
            tracing::debug!(error = %text, "still unreachable");
        }
        self.record(&text).await;
    }

    /// Records why `run` retries for `status` (best effort, bounded; once per
    /// distinct reason, so a target that does not answer slows no retry twice).
    async fn record(&mut self, text: &str) {
        self.noted = true;
        if self.recorded.as_deref() == Some(text) {
            return;
        }
        self.recorded = Some(text.to_string());
        self.write(Some(text)).await;
    }

    /// Clears the note when `run` stops (it no longer retries), if it made one.
    async fn clear_if_noted(&mut self) {
        if self.noted {
            self.clear().await;
        }
    }

    /// Clears the note once streaming.
    async fn clear(&mut self) {
        self.write(None).await;
        self.noted = false;
        self.last = None;
        self.recorded = None;
    }

    async fn write(&self, text: Option<&str>) {
        let done = async {
            let client = connect(self.target, "run").await?;
            if self.state.installed_version(&client).await? != Some(crate::state::STATE_VERSION) {
                return Ok(());
            }
            self.state.set_retrying(&client, self.slot, text).await
        };
        match tokio::time::timeout(Duration::from_secs(3), done).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %format!("{e:#}"), "could not record why run retries")
            }
            Err(_) => {
                tracing::debug!("could not record why run retries: the target did not answer")
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
    crate::row_selection::check_unchanged(&client, state, &opts.slot, &opts.rows).await?;
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
    tracing::info!(slot = %opts.slot, online = opts.online, "no finished bootstrap: bootstrapping first");
    observe::set_phase(
        RunPhase::Bootstrapping,
        Some(if opts.online {
            "bootstrapping online: creating the slot and the target tables".into()
        } else {
            "bootstrapping: copying the tables".into()
        }),
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

/// The task of `--sync-sequences`, ended when dropped.
struct SequenceSync(tokio::task::JoinHandle<()>);

impl Drop for SequenceSync {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SequenceSync {
    /// Every `every`, brings the target's sequences of the pipeline's tables up to
    /// the source's; a failed round is logged and tried again next time.
    fn start(source: &Endpoint, target: &Endpoint, cfg: &StreamConfig, every: Duration) -> Self {
        let (source, target) = (source.clone(), target.clone());
        let (state, slot) = (cfg.state.clone(), cfg.slot.clone());
        SequenceSync(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tick.tick().await;
                let round = async {
                    let src = connect(&source, "sequences").await?;
                    let tgt = connect(&target, "sequences").await?;
                    let tables: Vec<_> = state
                        .table_entries(&tgt, &slot)
                        .await?
                        .into_iter()
                        .map(|t| t.name)
                        .collect();
                    crate::sequences::sync(&src, &tgt, &tables, 0).await
                };
                match round.await {
                    Ok(synced) => {
                        if failing {
                            tracing::info!(
                                sequences = synced.len(),
                                "target sequences in step with the source again"
                            );
                        }
                        failing = false;
                        for s in synced.iter().filter(|s| s.created) {
                            tracing::info!(sequence = %s.target_sequence, columns = %s.columns.join(", "), "created the sequence on the target");
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %format!("{e:#}"), "could not bring the target's sequences up to the source's; trying again");
                        }
                        failing = true;
                    }
                }
            }
        }))
    }
}

/// Records the WAL budget in the state for `status` (best effort: `run` goes on
/// without it).
async fn record_wal_budget(target: &Endpoint, cfg: &StreamConfig) {
    let done = async {
        let client = connect(target, "run").await?;
        cfg.state
            .set_wal_budget(&client, &cfg.slot, cfg.max_retained_wal)
            .await
    };
    if let Err(e) = done.await {
        tracing::debug!(error = %format!("{e:#}"), "could not record the WAL budget");
    }
}

/// Checks the slot's retained WAL against the budget while the stream cannot run
/// (the target down, say) and drops the slot once it reaches the budget. Best
/// effort: an unreachable source is simply not checked.
async fn release_if_over_budget(source: &Endpoint, cfg: &StreamConfig) -> Result<()> {
    let Ok(src) = connect(source, "wal budget").await else {
        return Ok(());
    };
    let Some(wal) = crate::wal_budget::measure(&src, &cfg.slot).await? else {
        return Ok(());
    };
    let limit = crate::wal_budget::limit(cfg.max_retained_wal, wal.keep_size);
    observe::slot_wal(wal.retained, wal.keep_size, limit);
    let Some(budget) = cfg.max_retained_wal else {
        return Ok(());
    };
    if crate::wal_budget::judge(wal, Some(budget)) == crate::wal_budget::Verdict::Release {
        release_slot(
            &src,
            &cfg.slot,
            &crate::wal_budget::OverBudget {
                slot: cfg.slot.clone(),
                retained: wal.retained,
                limit: limit.unwrap_or(budget),
            },
        )
        .await?;
    }
    Ok(())
}

/// Drops the slot on purpose because its WAL reached the budget; the next session
/// finds it gone and repairs the gap with catch-up.
async fn release_slot(
    src: &tokio_postgres::Client,
    slot: &str,
    why: &crate::wal_budget::OverBudget,
) -> Result<()> {
    tracing::warn!(slot, retained = why.retained, limit = why.limit, "the slot reached its WAL budget: dropping it so the source frees its WAL; the gap is repaired by catch-up once the target is reachable");
    observe::set_phase(
        RunPhase::Reconnecting,
        Some(format!(
            "{why}: the slot was dropped; catch-up repairs the gap"
        )),
    );
    crate::bootstrap::drop_slot_if_exists(src, slot).await?;
    observe::slot_released();
    Ok(())
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
