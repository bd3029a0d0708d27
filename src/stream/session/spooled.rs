//! Streamed transactions kept on disk until they commit (past
//! `--max-stream-connections`, or to be applied whole), applied at their commit
//! through the main session.

use super::*;

impl Session<'_> {
    /// Applies a spooled streamed transaction that committed, through the main
    /// session, reading its messages back one at a time.
    pub(super) async fn apply_spooled(
        &mut self,
        spool: Spool,
        c: decoder::StreamCommit,
    ) -> Result<()> {
        if c.commit_lsn < self.applied {
            return Ok(());
        }
        self.barrier().await?;
        let messages = spool.messages();
        let mut reader = spool.into_reader()?;
        self.main.note_source_txn(c.commit_lsn);
        let version = self.main.begin().await?;
        self.refresh_positions(version).await?;
        self.replay_held().await?;
        while let Some(data) = reader.next_message()? {
            let message = decoder::decode_bytes(&data, true).map_err(|e| {
                anyhow::anyhow!("malformed spooled message of transaction {}: {e}", c.xid)
            })?;
            let op = match message {
                LogicalMessage::Insert(m) => Op::Insert {
                    rel: m.relation_oid,
                    new: m.new,
                },
                LogicalMessage::Update(m) => Op::Update {
                    rel: m.relation_oid,
                    old: m.old,
                    new: m.new,
                },
                LogicalMessage::Delete(m) => Op::Delete {
                    rel: m.relation_oid,
                    old: m.old,
                },
                LogicalMessage::Truncate(t) => {
                    for oid in &t.relation_oids {
                        self.ensure_relation(*oid, RelationAt::Replay).await?;
                    }
                    self.truncate_on_main(
                        c.commit_lsn,
                        c.xid,
                        &t.relation_oids,
                        t.restart_identity,
                    )
                    .await?;
                    continue;
                }
                // A shape change inside the transaction: at its place.
                LogicalMessage::Relation(rel) => {
                    self.on_relation(rel, RelationAt::Replay).await?;
                    continue;
                }
                LogicalMessage::Message(m) => {
                    self.on_captured_ddl(&m, RelationAt::Replay).await?;
                    continue;
                }
                _ => continue,
            };
            self.ensure_relation(op.rel(), RelationAt::Replay).await?;
            if self.ignored.contains(&op.rel()) || self.hold(c.commit_lsn, c.xid, &op).await? {
                continue;
            }
            let Some(op) = self.filter(c.xid, op, false).await? else {
                continue;
            };
            self.main.push(op);
            if self.main.buffered_bytes() >= FLUSH_BYTES {
                self.main.flush(&self.relations).await?;
            }
        }
        self.main.flush(&self.relations).await?;
        self.flush_held().await?;
        let sql = self.progress_sql(c.end_lsn, c.commit_time);
        let target_lsn = self.main.commit(&sql).await?;
        self.committed(c.end_lsn, target_lsn);
        crate::observe::transactions_applied(1, c.commit_time);
        tracing::debug!(
            xid = c.xid,
            messages,
            "applied a spooled streamed transaction"
        );
        self.report_after_commit().await
    }
}
