//! Source snapshots that copies read under, the locks that keep them valid, and the
//! sessions that import them.
//!
//! Two kinds, one interface:
//!
//! - A new slot's exported snapshot (`CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`):
//!   exactly the transactions that committed before the slot's consistent point, so
//!   rows copied under it need no copy position: the slot streams everything after.
//! - A plain `REPEATABLE READ` snapshot (resume, repair, resync, a finished catch-up):
//!   its visibility (`pg_current_snapshot()`) is recorded as a copy position, which
//!   tells the stream exactly which later-arriving transactions the copy already holds
//!   (see [`crate::positions`]).
//!
//! Either way, the tables are locked `ACCESS SHARE` for as long as the copy runs, as
//! pg_dump does: a table rewrite (`ALTER TABLE … ADD COLUMN … DEFAULT volatile()`,
//! `VACUUM FULL`) is not MVCC-safe and would make a not-yet-copied table look empty to
//! an older snapshot; with the lock it waits for the copy instead. For a plain
//! snapshot the locks are taken before the snapshot, so there is no gap. A slot's
//! snapshot exists before anything can be locked; the gap between the two is closed
//! by comparing every table's file node before the slot and after the lock: a
//! rewrite in between is detected and the caller takes a new slot.
//!
//! Every session that reads under the snapshot takes the same locks before it reads:
//! a lock request queues behind a waiting `ACCESS EXCLUSIVE` request, so a reader
//! asking for its first lock on a table after some DDL started waiting for the
//! holder would wait for the DDL, which waits for the holder, which waits for the
//! reader. A reader that cannot lock at once (DDL is already queued) does not take
//! part; the holder itself reads too, so the copy always makes progress, and each
//! reader keeps its locks until its own work is done.
//!
//! An exported snapshot is importable only while its exporting session is idle and
//! open. [`SourceSnapshot`] owns that session, and the only way to get a source
//! session reading under the snapshot is [`SourceSnapshot::import`] (or the holder
//! itself, [`SourceSnapshot::into_session`]).

use std::collections::HashMap;

use anyhow::{Context, Result};
use tokio_postgres::Client;

use crate::config::Endpoint;
use crate::pg::replication::{CreateSlotResult, ReplicationClient};
use crate::pg::{connect, quote_literal, Lsn, PgResultExt, QualifiedName};
use crate::positions::SnapshotView;

/// How long walshuttle waits for the `ACCESS SHARE` locks before saying who holds
/// the tables (another session's DDL).
const LOCK_TIMEOUT: &str = "60s";
/// How long an additional reader waits for its locks: they are granted at once
/// unless DDL is queued behind the holder, and then waiting would never end.
const READER_LOCK_TIMEOUT: &str = "2s";

enum Exporter {
    /// The replication connection that created the slot.
    Slot(ReplicationClient),
    /// Nothing left to keep open (the snapshot lives in the lock holder).
    None,
}

/// A snapshot on the source that copy sessions import, and the locks that keep the
/// tables from being rewritten under it.
pub struct SourceSnapshot {
    exporter: Exporter,
    /// The tables every reader locks.
    tables: Vec<QualifiedName>,
    /// Source session holding `ACCESS SHARE` on every table to copy, in a
    /// transaction under the snapshot, until [`SourceSnapshot::release`].
    holder: Client,
    /// Snapshot name for `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// Visibility of a plain snapshot, recorded as the copy position of what is read
    /// under it; `None` for a slot's own snapshot.
    pub view: Option<SnapshotView>,
    /// The slot's consistent point, or the WAL insert position read after a plain
    /// snapshot.
    pub lsn: Lsn,
}

/// A source session inside a REPEATABLE READ transaction reading under a snapshot.
pub struct SnapshotSession {
    /// The session; commit or drop it when the copy is done.
    pub client: Client,
}

/// A table's file node on the source: it changes when the table is rewritten.
pub type FileNodes = HashMap<QualifiedName, Option<i64>>;

/// Reads the file node of every table (current catalog state).
pub async fn file_nodes(client: &Client, tables: &[QualifiedName]) -> Result<FileNodes> {
    let mut out = HashMap::with_capacity(tables.len());
    for t in tables {
        let node: Option<i64> = client
            .query_opt(
                "SELECT pg_relation_filenode(c.oid)::bigint FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await
            .pg_context(|| format!("reading the file node of {t} on the source"))?
            .and_then(|r| r.get(0));
        out.insert(t.clone(), node);
    }
    Ok(out)
}

fn lock_sql(tables: &[QualifiedName], timeout: &str) -> String {
    if tables.is_empty() {
        return String::new();
    }
    format!(
        "SET LOCAL lock_timeout = '{timeout}'; LOCK TABLE {} IN ACCESS SHARE MODE; SET LOCAL lock_timeout = 0;",
        tables
            .iter()
            .map(|t| format!("ONLY {}", t.quoted()))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn lock_error(e: &tokio_postgres::Error) -> anyhow::Error {
    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
        anyhow::anyhow!(
            "a table to copy stayed locked on the source for {LOCK_TIMEOUT} (another session's ALTER TABLE, VACUUM FULL or LOCK?): wait for it to finish, then run walshuttle again"
        )
    } else {
        anyhow::anyhow!(
            "locking the tables to copy on the source: {}",
            crate::pg::connect::describe(e)
        )
    }
}

impl SourceSnapshot {
    /// Takes over a new slot's exported snapshot: locks `tables` under it and checks
    /// that none was rewritten since `before` (read before the slot was created).
    /// `Ok(Err(table))` names a table that was: the snapshot cannot see its rows.
    pub async fn from_slot(
        source: &Endpoint,
        client: ReplicationClient,
        slot: CreateSlotResult,
        tables: &[QualifiedName],
        before: &FileNodes,
    ) -> Result<std::result::Result<SourceSnapshot, QualifiedName>> {
        let holder = connect(source, "snapshot").await?;
        holder
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {} SET TRANSACTION SNAPSHOT {}",
                lock_sql(tables, LOCK_TIMEOUT),
                quote_literal(&slot.snapshot_name)
            ))
            .await
            .map_err(|e| lock_error(&e))?;
        let now = file_nodes(&holder, tables).await?;
        for t in tables {
            if now.get(t) != before.get(t) {
                return Ok(Err(t.clone()));
            }
        }
        Ok(Ok(SourceSnapshot {
            exporter: Exporter::Slot(client),
            tables: tables.to_vec(),
            holder,
            name: slot.snapshot_name,
            view: None,
            lsn: slot.consistent_point,
        }))
    }

    /// Locks `tables`, then takes and exports a plain snapshot, recording its
    /// visibility and the WAL insert position after it.
    pub async fn take(source: &Endpoint, tables: &[QualifiedName]) -> Result<SourceSnapshot> {
        let holder = connect(source, "snapshot").await?;
        holder
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {}",
                lock_sql(tables, LOCK_TIMEOUT)
            ))
            .await
            .map_err(|e| lock_error(&e))?;
        // The first query of the transaction takes the snapshot; the insert position
        // is read after it within the same statement.
        let row = holder
            .query_one(
                "SELECT pg_export_snapshot(), pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text",
                &[],
            )
            .await
            .pg_context(|| "taking a snapshot on the source".into())?;
        let lsn: Lsn = row
            .get::<_, String>(2)
            .parse()
            .context("reading the source's WAL position")?;
        let view = SnapshotView::parse(&row.get::<_, String>(1), lsn)?;
        Ok(SourceSnapshot {
            exporter: Exporter::None,
            tables: tables.to_vec(),
            holder,
            name: row.get(0),
            view: Some(view),
            lsn,
        })
    }

    /// Opens another source session reading under this snapshot, holding the same
    /// locks; `None` when the locks are not granted at once (DDL is queued behind
    /// the holder): such a session would wait for the DDL, which waits for the
    /// holder.
    pub async fn import(
        &self,
        source: &Endpoint,
        purpose: &str,
    ) -> Result<Option<SnapshotSession>> {
        let client = connect(source, purpose).await?;
        let sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {} SET TRANSACTION SNAPSHOT {}",
            lock_sql(&self.tables, READER_LOCK_TIMEOUT),
            quote_literal(&self.name)
        );
        match client.batch_execute(&sql).await {
            Ok(()) => Ok(Some(SnapshotSession { client })),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                tracing::info!(
                    "DDL is waiting for a table being copied: one reader fewer until the copy ends"
                );
                Ok(None)
            }
            Err(e) => {
                Err(e).pg_context(|| format!("importing snapshot {} on the source", self.name))
            }
        }
    }

    /// Opens up to `count` sessions reading under this snapshot: the holder and as
    /// many others as get their locks at once. Closes the slot's exporting
    /// connection afterwards; each session keeps its locks until it commits.
    pub async fn into_sessions(
        mut self,
        source: &Endpoint,
        purpose: &str,
        count: usize,
    ) -> Result<Vec<SnapshotSession>> {
        let mut sessions = Vec::with_capacity(count);
        for _ in 1..count.max(1) {
            if let Some(s) = self.import(source, purpose).await? {
                sessions.push(s);
            }
        }
        self.imported().await;
        sessions.insert(
            0,
            SnapshotSession {
                client: self.holder,
            },
        );
        Ok(sessions)
    }

    /// The session holding the locks, itself reading under the snapshot (for
    /// planning queries that must see what the copy sees).
    pub fn holder(&self) -> &Client {
        &self.holder
    }

    /// Closes the slot's exporting replication connection once every session that
    /// needs the snapshot has imported it; the locks stay.
    async fn imported(&mut self) {
        if let Exporter::Slot(client) = std::mem::replace(&mut self.exporter, Exporter::None) {
            client.close().await;
        }
    }

    /// Ends the snapshot and releases the locks.
    pub async fn release(mut self) {
        self.imported().await;
        let _ = self.holder.batch_execute("COMMIT").await;
    }
}
