//! The exported snapshot every copy worker reads under, and the connection that
//! keeps it alive.
//!
//! An exported snapshot is importable only while its exporting session is idle and
//! open. [`ExportedSnapshot`] owns that session, and the only way to get a source
//! session reading under the snapshot is [`ExportedSnapshot::import`], so no worker
//! can start after the exporter has gone.

use anyhow::{Context, Result};
use tokio_postgres::Client;

use crate::config::Endpoint;
use crate::pg::replication::{CreateSlotResult, ReplicationClient};
use crate::pg::{connect, quote_literal, Lsn, PgResultExt};

enum Exporter {
    /// The replication connection that created the slot: the snapshot is exactly the
    /// slot's consistent point.
    Slot(ReplicationClient),
    /// A REPEATABLE READ transaction that called `pg_export_snapshot()` (resume).
    Transaction(Client),
}

/// A snapshot on the source that copy workers import.
pub struct ExportedSnapshot {
    exporter: Exporter,
    /// Snapshot name for `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// WAL position the snapshot corresponds to: every transaction committed before
    /// it is visible, none committed at or after it.
    pub lsn: Lsn,
}

/// A source session inside a REPEATABLE READ transaction reading under an exported
/// snapshot.
pub struct SnapshotSession {
    /// The session; commit or drop it when the copy is done.
    pub client: Client,
}

impl ExportedSnapshot {
    /// Wraps the result of `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`.
    pub fn from_slot(client: ReplicationClient, slot: CreateSlotResult) -> Self {
        ExportedSnapshot {
            exporter: Exporter::Slot(client),
            name: slot.snapshot_name,
            lsn: slot.consistent_point,
        }
    }

    /// Exports a fresh snapshot from an ordinary session (a resumed bootstrap, whose
    /// original snapshot died with its connection). Its LSN is read after the
    /// snapshot was taken, so it bounds every commit the snapshot sees.
    pub async fn export_new(source: &Endpoint) -> Result<Self> {
        let client = connect(source, "snapshot").await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .pg_context(|| "opening the snapshot transaction on the source".into())?;
        let row = client
            .query_one(
                "SELECT pg_export_snapshot(), pg_current_wal_insert_lsn()::text",
                &[],
            )
            .await
            .pg_context(|| "exporting a snapshot on the source".into())?;
        let lsn: String = row.get(1);
        Ok(ExportedSnapshot {
            name: row.get(0),
            lsn: lsn.parse().context("reading the source's WAL position")?,
            exporter: Exporter::Transaction(client),
        })
    }

    /// Opens a source session reading under this snapshot.
    pub async fn import(&self, source: &Endpoint, purpose: &str) -> Result<SnapshotSession> {
        let client = connect(source, purpose).await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(&self.name)
            ))
            .await
            .pg_context(|| format!("importing snapshot {} on the source", self.name))?;
        Ok(SnapshotSession { client })
    }

    /// Releases the exporting session. Imported sessions keep working.
    pub async fn release(self) {
        match self.exporter {
            Exporter::Slot(client) => client.close().await,
            Exporter::Transaction(client) => {
                let _ = client.batch_execute("COMMIT").await;
            }
        }
    }
}
