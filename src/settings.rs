//! The configuration file (`--config walshuttle.toml`): every setting the flags
//! take, in one TOML file. Precedence, lowest first: built-in defaults, the file,
//! environment variables, command-line flags. Unknown keys are errors, so a typo
//! never silently falls back to a default.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;

use crate::cli::{parse_bytes, parse_duration, BootstrapArgs, Cli, Command, WatermarkArgs};
use crate::config::{redact, Endpoint, Side};
use crate::pg::QualifiedName;

/// A list given as a TOML array or as one comma-separated string.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum List {
    /// `["a", "b"]`
    Items(Vec<String>),
    /// `"a, b"`
    Text(String),
}

impl List {
    fn items(&self) -> Vec<String> {
        match self {
            List::Items(v) => v.clone(),
            List::Text(t) => t
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
}

/// A number, or text with a unit (`"30s"`, `"1GB"`).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    /// A bare number: seconds, or bytes.
    Number(f64),
    /// Text with a unit.
    Text(String),
}

/// The file, as written. Every key is optional.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Source database URL.
    pub source: Option<String>,
    /// Target database URL.
    pub target: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// Slot (= pipeline) name.
    pub slot: Option<String>,
    /// Publication name.
    pub publication: Option<String>,
    /// State schema on the target.
    pub state_schema: Option<String>,
    /// Parallel workers.
    pub jobs: Option<usize>,
    /// Tables, `[schema.]table`.
    pub tables: Option<List>,
    /// Schema patterns whose tables only are replicated (`--schemas`).
    pub schemas: Option<List>,
    /// Schema patterns left out (`--exclude-schemas`).
    pub exclude_schemas: Option<List>,
    /// Table patterns left out (`--exclude-tables`).
    pub exclude_tables: Option<List>,
    /// Column lists, `schema.table (col, …)` each (`--columns`).
    pub columns: Option<Vec<String>>,
    /// Row filters, `schema.table WHERE expression` each (`--row-filter`).
    pub row_filter: Option<Vec<String>>,
    /// Empty target tables that hold rows before copying.
    pub truncate_target: Option<bool>,
    /// Fire target foreign keys and triggers on replicated rows as for any writer.
    pub allow_target_triggers: Option<bool>,
    /// Capture DDL on the source with an event trigger (`--capture-ddl`).
    pub capture_ddl: Option<bool>,
    /// Online bootstrap: each table copied under its own snapshot while `run`
    /// streams (`--online`).
    pub online: Option<bool>,
    /// Creation-time columns (`column` or `schema.table=column`).
    pub created_column: Option<List>,
    /// Update-time columns.
    pub updated_column: Option<List>,
    /// Catch-up safety margin (`5m`).
    pub margin: Option<Quantity>,
    /// Catch-up polling interval (`30s`).
    pub poll: Option<Quantity>,
    /// Standby status interval of `run` (`1s`, or seconds).
    pub status_interval: Option<Quantity>,
    /// Where `run` serves `/metrics` and `/healthz` (`127.0.0.1:9187`).
    pub metrics_addr: Option<String>,
    /// Lag above which `/healthz` is 503 (`60s`).
    pub healthz_max_lag: Option<Quantity>,
    /// Streamed transactions `run` applies on connections of their own at once.
    pub max_stream_connections: Option<usize>,
    /// Target connections `run` applies committed transactions on at once.
    pub apply_lanes: Option<usize>,
    /// `run` keeps columns dropped on the source on the target.
    pub keep_dropped_columns: Option<bool>,
    /// Retained WAL above which `status` warns (`1GB`, or bytes).
    pub warn_retained_bytes: Option<Quantity>,
    /// WAL budget of `run`'s slot (`20GB`, or bytes).
    pub max_retained_wal: Option<Quantity>,
    /// How often `run` brings target sequences up to the source's (`30s`).
    pub sync_sequences: Option<Quantity>,
    /// Lag above which `switchover` refuses to start (`5s`).
    pub max_lag: Option<Quantity>,
    /// How `switchover` stops writes on the source: `read-only` or `none`.
    pub fence: Option<String>,
    /// How long `switchover` lets open write transactions finish (`10s`).
    pub fence_timeout: Option<Quantity>,
    /// Values `switchover` sets target sequences past the source's.
    pub sequence_gap: Option<i64>,
    /// Fence to done, past which `switchover` aborts (`30s`).
    pub max_downtime: Option<Quantity>,
}

/// The file's values, parsed and checked.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    /// The file, as written.
    pub file: FileConfig,
    /// Parsed `tables`.
    pub tables: Option<Vec<String>>,
    /// Parsed `margin`.
    pub margin: Option<Duration>,
    /// Parsed `poll`.
    pub poll: Option<Duration>,
    /// Parsed `status_interval`, seconds.
    pub status_interval: Option<f64>,
    /// Parsed `metrics_addr`.
    pub metrics_addr: Option<SocketAddr>,
    /// Parsed `healthz_max_lag`.
    pub healthz_max_lag: Option<Duration>,
    /// Parsed `warn_retained_bytes`.
    pub warn_retained_bytes: Option<u64>,
    /// Parsed `max_retained_wal`.
    pub max_retained_wal: Option<u64>,
    /// Parsed `sync_sequences`.
    pub sync_sequences: Option<Duration>,
    /// Parsed `max_lag`.
    pub max_lag: Option<Duration>,
    /// Parsed `fence`.
    pub fence: Option<crate::switchover::FenceMethod>,
    /// Parsed `fence_timeout`.
    pub fence_timeout: Option<Duration>,
    /// Parsed `max_downtime`.
    pub max_downtime: Option<Duration>,
}

/// A size setting: a whole number of bytes, or text with a unit (`"1GB"`).
fn bytes(key: &str, value: &Option<Quantity>) -> Result<Option<u64>> {
    Ok(match value {
        None => None,
        Some(Quantity::Number(n)) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
        Some(Quantity::Number(n)) => {
            bail!("`{key}` is {n}: use a whole number of bytes or e.g. \"1GB\"")
        }
        Some(Quantity::Text(t)) => {
            Some(parse_bytes(t).map_err(|e| anyhow::anyhow!("`{key}`: {e}"))?)
        }
    })
}

fn duration(key: &str, q: &Option<Quantity>) -> Result<Option<Duration>> {
    let Some(q) = q else { return Ok(None) };
    let text = match q {
        Quantity::Number(n) => n.to_string(),
        Quantity::Text(t) => t.clone(),
    };
    parse_duration(&text)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("`{key}`: {e}"))
}

/// The line (1-based) of a byte offset in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl FileConfig {
    /// Reads and checks a file. Every error is one line naming the file.
    pub fn load(path: &Path) -> Result<Resolved> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the config file {shown}: {e}"))?;
        let file: FileConfig = toml::from_str(&text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!(" (line {})", line_of(&text, s.start)))
                .unwrap_or_default();
            anyhow::anyhow!(
                "config file {shown}{at}: {}",
                e.message().trim().replace('\n', " ")
            )
        })?;
        file.resolve()
            .map_err(|e| anyhow::anyhow!("config file {shown}: {e:#}"))
    }

    /// Parses and checks every value.
    pub fn resolve(self) -> Result<Resolved> {
        for (key, url, side) in [
            ("source", &self.source, Side::Source),
            ("target", &self.target, Side::Target),
        ] {
            if let Some(url) = url {
                Endpoint::parse(side, url).map_err(|e| anyhow::anyhow!("`{key}`: {e}"))?;
            }
        }
        if let Some(f) = &self.log_format {
            if f != "text" && f != "json" {
                bail!("`log_format` is `{f}`: use \"text\" or \"json\"");
            }
        }
        if self.max_stream_connections == Some(0) {
            bail!("`max_stream_connections` must be at least 1");
        }
        if matches!(self.apply_lanes, Some(n) if !(1..=64).contains(&n)) {
            bail!("`apply_lanes` must be between 1 and 64");
        }
        if self.jobs == Some(0) {
            bail!("`jobs` must be at least 1");
        }
        let tables = self.tables.as_ref().map(List::items);
        for t in tables.iter().flatten() {
            QualifiedName::parse(t).map_err(|e| anyhow::anyhow!("`tables`: {e}"))?;
        }
        let items = |l: &Option<List>| l.as_ref().map(List::items).unwrap_or_default();
        crate::selection::TableFilter::new(
            &items(&self.schemas),
            &items(&self.exclude_schemas),
            &items(&self.exclude_tables),
        )
        .map_err(|e| anyhow::anyhow!("`schemas`/`exclude_schemas`/`exclude_tables`: {e}"))?;
        crate::row_selection::RowSelection::parse(
            self.columns.as_deref().unwrap_or_default(),
            self.row_filter.as_deref().unwrap_or_default(),
        )
        .map_err(|e| anyhow::anyhow!("`columns`/`row_filter`: {e}"))?;
        for (key, list) in [
            ("created_column", &self.created_column),
            ("updated_column", &self.updated_column),
        ] {
            if let Some(list) = list {
                WatermarkArgs::columns(&list.items())
                    .map_err(|e| anyhow::anyhow!("`{key}`: {e}"))?;
            }
        }
        let status_interval =
            duration("status_interval", &self.status_interval)?.map(|d| d.as_secs_f64());
        if let Some(s) = status_interval {
            if !(s > 0.0 && s <= 3600.0) {
                bail!("`status_interval` must be between 0 and 3600 seconds");
            }
        }
        let metrics_addr = match &self.metrics_addr {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!(
                    "`metrics_addr` is `{a}`: use an address and port, e.g. \"127.0.0.1:9187\""
                )
            })?),
        };
        let fence = match self.fence.as_deref() {
            None => None,
            Some("read-only") => Some(crate::switchover::FenceMethod::ReadOnly),
            Some("none") => Some(crate::switchover::FenceMethod::None),
            Some(other) => bail!("`fence` is `{other}`: use \"read-only\" or \"none\""),
        };
        if self.sequence_gap.is_some_and(|g| g < 0) {
            bail!("`sequence_gap` must be 0 or more");
        }
        let warn_retained_bytes = bytes("warn_retained_bytes", &self.warn_retained_bytes)?;
        let max_retained_wal = bytes("max_retained_wal", &self.max_retained_wal)?;
        Ok(Resolved {
            tables,
            margin: duration("margin", &self.margin)?,
            poll: duration("poll", &self.poll)?,
            status_interval,
            metrics_addr,
            healthz_max_lag: duration("healthz_max_lag", &self.healthz_max_lag)?,
            warn_retained_bytes,
            max_retained_wal,
            sync_sequences: duration("sync_sequences", &self.sync_sequences)?,
            max_lag: duration("max_lag", &self.max_lag)?,
            fence,
            fence_timeout: duration("fence_timeout", &self.fence_timeout)?,
            max_downtime: duration("max_downtime", &self.max_downtime)?,
            file: self,
        })
    }
}

/// Whether the user set `id` on the command line or through its environment
/// variable (rather than leaving clap's default, or nothing).
fn given_in(m: &ArgMatches, id: &str) -> bool {
    m.ids().any(|i| i.as_str() == id)
        && matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
}

/// Where a setting came from, for `config check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag.
    Flag,
    /// An environment variable.
    Env,
    /// The config file.
    File,
    /// The built-in default.
    Default,
}

impl Origin {
    /// How `config check` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Flag => "command line",
            Origin::Env => "environment",
            Origin::File => "config file",
            Origin::Default => "default",
        }
    }
}

fn origin(m: &ArgMatches, id: &str, in_file: bool) -> Origin {
    let source = if m.ids().any(|i| i.as_str() == id) {
        m.value_source(id)
    } else {
        None
    };
    match source {
        Some(ValueSource::CommandLine) => Origin::Flag,
        Some(ValueSource::EnvVariable) => Origin::Env,
        _ if in_file => Origin::File,
        _ => Origin::Default,
    }
}

impl Resolved {
    /// Fills every setting the user did not give on the command line or in the
    /// environment from the file.
    pub fn apply(&self, cli: &mut Cli, top: &ArgMatches) {
        let f = &self.file;
        let sub = top.subcommand().map(|(_, m)| m);
        let given = |id: &str| given_in(top, id) || sub.is_some_and(|m| given_in(m, id));
        let conns = &mut cli.connections;
        if !given("source") && f.source.is_some() {
            conns.source = f.source.clone();
        }
        if !given("target") && f.target.is_some() {
            conns.target = f.target.clone();
        }
        if let Some(v) = f.log_format.as_ref().filter(|_| !given("log_format")) {
            conns.log_format = v.clone();
        }
        let bootstrap = |b: &mut BootstrapArgs| {
            if let Some(v) = f.jobs.filter(|_| !given("jobs")) {
                b.jobs = Some(v);
            }
            if let Some(v) = self.tables.as_ref().filter(|_| !given("tables")) {
                b.tables = Some(v.clone());
            }
            if let Some(v) = f.schemas.as_ref().filter(|_| !given("schemas")) {
                b.schemas = v.items();
            }
            if let Some(v) = f
                .exclude_schemas
                .as_ref()
                .filter(|_| !given("exclude_schemas"))
            {
                b.exclude_schemas = v.items();
            }
            if let Some(v) = f
                .exclude_tables
                .as_ref()
                .filter(|_| !given("exclude_tables"))
            {
                b.exclude_tables = v.items();
            }
            if let Some(v) = f.columns.as_ref().filter(|_| !given("columns")) {
                b.columns = v.clone();
            }
            if let Some(v) = f.row_filter.as_ref().filter(|_| !given("row_filter")) {
                b.row_filter = v.clone();
            }
            if let Some(v) = f.slot.as_ref().filter(|_| !given("slot")) {
                b.slot = v.clone();
            }
            if let Some(v) = f.publication.as_ref().filter(|_| !given("publication")) {
                b.publication = Some(v.clone());
            }
            if let Some(v) = f.state_schema.as_ref().filter(|_| !given("state_schema")) {
                b.state_schema = v.clone();
            }
            if let Some(v) = f.truncate_target.filter(|_| !given("truncate_target")) {
                b.truncate_target = v;
            }
            if let Some(v) = f
                .allow_target_triggers
                .filter(|_| !given("allow_target_triggers"))
            {
                b.allow_target_triggers = v;
            }
            if let Some(v) = f.capture_ddl.filter(|_| !given("capture_ddl")) {
                b.capture_ddl = v;
            }
            if let Some(v) = f.online.filter(|_| !given("online")) {
                b.online = v;
            }
        };
        let watermarks = |w: &mut WatermarkArgs| {
            if let Some(v) = f
                .created_column
                .as_ref()
                .filter(|_| !given("created_column"))
            {
                w.created_column = v.items();
            }
            if let Some(v) = f
                .updated_column
                .as_ref()
                .filter(|_| !given("updated_column"))
            {
                w.updated_column = v.items();
            }
            if let Some(v) = self.margin.filter(|_| !given("margin")) {
                w.margin = v;
            }
        };
        match &mut cli.command {
            Command::Bootstrap(b) => bootstrap(b),
            Command::Run(r) => {
                bootstrap(&mut r.bootstrap);
                watermarks(&mut r.watermarks);
                if let Some(v) = self.status_interval.filter(|_| !given("status_interval")) {
                    r.status_interval = v;
                }
                if let Some(v) = self.metrics_addr.filter(|_| !given("metrics_addr")) {
                    r.metrics_addr = Some(v);
                }
                if let Some(v) = self.healthz_max_lag.filter(|_| !given("healthz_max_lag")) {
                    r.healthz_max_lag = v;
                }
                if let Some(v) = self.max_retained_wal.filter(|_| !given("max_retained_wal")) {
                    r.max_retained_wal = Some(v);
                }
                if let Some(v) = self.sync_sequences.filter(|_| !given("sync_sequences")) {
                    r.sync_sequences = Some(v);
                }
                if let Some(v) = f
                    .max_stream_connections
                    .filter(|_| !given("max_stream_connections"))
                {
                    r.max_stream_connections = u32::try_from(v).unwrap_or(u32::MAX);
                }
                if let Some(v) = f.apply_lanes.filter(|_| !given("apply_lanes")) {
                    r.apply_lanes = u32::try_from(v).unwrap_or(1);
                }
                if let Some(v) = f
                    .keep_dropped_columns
                    .filter(|_| !given("keep_dropped_columns"))
                {
                    r.keep_dropped_columns = v;
                }
            }
            Command::CatchUp(c) => {
                bootstrap(&mut c.bootstrap);
                watermarks(&mut c.watermarks);
                if let Some(v) = self.poll.filter(|_| !given("poll")) {
                    c.poll = Some(v);
                }
            }
            Command::Verify(v) => {
                if let Some(x) = f.jobs.filter(|_| !given("jobs")) {
                    v.jobs = Some(x);
                }
                if let Some(x) = self.tables.as_ref().filter(|_| !given("tables")) {
                    v.tables = Some(x.clone());
                }
                if let Some(x) = f.slot.as_ref().filter(|_| !given("slot")) {
                    v.slot = x.clone();
                }
                if let Some(x) = f.state_schema.as_ref().filter(|_| !given("state_schema")) {
                    v.state_schema = x.clone();
                }
                if let Some(x) = f
                    .allow_target_triggers
                    .filter(|_| !given("allow_target_triggers"))
                {
                    v.allow_target_triggers = x;
                }
            }
            Command::Status(s) => {
                if let Some(x) = f.state_schema.as_ref().filter(|_| !given("state_schema")) {
                    s.state_schema = x.clone();
                }
                if let Some(x) = self
                    .warn_retained_bytes
                    .filter(|_| !given("warn_retained_bytes"))
                {
                    s.warn_retained_bytes = x;
                }
                if let Some(v) = f
                    .created_column
                    .as_ref()
                    .filter(|_| !given("created_column"))
                {
                    s.created_column = v.items();
                }
                if let Some(v) = f
                    .updated_column
                    .as_ref()
                    .filter(|_| !given("updated_column"))
                {
                    s.updated_column = v.items();
                }
            }
            Command::Teardown(t) => {
                if let Some(x) = f.slot.as_ref().filter(|_| !given("slot")) {
                    t.slot = x.clone();
                }
                if let Some(x) = f.publication.as_ref().filter(|_| !given("publication")) {
                    t.publication = Some(x.clone());
                }
                if let Some(x) = f.state_schema.as_ref().filter(|_| !given("state_schema")) {
                    t.state_schema = x.clone();
                }
            }
            Command::Tables(t) => {
                if let Some(x) = f.slot.as_ref().filter(|_| !given("slot")) {
                    t.slot = x.clone();
                }
                if let Some(x) = f.state_schema.as_ref().filter(|_| !given("state_schema")) {
                    t.state_schema = x.clone();
                }
                if let Some(x) = f
                    .allow_target_triggers
                    .filter(|_| !given("allow_target_triggers"))
                {
                    t.allow_target_triggers = x;
                }
            }
            Command::Switchover(x) => {
                if let Some(v) = f.slot.as_ref().filter(|_| !given("slot")) {
                    x.slot = v.clone();
                }
                if let Some(v) = f.state_schema.as_ref().filter(|_| !given("state_schema")) {
                    x.state_schema = v.clone();
                }
                if let Some(v) = self.max_lag.filter(|_| !given("max_lag")) {
                    x.max_lag = v;
                }
                if let Some(v) = self.fence.filter(|_| !given("fence")) {
                    x.fence = v;
                }
                if let Some(v) = self.fence_timeout.filter(|_| !given("fence_timeout")) {
                    x.fence_timeout = v;
                }
                if let Some(v) = f.sequence_gap.filter(|_| !given("sequence_gap")) {
                    x.sequence_gap = v;
                }
                if let Some(v) = self.max_downtime.filter(|_| !given("max_downtime")) {
                    x.max_downtime = v;
                }
            }
            Command::Config(_) | Command::Demo(_) => {}
        }
    }

    /// The settings `config check` prints: every key with its effective value
    /// (passwords redacted) and where it came from. Checks that the effective
    /// source and target URLs parse, wherever they came from.
    pub fn report(&self, cli: &Cli, top: &ArgMatches) -> Result<String> {
        let f = &self.file;
        let mut lines: Vec<(String, String, Origin)> = Vec::new();
        for (key, value, side, in_file) in [
            (
                "source",
                &cli.connections.source,
                Side::Source,
                f.source.is_some(),
            ),
            (
                "target",
                &cli.connections.target,
                Side::Target,
                f.target.is_some(),
            ),
        ] {
            let shown = match value {
                Some(url) => {
                    Endpoint::parse(side, url)?;
                    redact(url)
                }
                None => "(not set)".to_string(),
            };
            lines.push((key.to_string(), shown, origin(top, key, in_file)));
        }
        lines.push((
            "log_format".into(),
            cli.connections.log_format.clone(),
            origin(top, "log_format", f.log_format.is_some()),
        ));
        let mut plain = |key: &str, value: Option<String>, default: &str| {
            let o = if value.is_some() {
                Origin::File
            } else {
                Origin::Default
            };
            lines.push((
                key.to_string(),
                value.unwrap_or_else(|| default.to_string()),
                o,
            ));
        };
        plain("slot", f.slot.clone(), "walshuttle");
        plain(
            "publication",
            f.publication.clone(),
            "recorded for the pipeline, else the slot's name",
        );
        plain("state_schema", f.state_schema.clone(), "walshuttle");
        plain("jobs", f.jobs.map(|j| j.to_string()), "number of CPUs");
        plain(
            "max_stream_connections",
            f.max_stream_connections.map(|n| n.to_string()),
            "4",
        );
        plain(
            "apply_lanes",
            f.apply_lanes.map(|n| n.to_string()),
            &crate::run::DEFAULT_APPLY_LANES.to_string(),
        );
        plain(
            "keep_dropped_columns",
            f.keep_dropped_columns.map(|b| b.to_string()),
            "false",
        );
        plain(
            "tables",
            self.tables.as_ref().map(|t| t.join(", ")),
            "every ordinary table outside system schemas",
        );
        for (key, list) in [
            ("schemas", &f.schemas),
            ("exclude_schemas", &f.exclude_schemas),
            ("exclude_tables", &f.exclude_tables),
        ] {
            plain(key, list.as_ref().map(|l| l.items().join(", ")), "none");
        }
        for (key, list) in [("columns", &f.columns), ("row_filter", &f.row_filter)] {
            plain(key, list.as_ref().map(|l| l.join("; ")), "none");
        }
        plain(
            "truncate_target",
            f.truncate_target.map(|b| b.to_string()),
            "false",
        );
        plain(
            "allow_target_triggers",
            f.allow_target_triggers.map(|b| b.to_string()),
            "false",
        );
        plain("capture_ddl", f.capture_ddl.map(|b| b.to_string()), "false");
        plain("online", f.online.map(|b| b.to_string()), "false");
        plain(
            "created_column",
            f.created_column.as_ref().map(|l| l.items().join(", ")),
            "created_at",
        );
        plain(
            "updated_column",
            f.updated_column.as_ref().map(|l| l.items().join(", ")),
            "updated_at",
        );
        plain("margin", self.margin.map(|d| format!("{d:?}")), "300s");
        plain("poll", self.poll.map(|d| format!("{d:?}")), "(off)");
        plain(
            "status_interval",
            self.status_interval.map(|s| format!("{s}s")),
            "1s",
        );
        plain(
            "metrics_addr",
            self.metrics_addr.map(|a| a.to_string()),
            "(off)",
        );
        plain(
            "healthz_max_lag",
            self.healthz_max_lag.map(|d| format!("{d:?}")),
            "60s",
        );
        plain(
            "warn_retained_bytes",
            self.warn_retained_bytes.map(|b| b.to_string()),
            "1073741824",
        );
        plain(
            "max_retained_wal",
            self.max_retained_wal.map(|b| b.to_string()),
            "(off)",
        );
        plain(
            "sync_sequences",
            self.sync_sequences.map(|d| format!("{d:?}")),
            "(off)",
        );
        plain("max_lag", self.max_lag.map(|d| format!("{d:?}")), "5s");
        plain("fence", f.fence.clone(), "read-only");
        plain(
            "fence_timeout",
            self.fence_timeout.map(|d| format!("{d:?}")),
            "10s",
        );
        plain("sequence_gap", f.sequence_gap.map(|g| g.to_string()), "0");
        plain(
            "max_downtime",
            self.max_downtime.map(|d| format!("{d:?}")),
            "30s",
        );
        let width = lines.iter().map(|(k, _, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v, o) in lines {
            out.push_str(&format!("{k:<width$} = {v}  ({})\n", o.as_str()));
        }
        Ok(out.trim_end().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let bad: std::result::Result<FileConfig, _> = toml::from_str("slott = \"x\"");
        assert!(bad.is_err());
        let file: FileConfig = toml::from_str(
            "margin = \"5m\"\nstatus_interval = 2\nwarn_retained_bytes = \"2GiB\"\ntables = \"a, b.c\"",
        )
        .unwrap();
        let r = file.resolve().unwrap();
        assert_eq!(r.margin, Some(Duration::from_secs(300)));
        assert_eq!(r.status_interval, Some(2.0));
        assert_eq!(r.warn_retained_bytes, Some(2 << 30));
        assert_eq!(r.tables, Some(vec!["a".to_string(), "b.c".to_string()]));
        let file: FileConfig =
            toml::from_str("fence = \"none\"\nmax_downtime = \"45s\"\nsequence_gap = 100").unwrap();
        let r = file.resolve().unwrap();
        assert_eq!(r.fence, Some(crate::switchover::FenceMethod::None));
        assert_eq!(r.max_downtime, Some(Duration::from_secs(45)));
        let file: FileConfig = toml::from_str("fence = \"off\"").unwrap();
        assert!(file.resolve().is_err());
        let file: FileConfig = toml::from_str("margin = \"5 fortnights\"").unwrap();
        assert!(file.resolve().is_err());
        let file: FileConfig =
            toml::from_str("source = \"postgresql://u:pw@h:notaport/db\"").unwrap();
        let err = file.resolve().unwrap_err().to_string();
        assert!(err.contains("source") && !err.contains("pw@"), "{err}");
    }
}
