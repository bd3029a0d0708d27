//! What `run` tells the outside world while it works: Prometheus metrics (their names
//! and the helpers that record them), the health state behind `/healthz`, and the
//! small HTTP server (`--metrics-addr`) that serves both.
//!
//! Recording goes through the `metrics` facade: without `--metrics-addr` no recorder
//! is installed and every helper here costs next to nothing. With it, every series
//! carries the label `pipeline` (the slot name) as a global label of the exporter.
//! The health state is process-wide (one pipeline per process) and updated by the
//! stream session, the retry loop and the bootstrap through the functions below.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::pg::{Lsn, QualifiedName};

/// Metric names. Every series is also labelled `pipeline`.
pub mod names {
    /// Gauge: bytes of source WAL (as far as the stream has shown it) not yet applied.
    pub const LAG_BYTES: &str = "walshuttle_lag_bytes";
    /// Gauge: seconds since the source commit of the last applied transaction; 0 when
    /// caught up.
    pub const LAG_SECONDS: &str = "walshuttle_lag_seconds";
    /// Gauge: the source LSN applied on the target, as a number.
    pub const APPLIED_LSN: &str = "walshuttle_applied_lsn";
    /// Gauge: 1 while streaming, 0 otherwise.
    pub const STREAMING: &str = "walshuttle_streaming";
    /// Counter, labels `table` and `op` (`insert`, `update`, `delete`): rows applied
    /// by committed target transactions.
    pub const APPLIED_ROWS: &str = "walshuttle_applied_rows_total";
    /// Counter: source transactions applied.
    pub const TRANSACTIONS: &str = "walshuttle_transactions_applied_total";
    /// Histogram: source transactions per target apply transaction.
    pub const BATCH_TRANSACTIONS: &str = "walshuttle_apply_batch_transactions";
    /// Histogram: seconds a target apply transaction took to commit.
    pub const COMMIT_SECONDS: &str = "walshuttle_apply_commit_seconds";
    /// Histogram: seconds from a source commit to its commit on the target.
    pub const COMMIT_LATENCY: &str = "walshuttle_commit_latency_seconds";
    /// Counter, label `table`: rows copied by the bootstrap (or catch-up copy).
    pub const ROWS_COPIED: &str = "walshuttle_bootstrap_rows_copied_total";
    /// Counter, label `table`: bootstrap chunks copied.
    pub const CHUNKS_COPIED: &str = "walshuttle_bootstrap_chunks_copied_total";
    /// Counter: reconnect attempts of the replication stream.
    pub const RECONNECTS: &str = "walshuttle_reconnects_total";
    /// Counter, label `kind` (`stream`, `slot_busy`, `fatal`): errors seen by `run`.
    pub const ERRORS: &str = "walshuttle_errors_total";
    /// Gauge: bytes of WAL the slot holds back on the source (from its restart
    /// position to the source's current WAL position), read every 10 s.
    pub const RETAINED_WAL: &str = "walshuttle_slot_retained_wal_bytes";
    /// Gauge: the source's `max_slot_wal_keep_size` in bytes, the point at which the
    /// server invalidates the slot (absent when unlimited).
    pub const WAL_KEEP_LIMIT: &str = "walshuttle_slot_wal_keep_limit_bytes";
    /// Gauge: the retained WAL at which `run` drops the slot on purpose
    /// (`--max-retained-wal`, or 95% of `max_slot_wal_keep_size`).
    pub const WAL_BUDGET: &str = "walshuttle_slot_wal_budget_bytes";
    /// Gauge, label `phase`: 1 for the phase of the pipeline's last `walshuttle
    /// switchover` as recorded on the target, 0 for the other phases.
    pub const SWITCHOVER_PHASE: &str = "walshuttle_switchover_phase";
    /// Tables of the pipeline whose copy is not in the stream yet (being copied
    /// online, or their held changes being applied).
    pub const TABLES_COPYING: &str = "walshuttle_tables_copying";
    /// Gauge: 1 once `run` stopped on an error retrying cannot fix (it keeps
    /// serving `/metrics` for a short grace so Prometheus sees it), 0 before.
    pub const STOPPED_ON_ERROR: &str = "walshuttle_stopped_on_error";
}

/// The phases a `walshuttle switchover` records, in order.
const SWITCHOVER_PHASES: [&str; 7] = [
    "fencing",
    "draining",
    "sequences",
    "verifying",
    "reversing",
    "done",
    "aborted",
];

/// Shows the phase of the pipeline's switchover (run by another process, read from
/// the target's state), so a dashboard sees the cutover while it happens.
pub fn switchover_phase(phase: Option<&str>) {
    for p in SWITCHOVER_PHASES {
        metrics::gauge!(names::SWITCHOVER_PHASE, "phase" => p).set(if phase == Some(p) {
            1.0
        } else {
            0.0
        });
    }
}

/// What `run` is doing, as `/healthz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunPhase {
    /// Connecting and reading the state.
    Starting,
    /// Copying tables.
    Bootstrapping,
    /// Repairing a gap from watermarks.
    CatchingUp,
    /// Applying changes from the slot.
    Streaming,
    /// The stream failed; waiting to reconnect.
    Reconnecting,
    /// Stopping on request, or stopped by a fatal error.
    Stopped,
}

impl RunPhase {
    /// The name used in `/healthz`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunPhase::Starting => "starting",
            RunPhase::Bootstrapping => "bootstrapping",
            RunPhase::CatchingUp => "catching_up",
            RunPhase::Streaming => "streaming",
            RunPhase::Reconnecting => "reconnecting",
            RunPhase::Stopped => "stopped",
        }
    }
}

struct HealthState {
    phase: RunPhase,
    reason: Option<String>,
    /// The furthest source WAL position the stream has shown.
    source_end: Lsn,
    /// The source position applied (or, when idle, confirmed) on the target.
    applied: Lsn,
    /// Nothing received is waiting to be applied.
    caught_up: bool,
    /// Source commit time of the last applied transaction, µs since the Unix epoch.
    last_commit_micros: Option<i64>,
    /// WAL the slot holds back on the source.
    retained_wal: Option<u64>,
    /// Retained WAL at which the slot is released.
    wal_budget: Option<u64>,
    /// Tables whose copy has not joined the stream yet.
    tables_copying: Option<u64>,
    /// A lock wait of one of the apply sessions, while it lasts.
    apply_wait: Option<ApplyWait>,
}

/// A lock wait of one of walshuttle's apply sessions on the target, seen by the
/// watchdog while a step waits on it: reported by `/healthz` while it lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyWait {
    /// The apply session that waits.
    pub waiter: i32,
    /// The sessions holding the lock it waits for.
    pub holders: Vec<i32>,
    /// Whether a holder is walshuttle's own session: a wait that cannot end by
    /// itself (the watchdog resolves it at its next probe).
    pub on_itself: bool,
}

impl ApplyWait {
    fn describe(&self) -> String {
        let holders = self
            .holders
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if self.on_itself {
            format!(
                "apply session pid {} waits for walshuttle's own session pid {holders} on the target: a wait on itself, being resolved",
                self.waiter
            )
        } else {
            format!(
                "apply session pid {} waits for a lock held by pid {holders} on the target (not walshuttle's): it goes on once that one ends",
                self.waiter
            )
        }
    }
}

static HEALTH: Mutex<HealthState> = Mutex::new(HealthState {
    phase: RunPhase::Starting,
    reason: None,
    source_end: Lsn::ZERO,
    applied: Lsn::ZERO,
    caught_up: false,
    last_commit_micros: None,
    retained_wal: None,
    wal_budget: None,
    tables_copying: None,
    apply_wait: None,
});

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

fn health() -> MutexGuard<'static, HealthState> {
    // A panic while holding the lock leaves plain data behind: still usable.
    HEALTH.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// Records a phase change (and why, for phases that are not healthy).
pub fn set_phase(phase: RunPhase, reason: Option<String>) {
    let mut h = health();
    if phase != RunPhase::Streaming {
        h.caught_up = false;
    }
    h.phase = phase;
    h.reason = reason;
    drop(h);
    metrics::gauge!(names::STREAMING).set(if phase == RunPhase::Streaming {
        1.0
    } else {
        0.0
    });
}

/// Records where the stream stands: the source WAL end it has seen, the position
/// applied (or confirmed while idle), and whether anything received is still pending.
pub fn stream_position(source_end: Lsn, applied: Lsn, idle: bool) {
    let mut h = health();
    h.source_end = h.source_end.max(source_end);
    h.applied = h.applied.max(applied);
    h.caught_up = idle && h.applied >= h.source_end;
}

/// Records `count` source transactions committed on the target in one apply
/// transaction, the last of which committed on the source at `commit_time`.
pub fn transactions_applied(count: usize, commit_time: crate::stream::decoder::PgTimestamp) {
    let micros = commit_time.unix_micros();
    health().last_commit_micros = Some(micros);
    metrics::counter!(names::TRANSACTIONS).increment(count as u64);
    metrics::histogram!(names::BATCH_TRANSACTIONS).record(count as f64);
    let latency = (now_micros() - micros).max(0) as f64 / 1e6;
    metrics::histogram!(names::COMMIT_LATENCY).record(latency);
}

/// The operation of an applied row, as the `op` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowOp {
    /// Inserted (or upserted).
    Insert,
    /// Updated.
    Update,
    /// Deleted.
    Delete,
}

impl RowOp {
    fn label(self) -> &'static str {
        match self {
            RowOp::Insert => "insert",
            RowOp::Update => "update",
            RowOp::Delete => "delete",
        }
    }
}

/// Counts rows applied to `table` by a committed target transaction.
pub fn rows_applied(table: &QualifiedName, op: RowOp, rows: u64) {
    if rows > 0 {
        metrics::counter!(names::APPLIED_ROWS, "table" => table.to_string(), "op" => op.label())
            .increment(rows);
    }
}

/// Records how long a target apply transaction took to commit.
pub fn apply_commit_duration(took: Duration) {
    metrics::histogram!(names::COMMIT_SECONDS).record(took.as_secs_f64());
}

/// Counts rows of one bootstrap chunk committed on the target.
pub fn rows_copied(table: &QualifiedName, rows: u64) {
    let table = table.to_string();
    metrics::counter!(names::ROWS_COPIED, "table" => table.clone()).increment(rows);
    metrics::counter!(names::CHUNKS_COPIED, "table" => table).increment(1);
}

/// Counts a reconnect attempt of the stream.
pub fn reconnect() {
    metrics::counter!(names::RECONNECTS).increment(1);
}

/// Records the lock wait an apply session is in now (`None`: none waits).
pub fn apply_wait(wait: Option<ApplyWait>) {
    health().apply_wait = wait;
}

/// Counts an error of `kind` (`stream`, `slot_busy`, `fatal`).
pub fn error(kind: &'static str) {
    metrics::counter!(names::ERRORS, "kind" => kind).increment(1);
}

/// The health as `/healthz` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HealthReport {
    /// `ok` or `unhealthy`.
    pub status: &'static str,
    /// What `run` is doing.
    pub phase: &'static str,
    /// Seconds behind the source; 0 when caught up, null when unknown.
    pub lag_seconds: Option<f64>,
    /// Bytes of source WAL not yet applied, null before the stream showed any.
    pub lag_bytes: Option<u64>,
    /// WAL the slot holds back on the source, null until measured.
    pub retained_wal_bytes: Option<u64>,
    /// Retained WAL at which the slot is released on purpose; null without a budget.
    pub wal_budget_bytes: Option<u64>,
    /// Tables still being copied (online) or having their held changes applied;
    /// null before the stream started.
    pub tables_copying: Option<u64>,
    /// Which apply session waits for which lock holder on the target, while it
    /// lasts; null when none waits.
    pub waiting: Option<String>,
    /// Why it is unhealthy; null when ok.
    pub reason: Option<String>,
}

/// Lag now: (seconds, bytes), each `None` while unknown.
fn lag(h: &HealthState) -> (Option<f64>, Option<u64>) {
    let bytes = (!h.source_end.is_zero()).then(|| h.source_end.bytes_since(h.applied));
    let seconds = if h.caught_up {
        Some(0.0)
    } else {
        h.last_commit_micros
            .map(|c| (now_micros() - c).max(0) as f64 / 1e6)
    };
    (seconds, bytes)
}

/// Healthy while streaming with a lag of at most `max_lag`.
pub fn health_report(max_lag: Duration) -> HealthReport {
    let h = health();
    let (lag_seconds, lag_bytes) = lag(&h);
    let reason = match h.phase {
        // A wait on itself is no progress, whatever the lag says.
        RunPhase::Streaming if h.apply_wait.as_ref().is_some_and(|w| w.on_itself) => {
            h.apply_wait.as_ref().map(ApplyWait::describe)
        }
        RunPhase::Streaming => match (lag_seconds, h.retained_wal, h.wal_budget) {
            (Some(s), _, _) if s > max_lag.as_secs_f64() => Some(format!(
                "lag of {s:.1} s exceeds the threshold of {:.1} s (--healthz-max-lag)",
                max_lag.as_secs_f64()
            )),
            (_, Some(r), Some(b)) if r as f64 >= b as f64 * 0.8 => Some(format!(
                "the slot holds {r} bytes of WAL, over 80% of its budget of {b} bytes"
            )),
            _ => None,
        },
        other => Some(
            h.reason
                .clone()
                .unwrap_or_else(|| format!("not streaming: {}", other.as_str())),
        ),
    };
    HealthReport {
        status: if reason.is_none() { "ok" } else { "unhealthy" },
        phase: h.phase.as_str(),
        lag_seconds,
        lag_bytes,
        retained_wal_bytes: h.retained_wal,
        wal_budget_bytes: h.wal_budget,
        tables_copying: h.tables_copying,
        waiting: h.apply_wait.as_ref().map(ApplyWait::describe),
        reason,
    }
}

/// Sets the gauges derived from the health state (called before each scrape).
fn refresh_gauges() {
    let h = health();
    let (seconds, bytes) = lag(&h);
    let applied = h.applied;
    drop(h);
    if let Some(s) = seconds {
        metrics::gauge!(names::LAG_SECONDS).set(s);
    }
    if let Some(b) = bytes {
        metrics::gauge!(names::LAG_BYTES).set(b as f64);
    }
    if !applied.is_zero() {
        metrics::gauge!(names::APPLIED_LSN).set(applied.0 as f64);
    }
}

/// Installs the Prometheus recorder (once per process), labelling every series
/// with `pipeline`.
fn install_recorder(pipeline: &str) -> Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .add_global_label("pipeline", pipeline)
        .set_buckets_for_metric(
            Matcher::Full(names::BATCH_TRANSACTIONS.into()),
            &[
                1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 20000.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::COMMIT_SECONDS.into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::COMMIT_LATENCY.into()),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 900.0, 3600.0,
                ],
            )
        })
        .and_then(|b| b.install_recorder())
        .map_err(|e| anyhow::anyhow!("cannot set up the metrics recorder: {e}"))?;
    let _ = HANDLE.set(handle.clone());
    describe();
    register_at_zero();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Every series without a per-table label exists from the start, at 0: a
/// dashboard shows 0 rather than "No data", and `increase()` sees the first error.
fn register_at_zero() {
    metrics::counter!(names::TRANSACTIONS).absolute(0);
    metrics::counter!(names::RECONNECTS).absolute(0);
    for kind in ERROR_KINDS {
        metrics::counter!(names::ERRORS, "kind" => kind).absolute(0);
    }
    metrics::gauge!(names::STREAMING).set(0.0);
    metrics::gauge!(names::STOPPED_ON_ERROR).set(0.0);
}

/// The `kind` labels of [`names::ERRORS`].
pub const ERROR_KINDS: [&str; 4] = ["stream", "slot_busy", "connect", "fatal"];

/// Whether `/metrics` was scraped since `run` stopped on an error.
static SCRAPED_AFTER_STOP: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// After a stop on an error: sets [`names::STOPPED_ON_ERROR`] and, when metrics
/// are served, keeps serving them (and `/healthz`, 503 with the reason) until one
/// scrape has seen the stop, at most `grace` (or until `stop` turns true).
pub async fn stopped_on_error(grace: Duration, stop: &mut tokio::sync::watch::Receiver<bool>) {
    metrics::gauge!(names::STOPPED_ON_ERROR).set(1.0);
    if HANDLE.get().is_none() {
        return;
    }
    SCRAPED_AFTER_STOP.store(false, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(
        "serving /metrics for up to {} s more so the stop is scraped",
        grace.as_secs()
    );
    let scraped = async {
        while !SCRAPED_AFTER_STOP.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = scraped => {}
        _ = tokio::time::sleep(grace) => {}
        _ = async { while !*stop.borrow() { if stop.changed().await.is_err() { std::future::pending::<()>().await; } } } => {}
    }
}

/// The `# HELP` texts.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        names::LAG_BYTES,
        Unit::Bytes,
        "Source WAL shown by the stream but not yet applied on the target"
    );
    describe_gauge!(
        names::LAG_SECONDS,
        Unit::Seconds,
        "Seconds since the source commit of the last applied transaction; 0 when caught up"
    );
    describe_gauge!(
        names::APPLIED_LSN,
        "Source LSN applied on the target, as a byte position"
    );
    describe_gauge!(names::STREAMING, "1 while streaming changes, 0 otherwise");
    describe_counter!(
        names::APPLIED_ROWS,
        "Rows applied on the target by committed transactions, by table and operation"
    );
    describe_counter!(names::TRANSACTIONS, "Source transactions applied");
    describe_histogram!(
        names::BATCH_TRANSACTIONS,
        "Source transactions per target apply transaction"
    );
    describe_histogram!(
        names::COMMIT_SECONDS,
        Unit::Seconds,
        "Time to commit a target apply transaction"
    );
    describe_histogram!(
        names::COMMIT_LATENCY,
        Unit::Seconds,
        "Time from a source commit to its commit on the target"
    );
    describe_counter!(names::ROWS_COPIED, "Rows copied by the bootstrap, by table");
    describe_counter!(
        names::CHUNKS_COPIED,
        "Chunks copied by the bootstrap, by table"
    );
    describe_counter!(
        names::RECONNECTS,
        "Reconnect attempts of the replication stream"
    );
    describe_counter!(names::ERRORS, "Errors seen by run, by kind");
    describe_gauge!(
        names::RETAINED_WAL,
        Unit::Bytes,
        "WAL the slot holds back on the source"
    );
    describe_gauge!(
        names::WAL_BUDGET,
        Unit::Bytes,
        "Retained WAL at which run drops the slot on purpose"
    );
    describe_gauge!(
        names::SWITCHOVER_PHASE,
        "1 for the phase of the pipeline's last walshuttle switchover"
    );
    describe_gauge!(
        names::WAL_KEEP_LIMIT,
        Unit::Bytes,
        "The source's max_slot_wal_keep_size, past which it invalidates the slot"
    );
    describe_gauge!(
        names::STOPPED_ON_ERROR,
        "1 once run stopped on an error retrying cannot fix"
    );
    describe_gauge!(
        names::TABLES_COPYING,
        "Tables being copied online or having the changes held meanwhile applied"
    );
}

/// Records how many of the pipeline's tables have not joined the stream yet.
pub fn tables_copying(count: usize) {
    metrics::gauge!(names::TABLES_COPYING).set(count as f64);
    health().tables_copying = Some(count as u64);
}

/// Records the WAL the slot holds back on the source, the server's limit for it and
/// the budget it is released at (`--max-retained-wal`).
pub fn slot_wal(retained: u64, keep_limit: Option<u64>, budget: Option<u64>) {
    metrics::gauge!(names::RETAINED_WAL).set(retained as f64);
    if let Some(limit) = keep_limit {
        metrics::gauge!(names::WAL_KEEP_LIMIT).set(limit as f64);
    }
    if let Some(b) = budget {
        metrics::gauge!(names::WAL_BUDGET).set(b as f64);
    }
    let mut h = health();
    h.retained_wal = Some(retained);
    h.wal_budget = budget;
}

/// The slot was dropped on purpose: its WAL is freed, so the retained WAL reads 0
/// until a new slot is measured (not the old slot's last reading).
pub fn slot_released() {
    metrics::gauge!(names::RETAINED_WAL).set(0.0);
    health().retained_wal = Some(0);
}

/// Starts serving `/metrics` (Prometheus text format) and `/healthz` on `addr`.
/// Fails at once when the address cannot be bound.
pub async fn serve(addr: SocketAddr, pipeline: &str, max_lag: Duration) -> Result<SocketAddr> {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                if let Some(other) = running_walshuttle(addr).await {
                    anyhow::bail!(
                        "cannot listen on {addr} for --metrics-addr: another walshuttle serves it ({other}): if it runs this pipeline, it already holds it; stop it first, or give this one another --metrics-addr"
                    );
                }
            }
            anyhow::bail!("cannot listen on {addr} for --metrics-addr: {e}; choose a free address");
        }
    };
    let bound = listener.local_addr().unwrap_or(addr);
    let handle = install_recorder(pipeline)?;
    tracing::info!(addr = %bound, "serving /metrics and /healthz");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &handle, max_lag)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    });
    Ok(bound)
}

/// Who answers on `addr`, when it is a walshuttle: its pipeline and phase, read
/// from its `/metrics` and `/healthz` (a second, bounded look: nothing else).
async fn running_walshuttle(addr: SocketAddr) -> Option<String> {
    async fn get(addr: SocketAddr, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let fetch = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut body = Vec::new();
            stream.take(1 << 20).read_to_end(&mut body).await.ok()?;
            Some(String::from_utf8_lossy(&body).into_owned())
        };
        tokio::time::timeout(Duration::from_secs(2), fetch)
            .await
            .ok()?
    }
    let metrics = get(addr, "/metrics").await?;
    if !metrics.contains("walshuttle_") {
        return None;
    }
    let pipeline = metrics
        .split("pipeline=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("unknown")
        .to_string();
    let phase = get(addr, "/healthz")
        .await
        .and_then(|h| {
            let body = h.split("\r\n\r\n").nth(1)?.to_string();
            serde_json::from_str::<serde_json::Value>(&body).ok()
        })
        .and_then(|v| v.get("phase").and_then(|p| p.as_str()).map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    Some(format!("pipeline {pipeline}, phase {phase}"))
}

fn respond(
    req: &Request<Incoming>,
    handle: &PrometheusHandle,
    max_lag: Duration,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        response
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            refresh_gauges();
            let body = handle.render();
            if health().phase == RunPhase::Stopped {
                SCRAPED_AFTER_STOP.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        "/healthz" => {
            let report = health_report(max_lag);
            let status = if report.reason.is_none() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::to_string(&report).unwrap_or_else(|_| "{}".into());
            reply(status, "application/json", body + "\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics or /healthz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_zero_when_caught_up_and_unknown_before_any_position() {
        let mut h = HealthState {
            phase: RunPhase::Streaming,
            reason: None,
            source_end: Lsn::ZERO,
            applied: Lsn::ZERO,
            caught_up: false,
            last_commit_micros: None,
            retained_wal: None,
            wal_budget: None,
            tables_copying: None,
            apply_wait: None,
        };
        assert_eq!(lag(&h), (None, None));
        h.source_end = Lsn(1000);
        h.applied = Lsn(400);
        h.last_commit_micros = Some(now_micros() - 5_000_000);
        let (secs, bytes) = lag(&h);
        assert_eq!(bytes, Some(600));
        assert!(secs.is_some_and(|s| (4.5..60.0).contains(&s)), "{secs:?}");
        h.caught_up = true;
        assert_eq!(lag(&h).0, Some(0.0));
    }
}
