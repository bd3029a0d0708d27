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

    /// TOML file with any of the settings the flags take (see README); flags and
    /// environment variables override it.
    #[arg(
        long,
        env = "WALSHUTTLE_CONFIG",
        global = true,
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub config: Option<std::path::PathBuf>,
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
    /// Repair a gap without a full recopy when the WAL is gone (slot dropped or
    /// invalidated, or no logical decoding): upsert rows changed since the
    /// created/updated watermarks, delete rows deleted on the source, and hand a
    /// fresh slot to `run`. With --poll, repeat forever from plain snapshots.
    CatchUp(CatchUpArgs),
    /// Compare source and target by key-range hashes. Exit 0 equal, 1 different,
    /// 2 error. --repair fixes the differing rows on the target.
    Verify(VerifyArgs),
    /// Show every pipeline on the target: phase, positions and lag, the slot on the
    /// source, copy progress, watermarks. Read-only.
    Status(StatusArgs),
    /// Retire a pipeline: drop its slot and publication on the source and its state
    /// on the target. Replicated tables are left alone. Asks first unless --yes.
    Teardown(TeardownArgs),
    /// Change a live pipeline's tables while `run` streams the others: `add` copies
    /// new tables under their own snapshot and streams them, `remove` takes tables
    /// out of the publication and stops applying them, `resync` copies tables again.
    Tables(TablesArgs),
    /// Move to the target while `run` streams: check, fence the source read-only,
    /// drain the stream to the fence, set the target's sequences, verify every
    /// table at the fence. Exit 0 only when everything is equal; an abort lifts the
    /// fence and exits 1. --reverse starts a pipeline back to the source.
    Switchover(SwitchoverArgs),
    /// Work with the configuration file.
    Config(ConfigArgs),
    /// See it work: start two throwaway local PostgreSQL clusters, load the demo
    /// schema, bootstrap, stream while a live writer runs (throughput and lag as it
    /// goes) for --seconds (30 by default), then verify and print a summary.
    Demo(DemoArgs),
}

/// Options of `demo`.
#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Seconds of streaming before the demo stops, verifies and prints its
    /// summary; 0 streams until Ctrl-C (which also ends it early, verified).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub seconds: u64,

    /// Demo data scale: 100,000 recommendation rows per unit.
    #[arg(long, default_value_t = 1)]
    pub scale: u32,

    /// Parallel copy workers (default: number of CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// Options of `status`.
#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    /// Schema on the target holding walshuttle's state.
    #[arg(long, default_value = "walshuttle")]
    pub state_schema: String,

    /// Print the report as JSON (every key always present; null when unknown).
    #[arg(long)]
    pub json: bool,

    /// Warn when a slot retains more WAL than this on the source (bytes, or with a
    /// unit as in postgresql.conf: 512MB, 2GB).
    #[arg(long, default_value = "1GB", value_parser = parse_bytes, value_name = "BYTES")]
    pub warn_retained_bytes: u64,

    /// Creation-time column for the watermarks: `column` for every table, or
    /// `schema.table=column` (repeatable; default created_at).
    #[arg(long = "created-column", value_name = "[TABLE=]COLUMN")]
    pub created_column: Vec<String>,

    /// Last-update-time column for the watermarks (default updated_at).
    #[arg(long = "updated-column", value_name = "[TABLE=]COLUMN")]
    pub updated_column: Vec<String>,
}

impl StatusArgs {
    /// Resolves the options.
    pub fn options(&self) -> anyhow::Result<crate::status::StatusOptions> {
        Ok(crate::status::StatusOptions {
            state_schema: self.state_schema.clone(),
            warn_retained_bytes: self.warn_retained_bytes,
            created_columns: WatermarkArgs::columns(&self.created_column)?,
            updated_columns: WatermarkArgs::columns(&self.updated_column)?,
        })
    }
}

/// Options of `switchover`.
#[derive(Debug, Args, Clone)]
pub struct SwitchoverArgs {
    /// Pipeline (slot) to switch over; `run` must be streaming it.
    #[arg(long, default_value = "walshuttle")]
    pub slot: String,

    /// Schema holding walshuttle's state (on the target; with --reverse also on the
    /// source).
    #[arg(long, default_value = "walshuttle")]
    pub state_schema: String,

    /// Refuse to start while the target lags more than this (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub max_lag: std::time::Duration,

    /// Check and print the plan with estimated timings; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// How writes are stopped on the source: `read-only` (the database defaults to
    /// read-only and earlier sessions are ended) or `none` (the application is
    /// already stopped).
    #[arg(long, value_enum, default_value = "read-only", value_name = "METHOD")]
    pub fence: crate::switchover::FenceMethod,

    /// How long open write transactions get to commit once the fence is up, before
    /// they are cancelled.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub fence_timeout: std::time::Duration,

    /// Set every target sequence this many values past the source's next value.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..), value_name = "N")]
    pub sequence_gap: i64,

    /// Abort (lift the fence, streaming continues, exit 1) when the fence, drain,
    /// sequences and verify take longer than this together.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub max_downtime: std::time::Duration,

    /// Start a pipeline back from the target to the source (slot
    /// `<slot>_reverse`), without a copy, for `walshuttle run` to stream.
    #[arg(long)]
    pub reverse: bool,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl SwitchoverArgs {
    /// Resolves the options.
    pub fn options(&self) -> crate::switchover::SwitchoverOptions {
        crate::switchover::SwitchoverOptions {
            slot: self.slot.clone(),
            state_schema: self.state_schema.clone(),
            max_lag: self.max_lag,
            dry_run: self.dry_run,
            fence: self.fence,
            fence_timeout: self.fence_timeout,
            sequence_gap: self.sequence_gap,
            max_downtime: self.max_downtime,
            reverse: self.reverse,
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

/// Options of `teardown`.
#[derive(Debug, Args, Clone)]
pub struct TeardownArgs {
    /// Replication slot (= pipeline) to tear down.
    #[arg(long, default_value = "walshuttle")]
    pub slot: String,

    /// Publication to drop (default: the one recorded for the pipeline, else the
    /// slot's name); only the pipeline's own is ever dropped.
    #[arg(long)]
    pub publication: Option<String>,

    /// Schema on the target holding walshuttle's state.
    #[arg(long, default_value = "walshuttle")]
    pub state_schema: String,

    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

impl TeardownArgs {
    /// Resolves the options.
    pub fn options(&self) -> crate::teardown::TeardownOptions {
        crate::teardown::TeardownOptions {
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            state_schema: self.state_schema.clone(),
        }
    }
}

/// Options of `tables`.
#[derive(Debug, Args, Clone)]
pub struct TablesArgs {
    /// What to do with the tables.
    #[arg(value_enum)]
    pub action: crate::tables::TablesAction,

    /// The tables, as schema.name (a bare name is in public).
    #[arg(required = true, num_args = 1..)]
    pub tables: Vec<String>,

    /// Pipeline (slot) whose tables change.
    #[arg(long, default_value = "walshuttle")]
    pub slot: String,

    /// Schema on the target holding walshuttle's state.
    #[arg(long, default_value = "walshuttle")]
    pub state_schema: String,

    /// add: replace the rows an existing target table already holds (otherwise a
    /// target table with rows walshuttle did not copy is refused).
    #[arg(long)]
    pub truncate_target: bool,

    /// Fire foreign keys and triggers of the target tables on copied rows as for
    /// any writer, when the target role cannot use replica mode.
    #[arg(long)]
    pub allow_target_triggers: bool,

    /// add: an added table's column list, 'schema.table (col, …)' (PostgreSQL 15+
    /// source; as bootstrap's --columns). Repeatable.
    #[arg(long = "columns", value_name = "TABLE (COLUMNS)")]
    pub columns: Vec<String>,

    /// add: an added table's row filter, 'schema.table WHERE expression'
    /// (PostgreSQL 15+ source; as bootstrap's --row-filter). Repeatable.
    #[arg(long = "row-filter", value_name = "TABLE WHERE EXPR")]
    pub row_filter: Vec<String>,
}

impl TablesArgs {
    /// Resolves the options.
    pub fn options(&self) -> anyhow::Result<crate::tables::TablesOptions> {
        let mut tables = Vec::with_capacity(self.tables.len());
        for t in &self.tables {
            tables.push(
                QualifiedName::parse(t).map_err(|e| anyhow::anyhow!("table name {t:?}: {e}"))?,
            );
        }
        Ok(crate::tables::TablesOptions {
            action: self.action,
            tables,
            slot: self.slot.clone(),
            state_schema: self.state_schema.clone(),
            truncate_target: self.truncate_target,
            allow_target_triggers: self.allow_target_triggers,
            rows: crate::row_selection::RowSelection::parse(&self.columns, &self.row_filter)?,
        })
    }
}

/// `config` subcommands.
#[derive(Debug, Args, Clone)]
pub struct ConfigArgs {
    /// What to do with the file.
    #[command(subcommand)]
    pub action: ConfigAction,
}

/// What `config` does.
#[derive(Debug, Subcommand, Clone)]
pub enum ConfigAction {
    /// Validate the --config file (unknown keys, URLs, durations, addresses) and
    /// print the resolved settings, passwords redacted. Exit 0 valid, 1 not.
    Check,
}

/// Parses `1073741824`, `512MB`, `2GB` into bytes. Units count in 1024s, as in
/// `postgresql.conf` (`kB`, `MB`, `GB`, `TB`; `KiB`, `MiB`, `GiB`, `TiB` too).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{text}` is not a size: use e.g. 1073741824, 512MB, 2GB");
    let value: f64 = num.parse().map_err(|_| bad())?;
    let power = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kb" | "kib" => 1,
        "mb" | "mib" => 2,
        "gb" | "gib" => 3,
        "tb" | "tib" => 4,
        _ => return Err(bad()),
    };
    let factor = 1024f64.powi(power);
    let bytes = value * factor;
    if !(0.0..=9.0e18).contains(&bytes) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(bytes as u64)
}

/// Which columns carry a row's creation and last-update times.
#[derive(Debug, Args, Clone)]
pub struct WatermarkArgs {
    /// Creation-time column: `column` for every table, or `schema.table=column`
    /// (repeatable).
    #[arg(long = "created-column", value_name = "[TABLE=]COLUMN")]
    pub created_column: Vec<String>,

    /// Last-update-time column: `column` for every table, or `schema.table=column`
    /// (repeatable).
    #[arg(long = "updated-column", value_name = "[TABLE=]COLUMN")]
    pub updated_column: Vec<String>,

    /// Safety margin below the watermarks, covering transactions that committed
    /// after rows with later timestamps (e.g. 300s, 5m, 1h).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub margin: std::time::Duration,
}

impl WatermarkArgs {
    /// Column maps keyed by table (`None` for the default).
    pub fn columns(
        list: &[String],
    ) -> anyhow::Result<std::collections::HashMap<Option<QualifiedName>, String>> {
        let mut map = std::collections::HashMap::new();
        for item in list {
            match item.rsplit_once('=') {
                Some((table, column)) => {
                    let table = QualifiedName::parse(table).map_err(|e| anyhow::anyhow!("{e}"))?;
                    map.insert(Some(table), column.trim().to_string());
                }
                None => {
                    map.insert(None, item.trim().to_string());
                }
            }
        }
        Ok(map)
    }

    /// Catch-up settings from these flags and the pipeline's.
    pub fn catch_up_options(
        &self,
        b: &BootstrapOptions,
        without_slot: bool,
    ) -> anyhow::Result<crate::catchup::CatchUpOptions> {
        Ok(crate::catchup::CatchUpOptions {
            slot: b.slot.clone(),
            publication: b.publication.clone(),
            allow_target_triggers: b.allow_target_triggers,
            state_schema: b.state_schema.clone(),
            tables: b.tables.clone(),
            jobs: b.jobs,
            margin: self.margin,
            created_columns: Self::columns(&self.created_column)?,
            updated_columns: Self::columns(&self.updated_column)?,
            without_slot,
            filter: b.filter.clone(),
            rows: b.rows.clone(),
        })
    }
}

/// Parses `300`, `300s`, `500ms`, `5m`, `1h` into a duration.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: use e.g. 30s, 5m, 1h"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{text}` is not a duration: use e.g. 30s, 5m, 1h")),
    };
    if !(0.0..=31_536_000.0).contains(&secs) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Options of `catch-up`.
#[derive(Debug, Args, Clone)]
pub struct CatchUpArgs {
    /// Pipeline settings.
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,

    /// Watermark columns and margin.
    #[command(flatten)]
    pub watermarks: WatermarkArgs,

    /// Repeat every INTERVAL until stopped, from plain snapshots without a slot: the
    /// sync mode for sources without logical decoding (e.g. 30s, 1m).
    #[arg(long, value_parser = parse_duration, value_name = "INTERVAL")]
    pub poll: Option<std::time::Duration>,
}

/// Options of `verify`.
#[derive(Debug, Args, Clone)]
pub struct VerifyArgs {
    /// Comma-separated tables (default: the pipeline's, else every table).
    #[arg(long, value_delimiter = ',')]
    pub tables: Option<Vec<String>>,

    /// Pipeline (slot) whose tables and stream position to use.
    #[arg(long, default_value = "walshuttle")]
    pub slot: String,

    /// Schema on the target for walshuttle's own state.
    #[arg(long, default_value = "walshuttle")]
    pub state_schema: String,

    /// Parallel workers (default: number of CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,

    /// Fix the differing rows on the target (delete extra rows, copy missing and
    /// changed ones from the source).
    #[arg(long)]
    pub repair: bool,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// With --repair: fire foreign keys and triggers of the target tables on
    /// repaired rows as for any writer, when the target role cannot use replica mode.
    #[arg(long)]
    pub allow_target_triggers: bool,
}

impl VerifyArgs {
    /// Resolves defaults.
    pub fn options(&self) -> anyhow::Result<crate::verify::VerifyOptions> {
        let b = BootstrapArgs {
            jobs: self.jobs,
            tables: self.tables.clone(),
            slot: self.slot.clone(),
            publication: None,
            state_schema: self.state_schema.clone(),
            truncate_target: false,
            allow_target_triggers: self.allow_target_triggers,
            capture_ddl: false,
            online: false,
            schemas: Vec::new(),
            exclude_schemas: Vec::new(),
            exclude_tables: Vec::new(),
            columns: Vec::new(),
            row_filter: Vec::new(),
        }
        .options()?;
        Ok(crate::verify::VerifyOptions {
            tables: b.tables,
            slot: b.slot,
            state_schema: b.state_schema,
            jobs: b.jobs,
            repair: self.repair,
            allow_target_triggers: b.allow_target_triggers,
        })
    }
}

/// Options of `run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Bootstrap settings, used when the pipeline has not been bootstrapped.
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,

    /// Watermark settings for the automatic catch-up when the slot is lost.
    #[command(flatten)]
    pub watermarks: WatermarkArgs,

    /// Seconds between standby status updates sent to the source.
    #[arg(long, default_value_t = 1.0)]
    pub status_interval: f64,

    /// Serve Prometheus metrics on /metrics and a health check on /healthz at this
    /// address, e.g. 127.0.0.1:9187.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Lag above which /healthz answers 503 (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub healthz_max_lag: std::time::Duration,

    /// Streamed (large, in-progress) source transactions applied at once, each on a
    /// target connection of its own; more are kept on local disk (TMPDIR) until
    /// they commit.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000), value_name = "N")]
    pub max_stream_connections: u32,

    /// Target connections applying committed source transactions at once: a batch
    /// of transactions runs beside the ones in flight when none of its rows (by
    /// replica identity) is theirs, and every batch commits in the source's commit
    /// order. 1 applies on one connection.
    #[arg(long, default_value_t = crate::run::DEFAULT_APPLY_LANES as u32, value_parser = clap::value_parser!(u32).range(1..=64), value_name = "N")]
    pub apply_lanes: u32,

    /// WAL the slot may hold back on the source (bytes, or 512MB, 20GB): past it the
    /// slot is dropped on purpose (the source frees the WAL) and the gap is later
    /// repaired by catch-up; a warning comes at 80%. Without it the source's
    /// max_slot_wal_keep_size alone decides.
    #[arg(long, value_parser = parse_bytes, value_name = "SIZE")]
    pub max_retained_wal: Option<u64>,

    /// Every INTERVAL (e.g. 30s), set each target sequence of the replicated tables
    /// (identity and serial columns; created when missing) to at least the source's
    /// next value, so a target promoted at any moment hands out no id twice.
    #[arg(long, value_parser = parse_duration, value_name = "INTERVAL")]
    pub sync_sequences: Option<std::time::Duration>,
    /// Keep a column dropped on the source on the target instead of dropping it
    /// there (made nullable when it is NOT NULL without a default, so new rows fit).
    #[arg(long)]
    pub keep_dropped_columns: bool,
}

impl RunArgs {
    /// Resolves defaults.
    pub fn options(&self) -> anyhow::Result<crate::run::RunOptions> {
        if !(self.status_interval > 0.0 && self.status_interval <= 3600.0) {
            anyhow::bail!("--status-interval must be between 0 and 3600 seconds");
        }
        let bootstrap = self.bootstrap.options()?;
        Ok(crate::run::RunOptions {
            catch_up: self.watermarks.catch_up_options(&bootstrap, false)?,
            bootstrap,
            status_interval: std::time::Duration::from_secs_f64(self.status_interval),
            metrics_addr: self.metrics_addr,
            healthz_max_lag: self.healthz_max_lag,
            max_stream_connections: self.max_stream_connections as usize,
            apply_lanes: self.apply_lanes as usize,
            max_retained_wal: self.max_retained_wal,
            sync_sequences: self.sync_sequences,
            keep_dropped_columns: self.keep_dropped_columns,
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

    /// Comma-separated schema patterns: only tables in these schemas (as `pg_dump
    /// -n`: `*` and `?` wildcards, quote capitals and dots).
    #[arg(long, value_delimiter = ',', value_name = "PATTERNS")]
    pub schemas: Vec<String>,

    /// Comma-separated schema patterns whose tables are left out (as `pg_dump -N`).
    #[arg(long, value_delimiter = ',', value_name = "PATTERNS")]
    pub exclude_schemas: Vec<String>,

    /// Comma-separated table patterns left out, as [schema.]table (as `pg_dump -T`;
    /// a table pattern without a schema matches in every schema).
    #[arg(long, value_delimiter = ',', value_name = "PATTERNS")]
    pub exclude_tables: Vec<String>,

    /// A table's column list, as a publication takes it: 'schema.table (col, "Col")'
    /// (PostgreSQL 15+ source). Only these columns are copied, streamed and
    /// compared; the list must include the replica identity. Repeatable.
    #[arg(long = "columns", value_name = "TABLE (COLUMNS)")]
    pub columns: Vec<String>,

    /// A table's row filter, as a publication takes it: 'schema.table WHERE
    /// expression' (PostgreSQL 15+ source). Only source rows it keeps are copied,
    /// streamed and compared; it may use only replica identity columns. Repeatable.
    #[arg(long = "row-filter", value_name = "TABLE WHERE EXPR")]
    pub row_filter: Vec<String>,

    /// Replication slot name; also names the pipeline.
    #[arg(long, default_value = "walshuttle")]
    pub slot: String,

    /// Publication name on the source (default: the one recorded for the pipeline,
    /// else the slot's name). Each pipeline needs its own.
    #[arg(long)]
    pub publication: Option<String>,

    /// Schema on the target for walshuttle's own state.
    #[arg(long, default_value = "walshuttle")]
    pub state_schema: String,

    /// Empty target tables that already hold rows before copying into them.
    #[arg(long)]
    pub truncate_target: bool,

    /// Fire foreign keys and triggers of existing target tables on replicated rows
    /// as for any writer, when the target role cannot use replica mode.
    #[arg(long)]
    pub allow_target_triggers: bool,

    /// Capture DDL on the source with an event trigger (needs a superuser source
    /// role) and apply it on the target at its place in the log: columns added,
    /// dropped, renamed or retyped, defaults, NOT NULL, indexes, tables renamed,
    /// dropped or created, new partitions.
    #[arg(long)]
    pub capture_ddl: bool,

    /// bootstrap and run: copy each table under a short snapshot of its own while
    /// the stream runs (`run` does the copying), instead of every table under one
    /// snapshot held for the whole copy: the source keeps no old snapshot and the
    /// slot little WAL during the copy.
    #[arg(long)]
    pub online: bool,
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
            allow_target_triggers: self.allow_target_triggers,
            capture_ddl: self.capture_ddl,
            online: self.online,
            filter: crate::selection::TableFilter::new(
                &self.schemas,
                &self.exclude_schemas,
                &self.exclude_tables,
            )?,
            rows: crate::row_selection::RowSelection::parse(&self.columns, &self.row_filter)?,
        })
    }
}
