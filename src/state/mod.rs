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

mod chunks;
mod pipelines;
mod positions;
mod progress;
pub mod schema;
mod tables;

use anyhow::{bail, Result};
use tokio_postgres::{Client, GenericClient};

use crate::pg::SnapshotView;
use crate::pg::{quote_ident, quote_literal, Lsn, PgResultExt, QualifiedName};

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
}
