//! The command line: the contract users script against. Subcommand names, flags,
//! environment variables and exit codes here change only with a major version.

use clap::{Args, Parser, Subcommand};

use crate::bootstrap::BootstrapOptions;
use crate::pg::QualifiedName;

/// walshuttle keeps a target PostgreSQL database an exact, continuously updated copy
/// of tables in a source PostgreSQL database: one parallel bulk copy from a
/// consistent snapshot, then every change from the write-ahead log, exactly once.
#[derive(Debug, Parser)]
#[command(name = "walshuttle", version, about, long_about = None)]
pub struct Cli {
    /// Connection settings shared by every subcommand.
    #[command(flatten)]
    pub connections: Connections,

    /// The job to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where to read from and write to.
#[derive(Debug, Args, Clone)]
pub struct Connections {
    /// Source database URL, e.g. postgresql://replicator:secret@db1:5432/app
    #[arg(long, env = "WALSHUTTLE_SOURCE", global = true, hide_env_values = true)]
    pub source: Option<String>,

    /// Target database URL, e.g. postgresql://writer:secret@db2:5432/app
    #[arg(long, env = "WALSHUTTLE_TARGET", global = true, hide_env_values = true)]
    pub target: Option<String>,

    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy every selected table from a consistent snapshot, in parallel chunks,
    /// and record where streaming continues. Safe to rerun: an interrupted
    /// bootstrap resumes, a finished one exits 0 without copying.
    Bootstrap(BootstrapArgs),
    /// The sidecar: bootstrap if never done, then stream every change from the slot
    /// to the target, exactly once, until SIGTERM/SIGINT.
    Run(RunArgs),
}

/// Options of `run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Bootstrap settings, used when the pipeline has not been bootstrapped.
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,

    /// Seconds between standby status updates sent to the source.
    #[arg(long, default_value_t = 1.0)]
    pub status_interval: f64,
}

impl RunArgs {
    /// Resolves defaults.
    pub fn options(&self) -> anyhow::Result<crate::run::RunOptions> {
        if !(self.status_interval > 0.0 && self.status_interval <= 3600.0) {
            anyhow::bail!("--status-interval must be between 0 and 3600 seconds");
        }
        Ok(crate::run::RunOptions {
            bootstrap: self.bootstrap.options()?,
            status_interval: std::time::Duration::from_secs_f64(self.status_interval),
        })
    }
}

/// Options of `bootstrap` (and of `run`, which bootstraps first when needed).
#[derive(Debug, Args, Clone)]
pub struct BootstrapArgs {
    /// Parallel copy workers (default: number of CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,

    /// Comma-separated tables as [schema.]table (default: every ordinary table
    /// outside system schemas). Quote names with dots or capitals: '"Order Items"'.
    #[arg(long, value_delimiter = ',')]
    pub tables: Option<Vec<String>>,

    /// Replication slot name; also names the pipeline.
    #[arg(long, default_value = "walshuttle")]
    pub slot: String,

    /// Publication name on the source.
    #[arg(long, default_value = "walshuttle")]
    pub publication: String,

    /// Schema on the target for walshuttle's own state.
    #[arg(long, default_value = "walshuttle")]
    pub state_schema: String,

    /// Empty target tables that already hold rows before copying into them.
    #[arg(long)]
    pub truncate_target: bool,
}

impl BootstrapArgs {
    /// Resolves defaults and parses table names.
    pub fn options(&self) -> anyhow::Result<BootstrapOptions> {
        let tables = match &self.tables {
            None => None,
            Some(list) => Some(
                list.iter()
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| QualifiedName::parse(s).map_err(|e| anyhow::anyhow!("--tables: {e}")))
                    .collect::<anyhow::Result<Vec<_>>>()?,
            ),
        };
        let jobs = self.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
        if jobs == 0 {
            anyhow::bail!("--jobs must be at least 1");
        }
        Ok(BootstrapOptions {
            jobs,
            tables,
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            state_schema: self.state_schema.clone(),
            truncate_target: self.truncate_target,
        })
    }
}
