//! `chunks`: the bootstrap plan and the status of every chunk.

use super::*;

impl StateStore {
    /// Writes the plan into `chunks` (inside the caller's transaction).
    pub async fn record_plan(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        chunks: &[ChunkRow],
    ) -> Result<()> {
        let sql = format!(
            "INSERT INTO {} (pipeline, schema_name, table_name, chunk_no, start_block, end_block, key_lo, key_hi) \
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[]) \
             ON CONFLICT DO NOTHING",
            self.table("chunks")
        );
        let schemas: Vec<&str> = chunks.iter().map(|c| c.table.schema.as_str()).collect();
        let names: Vec<&str> = chunks.iter().map(|c| c.table.name.as_str()).collect();
        let nos: Vec<i32> = chunks.iter().map(|c| c.chunk_no).collect();
        let mut starts = Vec::with_capacity(chunks.len());
        let mut ends = Vec::with_capacity(chunks.len());
        let mut los = Vec::with_capacity(chunks.len());
        let mut his = Vec::with_capacity(chunks.len());
        for c in chunks {
            match c.range {
                ChunkRange::Blocks { start, end } => {
                    starts.push(Some(start));
                    ends.push(end);
                    los.push(None);
                    his.push(None);
                }
                ChunkRange::Keys { lo, hi } => {
                    starts.push(None);
                    ends.push(None);
                    los.push(lo);
                    his.push(hi);
                }
            }
        }
        client
            .execute(
                &sql,
                &[
                    &pipeline, &schemas, &names, &nos, &starts, &ends, &los, &his,
                ],
            )
            .await
            .pg_context(|| "recording the chunk plan on the target".into())?;
        Ok(())
    }

    /// Every chunk of a pipeline, in plan order.
    pub async fn chunks(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Vec<ChunkRow>> {
        let rows = client
            .query(
                &format!(
                    "SELECT c.schema_name, c.table_name, c.chunk_no, c.start_block, c.end_block, c.key_lo, c.key_hi, \
                            c.done_at IS NOT NULL, c.snapshot_id, \
                            c.done_at IS NOT NULL AND c.snapshot_id IS NULL \
                              AND c.snapshot_lsn IS DISTINCT FROM p.stream_start_lsn \
                     FROM {} c JOIN {} p USING (pipeline) \
                     WHERE c.pipeline = $1 ORDER BY c.schema_name, c.table_name, c.chunk_no",
                    self.table("chunks"),
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| "reading the chunk plan from the target".into())?;
        Ok(rows
            .iter()
            .map(|r| {
                let start: Option<i64> = r.get(3);
                ChunkRow {
                    table: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    chunk_no: r.get(2),
                    range: match start {
                        Some(start) => ChunkRange::Blocks {
                            start,
                            end: r.get(4),
                        },
                        None => ChunkRange::Keys {
                            lo: r.get(5),
                            hi: r.get(6),
                        },
                    },
                    done: r.get(7),
                    snapshot_id: r.get(8),
                    inexact: r.get(9),
                }
            })
            .collect())
    }

    /// Marks a chunk copied (inside the transaction that wrote its rows), with the
    /// snapshot it was read under (`None`: the slot's own) and the slot's position.
    #[allow(clippy::too_many_arguments)]
    pub async fn mark_chunk_done(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        chunk: &ChunkRow,
        rows: i64,
        bytes: i64,
        worker: i32,
        snapshot_id: Option<i64>,
        snapshot_lsn: Lsn,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET rows_copied = $5, bytes_copied = $6, worker = $7, snapshot_id = $8, \
                       snapshot_lsn = $9::text::pg_lsn, started_at = now(), done_at = clock_timestamp() \
                     WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3 AND chunk_no = $4",
                    self.table("chunks")
                ),
                &[
                    &pipeline,
                    &chunk.table.schema,
                    &chunk.table.name,
                    &chunk.chunk_no,
                    &rows,
                    &bytes,
                    &worker,
                    &snapshot_id,
                    &snapshot_lsn.to_string(),
                ],
            )
            .await
            .pg_context(|| format!("marking chunk {} of {} copied", chunk.chunk_no, chunk.table))?;
        Ok(())
    }

    /// Replaces the plan of one table (its rows are being copied again from scratch).
    pub async fn replace_table_plan(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
        chunks: &[ChunkRow],
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                    self.table("chunks")
                ),
                &[&pipeline, &table.schema, &table.name],
            )
            .await
            .pg_context(|| format!("replanning the copy of {table}"))?;
        self.record_plan(client, pipeline, chunks).await
    }

    /// Rows and COPY bytes copied per table, in plan order.
    pub async fn table_totals(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Vec<(QualifiedName, i64, i64)>> {
        let rows = client
            .query(
                &format!(
                    "SELECT t.schema_name, t.table_name, coalesce(sum(c.rows_copied), 0)::bigint, coalesce(sum(c.bytes_copied), 0)::bigint \
                     FROM {} t LEFT JOIN {} c USING (pipeline, schema_name, table_name) \
                     WHERE t.pipeline = $1 GROUP BY t.schema_name, t.table_name, t.position ORDER BY t.position",
                    self.table("pipeline_tables"),
                    self.table("chunks")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| "summing the copy".into())?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    r.get(2),
                    r.get(3),
                )
            })
            .collect())
    }

    /// Per table: rows copied, chunks done, chunks planned (for `status`).
    pub async fn chunk_progress(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Vec<(QualifiedName, i64, i64, i64)>> {
        let rows = client
            .query(
                &format!(
                    "SELECT schema_name, table_name, coalesce(sum(rows_copied), 0)::bigint, \
                            count(*) FILTER (WHERE done_at IS NOT NULL), count(*) \
                     FROM {} WHERE pipeline = $1 GROUP BY schema_name, table_name",
                    self.table("chunks")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the copy progress of pipeline {pipeline}"))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                )
            })
            .collect())
    }

    // ----- snapshots and copy positions ------------------------------------------------
}
