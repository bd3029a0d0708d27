//! Captured DDL (`--capture-ddl`, see [`crate::ddl_capture`]) in a replication
//! session. A message of the pipeline's trigger is applied where a Relation message
//! would be (see `on_relation`): on the main connection, after the transactions
//! batched before it committed and the ops buffered under the old shape went out,
//! inside the target transaction of the source transaction that made the change. A
//! streamed transaction that carries one is received again and applied whole at its
//! commit, since its own connection's locks would block the main one. Tables that
//! join, are renamed or are dropped change the pipeline's state in that same target
//! transaction, so a crash finds the shape, the rows and the state agreeing.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::{RelationAt, Session};
use crate::ddl_capture::apply::{self, Action, TablePlan};
use crate::pg::{PgResultExt, QualifiedName};
use crate::state::TableState;
use crate::stream::decoder::LogicalDecodingMessage;
use crate::stream::relations::Fatal;

impl Session<'_> {
    /// A logical message received outside a spooled transaction.
    pub(super) async fn on_message(&mut self, m: LogicalDecodingMessage) -> Result<()> {
        if !m.transactional || self.ddl_prefix.as_deref() != Some(m.prefix.as_str()) {
            return Ok(());
        }
        if let (Some(top), Some(_)) = (self.in_stream, m.xid) {
            self.cfg.memory.apply_whole(top);
            tracing::info!(xid = top, "a streamed transaction changes a table's definition (captured DDL): receiving it again, to apply it whole at its commit");
            anyhow::bail!(
                "streamed transaction {top} changes a table's definition: reconnecting to receive it again from its start and apply it whole at its commit"
            );
        }
        self.on_captured_ddl(&m, RelationAt::Transaction).await
    }

    /// Makes the target match what a message of the trigger describes.
    pub(super) async fn on_captured_ddl(
        &mut self,
        m: &LogicalDecodingMessage,
        at: RelationAt,
    ) -> Result<()> {
        if self.ddl_prefix.as_deref() != Some(m.prefix.as_str()) {
            return Ok(());
        }
        if at == RelationAt::Transaction && self.current.as_ref().is_none_or(|t| t.skip) {
            return Ok(());
        }
        self.before_shape_change(at == RelationAt::Transaction)
            .await?;
        let msg = apply::parse(&m.content)?;
        let version = self.main.begin().await?;
        self.refresh_positions(version).await?;
        let carried: Vec<QualifiedName> = self
            .cfg
            .state
            .table_entries(&self.main.client, &self.cfg.slot)
            .await?
            .into_iter()
            .map(|e| e.name)
            .collect();
        let action = apply::plan(
            &msg,
            &self.main.client,
            &carried,
            self.cfg.keep_dropped_columns,
        )
        .await?;
        match action {
            Action::Skip(note) => {
                tracing::info!(lsn = %m.lsn, command = %msg.tag, "captured DDL skipped: {note}");
            }
            Action::Stop(line) => return Err(Fatal(line).into()),
            Action::Labels(statements) => {
                // A label added in a transaction cannot be used before it commits:
                // added at once, in transactions of their own (an extra label harms
                // no row).
                for sql in statements {
                    self.monitor
                        .batch_execute(&sql)
                        .await
                        .pg_context(|| format!("running on the target: {sql}"))?;
                }
                tracing::info!(command = %msg.tag, "captured DDL: enum labels added on the target");
            }
            Action::Table(plan) => self.apply_table(plan, carried).await?,
            Action::Dropped(table) => {
                self.cfg
                    .state
                    .remove_table(&self.main.client, &self.cfg.slot, &table)
                    .await?;
                let rest: Vec<QualifiedName> =
                    carried.into_iter().filter(|t| *t != table).collect();
                for oid in Arc::make_mut(&mut self.relations).set_allowed(rest) {
                    self.ignored.insert(oid);
                    self.relation_cache.remove(&oid);
                }
                self.joins.resync.retain(|t| *t != table);
                tracing::warn!(table = %table, "table dropped on the source: taken out of the pipeline; its copy on the target is left as it is (drop it there when it is no longer needed)");
            }
        }
        if self.current.is_some() {
            self.main_has_partial = true;
        }
        Ok(())
    }

    /// Runs a table's statements and records what changed in the pipeline.
    async fn apply_table(&mut self, plan: TablePlan, carried: Vec<QualifiedName>) -> Result<()> {
        if plan.needs_types {
            if let Some(table) = crate::catalog::load_table(&self.source_sql, &plan.to).await? {
                crate::catalog::create_missing_types(&self.source_sql, &self.main.client, &table)
                    .await?;
            }
        }
        if !plan.statements.is_empty() {
            let sql = format!(
                "SET LOCAL lock_timeout = '10s'; {}",
                plan.statements.join("; ")
            );
            self.main
                .execute_in_txn(&sql)
                .await
                .with_context(|| format!("changing {} on the target as the source did", plan.to))?;
        }
        let mut tables = carried;
        if plan.joins {
            self.cfg
                .state
                .put_table(
                    &self.main.client,
                    &self.cfg.slot,
                    &plan.to,
                    TableState::Ready,
                )
                .await?;
            tables.push(plan.to.clone());
        } else if plan.from != plan.to {
            self.cfg
                .state
                .rename_table(&self.main.client, &self.cfg.slot, &plan.from, &plan.to)
                .await?;
            for t in tables.iter_mut().filter(|t| **t == plan.from) {
                *t = plan.to.clone();
            }
            for t in self.joins.resync.iter_mut().filter(|t| **t == plan.from) {
                *t = plan.to.clone();
            }
        }
        // Shapes of renamed tables are forgotten; their next Relation message
        // installs them again (their changes are still wanted).
        let _ = Arc::make_mut(&mut self.relations).set_allowed(tables);
        self.ignored.remove(&plan.oid);
        self.relation_cache.remove(&plan.oid);
        self.cfg.memory.remember_shape(plan.oid, plan.seen);
        if plan.resync && !self.joins.resync.contains(&plan.to) {
            self.joins.resync.push(plan.to.clone());
        }
        for note in &plan.notes {
            tracing::info!(table = %plan.to, "{note}");
        }
        self.main.forget_statements();
        self.lanes.forget_statements();
        for st in self.streams.values_mut() {
            st.session.forget_statements();
        }
        Ok(())
    }
}
