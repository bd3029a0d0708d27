//! TRUNCATE and a table's shape (Relation messages): where in commit order the
//! target makes them, and on which connection.

use super::*;

impl Session<'_> {
    /// The TRUNCATE of the replicated tables among `oids`, if any, as `client` (the
    /// connection that runs it, in its open transaction) sees them. The source's
    /// message lists every relation it truncated, so each is truncated `ONLY`: the
    /// target's inheritance children are not the source's (a child the pipeline
    /// does not carry, or one only the target has). A table partitioned on the
    /// target is truncated with its partitions, as PostgreSQL's own apply does.
    pub(super) async fn truncate_sql(
        &self,
        client: &Client,
        oids: &[u32],
        restart_identity: bool,
    ) -> Result<Option<String>> {
        let mut names = Vec::with_capacity(oids.len());
        for oid in oids {
            names.push(self.relations.get(*oid)?.name.quoted());
        }
        if names.is_empty() {
            return Ok(None);
        }
        let partitioned: Vec<bool> = client
            .query(
                "SELECT coalesce(c.relkind = 'p', false) \
                 FROM unnest($1::text[]) WITH ORDINALITY AS u(name, i) \
                 LEFT JOIN pg_class c ON c.oid = to_regclass(u.name) ORDER BY u.i",
                &[&names],
            )
            .await
            .pg_context(|| "reading which truncated tables are partitioned on the target".into())?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let targets: Vec<String> = names
            .iter()
            .zip(partitioned.iter().chain(std::iter::repeat(&false)))
            .map(|(name, &p)| {
                if p {
                    name.clone()
                } else {
                    format!("ONLY {name}")
                }
            })
            .collect();
        Ok(Some(format!(
            "TRUNCATE {}{}",
            targets.join(", "),
            if restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            }
        )))
    }

    pub(super) async fn on_truncate(
        &mut self,
        xid: Option<u32>,
        oids: &[u32],
        restart_identity: bool,
    ) -> Result<()> {
        if let (Some(top), Some(_)) = (self.in_stream, xid) {
            let mut live = Vec::with_capacity(oids.len());
            for oid in oids {
                if self.ignored.contains(oid) {
                    continue;
                }
                if self.held_or_replaying(*oid)? || !self.positions.is_empty() {
                    // Held tables and copy positions are decided on the main
                    // connection, at the transaction's commit.
                    self.cfg.memory.apply_whole(top);
                    anyhow::bail!(
                        "streamed transaction {top} truncates a table whose copy is running or recent: reconnecting to receive it again and apply it whole at its commit"
                    );
                }
                live.push(*oid);
            }
            if live.is_empty() {
                return Ok(());
            }
            let Some(st) = self.streams.get_mut(&top) else {
                return Ok(());
            };
            st.tables.extend(live.iter().copied());
            st.session.flush(&self.relations).await?;
            let Some(st) = self.streams.get(&top) else {
                return Ok(());
            };
            let Some(sql) = self
                .truncate_sql(&st.session.client, &live, restart_identity)
                .await?
            else {
                return Ok(());
            };
            if let Some(st) = self.streams.get_mut(&top) {
                st.session.execute_in_txn(&sql).await?;
            }
            return Ok(());
        }
        let Some(txn) = &self.current else {
            return Ok(());
        };
        if txn.skip {
            return Ok(());
        }
        let (xid, commit_lsn) = (txn.xid, txn.commit_lsn);
        for oid in oids {
            self.ensure_relation(*oid, RelationAt::Transaction).await?;
        }
        self.barrier().await?;
        let version = self.main.begin().await?;
        self.refresh_positions(version).await?;
        self.replay_held().await?;
        self.truncate_on_main(commit_lsn, xid, oids, restart_identity)
            .await?;
        self.main_mark = 0;
        self.main_has_partial = true;
        Ok(())
    }

    /// Before a table's shape changes on the main connection: the transactions
    /// batched before the current one commit (when it arrived `in_transaction`),
    /// every lane drains, and ops buffered under the old shape go out on every
    /// connection. Flushing also ends an open COPY, which must not be left open
    /// while the catalog is read on the connection.
    pub(super) async fn before_shape_change(&mut self, in_transaction: bool) -> Result<()> {
        if in_transaction && self.batch_txns > 0 && !self.main_has_partial {
            let tail = self.main.split_off(self.main_mark);
            self.commit_all().await?;
            self.main.restore(tail);
        }
        self.barrier().await?;
        let had_work = self.main.buffered() > 0;
        self.main.flush(&self.relations).await?;
        if had_work {
            self.main_mark = 0;
            if self.current.is_some() {
                self.main_has_partial = true;
            }
        }
        for st in self.streams.values_mut() {
            st.session.flush(&self.relations).await?;
        }
        Ok(())
    }

    /// Takes in a Relation message received earlier in a skipped transaction, before
    /// the first change of its table that is applied.
    pub(super) async fn ensure_relation(&mut self, oid: u32, at: RelationAt) -> Result<()> {
        if let Some(rel) = self.pending_relations.remove(&oid) {
            self.on_relation(rel, at).await?;
        }
        Ok(())
    }

    /// A table's description: when it differs from what the target has, the change
    /// the source made is made on the target, on the main connection, at the
    /// message's place in commit order:
    /// - inside a transaction received whole, in its target transaction, after the
    ///   transactions batched before it committed (and within it, after its changes
    ///   under the old shape);
    /// - inside a spooled streamed transaction, the same, when it commits;
    /// - inside a streamed transaction applied on its own connection, at once in a
    ///   transaction of its own, when the change is committed on the source and this
    ///   transaction has not written the table: nothing else can hold the table then
    ///   (the source serialises writers and the DDL by lock, so every transaction that
    ///   wrote it under the old shape has committed). Otherwise the change is the
    ///   transaction's own, made after it wrote the table, whose lock on the target
    ///   would make the main connection wait behind it for good: the session
    ///   reconnects, and the source sends the transaction again from its start, to
    ///   be kept on disk and applied whole at its commit (`StreamMemory`).
    pub(super) async fn on_relation(&mut self, rel: Relation, at: RelationAt) -> Result<()> {
        let name = QualifiedName::new(rel.namespace.clone(), rel.name.clone());
        if !self.relations.is_allowed(&name) {
            // `walshuttle tables add|remove` may have changed the pipeline's tables.
            self.reload_tables().await?;
        }
        if !self.relations.is_allowed(&name) {
            if self.in_publication(&name).await? {
                return Err(Fatal(format!(
                    "the publication sends table {name}, which is not part of this pipeline: the publication was edited by hand; add the table with `walshuttle tables add {}` or restore the publication (ALTER PUBLICATION … SET TABLE)",
                    name.quoted()
                ))
                .into());
            }
            // Removed from the pipeline: changes committed before it left the
            // publication are still on their way, and are not applied.
            self.ignored.insert(rel.oid);
            self.pending_relations.remove(&rel.oid);
            return Ok(());
        }
        self.ignored.remove(&rel.oid);
        let unchanged = self.relation_cache.get(&rel.oid).is_some_and(|known| {
            known.namespace == rel.namespace
                && known.name == rel.name
                && known.replica_identity == rel.replica_identity
                && known.columns.len() == rel.columns.len()
                && known.columns.iter().zip(&rel.columns).all(|(a, b)| {
                    a.name == b.name
                        && a.type_oid == b.type_oid
                        && a.type_modifier == b.type_modifier
                        && a.is_key == b.is_key
                })
        });
        if unchanged {
            self.pending_relations.remove(&rel.oid);
            return Ok(());
        }
        if at == RelationAt::Transaction && self.current.as_ref().is_some_and(|t| t.skip) {
            self.pending_relations.insert(rel.oid, rel);
            return Ok(());
        }
        self.pending_relations.remove(&rel.oid);
        self.before_shape_change(at == RelationAt::Transaction)
            .await?;
        let memory = Arc::clone(&self.cfg.memory);
        let change = Arc::make_mut(&mut self.relations)
            .plan(
                &rel,
                &self.source_sql,
                &self.main.client,
                &memory,
                self.cfg.keep_dropped_columns,
            )
            .await?;
        if !change.statements.is_empty() {
            let sql = format!(
                "SET LOCAL lock_timeout = '10s'; {}",
                change.statements.join("; ")
            );
            match at {
                RelationAt::Transaction | RelationAt::Replay => {
                    let version = self.main.begin().await?;
                    self.refresh_positions(version).await?;
                    self.main
                        .execute_in_txn(&sql)
                        .await
                        .with_context(|| format!("changing {} on the target", change.table))?;
                    if self.current.is_some() {
                        self.main_has_partial = true;
                    }
                }
                RelationAt::Stream(xid) => {
                    let wrote = self
                        .streams
                        .get(&xid)
                        .is_some_and(|st| st.tables.contains(&rel.oid));
                    if wrote || !change.committed {
                        memory.apply_whole(xid);
                        tracing::info!(table = %change.table, xid, "a streamed transaction changes the table's definition after writing to it: receiving it again, to apply it whole at its commit");
                        anyhow::bail!(
                            "streamed transaction {xid} changes the definition of {} after writing to it: reconnecting to receive it again from its start and apply it whole at its commit",
                            change.table
                        );
                    }
                    self.commit_batch().await?;
                    self.main.begin().await?;
                    self.main
                        .execute_in_txn(&sql)
                        .await
                        .with_context(|| format!("changing {} on the target", change.table))?;
                    self.main.commit("SELECT 1").await?;
                }
            }
        }
        let changed = Arc::make_mut(&mut self.relations)
            .install(&rel, &self.main.client, change, &memory)
            .await?;
        if changed && self.resync_on_shape.remove(&name) && !self.pending_resync.contains(&name) {
            self.pending_resync.push(name.clone());
        }
        if changed {
            self.main.forget_statements();
            self.lanes.forget_statements();
            for st in self.streams.values_mut() {
                st.session.forget_statements();
            }
        }
        for t in Arc::make_mut(&mut self.relations).take_resync() {
            if !self.pending_resync.contains(&t) {
                self.pending_resync.push(t);
            }
        }
        self.relation_cache.insert(rel.oid, rel);
        Ok(())
    }
}
