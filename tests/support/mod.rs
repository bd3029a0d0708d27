//! The cluster harness: throwaway PostgreSQL servers for integration tests.
//!
//! A thin panicking layer over walshuttle's own [`LocalCluster`] (the one harness,
//! shared with `walshuttle demo`): each [`Cluster`] is a fresh `initdb` in a temp
//! directory on a free port with `wal_level=logical`, of the machine's default
//! PostgreSQL or of a chosen major version (fetched by `scripts/fetch-postgres.sh`).
//! It can be stopped (fast or immediate, i.e. a crash), restarted, and is always
//! removed when dropped, even when the test fails. As root, server binaries run as
//! the `postgres` user through `runuser`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use walshuttle::localpg::{LocalCluster, LocalClusterOptions, StopMode};

pub use walshuttle::localpg::ServerTls;

/// Password of the `postgres` superuser in every test cluster.
pub const PASSWORD: &str = "harness-secret-pw";

/// Extra settings for a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Major version of the server (`Some(17)`); `None` for the machine's default.
    /// A version that is not on the machine fails the test, saying how to fetch it.
    /// Defaults to [`default_version`].
    pub version: Option<u32>,
    /// `wal_level`: `logical` unless a test needs a source without logical decoding.
    pub wal_level: &'static str,
    /// Further `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
    /// When set, the server runs with `ssl = on` and this certificate and key.
    pub tls: Option<ServerTls>,
    /// When not empty, `pg_hba.conf` is replaced by these lines (after `local` trust
    /// lines for normal and replication connections), e.g.
    /// `hostssl all all 127.0.0.1/32 scram-sha-256`.
    pub hba: Vec<String>,
}

/// The major version of clusters that ask for none: `WALSHUTTLE_TEST_PG_VERSION`
/// when set (to run any test file on another version), else the machine's default.
pub fn default_version() -> Option<u32> {
    let value = std::env::var("WALSHUTTLE_TEST_PG_VERSION").ok()?;
    if value.is_empty() {
        return None;
    }
    Some(value.parse().unwrap_or_else(|_| {
        panic!("WALSHUTTLE_TEST_PG_VERSION={value:?} is not a major version such as 17")
    }))
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            version: default_version(),
            wal_level: "logical",
            extra_conf: Vec::new(),
            tls: None,
            hba: Vec::new(),
        }
    }
}

/// A running throwaway PostgreSQL server.
pub struct Cluster {
    inner: LocalCluster,
    /// TCP port on 127.0.0.1.
    pub port: u16,
}

/// Finds the machine's default PostgreSQL server binaries, or panics with how to
/// install them.
pub fn bindir() -> PathBuf {
    walshuttle::localpg::find_bindir().unwrap_or_else(|e| panic!("{e:#}"))
}

fn stop_mode(mode: &str) -> StopMode {
    mode.parse().unwrap_or_else(|e| panic!("{e:#}"))
}

impl Cluster {
    /// Starts a cluster of the default version ([`default_version`]) with
    /// `wal_level=logical`.
    pub fn start() -> Cluster {
        Cluster::start_with(ClusterOptions::default())
    }

    /// Starts a cluster of major version `major` with `wal_level=logical`; panics
    /// saying how to fetch the binaries when they are missing.
    pub fn start_version(major: u32) -> Cluster {
        Cluster::start_with(ClusterOptions {
            version: Some(major),
            ..ClusterOptions::default()
        })
    }

    /// Starts a cluster with the given options.
    pub fn start_with(options: ClusterOptions) -> Cluster {
        let local = LocalClusterOptions {
            version: options.version,
            wal_level: options.wal_level.to_string(),
            password: PASSWORD.to_string(),
            extra_conf: options.extra_conf,
            tls: options.tls,
            hba: options.hba,
        };
        let inner = LocalCluster::start(&local)
            .unwrap_or_else(|e| panic!("could not start a test cluster: {e:#}"));
        let port = inner.port;
        Cluster { inner, port }
    }

    /// Starts a physical standby of this cluster (see
    /// [`LocalCluster::start_standby`]); `extra_conf` lines go into its
    /// `postgresql.conf`.
    pub fn start_standby(&self, extra_conf: &[&str]) -> Cluster {
        let extra: Vec<String> = extra_conf.iter().map(|l| l.to_string()).collect();
        let inner = self
            .inner
            .start_standby(&extra)
            .unwrap_or_else(|e| panic!("could not start a standby: {e:#}"));
        let port = inner.port;
        Cluster { inner, port }
    }

    /// The server's major version.
    pub fn version(&self) -> u32 {
        self.inner.major()
    }

    /// The server binaries' directory.
    pub fn bindir(&self) -> &Path {
        self.inner.bindir()
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        self.inner.log()
    }

    /// Starts a stopped cluster again on the same port.
    pub fn restart_stopped(&self) {
        if let Err(e) = self.inner.start_again() {
            panic!("{e:#}");
        }
    }

    /// Stops the server: `fast` (clean) or `immediate` (a crash: no checkpoint).
    pub fn stop(&self, mode: &str) {
        if let Err(e) = self.inner.stop(stop_mode(mode)) {
            panic!("{e:#}");
        }
    }

    /// Stops and starts the server.
    pub fn restart(&self, mode: &str) {
        self.stop(mode);
        self.restart_stopped();
    }

    /// URL for the `postgres` database as the superuser, with the password.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// URL for a given database.
    pub fn url_for(&self, db: &str) -> String {
        self.inner.url_for(db)
    }

    /// A connected client for the `postgres` database.
    pub async fn client(&self) -> Client {
        self.client_for("postgres").await
    }

    /// A connected client for a given database.
    pub async fn client_for(&self, db: &str) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.url_for(db), NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to test cluster on {}: {e}", self.port));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Runs SQL through psql (for scripts with psql variables, like the generator).
    pub fn psql_file(&self, file: &Path, vars: &[(&str, &str)]) -> Output {
        self.inner
            .psql_file("postgres", file, vars)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// Polls `check` until it returns true or `timeout` passes; panics with `what`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Row count and an order-independent content hash of a table, for byte-equality
/// checks between source and target.
pub async fn table_fingerprint(client: &Client, table: &str) -> (i64, String) {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') FROM {table} t"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("fingerprint {table}: {e}"));
    (row.get(0), row.get(1))
}

/// Asserts every listed table has the same rows on both sides.
pub async fn assert_tables_equal(source: &Client, target: &Client, tables: &[&str]) {
    for table in tables {
        let s = table_fingerprint(source, table).await;
        let t = table_fingerprint(target, table).await;
        assert_eq!(s, t, "table {table} differs between source and target");
    }
}

/// The walshuttle binary built for this test run, with source and target set.
pub fn walshuttle(source: &Cluster, target: &Cluster) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walshuttle"));
    cmd.env("WALSHUTTLE_SOURCE", source.url())
        .env("WALSHUTTLE_TARGET", target.url())
        .env_remove("WALSHUTTLE_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Runs a command to completion and returns (exit code, stdout, stderr).
pub fn run(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().expect("run walshuttle");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Path of a file in the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

// ---------------------------------------------------------------------------
// Helpers for tests of the long-running `walshuttle run` process.
// ---------------------------------------------------------------------------

/// Where the `walshuttle run` processes of one test write their stdout and stderr
/// (one file per process). When the test panics, every log is printed when this is
/// dropped, so declare it before the [`RunChild`]ren it spawns.
pub struct RunLogs {
    dir: tempfile::TempDir,
    spawned: usize,
}

impl Default for RunLogs {
    fn default() -> Self {
        RunLogs {
            dir: tempfile::Builder::new()
                .prefix("walshuttle-run-logs-")
                .tempdir()
                .expect("create a temp dir for run logs"),
            spawned: 0,
        }
    }
}

impl RunLogs {
    /// An empty log directory.
    pub fn new() -> RunLogs {
        RunLogs::default()
    }

    /// Spawns `cmd` (e.g. `walshuttle(&s, &t)` with `run` and its flags) with stdout and
    /// stderr going to a fresh log file. The child is killed when the guard drops.
    pub fn spawn(&mut self, mut cmd: Command) -> RunChild {
        self.spawned += 1;
        let path = self.dir.path().join(format!("run-{}.log", self.spawned));
        let file = std::fs::File::create(&path).expect("create a run log file");
        let out = file.try_clone().expect("clone the run log file");
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(file));
        let child = cmd.spawn().expect("spawn walshuttle");
        eprintln!(
            "spawned walshuttle (pid {}), log {}",
            child.id(),
            path.display()
        );
        RunChild { child, log: path }
    }

    /// Every log so far (the last 150 lines of each), with a header per process.
    pub fn all(&self) -> String {
        let mut text = String::new();
        for n in 1..=self.spawned {
            let path = self.dir.path().join(format!("run-{n}.log"));
            let body = std::fs::read_to_string(&path).unwrap_or_default();
            text.push_str(&format!(
                "----- walshuttle process #{n} ({}) -----\n{}\n",
                path.display(),
                tail(&body, 150)
            ));
        }
        text
    }
}

impl Drop for RunLogs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.all());
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A spawned walshuttle process; SIGKILLed and reaped when dropped, even on panic.
pub struct RunChild {
    child: std::process::Child,
    log: PathBuf,
}

impl RunChild {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (does not wait).
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM, "SIGTERM");
    }

    /// Freezes the process (SIGSTOP): its connections stay open, it reads and
    /// answers nothing, like a replicator stuck on a slow target.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP, "SIGSTOP");
    }

    /// Lets a [`RunChild::pause`]d process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT, "SIGCONT");
    }

    fn signal(&self, signal: libc::c_int, name: &str) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet, so the
        // pid cannot have been reused.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({name}) failed");
    }

    /// The exit status if the process has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait on walshuttle")
    }

    /// Polls until the process exits or `timeout` passes.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Err` with the exit status and log tail if the process has exited.
    pub fn check_running(&mut self) -> Result<(), String> {
        match self.try_exit() {
            None => Ok(()),
            Some(status) => Err(format!(
                "walshuttle (pid {}) exited unexpectedly with {status}; log tail:\n{}",
                self.pid(),
                tail(&self.log(), 80)
            )),
        }
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self, when: &str) {
        if let Err(e) = self.check_running() {
            panic!("{when}: {e}");
        }
    }

    /// Peak resident set size (`VmHWM`) in kB, read from `/proc/<pid>/status`.
    pub fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status of walshuttle");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }
}

impl Drop for RunChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Like [`wait_until`], but fails at once (with its log) if `run` exits meanwhile.
pub async fn wait_while_running<F, Fut>(
    what: &str,
    timeout: Duration,
    run: &mut RunChild,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if let Err(e) = run.check_running() {
            panic!("while waiting for {what}: {e}");
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; walshuttle log tail:\n{}",
            tail(&run.log(), 60)
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// [`table_fingerprint`] that reports errors (e.g. a table not created yet).
pub async fn try_table_fingerprint(client: &Client, table: &str) -> Result<(i64, String), String> {
    client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') FROM {table} t"
            ),
            &[],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .map_err(|e| format!("{e}"))
}

async fn converge(
    source: &Client,
    target: &Client,
    tables: &[&str],
    timeout: Duration,
    mut run: Option<&mut RunChild>,
) {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        let mut report = String::new();
        let mut equal = true;
        for table in tables {
            let s = try_table_fingerprint(source, table)
                .await
                .unwrap_or_else(|e| panic!("fingerprint {table} on the source: {e}"));
            let t = try_table_fingerprint(target, table).await;
            if t.as_ref() != Ok(&s) {
                equal = false;
            }
            report.push_str(&format!("  {table}: source {s:?}, target {t:?}\n"));
            if !equal {
                // No need to fingerprint the rest this round.
                break;
            }
        }
        if equal {
            eprintln!(
                "converged after {:.1}s: {}",
                started.elapsed().as_secs_f64(),
                tables.join(", ")
            );
            return;
        }
        if let Some(run) = run.as_deref_mut() {
            if let Err(e) = run.check_running() {
                panic!("waiting for convergence:\n{report}{e}");
            }
        }
        if Instant::now() >= deadline {
            // Fingerprint every table for the message.
            let mut full = String::new();
            for table in tables {
                let s = try_table_fingerprint(source, table).await;
                let t = try_table_fingerprint(target, table).await;
                full.push_str(&format!("  {table}: source {s:?}, target {t:?}\n"));
            }
            let log = run
                .as_deref()
                .map(|r| format!("walshuttle log tail:\n{}", tail(&r.log(), 60)))
                .unwrap_or_default();
            panic!("source and target did not converge within {timeout:?}:\n{full}{log}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls until every table has the same fingerprint on both sides; on timeout
/// panics showing both fingerprints of every table.
pub async fn wait_for_convergence(
    source: &Client,
    target: &Client,
    tables: &[&str],
    timeout: Duration,
) {
    converge(source, target, tables, timeout, None).await
}

/// [`wait_for_convergence`] that also fails at once if `run` exits.
pub async fn wait_for_convergence_running(
    run: &mut RunChild,
    source: &Client,
    target: &Client,
    tables: &[&str],
    timeout: Duration,
) {
    converge(source, target, tables, timeout, Some(run)).await
}

/// `walshuttle.progress.applied_lsn` of a pipeline as text, `None` while there is none
/// (or the state schema does not exist yet, or the query fails).
pub async fn applied_lsn(target: &Client, pipeline: &str) -> Option<String> {
    target
        .query_opt(
            "SELECT applied_lsn::text FROM walshuttle.progress WHERE pipeline = $1",
            &[&pipeline],
        )
        .await
        .ok()
        .flatten()
        .map(|row| row.get(0))
}

/// Whether the target's applied LSN of a pipeline is past `lsn` (any row at all
/// when `lsn` is `None`).
pub async fn applied_beyond(target: &Client, pipeline: &str, lsn: Option<&str>) -> bool {
    let lsn = lsn.unwrap_or("0/0");
    target
        .query_opt(
            "SELECT applied_lsn > $2::text::pg_lsn FROM walshuttle.progress WHERE pipeline = $1",
            &[&pipeline, &lsn],
        )
        .await
        .ok()
        .flatten()
        .map(|row| row.get::<_, bool>(0))
        .unwrap_or(false)
}

/// Whether a WAL sender streams from a replication slot on the source (START_REPLICATION
/// issued: state catchup or streaming). A slot is also `active` while the connection
/// that creates it exports its snapshot to a bootstrap's copy, which is not streaming.
pub async fn slot_active(source: &Client, slot: &str) -> bool {
    source
        .query_opt(
            "SELECT s.active AND EXISTS (SELECT 1 FROM pg_stat_replication r \
                                          WHERE r.pid = s.active_pid \
                                            AND r.state IN ('catchup', 'streaming')) \
               FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .ok()
        .flatten()
        .map(|row| row.get::<_, bool>(0))
        .unwrap_or(false)
}

/// Connects to a URL, `None` on failure (for writers that ride through restarts).
pub async fn try_connect(url: &str) -> Option<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

// ---------------------------------------------------------------------------
// Helpers for TLS tests.
// ---------------------------------------------------------------------------

impl Cluster {
    /// URL for a database through a given host name (e.g. `localhost`, to match a
    /// certificate) with extra query parameters (e.g. `sslmode=verify-full&sslrootcert=…`).
    pub fn url_via(&self, host: &str, db: &str, query: &str) -> String {
        let mut url = format!("postgresql://postgres:{PASSWORD}@{host}:{}/{db}", self.port);
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        url
    }

    /// A client for a database over the cluster's Unix-domain socket (trusted, no
    /// TLS): works whatever `pg_hba.conf` demands of TCP connections.
    pub async fn local_client_for(&self, db: &str) -> Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.inner.dir())
            .port(self.port)
            .user("postgres")
            .dbname(db);
        let (client, conn) = config.connect(NoTls).await.unwrap_or_else(|e| {
            panic!("connect to test cluster {} over its socket: {e}", self.port)
        });
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

// ---------------------------------------------------------------------------
// Network faults: a TCP proxy between walshuttle and a cluster.
// ---------------------------------------------------------------------------

pub mod proxy;

/// The walshuttle binary with explicit source and target URLs (e.g. through a
/// [`proxy::Proxy`]).
pub fn walshuttle_urls(source_url: &str, target_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walshuttle"));
    cmd.env("WALSHUTTLE_SOURCE", source_url)
        .env("WALSHUTTLE_TARGET", target_url)
        .env_remove("WALSHUTTLE_LOG")
        .stdin(Stdio::null());
    cmd
}

pub mod workload;

/// A TCP port nothing listens on now (for `run --metrics-addr`).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// `GET path` on 127.0.0.1:port: (status code, body), `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    use std::io::{Read, Write};
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Waits until `run` streams from the pipeline's slot `walshuttle` (not just
/// bootstraps), failing early if it exits.
pub async fn wait_streaming(run: &mut RunChild, src: &Client) {
    wait_while_running(
        "the slot to be streamed from",
        Duration::from_secs(120),
        run,
        || async { slot_active(src, "walshuttle").await },
    )
    .await;
}

/// Starts `bootstrap --jobs 1` and SIGKILLs it once `table` has at least one chunk
/// done and at least one not done.
pub async fn kill_bootstrap_after_first_chunk(source: &Cluster, target: &Cluster, table: &str) {
    let mut cmd = walshuttle(source, target);
    cmd.args(["bootstrap", "--jobs", "1"]);
    let mut child = cmd.spawn().expect("spawn bootstrap");
    let tgt = target.client().await;
    wait_until("a first chunk done", Duration::from_secs(180), || async {
        tgt.query_one(
            "SELECT count(*) FROM walshuttle.chunks WHERE table_name = $1 AND done_at IS NOT NULL",
            &[&table],
        )
        .await
        .map(|r| r.get::<_, i64>(0) >= 1)
        .unwrap_or(false)
    })
    .await;
    child.kill().expect("SIGKILL bootstrap");
    child.wait().expect("reap bootstrap");
    let undone: i64 = tgt
        .query_one(
            "SELECT count(*) FROM walshuttle.chunks WHERE table_name = $1 AND done_at IS NULL",
            &[&table],
        )
        .await
        .expect("count the chunks not done")
        .get(0);
    assert!(
        undone > 0,
        "the bootstrap finished before it could be killed"
    );
}

/// Runs `sql` (one or more statements), panicking with it on an error.
pub async fn exec(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The first column of the one row `sql` returns, as `i64`, panicking with it on an error.
pub async fn scalar_i64(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}
