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
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical",
            extra_conf: Vec::new(),
        }
    }
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
