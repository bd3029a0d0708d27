//! The cluster harness: throwaway PostgreSQL servers for integration tests.
//!
//! Each [`Cluster`] is a fresh `initdb` in a temp directory on a free port with
//! `wal_level=logical`, started with `pg_ctl`. It can be stopped (fast or immediate,
//! i.e. a crash), restarted, and is always removed when dropped, even when the test
//! fails. As root, server binaries run as the `postgres` user through `runuser`,
//! since initdb and postgres refuse to run as root.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// Password of the `postgres` superuser in every test cluster.
pub const PASSWORD: &str = "harness-secret-pw";

/// Extra settings for a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
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

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical",
            extra_conf: Vec::new(),
            tls: None,
            hba: Vec::new(),
        }
    }
}

/// A server certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server certificate (followed by any intermediates).
    pub cert_pem: String,
    /// The certificate's private key (PKCS#8 or traditional PEM).
    pub key_pem: String,
}

/// A running throwaway PostgreSQL server.
pub struct Cluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    as_postgres: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Finds the PostgreSQL server binaries, or panics with how to install them.
pub fn bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
            if dir.join("initdb").exists() {
                return dir;
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .collect();
        versions.sort();
        if let Some(dir) = versions.pop() {
            return dir;
        }
    }
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them, e.g. \
         `apt-get install -y postgresql` on Debian/Ubuntu, and make sure `pg_config --bindir` points at them"
    );
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

impl Cluster {
    /// Starts a cluster with `wal_level=logical`.
    pub fn start() -> Cluster {
        Cluster::start_with(ClusterOptions::default())
    }

    /// Starts a cluster with the given options.
    pub fn start_with(options: ClusterOptions) -> Cluster {
        let bindir = bindir();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("walshuttle-pg-")
            .tempdir()
            .expect("create a temp dir");
        if as_postgres {
            chown_postgres(dir.path());
        }
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD).expect("write pwfile");
        if as_postgres {
            chown_postgres(&pwfile);
        }
        let mut cluster = Cluster {
            dir,
            bindir,
            port: 0,
            as_postgres,
        };
        let out = cluster.pg_command(
            "initdb",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                pwfile.to_str().expect("utf-8 path"),
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!(
                "unix_socket_directories = '{}'",
                cluster.dir.path().display()
            ),
            format!("wal_level = {}", options.wal_level),
            "max_replication_slots = 16".into(),
            "max_wal_senders = 16".into(),
            "max_connections = 60".into(),
            "shared_buffers = 64MB".into(),
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "wal_sender_timeout = 10s".into(),
            "log_min_messages = warning".into(),
            "logging_collector = off".into(),
        ];
        conf.extend(options.extra_conf);
        if let Some(tls) = &options.tls {
            // The server refuses a key readable by others; as root it must also be
            // owned by the server user.
            let cert = data.join("server.crt");
            let key = data.join("server.key");
            std::fs::write(&cert, &tls.cert_pem).expect("write server.crt");
            std::fs::write(&key, &tls.key_pem).expect("write server.key");
            set_mode(&key, 0o600);
            if as_postgres {
                chown_postgres(&cert);
                chown_postgres(&key);
            }
            conf.push("ssl = on".into());
            conf.push("ssl_cert_file = 'server.crt'".into());
            conf.push("ssl_key_file = 'server.key'".into());
        }
        if !options.hba.is_empty() {
            let mut hba = vec![
                "local all all trust".to_string(),
                "local replication all trust".to_string(),
            ];
            hba.extend(options.hba.iter().cloned());
            hba.push(String::new());
            std::fs::write(data.join("pg_hba.conf"), hba.join("\n")).expect("write pg_hba.conf");
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push('\n');
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        for attempt in 0..5 {
            cluster.port = free_port();
            if cluster.try_start() {
                return cluster;
            }
            eprintln!(
                "cluster start attempt {attempt} failed on port {}",
                cluster.port
            );
        }
        panic!("could not start a test cluster:\n{}", cluster.log());
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn pg_command(&self, program: &str, args: &[&str]) -> Output {
        let path = self.bindir.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
    }

    fn try_start(&self) -> bool {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let port_opt = format!("-p {}", self.port);
        let out = self.pg_command(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-l",
                log.to_str().expect("utf-8 path"),
                "-o",
                &port_opt,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        out.status.success()
    }

    /// Starts a stopped cluster again on the same port.
    pub fn restart_stopped(&self) {
        assert!(self.try_start(), "restart failed:\n{}", self.log());
    }

    /// Stops the server: `fast` (clean) or `immediate` (a crash: no checkpoint).
    pub fn stop(&self, mode: &str) {
        let data = self.data_dir();
        let out = self.pg_command(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop -m {mode} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
        format!(
            "postgresql://postgres:{PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
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
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .env("PGPASSWORD", PASSWORD);
        for (k, v) in vars {
            cmd.args(["-v", &format!("{k}={v}")]);
        }
        cmd.arg("-f").arg(file);
        cmd.output().expect("run psql")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.pg_command(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .arg("postgres:")
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown postgres {}", path.display());
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
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet, so the
        // pid cannot have been reused.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
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

/// Whether a replication slot exists on the source and a WAL sender is attached to it.
pub async fn slot_active(source: &Client, slot: &str) -> bool {
    source
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
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

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

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
            .host_path(self.dir.path())
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
