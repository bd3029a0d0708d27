//! Throwaway local PostgreSQL clusters, started from server binaries on this
//! machine: what `walshuttle demo` runs against, and the one harness the integration
//! tests build on (`tests/support`).
//!
//! Each cluster is an `initdb` in a temporary directory on a free port with
//! `wal_level=logical` (unless told otherwise), password authentication over TCP,
//! of the machine's default PostgreSQL or of a chosen major version (see
//! [`binaries`]), and is stopped and removed when dropped. As root, the server runs
//! as the `postgres` user through `runuser`, since initdb and postgres refuse to run
//! as root.

pub mod binaries;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

pub use binaries::ServerBinaries;

/// A server certificate and its private key, both PEM, for a cluster with TLS.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server certificate (followed by any intermediates).
    pub cert_pem: String,
    /// The certificate's private key (PKCS#8 or traditional PEM).
    pub key_pem: String,
}

/// Options for a new cluster.
#[derive(Clone, Debug)]
pub struct LocalClusterOptions {
    /// Major version of the server; `None` for the machine's default
    /// (`pg_config --bindir`).
    pub version: Option<u32>,
    /// `wal_level` (`logical`, or `replica` for a source without logical decoding).
    pub wal_level: String,
    /// Password of the `postgres` superuser.
    pub password: String,
    /// Extra `postgresql.conf` lines (after the defaults, so they win).
    pub extra_conf: Vec<String>,
    /// When set, the server runs with `ssl = on` and this certificate and key.
    pub tls: Option<ServerTls>,
    /// When not empty, `pg_hba.conf` is replaced by these lines (after `local` trust
    /// lines for normal and replication connections), e.g.
    /// `hostssl all all 127.0.0.1/32 scram-sha-256`.
    pub hba: Vec<String>,
}

impl Default for LocalClusterOptions {
    fn default() -> Self {
        LocalClusterOptions {
            version: None,
            wal_level: "logical".into(),
            password: "walshuttle-local".into(),
            extra_conf: Vec::new(),
            tls: None,
            hba: Vec::new(),
        }
    }
}

/// How to stop a server (`pg_ctl stop -m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for every session to end.
    Smart,
    /// Disconnect sessions, checkpoint: a clean shutdown.
    Fast,
    /// No checkpoint: a crash, recovered at the next start.
    Immediate,
}

impl StopMode {
    /// `pg_ctl`'s name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

impl std::str::FromStr for StopMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<StopMode> {
        match s {
            "smart" => Ok(StopMode::Smart),
            "fast" => Ok(StopMode::Fast),
            "immediate" => Ok(StopMode::Immediate),
            other => bail!("unknown stop mode {other:?}: use smart, fast or immediate"),
        }
    }
}

/// A running local cluster.
pub struct LocalCluster {
    dir: tempfile::TempDir,
    binaries: ServerBinaries,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    password: String,
    as_postgres: bool,
}

/// Finds the machine's default PostgreSQL server binaries (`pg_config --bindir`,
/// then `/usr/lib/postgresql/*/bin`), or says which package to install.
pub fn find_bindir() -> Result<PathBuf> {
    Ok(binaries::default_binaries()?.bindir)
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

/// The `postgresql.conf` lines every cluster gets, before the caller's.
fn base_conf(socket_dir: &Path, wal_level: &str) -> Vec<String> {
    vec![
        "listen_addresses = '127.0.0.1'".to_string(),
        format!("unix_socket_directories = '{}'", socket_dir.display()),
        format!("wal_level = {wal_level}"),
        "max_replication_slots = 16".into(),
        "max_wal_senders = 16".into(),
        "max_connections = 60".into(),
        "shared_buffers = 64MB".into(),
        "fsync = off".into(),
        "full_page_writes = off".into(),
        "wal_sender_timeout = 10s".into(),
        "log_min_messages = warning".into(),
        "logging_collector = off".into(),
    ]
}

impl LocalCluster {
    /// Initialises and starts a cluster.
    pub fn start(options: &LocalClusterOptions) -> Result<LocalCluster> {
        let binaries = match options.version {
            Some(major) => binaries::binaries_for(major)?,
            None => binaries::default_binaries()?,
        };
        let as_postgres = binaries::is_root();
        let dir = tempfile::Builder::new()
            .prefix("walshuttle-pg-")
            .tempdir()
            .context("creating a temporary directory")?;
        let mut cluster = LocalCluster {
            dir,
            binaries,
            port: 0,
            password: options.password.clone(),
            as_postgres,
        };
        cluster.own(cluster.dir.path())?;
        let pwfile = cluster.dir.path().join("pwfile");
        std::fs::write(&pwfile, &options.password).context("writing the password file")?;
        cluster.own(&pwfile)?;
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
                "initdb ({}) failed: {}",
                cluster.binaries.bindir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut conf = base_conf(cluster.dir.path(), &options.wal_level);
        conf.extend(options.extra_conf.iter().cloned());
        if let Some(tls) = &options.tls {
            cluster.install_tls(tls)?;
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
            std::fs::write(data.join("pg_hba.conf"), hba.join("\n"))
                .context("writing pg_hba.conf")?;
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).context("reading postgresql.conf")?;
        text.push('\n');
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text).context("writing postgresql.conf")?;
        // A free port may be taken by someone else before the server binds it.
        for _ in 0..5 {
            cluster.port = free_port()?;
            if cluster.pg_ctl_start()? {
                return Ok(cluster);
            }
        }
        bail!(
            "could not start a local PostgreSQL {} cluster:\n{}",
            cluster.binaries.major,
            cluster.log()
        )
    }

    /// Writes the server's certificate and key into the data directory: the server
    /// refuses a key readable by others, and as root it must be the server user's.
    fn install_tls(&self, tls: &ServerTls) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data_dir();
        let cert = data.join("server.crt");
        let key = data.join("server.key");
        std::fs::write(&cert, &tls.cert_pem).context("writing server.crt")?;
        std::fs::write(&key, &tls.key_pem).context("writing server.key")?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .context("making server.key private")?;
        self.own(&cert)?;
        self.own(&key)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
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
        &self.binaries.bindir
    }

    /// The server's major version.
    pub fn major(&self) -> u32 {
        self.binaries.major
    }

    /// The `postgres` superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Hands a file the cluster writes to the server user (as root).
    fn own(&self, path: &Path) -> Result<()> {
        if !self.as_postgres {
            return Ok(());
        }
        let status = Command::new("chown")
            .arg("postgres:")
            .arg(path)
            .status()
            .context("running chown")?;
        if !status.success() {
            bail!(
                "chown postgres {} failed: is there a `postgres` user? (create one: useradd --system postgres)",
                path.display()
            );
        }
        Ok(())
    }

    fn pg_command(&self, program: &str, args: &[&str]) -> Result<Output> {
        let path = self.binaries.bindir.join(program);
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

    /// Stops the server and waits until it is down.
    pub fn stop(&self, mode: StopMode) -> Result<()> {
        let data = self.data_dir();
        let out = self.pg_command(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                mode.as_str(),
                "-w",
                "stop",
            ],
        )?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop -m {} failed: {}",
                mode.as_str(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Stops the server and starts it again on the same port.
    pub fn restart(&self, mode: StopMode) -> Result<()> {
        self.stop(mode)?;
        self.start_again()
    }

    /// Starts a physical standby of this cluster, streaming from it: the primary is
    /// stopped cleanly for a moment so its data directory can be copied as a
    /// consistent base (no `pg_basebackup` needed, which the fetched binaries lack),
    /// then started again. `extra_conf` goes into the standby's `postgresql.conf`
    /// (e.g. `primary_slot_name`, `hot_standby_feedback`, `sync_replication_slots`).
    pub fn start_standby(&self, extra_conf: &[String]) -> Result<LocalCluster> {
        self.stop(StopMode::Fast)?;
        let dir = tempfile::Builder::new()
            .prefix("walshuttle-pg-standby-")
            .tempdir()
            .context("creating a temporary directory")?;
        let mut standby = LocalCluster {
            dir,
            binaries: self.binaries.clone(),
            port: 0,
            password: self.password.clone(),
            as_postgres: self.as_postgres,
        };
        standby.own(standby.dir.path())?;
        let copied = Command::new("cp")
            .arg("-a")
            .arg(self.data_dir())
            .arg(standby.data_dir())
            .status()
            .context("copying the primary's data directory")?;
        self.start_again()?;
        if !copied.success() {
            bail!("copying the primary's data directory failed");
        }
        let data = standby.data_dir();
        // The primary's slots are its own.
        if let Ok(entries) = std::fs::read_dir(data.join("pg_replslot")) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let signal = data.join("standby.signal");
        std::fs::write(&signal, "").context("writing standby.signal")?;
        standby.own(&signal)?;
        let mut conf = vec![
            format!(
                "unix_socket_directories = '{}'",
                standby.dir.path().display()
            ),
            format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres password={} dbname=postgres application_name=standby'",
                self.port, self.password
            ),
        ];
        conf.extend(extra_conf.iter().cloned());
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).context("reading postgresql.conf")?;
        text.push('\n');
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text).context("writing postgresql.conf")?;
        for _ in 0..5 {
            standby.port = free_port()?;
            if standby.pg_ctl_start()? {
                return Ok(standby);
            }
        }
        bail!("could not start a standby:\n{}", standby.log())
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
        let mut cmd = Command::new(binaries::psql_for(self.bindir()));
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
        let _ = self.stop(StopMode::Immediate);
    }
}
