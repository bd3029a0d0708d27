//! Tables copied while the pipeline streams (`walshuttle tables add|resync`,
//! online bootstrap): their changes are held on the target until the copy is in,
//! then replayed through the copy positions; and tables copied again after a
//! rewrite on the source.

use super::*;

impl Session<'_> {
    /// Reloads the copy positions when a transaction just opened (`version` is
    /// what it read under the positions lock) sees a newer version than the session
    /// holds: a rewrite outside the stream committed meanwhile.
    pub(super) async fn refresh_positions(&mut self, version: Option<i64>) -> Result<()> {
        let Some(version) = version else {
            return Ok(());
        };
        if version == self.positions.version() {
            return Ok(());
        }
        // The version first, then the tables, then the positions: a copy commits its
        // table's state, its positions and a new version together, so positions
        // read after the states hold those of every table seen copied. (Read the
        // other way round, a copy committing between the two reads left a table
        // replayed and joined to the stream with no positions to skip what its
        // snapshot saw: a duplicate row.) A copy committing after the version was
        // read leaves the session one version behind, so the next refresh reads
        // the tables again. (Counted at the version read last, a copy committing
        // between the tables and the positions left its table `held` in this
        // session for good: never replayed, never ready.)
        let before = self
            .cfg
            .state
            .positions_version(&*self.monitor, &self.cfg.slot)
            .await?;
        self.reload_tables().await?;
        self.positions = StreamPositions::load(
            &self.cfg.state,
            &self.monitor,
            &self.source_sql,
            &self.cfg.slot,
            self.applied,
            self.binary,
        )
        .await?;
        self.positions.as_of(before);
        Ok(())
    }

    /// Reads the pipeline's tables again (`walshuttle tables add|remove|resync`
    /// changed them): which are carried, and whose changes are held.
    pub(super) async fn reload_tables(&mut self) -> Result<()> {
        let entries = self
            .cfg
            .state
            .table_entries(&*self.monitor, &self.cfg.slot)
            .await?;
        let (held, replay) = held_sets(&entries);
        let joining: Vec<QualifiedName> = held
            .iter()
            .filter(|t| !self.relations.is_allowed(t))
            .cloned()
            .collect();
        if self.binary
            && !joining.is_empty()
            && !binary_capable(&self.source_sql, &self.monitor, &joining).await?
        {
            anyhow::bail!(
                "a table joining the pipeline has values that cannot be received in binary: reconnecting to receive every value as text"
            );
        }
        let names: Vec<QualifiedName> = entries.into_iter().map(|e| e.name).collect();
        for oid in Arc::make_mut(&mut self.relations).set_allowed(names) {
            // Removed from the pipeline: its changes still in flight are not applied.
            self.ignored.insert(oid);
            self.relation_cache.remove(&oid);
        }
        crate::observe::tables_copying(held.len());
        self.joins.held = held;
        self.joins.replaying = replay;
        Ok(())
    }

    /// Whether the pipeline's publication on the source carries `table`.
    pub(super) async fn in_publication(&self, table: &QualifiedName) -> Result<bool> {
        Ok(self
            .source_sql
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&self.cfg.publication, &table.schema, &table.name],
            )
            .await
            .pg_context(|| format!("looking up {table} in the publication"))?
            .is_some())
    }

    /// The table of relation `oid` when its changes are held (its copy is running).
    pub(super) fn held_table(&self, oid: u32) -> Result<Option<QualifiedName>> {
        if self.joins.held.is_empty() {
            return Ok(None);
        }
        let table = &self.relations.get(oid)?.name;
        Ok(self.joins.held.contains(table).then(|| table.clone()))
    }

    /// Whether changes of relation `oid` cannot be applied on a streamed
    /// transaction's own connection now: its table's copy is running, or is in with
    /// held changes still to apply first (both happen on the main connection).
    pub(super) fn held_or_replaying(&self, oid: u32) -> Result<bool> {
        if self.joins.held.is_empty() && self.joins.replaying.is_empty() {
            return Ok(false);
        }
        let table = &self.relations.get(oid)?.name;
        Ok(self.joins.held.contains(table) || self.joins.replaying.contains(table))
    }

    /// Holds `op` when its table is being copied (see [`super::held`]): written to
    /// `held_changes` in the open main transaction instead of applied. Returns
    /// whether it was held.
    pub(super) async fn hold(&mut self, commit_lsn: Lsn, xid: u32, op: &Op) -> Result<bool> {
        let Some(table) = self.held_table(op.rel())? else {
            return Ok(false);
        };
        self.barrier().await?;
        self.hold_change(&table, commit_lsn, xid, &crate::stream::held::encode(op))
            .await?;
        Ok(true)
    }

    pub(super) async fn hold_change(
        &mut self,
        table: &QualifiedName,
        commit_lsn: Lsn,
        xid: u32,
        change: &[u8],
    ) -> Result<()> {
        let row =
            self.cfg
                .state
                .held_row(&self.cfg.slot, table, commit_lsn, xid, self.binary, change);
        self.joins.held_rows.push(row);
        if self.joins.held_rows.len() >= HELD_BATCH {
            self.flush_held().await?;
        }
        Ok(())
    }

    /// Writes the held changes buffered so far, in the open main transaction: before
    /// it commits, and before held changes are read back.
    pub(super) async fn flush_held(&mut self) -> Result<()> {
        if self.joins.held_rows.is_empty() {
            return Ok(());
        }
        let sql = self.cfg.state.hold_sql(&self.joins.held_rows);
        self.joins.held_rows.clear();
        self.main.execute_in_txn(&sql).await
    }

    /// Applies, in the open main transaction, a TRUNCATE of a source transaction
    /// (`xid`, committing at `commit_lsn`): tables removed from the pipeline are left
    /// alone, those being copied hold it, the copy positions decide the rest.
    pub(super) async fn truncate_on_main(
        &mut self,
        commit_lsn: Lsn,
        xid: u32,
        oids: &[u32],
        restart_identity: bool,
    ) -> Result<()> {
        let mut apply = Vec::with_capacity(oids.len());
        for oid in oids {
            if self.ignored.contains(oid) {
                continue;
            }
            if let Some(table) = self.held_table(*oid)? {
                let change = crate::stream::held::encode_truncate(*oid, restart_identity);
                self.hold_change(&table, commit_lsn, xid, &change).await?;
                continue;
            }
            let table = &self.relations.get(*oid)?.name;
            if self.positions.is_empty() || self.positions.truncate(table, xid)? {
                apply.push(*oid);
            }
        }
        if !apply.is_empty() {
            self.main.flush(&self.relations).await?;
        }
        if let Some(sql) = self
            .truncate_sql(&self.main.client, &apply, restart_identity)
            .await?
        {
            self.main.execute_in_txn(&sql).await?;
        }
        Ok(())
    }

    /// Applies, in the open main transaction, changes held for tables whose copy is
    /// in (through its copy position: what its snapshot saw is skipped), for at most
    /// [`REPLAY_SLICE`] per table and transaction, so the other tables keep
    /// streaming while a long copy's backlog drains; the table's new changes are held
    /// behind it meanwhile. A table whose backlog is drained joins the stream.
    pub(super) async fn replay_held(&mut self) -> Result<()> {
        if self.joins.replaying.is_empty() {
            return Ok(());
        }
        self.barrier().await?;
        self.flush_held().await?;
        let tables: Vec<QualifiedName> = self.joins.replaying.iter().cloned().collect();
        for table in tables {
            // Its shape: from this session's Relation message, or as pgoutput would
            // describe it now.
            let oid = match self.relations.oid_of(&table) {
                Some(oid) => oid,
                None => {
                    let rel =
                        crate::stream::drift::catalog_relation(&self.source_sql, &table).await?;
                    let oid = rel.oid;
                    self.on_relation(rel, RelationAt::Transaction).await?;
                    oid
                }
            };
            // What the table's copies saw (one snapshot, or one per key range),
            // however far the stream is past them now.
            let mut copies = StreamPositions::for_table(
                &self.cfg.state,
                &self.main.client,
                &self.source_sql,
                &self.cfg.slot,
                &table,
                self.binary,
            )
            .await?;
            if copies.is_empty() {
                return Err(Fatal(format!(
                    "{table} is marked copied but its copy position is missing: run `walshuttle tables resync {}`",
                    table.quoted()
                ))
                .into());
            }
            let started = Instant::now();
            let drained = loop {
                let drained = self.replay_chunk(&table, oid, &mut copies).await?;
                if drained || started.elapsed() >= REPLAY_SLICE {
                    break drained;
                }
            };
            if self.current.is_some() {
                self.main_mark = 0;
                self.main_has_partial = true;
            }
            if !drained {
                tracing::debug!(table = %table, "applied held changes of a copied table; more are held");
                continue;
            }
            self.cfg
                .state
                .set_table_state(
                    &self.main.client,
                    &self.cfg.slot,
                    Some(&table),
                    TableState::Ready,
                )
                .await?;
            self.joins.held.remove(&table);
            self.joins.replaying.remove(&table);
            crate::observe::tables_copying(self.joins.held.len());
            // From here its changes are decided by the copies its held changes were
            // replayed through, until the stream passes them.
            self.positions.adopt(&table, &copies, self.applied);
            tracing::info!(table = %table, "the table's copy is in and the changes held meanwhile are applied: it streams with the others now");
        }
        Ok(())
    }

    /// Applies the oldest [`REPLAY_CHUNK`] changes held for `table` (relation `oid`)
    /// that `snapshot` did not see, and forgets them; returns whether none are left.
    pub(super) async fn replay_chunk(
        &mut self,
        table: &QualifiedName,
        oid: u32,
        copies: &mut StreamPositions,
    ) -> Result<bool> {
        let held = self
            .cfg
            .state
            .held_changes(&self.main.client, &self.cfg.slot, table, REPLAY_CHUNK)
            .await?;
        let drained = (held.len() as i64) < REPLAY_CHUNK;
        let mut seqs = Vec::with_capacity(held.len());
        for (seq, xid, binary, change) in held {
            seqs.push(seq);
            if binary != self.binary {
                return Err(Fatal(format!(
                    "changes of {table} were held with values in {} but the stream now receives them in {} (the pipeline's tables changed meanwhile): run `walshuttle tables resync {}`",
                    if binary { "binary" } else { "text" },
                    if self.binary { "binary" } else { "text" },
                    table.quoted()
                ))
                .into());
            }
            let message = decoder::decode_bytes(&bytes::Bytes::from(change), false)
                .map_err(|e| anyhow::anyhow!("malformed held change of {table}: {e}"))?;
            let op = match message {
                LogicalMessage::Insert(m) => Op::Insert {
                    rel: oid,
                    new: m.new,
                },
                LogicalMessage::Update(m) => Op::Update {
                    rel: oid,
                    old: m.old,
                    new: m.new,
                },
                LogicalMessage::Delete(m) => Op::Delete {
                    rel: oid,
                    old: m.old,
                },
                LogicalMessage::Truncate(t) => {
                    // Skipped when the copies saw it, applied when none did.
                    if !copies.truncate(table, xid)? {
                        continue;
                    }
                    self.main.flush(&self.relations).await?;
                    if let Some(sql) = self
                        .truncate_sql(&self.main.client, &[oid], t.restart_identity)
                        .await?
                    {
                        self.main.execute_in_txn(&sql).await?;
                    }
                    continue;
                }
                _ => continue,
            };
            // What the copy holding the row saw, the copy holds already.
            let columns = &self.relations.get(oid)?.column_names;
            let op = match copies.decide(table, columns, xid, op) {
                Decision::Apply(op) => op,
                Decision::Skip => continue,
                Decision::Refetch { rel, new } => {
                    let (op, position) = self.refetch(xid, rel, new).await?;
                    copies.add(position);
                    match op {
                        Some(op) => op,
                        None => continue,
                    }
                }
            };
            self.main.push(op);
            if self.main.buffered_bytes() >= FLUSH_BYTES {
                self.main.flush(&self.relations).await?;
            }
        }
        self.main.flush(&self.relations).await?;
        self.cfg
            .state
            .forget_held(&self.main.client, &self.cfg.slot, table, &seqs)
            .await?;
        Ok(drained)
    }

    /// Copies again, each under a new snapshot recorded as its copy position, the
    /// tables whose rows cannot be derived from the stream (see `added_columns`).
    /// Runs between transactions, with no streamed transaction open (those hold the
    /// positions lock the rewrite needs).
    pub(super) async fn resync_pending(&mut self) -> Result<()> {
        if self.joins.resync.is_empty()
            || self.current.is_some()
            || !self.streams.is_empty()
            || self.main.in_txn()
        {
            return Ok(());
        }
        self.drain_lanes().await?;
        let progress = Arc::clone(&self.progress);
        for name in std::mem::take(&mut self.joins.resync) {
            let Some(mut table) = crate::catalog::load_table(&self.source_sql, &name).await? else {
                continue;
            };
            // Only what the pipeline replicates (`--columns`, `--row-filter`).
            crate::row_selection::current(
                &self.source_sql,
                &self.main.client,
                &self.cfg.state,
                &self.cfg.slot,
            )
            .await?
            .narrow(&mut table)?;
            // Columns the stream has not brought to the target yet are filled in
            // by it when their Relation message arrives.
            let on_target = crate::catalog::load_table(&self.main.client, &name).await?;
            if let Some(on_target) = &on_target {
                table
                    .columns
                    .retain(|c| on_target.columns.iter().any(|t| t.name == c.name));
            }
            let binary = crate::catalog::target_fit(&table, on_target.as_ref())?.binary();
            let (_, copied) = crate::rewrite::rewrite_now(
                self.source,
                &mut self.main.client,
                &self.cfg.state,
                Some(&self.cfg.slot),
                &table,
                crate::rewrite::Rows::All,
                binary,
                "resync",
                &|n| {
                    progress.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                },
            )
            .await?;
            // Rows this copy holds that were written after a column the target
            // lacks was added have values of their own in it, which the column's
            // `ADD` on the target cannot know: copied once more when it arrives.
            // The source's columns are read again after the copy's snapshot, so a
            // column added between the first read and the snapshot counts too.
            if let (Some(now), Some(on_target)) = (
                crate::catalog::load_table(&self.source_sql, &name).await?,
                &on_target,
            ) {
                if now
                    .columns
                    .iter()
                    .any(|c| !on_target.columns.iter().any(|t| t.name == c.name))
                {
                    self.joins.resync_on_shape.insert(name.clone());
                }
            }
            self.cfg
                .state
                .set_table_state(
                    &self.main.client,
                    &self.cfg.slot,
                    Some(&name),
                    TableState::Ready,
                )
                .await?;
            tracing::info!(table = %name, rows = copied, "copied the table again: what its rows hold on the source cannot be derived from the stream (a column added with a volatile default, or a rename that the messages leave open)");
        }
        Ok(())
    }
}
