//! A key change the copies cannot complete (see [`Decision::Refetch`]): its row is
//! read again from the source (see [`crate::stream::refetch`]) and written, and the
//! read is recorded as the row's copy position in the open main transaction.

use super::*;
use crate::positions::{Position, Scope};
use crate::state::StoredScope;
use crate::stream::decoder::TupleData;
use crate::stream::refetch;

impl Session<'_> {
    /// Reads the row of relation `rel` whose new image `new` (made by source
    /// transaction `xid`) lacks unchanged TOASTed values, records the read as the
    /// row's copy position inside the open main transaction, and returns the
    /// insert to apply (none when the row is gone from the source: a later change
    /// in the stream deleted or moved it) with the position, which the caller adds
    /// to the positions deciding this table's changes.
    pub(super) async fn refetch(
        &mut self,
        xid: u32,
        rel: u32,
        new: TupleData,
    ) -> Result<(Option<Op>, Position)> {
        // Its statements run on the main connection beside row changes: nothing in
        // flight may share them.
        self.barrier().await?;
        self.main.flush(&self.relations).await?;
        if self.current.is_some() {
            self.main_mark = 0;
            self.main_has_partial = true;
        }
        let shape = self.relations.get(rel)?.clone();
        // Keys in the order copy positions store them: the source's identity key.
        let key_columns = crate::catalog::load_table(&self.source_sql, &shape.name)
            .await?
            .map(|t| t.key)
            .unwrap_or_default();
        // A row moved into a row filter (`--row-filter`) is read only if it is
        // still inside it.
        let row_filter = crate::row_selection::current(
            &self.source_sql,
            &self.main.client,
            &self.cfg.state,
            &self.cfg.slot,
        )
        .await?
        .get(&shape.name)
        .and_then(|r| r.filter.clone());
        let read = refetch::read_row(
            self.source,
            &shape,
            &key_columns,
            &new,
            xid,
            row_filter.as_deref(),
        )
        .await?;
        let snapshot_id = self
            .cfg
            .state
            .record_snapshot(
                &self.main.client,
                &self.cfg.slot,
                &read.snapshot,
                "key change read again",
            )
            .await?;
        let id = self
            .cfg
            .state
            .add_position(
                &self.main.client,
                &self.cfg.slot,
                &shape.name,
                &StoredScope::Keys(vec![read.key_text.clone()]),
                snapshot_id,
            )
            .await?;
        tracing::info!(
            table = %shape.name,
            key = %read.key_text.join(", "),
            xid,
            found = read.row.is_some(),
            "a key change moved a row with unchanged TOASTed values into a range copied earlier (or into the row filter): its row was read again from the source, and later changes the read holds are skipped"
        );
        let position = Position {
            id,
            table: shape.name.clone(),
            scope: Scope::Keys {
                columns: key_columns,
                keys: vec![read.key],
            },
            snapshot: Arc::new(read.snapshot),
        };
        Ok((read.row.map(|new| Op::Insert { rel, new }), position))
    }
}
