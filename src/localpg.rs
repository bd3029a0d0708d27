//! Throwaway local PostgreSQL clusters, started from the server binaries on this
//! machine: what `walshuttle demo` runs against, and what the test harness builds on.
//!
//! Each cluster is an `initdb` in a temporary directory on a free port with
//! `wal_level=logical`, password authentication over TCP, and is stopped and removed
//! when dropped. As root, the server runs as the `postgres` user through `runuser`,
//! since initdb and postgres refuse to run as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// Options for a new cluster.
#[derive(Clone, Debug)]
pub struct LocalClusterOptions {
    /// `wal_level` (`logical`, or `replica` for a source without logical decoding).
    pub wal_level: String,
    /// Password of the `postgres` superuser.
    pub password: String,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
}

impl Default for LocalClusterOptions {
    fn default() -> Self {
        LocalClusterOptions {
            wal_level: "logical".into(),
            password: "walshuttle-local".into(),
            extra_conf: Vec::new(),
        }
    }
}

/// A running local cluster.
pub struct LocalCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    password: String,
    as_postgres: bool,
}

/// Finds the PostgreSQL server binaries (`pg_config --bindir`, then
/// `/usr/lib/postgresql/*/bin`), or says which package to install.
pub fn find_bindir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
            if dir.join("initdb").exists() {
                return Ok(dir);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .collect();
        dirs.sort();
        if let Some(dir) = dirs.pop() {
            return Ok(dir);
        }
    }
    bail!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them (Debian/Ubuntu: apt-get install -y postgresql; macOS: brew install postgresql) and make sure `pg_config --bindir` points at them"
    )
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

impl LocalCluster {
    /// Initialises and starts a cluster.
    pub fn start(options: &LocalClusterOptions) -> Result<LocalCluster> {
        let bindir = find_bindir()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("walshuttle-pg-")
            .tempdir()
            .context("creating a temporary directory")?;
        let cluster = LocalCluster {
            dir,
            bindir,
            port: 0,
            password: options.password.clone(),
            as_postgres,
        };
        if as_postgres {
            cluster.chown(cluster.dir.path())?;
        }
        let pwfile = cluster.dir.path().join("pwfile");
        std::fs::write(&pwfile, &options.password).context("writing the password file")?;
        if as_postgres {
            cluster.chown(&pwfile)?;
        }
        let data = cluster.data_dir();
        let out = cluster.pg_command(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                &pwfile.to_string_lossy(),
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
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
        ];
        conf.extend(options.extra_conf.iter().cloned());
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).context("reading postgresql.conf")?;
        text.push('\n');
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text).context("writing postgresql.conf")?;
        let mut cluster = cluster;
        for _ in 0..5 {
            cluster.port = free_port()?;
            if cluster.pg_ctl_start()? {
                return Ok(cluster);
            }
        }
        bail!(
            "could not start a local PostgreSQL cluster:\n{}",
            cluster.log()
        )
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The directory holding the cluster (data, log, socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server binaries' directory.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    fn chown(&self, path: &Path) -> Result<()> {
        let status = Command::new("chown")
            .arg("postgres:")
            .arg(path)
            .status()
            .context("running chown")?;
        if !status.success() {
            bail!(
                "chown postgres {} failed: is there a `postgres` user?",
                path.display()
            );
        }
        Ok(())
    }

    fn pg_command(&self, program: &str, args: &[&str]) -> Result<Output> {
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
            .with_context(|| format!("running {}", path.display()))
    }

    fn pg_ctl_start(&self) -> Result<bool> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let port = format!("-p {}", self.port);
        let out = self.pg_command(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-o",
                &port,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        Ok(out.status.success())
    }

    /// Starts a stopped cluster again on the same port.
    pub fn start_again(&self) -> Result<()> {
        if !self.pg_ctl_start()? {
            bail!("restarting the cluster failed:\n{}", self.log());
        }
        Ok(())
    }

    /// Stops the server: `fast` (clean) or `immediate` (a crash: no checkpoint).
    pub fn stop(&self, mode: &str) -> Result<()> {
        let data = self.data_dir();
        let out = self.pg_command(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", mode, "-w", "stop"],
        )?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop -m {mode} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// URL of a database as the superuser, with the password.
    pub fn url_for(&self, db: &str) -> String {
        format!(
            "postgresql://postgres:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// Runs a SQL file through psql (scripts with psql variables, like the generator).
    pub fn psql_file(&self, db: &str, file: &Path, vars: &[(&str, &str)]) -> Result<Output> {
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .env("PGPASSWORD", &self.password)
            .stdin(Stdio::null());
        for (k, v) in vars {
            cmd.args(["-v", &format!("{k}={v}")]);
        }
        cmd.arg("-f").arg(file);
        cmd.output().context("running psql")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.pg_command(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}
