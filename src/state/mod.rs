//! The `walshuttle.*` schema on the target: what makes every step resumable.
//!
//! State lives in the same database as the replicated data so it can commit in the
//! same transaction as the data it describes: a chunk's rows and its `done` mark, a
//! range rewritten outside the stream and its copy position, an applied transaction
//! and the LSN it reached. This module owns every read and write of that schema; the
//! rest of walshuttle calls it and never writes SQL against the state tables itself.
//!
//! The states, and who moves them:
//!
//! - A pipeline's [`Phase`]: `creating_slot` → `bootstrapping` → `copied` →
//!   `streaming`, and `catching_up` (from any phase after `copied`) → `copied` when
//!   the slot was lost or a catch-up was interrupted.
//! - A table's [`TableState`]: `copying` (chunks left) → `ready`; `repairing` while a
//!   catch-up has not yet proven it equal.
//! - A chunk: planned → copied (`done_at`), with the snapshot it was read under.
//! - A copy position: written with the rows it describes, forgotten once the stream
//!   has passed its snapshot (see [`crate::positions`]).
//!
//! The schema is versioned ([`schema::MIGRATIONS`]); a newer binary upgrades it in
//! place, an older one refuses to touch it.

pub mod schema;

use anyhow::{bail, Result};
use tokio_postgres::{Client, GenericClient};

use crate::pg::{quote_ident, quote_literal, Lsn, PgResultExt, QualifiedName};
use crate::positions::SnapshotView;

/// Every table of the state schema, those holding rows of other tables' pipelines
/// after those they refer to.
pub const STATE_TABLES: [&str; 10] = [
    "held_changes",
    "copy_position_keys",
    "copy_positions",
    "snapshots",
    "pipeline_tables",
    "chunks",
    "progress",
    "watermarks",
    "pipelines",
    "schema_version",
];

/// Version of the state schema this binary writes.
pub const STATE_VERSION: i32 = schema::MIGRATIONS.len() as i32;

/// Which tables a pipeline was asked to carry when it was bootstrapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Bootstrapped before walshuttle recorded it.
    Unknown,
    /// Every ordinary table outside system schemas (no `--tables`).
    EveryTable,
    /// `--tables` as given (a partitioned table stands for its partitions).
    Named(Vec<QualifiedName>),
}

/// Where a pipeline stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The slot is being created; no data copied yet.
    CreatingSlot,
    /// Chunks are being copied.
    Bootstrapping,
    /// Every table copied and indexed; streaming may start.
    Copied,
    /// `run` is applying changes from the slot.
    Streaming,
    /// A catch-up (gap repair) is under way and must finish before streaming.
    CatchingUp,
}

impl Phase {
    /// The text stored in `pipelines.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::CreatingSlot => "creating_slot",
            Phase::Bootstrapping => "bootstrapping",
            Phase::Copied => "copied",
            Phase::Streaming => "streaming",
            Phase::CatchingUp => "catching_up",
        }
    }

    fn parse(text: &str) -> Result<Phase> {
        Ok(match text {
            "creating_slot" => Phase::CreatingSlot,
            "bootstrapping" => Phase::Bootstrapping,
            "copied" => Phase::Copied,
            "streaming" => Phase::Streaming,
            "catching_up" => Phase::CatchingUp,
            other => bail!("unknown pipeline phase `{other}` in the state schema"),
        })
    }

    /// Whether the initial copy is finished (streaming may start once any catch-up
    /// is done).
    pub fn copied(self) -> bool {
        matches!(self, Phase::Copied | Phase::Streaming | Phase::CatchingUp)
    }
}

/// Where one table of a pipeline stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableState {
    /// Planned chunks are not all copied yet.
    Copying,
    /// Equal to the source as of its copy positions; the stream keeps it so.
    Ready,
    /// A catch-up has not yet compared and repaired it.
    Repairing,
    /// Its rows were rewritten on the source in a way the stream cannot carry (a
    /// column added with a volatile default): it is copied again, while the others
    /// stream.
    Resync,
    /// Being copied while the pipeline streams (`walshuttle tables add|resync`): the
    /// stream holds its changes in `held_changes` meanwhile.
    Held,
    /// Copied under a recorded snapshot: the stream applies the changes it held
    /// (those the snapshot did not see), then the table is `ready`.
    Copied,
}

impl TableState {
    /// The text stored in `pipeline_tables.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            TableState::Copying => "copying",
            TableState::Ready => "ready",
            TableState::Repairing => "repairing",
            TableState::Resync => "resync",
            TableState::Held => "held",
            TableState::Copied => "copied",
        }
    }

    fn parse(text: &str) -> TableState {
        match text {
            "copying" => TableState::Copying,
            "repairing" => TableState::Repairing,
            "resync" => TableState::Resync,
            "held" => TableState::Held,
            "copied" => TableState::Copied,
            _ => TableState::Ready,
        }
    }
}

/// One pipeline's row in `pipelines`.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// Pipeline name: the slot name.
    pub name: String,
    /// Publication on the source.
    pub publication: String,
    /// Current phase.
    pub phase: Phase,
    /// Where the stream of the pipeline's current slot begins: the slot's consistent
    /// point when it was created. Rows copied under the slot's own exported snapshot
    /// need no copy position: the stream starts exactly after them.
    pub stream_start_lsn: Option<Lsn>,
    /// Tables of this pipeline, in plan order.
    pub tables: Vec<QualifiedName>,
    /// Why `run` stopped on an error that retrying cannot fix, if it did.
    pub stop_reason: Option<String>,
}

/// One table of a pipeline with its state.
#[derive(Clone, Debug)]
pub struct TableEntry {
    /// The table.
    pub name: QualifiedName,
    /// Its state.
    pub state: TableState,
    /// The integer key column its chunks are ranges of, if it is chunked by key.
    pub chunk_column: Option<String>,
}

/// One chunk of the bootstrap plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRow {
    /// Table the chunk belongs to.
    pub table: QualifiedName,
    /// Position of the chunk within its table.
    pub chunk_no: i32,
    /// What rows it holds.
    pub range: ChunkRange,
    /// Whether it was copied.
    pub done: bool,
    /// The snapshot it was copied under: `None` for the slot's own snapshot (or not
    /// copied yet).
    pub snapshot_id: Option<i64>,
    /// Whether it was copied under a snapshot whose visibility is not recorded (a
    /// resume by the first release): such a copy cannot be trusted row by row.
    pub inexact: bool,
}

/// The rows of one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkRange {
    /// Heap blocks `[start, end)` (open end: `None`); valid only under one snapshot.
    Blocks {
        /// First block.
        start: i64,
        /// End block, exclusive.
        end: Option<i64>,
    },
    /// Key values `[lo, hi)` of the table's integer chunk column (open ends `None`):
    /// a row never leaves its key range, so a copied chunk stays valid under any
    /// later snapshot.
    Keys {
        /// Inclusive lower bound.
        lo: Option<i64>,
        /// Exclusive upper bound.
        hi: Option<i64>,
    },
}

/// What a stored copy position covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredScope {
    /// The whole table.
    Table,
    /// `[lo, hi)` of an integer column.
    Range {
        /// The column.
        column: String,
        /// Inclusive lower bound.
        lo: Option<i64>,
        /// Exclusive upper bound.
        hi: Option<i64>,
    },
    /// Individual identity keys, each as the text of its columns (source output).
    Keys(Vec<Vec<String>>),
}

/// A copy position as stored, with its snapshot.
#[derive(Clone, Debug)]
pub struct StoredPosition {
    /// Order of writing.
    pub id: i64,
    /// The table.
    pub table: QualifiedName,
    /// What it covers.
    pub scope: StoredScope,
    /// The snapshot its rows were read under.
    pub snapshot: SnapshotView,
}

/// Handle on the state schema of one target database.
#[derive(Clone, Debug)]
pub struct StateStore {
    schema: String,
}

impl StateStore {
    /// A store in `schema` (default `walshuttle`).
    pub fn new(schema: &str) -> Self {
        StateStore {
            schema: schema.to_string(),
        }
    }

    /// A store in `schema` on the target behind `client`, refusing a state schema
    /// written by a newer walshuttle before anything reads or writes it.
    pub async fn open(client: &Client, schema: &str) -> Result<Self> {
        let store = StateStore::new(schema);
        store.check_version(client).await?;
        Ok(store)
    }

    /// A store in `schema` whose state, if a release before this one wrote it, is
    /// upgraded in place first (commands that write state); refuses a newer one.
    pub async fn open_upgrading(client: &Client, schema: &str) -> Result<Self> {
        let store = StateStore::open(client, schema).await?;
        if store.installed_version(client).await?.is_some() {
            store.migrate(client).await?;
        }
        Ok(store)
    }

    /// Refuses a state schema older than this binary's (read-only commands, which
    /// do not upgrade it).
    pub async fn check_current(&self, client: &impl GenericClient) -> Result<()> {
        self.check_version(client).await?;
        match self.installed_version(client).await? {
            Some(v) if v < STATE_VERSION => bail!(
                "the state schema {} on the target was written by an older walshuttle (version {v}): run `walshuttle run` once to upgrade it",
                self.schema
            ),
            _ => Ok(()),
        }
    }

    /// The schema name, unquoted.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Quoted, schema-qualified name of a state table.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(name))
    }

    /// Reads the installed version, `None` when the schema is absent.
    pub async fn installed_version(&self, client: &impl GenericClient) -> Result<Option<i32>> {
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = 'schema_version'",
                &[&self.schema],
            )
            .await
            .pg_context(|| "reading the state schema version on the target".into())?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let row = client
            .query_opt(
                &format!("SELECT max(version) FROM {}", self.table("schema_version")),
                &[],
            )
            .await
            .pg_context(|| "reading the state schema version on the target".into())?;
        Ok(row.and_then(|r| r.get::<_, Option<i32>>(0)))
    }

    /// Refuses a state schema written by a newer walshuttle, without changing anything.
    pub async fn check_version(&self, client: &impl GenericClient) -> Result<()> {
        if let Some(v) = self.installed_version(client).await? {
            if v > STATE_VERSION {
                bail!(
                    "the state schema {} on the target is version {v}, written by a newer walshuttle (this one knows up to {STATE_VERSION}): upgrade walshuttle",
                    self.schema
                );
            }
        }
        Ok(())
    }

    /// Creates the state schema, or upgrades an older one in place, to
    /// [`STATE_VERSION`], one transaction per version.
    pub async fn migrate(&self, client: &Client) -> Result<()> {
        self.check_version(client).await?;
        let lock = format!(
            "SELECT pg_advisory_xact_lock(hashtext('walshuttle state ' || {}))",
            quote_literal(&self.schema)
        );
        let s = quote_ident(&self.schema);
        // One log line for the whole climb: "created" on a fresh target,
        // "upgraded from N" on an older schema.
        let first = self.installed_version(client).await?.unwrap_or(0);
        loop {
            let installed = self.installed_version(client).await?.unwrap_or(0);
            if installed >= STATE_VERSION {
                if first == 0 && installed > 0 {
                    tracing::info!(schema = %self.schema, version = installed, "created the state schema");
                } else if first < installed {
                    tracing::info!(schema = %self.schema, from = first, to = installed, "upgraded the state schema");
                }
                return Ok(());
            }
            let step = schema::MIGRATIONS[installed as usize].replace("{s}", &s);
            // Read the version again under the lock: a concurrent walshuttle may
            // have upgraded meanwhile.
            client
                .batch_execute(&format!("BEGIN; {lock};"))
                .await
                .pg_context(|| {
                    format!("upgrading the state schema {} on the target", self.schema)
                })?;
            let again = self.installed_version(client).await?.unwrap_or(0);
            if again != installed {
                client
                    .batch_execute("COMMIT")
                    .await
                    .pg_context(|| "upgrading the state schema".into())?;
                continue;
            }
            match client.batch_execute(&format!("{step}; COMMIT;")).await {
                Ok(()) => {
                    tracing::debug!(schema = %self.schema, from = installed, to = installed + 1, "state schema migration step");
                }
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(e).pg_context(|| {
                        format!(
                            "upgrading the state schema {} on the target to version {}",
                            self.schema,
                            installed + 1
                        )
                    });
                }
            }
        }
    }

    // ----- pipelines ---------------------------------------------------------

    /// Names of every pipeline recorded in this schema.
    pub async fn pipeline_names(&self, client: &impl GenericClient) -> Result<Vec<String>> {
        Ok(client
            .query(
                &format!(
                    "SELECT pipeline FROM {} ORDER BY pipeline",
                    self.table("pipelines")
                ),
                &[],
            )
            .await
            .pg_context(|| "listing the pipelines on the target".into())?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Reads a pipeline's row, `None` when absent.
    pub async fn pipeline(
        &self,
        client: &impl GenericClient,
        name: &str,
    ) -> Result<Option<Pipeline>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT pipeline, publication, phase, stream_start_lsn::text, stop_reason \
                     FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&name],
            )
            .await
            .pg_context(|| format!("reading pipeline {name} from the state schema"))?;
        let Some(row) = row else { return Ok(None) };
        let tables = self
            .table_entries(client, name)
            .await?
            .into_iter()
            .map(|t| t.name)
            .collect();
        Ok(Some(Pipeline {
            name: row.get(0),
            publication: row.get(1),
            phase: Phase::parse(row.get(2))?,
            stream_start_lsn: row
                .get::<_, Option<String>>(3)
                .and_then(|s| s.parse::<Lsn>().ok()),
            tables,
            stop_reason: row.get(4),
        }))
    }

    /// A pipeline's row when the state schema exists and holds one; `None` otherwise
    /// (a target walshuttle never wrote to).
    pub async fn existing_pipeline(
        &self,
        client: &impl GenericClient,
        name: &str,
    ) -> Result<Option<Pipeline>> {
        match self.installed_version(client).await? {
            Some(v) if v >= STATE_VERSION => self.pipeline(client, name).await,
            Some(_) => {
                bail!(
                    "the state schema {} on the target was written by an older walshuttle: run `walshuttle run` or `walshuttle bootstrap` once to upgrade it",
                    self.schema
                )
            }
            None => Ok(None),
        }
    }

    /// Inserts or replaces a pipeline's row (its table list is written by
    /// [`StateStore::set_tables`]).
    pub async fn save_pipeline(&self, client: &impl GenericClient, p: &Pipeline) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} AS p (pipeline, publication, phase, stream_start_lsn, stop_reason) \
                     VALUES ($1, $2, $3, $4::text::pg_lsn, $5) \
                     ON CONFLICT (pipeline) DO UPDATE SET publication = EXCLUDED.publication, phase = EXCLUDED.phase, \
                       stream_start_lsn = EXCLUDED.stream_start_lsn, stop_reason = EXCLUDED.stop_reason, updated_at = now()",
                    self.table("pipelines")
                ),
                &[
                    &p.name,
                    &p.publication,
                    &p.phase.as_str(),
                    &p.stream_start_lsn.map(|l| l.to_string()),
                    &p.stop_reason,
                ],
            )
            .await
            .pg_context(|| format!("saving pipeline {} in the state schema", p.name))?;
        Ok(())
    }

    /// Moves a pipeline to `phase`.
    pub async fn set_phase(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        phase: Phase,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET phase = $2, updated_at = now() WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline, &phase.as_str()],
            )
            .await
            .pg_context(|| format!("recording the phase of pipeline {pipeline}"))?;
        Ok(())
    }

    /// Records the WAL budget `run` watches the slot against (`--max-retained-wal`),
    /// for `status`.
    pub async fn set_wal_budget(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        budget: Option<u64>,
    ) -> Result<()> {
        let budget = budget.map(|b| b.min(i64::MAX as u64) as i64);
        self.set_pipeline_column(
            client,
            pipeline,
            "wal_budget_bytes",
            &budget,
            "the WAL budget",
        )
        .await
    }

    /// Sets one column of a pipeline's row when it differs (no write otherwise).
    async fn set_pipeline_column(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        column: &str,
        value: &(dyn tokio_postgres::types::ToSql + Sync),
        what: &str,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET {c} = $2, updated_at = now() WHERE pipeline = $1 \
                     AND {c} IS DISTINCT FROM $2",
                    self.table("pipelines"),
                    c = quote_ident(column)
                ),
                &[&pipeline, value],
            )
            .await
            .pg_context(|| format!("recording {what} of pipeline {pipeline}"))?;
        Ok(())
    }

    /// The WAL budget `run` last recorded for a pipeline.
    pub async fn wal_budget(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<u64>> {
        Ok(client
            .query_opt(
                &format!(
                    "SELECT wal_budget_bytes FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the WAL budget of pipeline {pipeline}"))?
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|b| b.max(0) as u64))
    }

    /// Records (or, with `None`, clears) why `run` stopped for good.
    pub async fn set_stop_reason(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        self.set_pipeline_column(client, pipeline, "stop_reason", &reason, "why it stopped")
            .await
    }

    /// Records the pipeline's table filter (`--schemas`, `--exclude-*`), or none.
    pub async fn set_table_filter(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        filter: &crate::selection::TableFilter,
    ) -> Result<()> {
        let text = (!filter.is_empty()).then(|| filter.to_json());
        self.set_pipeline_column(client, pipeline, "table_filter", &text, "the table filter")
            .await
    }

    /// The pipeline's table filter; empty when none was given.
    pub async fn table_filter(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<crate::selection::TableFilter> {
        let text: Option<String> = client
            .query_opt(
                &format!(
                    "SELECT table_filter FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the table filter of pipeline {pipeline}"))?
            .and_then(|r| r.get(0));
        match text {
            Some(t) => crate::selection::TableFilter::from_json(&t),
            None => Ok(Default::default()),
        }
    }

    /// Records (or, with `None`, clears) why `run` is retrying while it retries
    /// (a server down or unreachable), for `status`; `since` is kept while the
    /// reason changes.
    pub async fn set_retrying(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET retrying = $2, \
                     retrying_since = CASE WHEN $2::text IS NULL THEN NULL ELSE coalesce(retrying_since, now()) END \
                     WHERE pipeline = $1 AND retrying IS DISTINCT FROM $2",
                    self.table("pipelines")
                ),
                &[&pipeline, &reason],
            )
            .await
            .pg_context(|| format!("recording why pipeline {pipeline} retries"))?;
        Ok(())
    }

    /// Why `run` retries, and for how long (whole seconds), if it recorded that it
    /// does.
    pub async fn retrying(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<(String, i64)>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT retrying, extract(epoch FROM now() - retrying_since)::bigint \
                     FROM {} WHERE pipeline = $1 AND retrying IS NOT NULL",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading why pipeline {pipeline} retries"))?;
        Ok(row.map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0))))
    }

    /// Records the phase of a `walshuttle switchover` of the pipeline (`fencing`,
    /// `draining`, ..., `done`, `aborted`) with a detail line, for `status`.
    pub async fn set_switchover(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        phase: &str,
        detail: Option<&str>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET switchover_phase = $2, switchover_detail = $3, switchover_at = now() \
                     WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline, &phase, &detail],
            )
            .await
            .pg_context(|| format!("recording the switchover phase of pipeline {pipeline}"))?;
        Ok(())
    }

    /// The last recorded switchover of the pipeline: (phase, detail, when), `None`
    /// when it never had one.
    pub async fn switchover(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<(String, Option<String>, String)>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT switchover_phase, switchover_detail, switchover_at::text FROM {} \
                     WHERE pipeline = $1 AND switchover_phase IS NOT NULL",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the switchover phase of pipeline {pipeline}"))?;
        Ok(row.map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get::<_, Option<String>>(2).unwrap_or_default(),
            )
        }))
    }

    /// Records which tables the pipeline was asked to carry: `--tables`, or every
    /// table (`None`).
    pub async fn set_selection(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        tables: Option<&[QualifiedName]>,
    ) -> Result<()> {
        let names: Vec<String> = tables
            .unwrap_or_default()
            .iter()
            .map(QualifiedName::quoted)
            .collect();
        client
            .execute(
                &format!(
                    "UPDATE {} SET selection = $2 WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline, &names],
            )
            .await
            .pg_context(|| format!("recording the table selection of pipeline {pipeline}"))?;
        Ok(())
    }

    /// Which tables the pipeline was asked to carry.
    pub async fn selection(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Selection> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT selection FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the table selection of pipeline {pipeline}"))?;
        let Some(names) = row.and_then(|r| r.get::<_, Option<Vec<String>>>(0)) else {
            return Ok(Selection::Unknown);
        };
        if names.is_empty() {
            return Ok(Selection::EveryTable);
        }
        let mut parsed = Vec::with_capacity(names.len());
        for n in names {
            parsed.push(QualifiedName::parse(&n).map_err(|e| {
                anyhow::anyhow!("pipeline {pipeline} records an unreadable table name: {e}")
            })?);
        }
        Ok(Selection::Named(parsed))
    }

    // ----- tables --------------------------------------------------------------

    /// Replaces a pipeline's table list.
    pub async fn set_tables(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        tables: &[TableEntry],
    ) -> Result<()> {
        let ctx = || format!("saving the tables of pipeline {pipeline}");
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE pipeline = $1",
                    self.table("pipeline_tables")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(ctx)?;
        let schemas: Vec<&str> = tables.iter().map(|t| t.name.schema.as_str()).collect();
        let names: Vec<&str> = tables.iter().map(|t| t.name.name.as_str()).collect();
        let states: Vec<&str> = tables.iter().map(|t| t.state.as_str()).collect();
        let columns: Vec<Option<&str>> = tables.iter().map(|t| t.chunk_column.as_deref()).collect();
        client
            .execute(
                &format!(
                    "INSERT INTO {} (pipeline, schema_name, table_name, position, state, chunk_column) \
                     SELECT $1, s, t, (o - 1)::int, st, c \
                     FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS u(s, t, st, c, o)",
                    self.table("pipeline_tables")
                ),
                &[&pipeline, &schemas, &names, &states, &columns],
            )
            .await
            .pg_context(ctx)?;
        Ok(())
    }

    /// Adds `table` to a pipeline (at the end of its list) or sets its state.
    pub async fn put_table(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
        state: TableState,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {t} (pipeline, schema_name, table_name, position, state) \
                     SELECT $1, $2, $3, coalesce(max(position) + 1, 0), $4 FROM {t} WHERE pipeline = $1 \
                     ON CONFLICT (pipeline, schema_name, table_name) DO UPDATE SET state = EXCLUDED.state",
                    t = self.table("pipeline_tables")
                ),
                &[&pipeline, &table.schema, &table.name, &state.as_str()],
            )
            .await
            .pg_context(|| format!("recording {table} in pipeline {pipeline}"))?;
        Ok(())
    }

    /// Forgets every change held for a pipeline's tables (its stream starts afresh
    /// from a new slot, after everything they describe).
    pub async fn clear_held(&self, client: &impl GenericClient, pipeline: &str) -> Result<()> {
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE pipeline = $1",
                    self.table("held_changes")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("clearing the held changes of pipeline {pipeline}"))?;
        Ok(())
    }

    /// Removes `table` from a pipeline, with its plan, positions and held changes.
    pub async fn remove_table(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
    ) -> Result<()> {
        for t in ["pipeline_tables", "chunks", "held_changes"] {
            client
                .execute(
                    &format!(
                        "DELETE FROM {} WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                        self.table(t)
                    ),
                    &[&pipeline, &table.schema, &table.name],
                )
                .await
                .pg_context(|| format!("removing {table} from pipeline {pipeline}"))?;
        }
        self.clear_positions(client, pipeline, Some(table)).await
    }

    /// Follows a table renamed on the source (`--capture-ddl`): every row of the
    /// pipeline that names it takes the new name (inside the caller's transaction).
    pub async fn rename_table(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        from: &QualifiedName,
        to: &QualifiedName,
    ) -> Result<()> {
        for t in [
            "pipeline_tables",
            "chunks",
            "held_changes",
            "copy_positions",
            "watermarks",
        ] {
            client
                .execute(
                    &format!(
                        "UPDATE {} SET schema_name = $4, table_name = $5 \
                         WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                        self.table(t)
                    ),
                    &[&pipeline, &from.schema, &from.name, &to.schema, &to.name],
                )
                .await
                .pg_context(|| {
                    format!("recording that {from} is now {to} in pipeline {pipeline}")
                })?;
        }
        Ok(())
    }

    /// Records that a pipeline captures DDL on the source (`--capture-ddl`): `run`
    /// then asks for the event trigger's messages.
    pub async fn set_capture_ddl(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        on: bool,
    ) -> Result<()> {
        self.set_pipeline_column(
            client,
            pipeline,
            "capture_ddl",
            &on,
            "whether it captures DDL",
        )
        .await
    }

    /// Whether a pipeline captures DDL on the source.
    pub async fn capture_ddl(&self, client: &impl GenericClient, pipeline: &str) -> Result<bool> {
        Ok(client
            .query_opt(
                &format!(
                    "SELECT capture_ddl FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading whether pipeline {pipeline} captures DDL"))?
            .is_some_and(|r| r.get::<_, bool>(0)))
    }

    /// A pipeline's tables with their states, in plan order.
    pub async fn table_entries(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Vec<TableEntry>> {
        Ok(client
            .query(
                &format!(
                    "SELECT schema_name, table_name, state, chunk_column FROM {} \
                     WHERE pipeline = $1 ORDER BY position",
                    self.table("pipeline_tables")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the tables of pipeline {pipeline}"))?
            .iter()
            .map(|r| TableEntry {
                name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                state: TableState::parse(r.get(2)),
                chunk_column: r.get(3),
            })
            .collect())
    }

    /// Moves one table (or, with `None`, every table) of a pipeline to `state`.
    pub async fn set_table_state(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: Option<&QualifiedName>,
        state: TableState,
    ) -> Result<()> {
        let (schema, name) = match table {
            Some(t) => (Some(t.schema.as_str()), Some(t.name.as_str())),
            None => (None, None),
        };
        client
            .execute(
                &format!(
                    "UPDATE {} SET state = $4 WHERE pipeline = $1 \
                     AND ($2::text IS NULL OR (schema_name = $2 AND table_name = $3))",
                    self.table("pipeline_tables")
                ),
                &[&pipeline, &schema, &name, &state.as_str()],
            )
            .await
            .pg_context(|| format!("recording the state of the tables of pipeline {pipeline}"))?;
        Ok(())
    }

    /// Whether the state schema holds anything about `table` for this pipeline
    /// (then walshuttle owns that table's rows on the target).
    pub async fn owns_table(
        &self,
        client: &Client,
        pipeline: &str,
        table: &QualifiedName,
    ) -> Result<bool> {
        if self.installed_version(client).await?.is_none() {
            return Ok(false);
        }
        Ok(client
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                    self.table("pipeline_tables")
                ),
                &[&pipeline, &table.schema, &table.name],
            )
            .await
            .pg_context(|| format!("reading the state of {table}"))?
            .is_some())
    }

    // ----- progress -------------------------------------------------------------

    /// Sets the applied position of a pipeline (inside the caller's transaction).
    pub async fn set_progress(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        applied: Lsn,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (pipeline, applied_lsn) VALUES ($1, $2::text::pg_lsn) \
                     ON CONFLICT (pipeline) DO UPDATE SET applied_lsn = EXCLUDED.applied_lsn, updated_at = now()",
                    self.table("progress")
                ),
                &[&pipeline, &applied.to_string()],
            )
            .await
            .pg_context(|| format!("recording the applied position of pipeline {pipeline}"))?;
        Ok(())
    }

    /// SQL marking `tables` to be copied again ([`TableState::Resync`]), run in the
    /// apply transaction whose changes revealed it, so the need survives a crash.
    pub fn resync_sql(&self, pipeline: &str, tables: &[QualifiedName]) -> String {
        tables
            .iter()
            .map(|t| {
                format!(
                    "UPDATE {} SET state = 'resync' WHERE pipeline = {} AND schema_name = {} AND table_name = {}",
                    self.table("pipeline_tables"),
                    quote_literal(pipeline),
                    quote_literal(&t.schema),
                    quote_literal(&t.name)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The SQL each apply transaction runs before COMMIT: the progress row moves to
    /// the end of the last source transaction it applied (never backwards).
    pub fn progress_sql(&self, pipeline: &str, end_lsn: Lsn, commit_unix_micros: i64) -> String {
        let secs = commit_unix_micros as f64 / 1e6;
        format!(
            "INSERT INTO {} AS p (pipeline, applied_lsn, commit_time, updated_at) \
             VALUES ({}, '{end_lsn}', to_timestamp({secs:.6}), now()) \
             ON CONFLICT (pipeline) DO UPDATE SET applied_lsn = greatest(p.applied_lsn, EXCLUDED.applied_lsn), \
             commit_time = EXCLUDED.commit_time, updated_at = now()",
            self.table("progress"),
            quote_literal(pipeline)
        )
    }

    /// A write that touches the progress row without moving it (to force a WAL
    /// flush with a synchronous commit when stopping).
    pub fn progress_touch_sql(&self, pipeline: &str) -> String {
        format!(
            "UPDATE {} SET updated_at = now() WHERE pipeline = {}",
            self.table("progress"),
            quote_literal(pipeline)
        )
    }

    /// The applied position of a pipeline, if recorded.
    pub async fn progress(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<Lsn>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT applied_lsn::text FROM {} WHERE pipeline = $1",
                    self.table("progress")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the applied position of pipeline {pipeline}"))?;
        Ok(row.and_then(|r| r.get::<_, String>(0).parse().ok()))
    }

    /// Applied position, source commit time of the last applied transaction, and
    /// seconds since then (by the target's clock), for `status`.
    pub async fn progress_detail(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<(Option<String>, Option<String>, Option<f64>)>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT applied_lsn::text, commit_time::text, \
                            extract(epoch FROM clock_timestamp() - commit_time)::float8 \
                     FROM {} WHERE pipeline = $1",
                    self.table("progress")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the progress of pipeline {pipeline}"))?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    // ----- chunks ----------------------------------------------------------------

    /// Writes the plan into `chunks` (inside the caller's transaction).
    pub async fn record_plan(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        chunks: &[ChunkRow],
    ) -> Result<()> {
        let sql = format!(
            "INSERT INTO {} (pipeline, schema_name, table_name, chunk_no, start_block, end_block, key_lo, key_hi) \
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[]) \
             ON CONFLICT DO NOTHING",
            self.table("chunks")
        );
        let schemas: Vec<&str> = chunks.iter().map(|c| c.table.schema.as_str()).collect();
        let names: Vec<&str> = chunks.iter().map(|c| c.table.name.as_str()).collect();
        let nos: Vec<i32> = chunks.iter().map(|c| c.chunk_no).collect();
        let mut starts = Vec::with_capacity(chunks.len());
        let mut ends = Vec::with_capacity(chunks.len());
        let mut los = Vec::with_capacity(chunks.len());
        let mut his = Vec::with_capacity(chunks.len());
        for c in chunks {
            match c.range {
                ChunkRange::Blocks { start, end } => {
                    starts.push(Some(start));
                    ends.push(end);
                    los.push(None);
                    his.push(None);
                }
                ChunkRange::Keys { lo, hi } => {
                    starts.push(None);
                    ends.push(None);
                    los.push(lo);
                    his.push(hi);
                }
            }
        }
        client
            .execute(
                &sql,
                &[
                    &pipeline, &schemas, &names, &nos, &starts, &ends, &los, &his,
                ],
            )
            .await
            .pg_context(|| "recording the chunk plan on the target".into())?;
        Ok(())
    }

    /// Every chunk of a pipeline, in plan order.
    pub async fn chunks(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Vec<ChunkRow>> {
        let rows = client
            .query(
                &format!(
                    "SELECT c.schema_name, c.table_name, c.chunk_no, c.start_block, c.end_block, c.key_lo, c.key_hi, \
                            c.done_at IS NOT NULL, c.snapshot_id, \
                            c.done_at IS NOT NULL AND c.snapshot_id IS NULL \
                              AND c.snapshot_lsn IS DISTINCT FROM p.stream_start_lsn \
                     FROM {} c JOIN {} p USING (pipeline) \
                     WHERE c.pipeline = $1 ORDER BY c.schema_name, c.table_name, c.chunk_no",
                    self.table("chunks"),
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| "reading the chunk plan from the target".into())?;
        Ok(rows
            .iter()
            .map(|r| {
                let start: Option<i64> = r.get(3);
                ChunkRow {
                    table: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    chunk_no: r.get(2),
                    range: match start {
                        Some(start) => ChunkRange::Blocks {
                            start,
                            end: r.get(4),
                        },
                        None => ChunkRange::Keys {
                            lo: r.get(5),
                            hi: r.get(6),
                        },
                    },
                    done: r.get(7),
                    snapshot_id: r.get(8),
                    inexact: r.get(9),
                }
            })
            .collect())
    }

    /// Marks a chunk copied (inside the transaction that wrote its rows), with the
    /// snapshot it was read under (`None`: the slot's own) and the slot's position.
    #[allow(clippy::too_many_arguments)]
    pub async fn mark_chunk_done(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        chunk: &ChunkRow,
        rows: i64,
        bytes: i64,
        worker: i32,
        snapshot_id: Option<i64>,
        snapshot_lsn: Lsn,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET rows_copied = $5, bytes_copied = $6, worker = $7, snapshot_id = $8, \
                       snapshot_lsn = $9::text::pg_lsn, started_at = now(), done_at = clock_timestamp() \
                     WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3 AND chunk_no = $4",
                    self.table("chunks")
                ),
                &[
                    &pipeline,
                    &chunk.table.schema,
                    &chunk.table.name,
                    &chunk.chunk_no,
                    &rows,
                    &bytes,
                    &worker,
                    &snapshot_id,
                    &snapshot_lsn.to_string(),
                ],
            )
            .await
            .pg_context(|| format!("marking chunk {} of {} copied", chunk.chunk_no, chunk.table))?;
        Ok(())
    }

    /// Replaces the plan of one table (its rows are being copied again from scratch).
    pub async fn replace_table_plan(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
        chunks: &[ChunkRow],
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                    self.table("chunks")
                ),
                &[&pipeline, &table.schema, &table.name],
            )
            .await
            .pg_context(|| format!("replanning the copy of {table}"))?;
        self.record_plan(client, pipeline, chunks).await
    }

    /// Rows and COPY bytes copied per table, in plan order.
    pub async fn table_totals(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Vec<(QualifiedName, i64, i64)>> {
        let rows = client
            .query(
                &format!(
                    "SELECT t.schema_name, t.table_name, coalesce(sum(c.rows_copied), 0)::bigint, coalesce(sum(c.bytes_copied), 0)::bigint \
                     FROM {} t LEFT JOIN {} c USING (pipeline, schema_name, table_name) \
                     WHERE t.pipeline = $1 GROUP BY t.schema_name, t.table_name, t.position ORDER BY t.position",
                    self.table("pipeline_tables"),
                    self.table("chunks")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| "summing the copy".into())?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    r.get(2),
                    r.get(3),
                )
            })
            .collect())
    }

    /// Per table: rows copied, chunks done, chunks planned (for `status`).
    pub async fn chunk_progress(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Vec<(QualifiedName, i64, i64, i64)>> {
        let rows = client
            .query(
                &format!(
                    "SELECT schema_name, table_name, coalesce(sum(rows_copied), 0)::bigint, \
                            count(*) FILTER (WHERE done_at IS NOT NULL), count(*) \
                     FROM {} WHERE pipeline = $1 GROUP BY schema_name, table_name",
                    self.table("chunks")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the copy progress of pipeline {pipeline}"))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                )
            })
            .collect())
    }

    // ----- snapshots and copy positions ------------------------------------------------

    /// Records a source snapshot rows are about to be copied under; returns its id.
    pub async fn record_snapshot(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        snapshot: &SnapshotView,
        purpose: &str,
    ) -> Result<i64> {
        let xip: Vec<i64> = snapshot.xip.iter().map(|&x| x as i64).collect();
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO {} (pipeline, snap_xmin, snap_xmax, snap_xip, lsn, purpose) \
                     VALUES ($1, $2, $3, $4, $5::text::pg_lsn, $6) RETURNING snapshot_id",
                    self.table("snapshots")
                ),
                &[
                    &pipeline,
                    &(snapshot.xmin as i64),
                    &(snapshot.xmax as i64),
                    &xip,
                    &snapshot.lsn.to_string(),
                    &purpose,
                ],
            )
            .await
            .pg_context(|| "recording a copy snapshot on the target".into())?;
        Ok(row.get(0))
    }

    /// Records a copy position (inside the transaction that wrote its rows) and
    /// tells running apply sessions that the positions changed.
    pub async fn add_position(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
        scope: &StoredScope,
        snapshot_id: i64,
    ) -> Result<i64> {
        let ctx = || format!("recording the copy position of {table}");
        let (kind, column, lo, hi) = match scope {
            StoredScope::Table => ("table", None, None, None),
            StoredScope::Range { column, lo, hi } => ("range", Some(column.as_str()), *lo, *hi),
            StoredScope::Keys(_) => ("keys", None, None, None),
        };
        let id: i64 = client
            .query_one(
                &format!(
                    "INSERT INTO {} (pipeline, schema_name, table_name, scope, key_column, key_lo, key_hi, snapshot_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING position_id",
                    self.table("copy_positions")
                ),
                &[
                    &pipeline,
                    &table.schema,
                    &table.name,
                    &kind,
                    &column,
                    &lo,
                    &hi,
                    &snapshot_id,
                ],
            )
            .await
            .pg_context(ctx)?
            .get(0);
        if let StoredScope::Keys(keys) = scope {
            // One array per key; a two-dimensional parameter keeps it one statement.
            for batch in keys.chunks(10_000) {
                let flat: Vec<String> = batch
                    .iter()
                    .map(|k| {
                        format!(
                            "{{{}}}",
                            k.iter()
                                .map(|v| format!(
                                    "\"{}\"",
                                    v.replace('\\', "\\\\").replace('"', "\\\"")
                                ))
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                    })
                    .collect();
                client
                    .execute(
                        &format!(
                            "INSERT INTO {} (pipeline, position_id, key) \
                             SELECT $1, $2, k::text[] FROM unnest($3::text[]) AS u(k)",
                            self.table("copy_position_keys")
                        ),
                        &[&pipeline, &id, &flat],
                    )
                    .await
                    .pg_context(ctx)?;
            }
        }
        client
            .execute(
                &format!(
                    "UPDATE {} SET positions_version = positions_version + 1 WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(ctx)?;
        Ok(id)
    }

    /// The copy positions of a pipeline whose snapshot the stream has not passed
    /// (`applied`), oldest first.
    pub async fn live_positions(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        applied: Lsn,
    ) -> Result<Vec<StoredPosition>> {
        let ctx = || format!("reading the copy positions of pipeline {pipeline}");
        let rows = client
            .query(
                &format!(
                    "SELECT c.position_id, c.schema_name, c.table_name, c.scope, c.key_column, c.key_lo, c.key_hi, \
                            s.snap_xmin, s.snap_xmax, s.snap_xip, s.lsn::text \
                     FROM {} c JOIN {} s USING (pipeline, snapshot_id) \
                     WHERE c.pipeline = $1 AND s.lsn > $2::text::pg_lsn ORDER BY c.position_id",
                    self.table("copy_positions"),
                    self.table("snapshots")
                ),
                &[&pipeline, &applied.to_string()],
            )
            .await
            .pg_context(ctx)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.get(0);
            let snapshot = snapshot_view(&r, 7)?;
            let kind: String = r.get(3);
            let scope = match kind.as_str() {
                "table" => StoredScope::Table,
                "range" => StoredScope::Range {
                    column: r.get::<_, Option<String>>(4).unwrap_or_default(),
                    lo: r.get(5),
                    hi: r.get(6),
                },
                _ => {
                    let keys = client
                        .query(
                            &format!(
                                "SELECT key FROM {} WHERE pipeline = $1 AND position_id = $2",
                                self.table("copy_position_keys")
                            ),
                            &[&pipeline, &id],
                        )
                        .await
                        .pg_context(ctx)?
                        .iter()
                        .map(|k| k.get::<_, Vec<String>>(0))
                        .collect();
                    StoredScope::Keys(keys)
                }
            };
            out.push(StoredPosition {
                id,
                table: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                scope,
                snapshot,
            });
        }
        Ok(out)
    }

    /// Forgets copy positions (and snapshots) the stream has passed.
    pub async fn expire_positions(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        applied: Lsn,
    ) -> Result<()> {
        let sql = format!(
            "WITH gone AS (DELETE FROM {s} WHERE pipeline = $1 AND lsn <= $2::text::pg_lsn \
                  AND NOT EXISTS (SELECT 1 FROM {c} ch WHERE ch.pipeline = $1 AND ch.snapshot_id = {s}.snapshot_id) \
                  AND NOT EXISTS (SELECT 1 FROM {p} cp JOIN {t} pt USING (pipeline, schema_name, table_name) \
                                  WHERE cp.pipeline = $1 AND cp.snapshot_id = {s}.snapshot_id AND pt.state IN ('held', 'copied')) \
                  RETURNING snapshot_id), \
                  pos AS (DELETE FROM {p} WHERE pipeline = $1 AND snapshot_id IN (SELECT snapshot_id FROM gone) RETURNING position_id) \
             DELETE FROM {k} WHERE pipeline = $1 AND position_id IN (SELECT position_id FROM pos)",
            s = self.table("snapshots"),
            c = self.table("chunks"),
            p = self.table("copy_positions"),
            k = self.table("copy_position_keys"),
            t = self.table("pipeline_tables"),
        );
        client
            .execute(&sql, &[&pipeline, &applied.to_string()])
            .await
            .pg_context(|| format!("forgetting passed copy positions of pipeline {pipeline}"))?;
        Ok(())
    }

    /// Forgets every copy position of a pipeline (its stream starts afresh from a new
    /// slot, after everything they describe) or only those of `table`.
    pub async fn clear_positions(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: Option<&QualifiedName>,
    ) -> Result<()> {
        let (schema, name) = match table {
            Some(t) => (Some(t.schema.as_str()), Some(t.name.as_str())),
            None => (None, None),
        };
        let sql = format!(
            "WITH pos AS (DELETE FROM {p} WHERE pipeline = $1 \
                 AND ($2::text IS NULL OR (schema_name = $2 AND table_name = $3)) RETURNING position_id) \
             DELETE FROM {k} WHERE pipeline = $1 AND position_id IN (SELECT position_id FROM pos)",
            p = self.table("copy_positions"),
            k = self.table("copy_position_keys"),
        );
        client
            .execute(&sql, &[&pipeline, &schema, &name])
            .await
            .pg_context(|| format!("clearing the copy positions of pipeline {pipeline}"))?;
        Ok(())
    }

    /// One row of `held_changes` as SQL values, for [`StateStore::hold_sql`]: a change
    /// of a table being copied, encoded as pgoutput sends it, held until the copy is
    /// in.
    pub fn held_row(
        &self,
        pipeline: &str,
        table: &QualifiedName,
        commit_lsn: Lsn,
        xid: u32,
        binary: bool,
        change: &[u8],
    ) -> String {
        use std::fmt::Write;
        let mut hex = String::with_capacity(change.len() * 2 + 2);
        hex.push_str("\\x");
        for b in change {
            let _ = write!(hex, "{b:02x}");
        }
        format!(
            "({}, {}, {}, '{commit_lsn}', {xid}, {binary}, '{hex}'::bytea)",
            quote_literal(pipeline),
            quote_literal(&table.schema),
            quote_literal(&table.name),
        )
    }

    /// SQL (for the apply transaction that received them) holding changes given as
    /// [`StateStore::held_row`]s, in order.
    pub fn hold_sql(&self, rows: &[String]) -> String {
        format!(
            "INSERT INTO {} (pipeline, schema_name, table_name, commit_lsn, xid, binary_values, change) VALUES {}",
            self.table("held_changes"),
            rows.join(", ")
        )
    }

    /// Up to `limit` of the oldest changes held for `table`, in commit order:
    /// (sequence number, transaction id, whether its values are in binary, change).
    pub async fn held_changes(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
        limit: i64,
    ) -> Result<Vec<(i64, u32, bool, Vec<u8>)>> {
        Ok(client
            .query(
                &format!(
                    "SELECT seq, xid, binary_values, change FROM {} \
                     WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3 \
                     ORDER BY commit_lsn, seq LIMIT $4",
                    self.table("held_changes")
                ),
                &[&pipeline, &table.schema, &table.name, &limit],
            )
            .await
            .pg_context(|| format!("reading the changes held for {table}"))?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<_, i64>(1) as u32,
                    r.get(2),
                    r.get::<_, Vec<u8>>(3),
                )
            })
            .collect())
    }

    /// Forgets changes held for `table` that were applied: those of `seqs`.
    pub async fn forget_held(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
        seqs: &[i64],
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3 AND seq = ANY($4)",
                    self.table("held_changes")
                ),
                &[&pipeline, &table.schema, &table.name, &seqs],
            )
            .await
            .pg_context(|| format!("forgetting the changes held for {table}"))?;
        Ok(())
    }

    /// The snapshot of the newest whole-table copy of `table` (`walshuttle tables
    /// add|resync`), which decides which of its held changes the copy already holds.
    /// Kept while the table is `held` or `copied`, however far the stream is.
    pub async fn table_copy_snapshot(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
    ) -> Result<Option<SnapshotView>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT s.snap_xmin, s.snap_xmax, s.snap_xip, s.lsn::text \
                     FROM {} c JOIN {} s USING (pipeline, snapshot_id) \
                     WHERE c.pipeline = $1 AND c.schema_name = $2 AND c.table_name = $3 AND c.scope = 'table' \
                     ORDER BY c.position_id DESC LIMIT 1",
                    self.table("copy_positions"),
                    self.table("snapshots")
                ),
                &[&pipeline, &table.schema, &table.name],
            )
            .await
            .pg_context(|| format!("reading the snapshot {table} was copied under"))?;
        row.map(|r| snapshot_view(&r, 0)).transpose()
    }

    /// Tells running apply sessions to read the pipeline's tables and positions
    /// again (inside the caller's transaction).
    pub async fn bump_positions_version(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET positions_version = positions_version + 1 WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("signalling pipeline {pipeline}'s apply sessions"))?;
        Ok(())
    }

    /// Counter bumped with every new copy position: apply sessions reload their
    /// positions when it moves.
    pub async fn positions_version(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<i64> {
        Ok(client
            .query_opt(
                &format!(
                    "SELECT positions_version FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| "reading the copy positions version".into())?
            .map(|r| r.get(0))
            .unwrap_or(0))
    }

    /// SQL that opens an apply transaction: BEGIN, the shared side of the positions
    /// lock (held until commit, so no rewrite outside the stream commits while this
    /// transaction decides which changes to apply), and the positions version, read
    /// after the lock is granted.
    pub fn apply_begin_sql(&self, pipeline: &str) -> String {
        format!(
            "BEGIN; SELECT pg_advisory_xact_lock_shared({}); SELECT positions_version FROM {} WHERE pipeline = {}",
            positions_lock_key(&self.schema, pipeline),
            self.table("pipelines"),
            quote_literal(pipeline)
        )
    }

    /// Tries to take the exclusive side of the positions lock in the caller's open
    /// transaction: true when no apply transaction is open. Never queues, so it can
    /// never stall the apply sessions.
    pub async fn try_lock_positions(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<bool> {
        Ok(client
            .query_one(
                &format!(
                    "SELECT pg_try_advisory_xact_lock({})",
                    positions_lock_key(&self.schema, pipeline)
                ),
                &[],
            )
            .await
            .pg_context(|| "locking the copy positions of the pipeline".into())?
            .get(0))
    }

    /// Removes every row of a pipeline from every state table (inside the caller's
    /// transaction); returns whether anything was there.
    pub async fn remove_pipeline(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<bool> {
        let mut any = false;
        for table in STATE_TABLES.iter().filter(|t| **t != "schema_version") {
            let exists = client
                .query_opt(
                    "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2",
                    &[&self.schema, table],
                )
                .await
                .pg_context(|| format!("looking up {table} in the state schema"))?
                .is_some();
            if !exists {
                continue;
            }
            let n = client
                .execute(
                    &format!("DELETE FROM {} WHERE pipeline = $1", self.table(table)),
                    &[&pipeline],
                )
                .await
                .pg_context(|| format!("removing pipeline {pipeline} from {table}"))?;
            any |= n > 0;
        }
        Ok(any)
    }

    /// Drops the whole state schema.
    pub async fn drop_schema(&self, client: &impl GenericClient) -> Result<()> {
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(&self.schema)
            ))
            .await
            .pg_context(|| format!("dropping the state schema {}", self.schema))?;
        Ok(())
    }

    /// Records the watermark a catch-up used for a table.
    pub async fn set_watermark(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
        created: Option<&str>,
        updated: Option<&str>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (pipeline, schema_name, table_name, created_max, updated_max) \
                     VALUES ($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz) \
                     ON CONFLICT (pipeline, schema_name, table_name) DO UPDATE SET created_max = EXCLUDED.created_max, \
                       updated_max = EXCLUDED.updated_max",
                    self.table("watermarks")
                ),
                &[&pipeline, &table.schema, &table.name, &created, &updated],
            )
            .await
            .pg_context(|| format!("recording the watermark of {table}"))?;
        Ok(())
    }
}

/// The advisory lock key that serializes rewrites outside the stream with the apply
/// transactions of one pipeline.
fn positions_lock_key(schema: &str, pipeline: &str) -> String {
    format!(
        "hashtextextended({}, 7081)",
        quote_literal(&format!("walshuttle positions {schema}.{pipeline}"))
    )
}

/// The snapshot in columns `at..at + 4` of `row`: xmin, xmax, xip, lsn as text.
fn snapshot_view(row: &tokio_postgres::Row, at: usize) -> Result<SnapshotView> {
    let lsn: Lsn = row.get::<_, String>(at + 3).parse()?;
    let xip: Vec<i64> = row.get(at + 2);
    let mut xip: Vec<u64> = xip.into_iter().map(|x| x as u64).collect();
    xip.sort_unstable();
    Ok(SnapshotView {
        xmin: row.get::<_, i64>(at) as u64,
        xmax: row.get::<_, i64>(at + 1) as u64,
        xip,
        lsn,
    })
}
