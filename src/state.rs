//! The `walshuttle.*` schema on the target: what makes every step resumable.
//!
//! State lives in the same database as the replicated data so it can commit in the
//! same transaction as the data it describes: a chunk's rows and its `done` mark, an
//! applied transaction and the LSN it reached. The schema is versioned; a newer
//! binary upgrades it, an older one refuses to touch it.

use anyhow::{bail, Result};
use tokio_postgres::{Client, GenericClient};

use crate::pg::{quote_ident, Lsn, PgResultExt, QualifiedName};

/// Version of the state schema this binary writes.
pub const STATE_VERSION: i32 = 1;

/// Where a pipeline stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The slot is being created; no data copied yet.
    CreatingSlot,
    /// Chunks are being copied.
    Bootstrapping,
    /// All chunks copied and indexes built; streaming may start.
    Copied,
    /// `run` is applying changes from the slot.
    Streaming,
    /// Gap repair from watermarks is under way.
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
    /// The slot's consistent point `L0`: streaming starts here.
    pub consistent_lsn: Option<Lsn>,
    /// The LSN of the latest copy snapshot `L1`; changes before it are applied in
    /// reconcile mode (upsert semantics).
    pub snapshot_lsn: Option<Lsn>,
    /// Whether the target is a consistent copy (not still reconciling).
    pub consistent: bool,
    /// Tables of this pipeline, as `schema.table` display names.
    pub tables: Vec<QualifiedName>,
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

    /// The schema name, unquoted.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Quoted, schema-qualified name of a state table.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(name))
    }

    /// Reads the installed version, `None` when the schema is absent.
    pub async fn installed_version(&self, client: &Client) -> Result<Option<i32>> {
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
    pub async fn check_version(&self, client: &Client) -> Result<()> {
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

    /// Creates or upgrades the state schema to [`STATE_VERSION`].
    pub async fn migrate(&self, client: &Client) -> Result<()> {
        self.check_version(client).await?;
        let installed = self.installed_version(client).await?.unwrap_or(0);
        if installed >= STATE_VERSION {
            return Ok(());
        }
        let s = quote_ident(&self.schema);
        // Version 1. Later versions append their own blocks, each guarded by `installed`.
        let v1 = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('walshuttle state ' || {lit}));
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.schema_version (version int NOT NULL, installed_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {s}.pipelines (
                 pipeline text PRIMARY KEY,
                 publication text NOT NULL,
                 phase text NOT NULL,
                 consistent_lsn pg_lsn,
                 snapshot_lsn pg_lsn,
                 consistent boolean NOT NULL DEFAULT false,
                 tables text[] NOT NULL DEFAULT '{{}}',
                 oldest_xact_at timestamptz,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {s}.pipeline_tables (
                 pipeline text NOT NULL,
                 schema_name text NOT NULL,
                 table_name text NOT NULL,
                 position int NOT NULL,
                 PRIMARY KEY (pipeline, schema_name, table_name));
             CREATE TABLE IF NOT EXISTS {s}.chunks (
                 pipeline text NOT NULL,
                 schema_name text NOT NULL,
                 table_name text NOT NULL,
                 chunk_no int NOT NULL,
                 start_block bigint NOT NULL,
                 end_block bigint,
                 rows_copied bigint,
                 bytes_copied bigint,
                 worker int,
                 snapshot_lsn pg_lsn,
                 started_at timestamptz,
                 done_at timestamptz,
                 PRIMARY KEY (pipeline, schema_name, table_name, chunk_no));
             CREATE TABLE IF NOT EXISTS {s}.progress (
                 pipeline text PRIMARY KEY,
                 applied_lsn pg_lsn NOT NULL,
                 commit_time timestamptz,
                 updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {s}.watermarks (
                 pipeline text NOT NULL,
                 schema_name text NOT NULL,
                 table_name text NOT NULL,
                 created_max timestamptz,
                 updated_max timestamptz,
                 PRIMARY KEY (pipeline, schema_name, table_name));
             INSERT INTO {s}.schema_version (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM {s}.schema_version WHERE version >= 1);
             COMMIT;",
            lit = crate::pg::quote_literal(&self.schema)
        );
        client
            .batch_execute(&v1)
            .await
            .pg_context(|| format!("creating the state schema {} on the target", self.schema))?;
        Ok(())
    }

    /// Reads a pipeline's row, `None` when absent or when the schema does not exist.
    pub async fn pipeline(
        &self,
        client: &impl GenericClient,
        name: &str,
    ) -> Result<Option<Pipeline>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT pipeline, publication, phase, consistent_lsn::text, snapshot_lsn::text, consistent \
                     FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&name],
            )
            .await
            .pg_context(|| format!("reading pipeline {name} from the state schema"))?;
        let Some(row) = row else { return Ok(None) };
        let tables = client
            .query(
                &format!(
                    "SELECT schema_name, table_name FROM {} WHERE pipeline = $1 ORDER BY position",
                    self.table("pipeline_tables")
                ),
                &[&name],
            )
            .await
            .pg_context(|| format!("reading the tables of pipeline {name}"))?
            .iter()
            .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        let parse_lsn = |v: Option<String>| v.and_then(|s| s.parse::<Lsn>().ok());
        Ok(Some(Pipeline {
            name: row.get(0),
            publication: row.get(1),
            phase: Phase::parse(row.get(2))?,
            consistent_lsn: parse_lsn(row.get(3)),
            snapshot_lsn: parse_lsn(row.get(4)),
            consistent: row.get(5),
            tables,
        }))
    }

    /// A pipeline's row when the state schema exists and holds one; `None` otherwise
    /// (a target walshuttle never wrote to).
    pub async fn existing_pipeline(&self, client: &Client, name: &str) -> Result<Option<Pipeline>> {
        match self.installed_version(client).await? {
            Some(_) => self.pipeline(client, name).await,
            None => Ok(None),
        }
    }

    /// Inserts or replaces a pipeline's row and table list.
    pub async fn save_pipeline(&self, client: &impl GenericClient, p: &Pipeline) -> Result<()> {
        let ctx = || format!("saving pipeline {} in the state schema", p.name);
        client
            .execute(
                &format!(
                    "INSERT INTO {} AS p (pipeline, publication, phase, consistent_lsn, snapshot_lsn, consistent) \
                     VALUES ($1, $2, $3, $4::text::pg_lsn, $5::text::pg_lsn, $6) \
                     ON CONFLICT (pipeline) DO UPDATE SET publication = EXCLUDED.publication, phase = EXCLUDED.phase, \
                       consistent_lsn = EXCLUDED.consistent_lsn, snapshot_lsn = EXCLUDED.snapshot_lsn, \
                       consistent = EXCLUDED.consistent, updated_at = now()",
                    self.table("pipelines")
                ),
                &[
                    &p.name,
                    &p.publication,
                    &p.phase.as_str(),
                    &p.consistent_lsn.map(|l| l.to_string()),
                    &p.snapshot_lsn.map(|l| l.to_string()),
                    &p.consistent,
                ],
            )
            .await
            .pg_context(ctx)?;
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE pipeline = $1",
                    self.table("pipeline_tables")
                ),
                &[&p.name],
            )
            .await
            .pg_context(ctx)?;
        for (i, t) in p.tables.iter().enumerate() {
            client
                .execute(
                    &format!(
                        "INSERT INTO {} (pipeline, schema_name, table_name, position) VALUES ($1, $2, $3, $4)",
                        self.table("pipeline_tables")
                    ),
                    &[&p.name, &t.schema, &t.name, &(i as i32)],
                )
                .await
                .pg_context(ctx)?;
        }
        Ok(())
    }

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

    /// Records the start of the oldest source transaction open now (or now, when
    /// none is), which widens the catch-up window if the slot is later lost.
    pub async fn set_oldest_xact(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        at: &str,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET oldest_xact_at = $2::text::timestamptz WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline, &at],
            )
            .await
            .pg_context(|| "recording the oldest open source transaction".into())?;
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
}
