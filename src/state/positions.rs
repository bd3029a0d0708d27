//! Copy positions: the snapshots that rows written outside the stream were read
//! under, the changes held for tables being copied, and the lock and version that
//! keep apply transactions and rewrites apart.

use super::*;

impl StateStore {
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
}

/// The advisory lock key that serializes rewrites outside the stream with the apply
/// transactions of one pipeline.
pub(super) fn positions_lock_key(schema: &str, pipeline: &str) -> String {
    format!(
        "hashtextextended({}, 7081)",
        quote_literal(&format!("walshuttle positions {schema}.{pipeline}"))
    )
}

/// The snapshot in columns `at..at + 4` of `row`: xmin, xmax, xip, lsn as text.
pub(super) fn snapshot_view(row: &tokio_postgres::Row, at: usize) -> Result<SnapshotView> {
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
