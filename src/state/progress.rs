//! `progress` and `watermarks`: how far the stream has applied, written in each
//! apply transaction, and the timestamps catch-up repairs from.

use super::*;

impl StateStore {
    /// Sets the applied position of a pipeline (inside the caller's transaction).
    pub async fn set_progress(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        applied: Lsn,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (pipeline, applied_lsn) VALUES ($1, $2::text::pg_lsn) \
                     ON CONFLICT (pipeline) DO UPDATE SET applied_lsn = EXCLUDED.applied_lsn, updated_at = now()",
                    self.table("progress")
                ),
                &[&pipeline, &applied.to_string()],
            )
            .await
            .pg_context(|| format!("recording the applied position of pipeline {pipeline}"))?;
        Ok(())
    }

    /// SQL marking `tables` to be copied again ([`TableState::Resync`]), run in the
    /// apply transaction whose changes revealed it, so the need survives a crash.
    pub fn resync_sql(&self, pipeline: &str, tables: &[QualifiedName]) -> String {
        tables
            .iter()
            .map(|t| {
                format!(
                    "UPDATE {} SET state = 'resync' WHERE pipeline = {} AND schema_name = {} AND table_name = {}",
                    self.table("pipeline_tables"),
                    quote_literal(pipeline),
                    quote_literal(&t.schema),
                    quote_literal(&t.name)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The SQL each apply transaction runs before COMMIT: the progress row moves to
    /// the end of the last source transaction it applied (never backwards).
    pub fn progress_sql(&self, pipeline: &str, end_lsn: Lsn, commit_unix_micros: i64) -> String {
        let secs = commit_unix_micros as f64 / 1e6;
        format!(
            "INSERT INTO {} AS p (pipeline, applied_lsn, commit_time, updated_at) \
             VALUES ({}, '{end_lsn}', to_timestamp({secs:.6}), now()) \
             ON CONFLICT (pipeline) DO UPDATE SET applied_lsn = greatest(p.applied_lsn, EXCLUDED.applied_lsn), \
             commit_time = EXCLUDED.commit_time, updated_at = now()",
            self.table("progress"),
            quote_literal(pipeline)
        )
    }

    /// A write that touches the progress row without moving it (to force a WAL
    /// flush with a synchronous commit when stopping).
    pub fn progress_touch_sql(&self, pipeline: &str) -> String {
        format!(
            "UPDATE {} SET updated_at = now() WHERE pipeline = {}",
            self.table("progress"),
            quote_literal(pipeline)
        )
    }

    /// The applied position of a pipeline, if recorded.
    pub async fn progress(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<Lsn>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT applied_lsn::text FROM {} WHERE pipeline = $1",
                    self.table("progress")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the applied position of pipeline {pipeline}"))?;
        Ok(row.and_then(|r| r.get::<_, String>(0).parse().ok()))
    }

    /// Applied position, source commit time of the last applied transaction, and
    /// seconds since then (by the target's clock), for `status`.
    pub async fn progress_detail(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<(Option<String>, Option<String>, Option<f64>)>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT applied_lsn::text, commit_time::text, \
                            extract(epoch FROM clock_timestamp() - commit_time)::float8 \
                     FROM {} WHERE pipeline = $1",
                    self.table("progress")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the progress of pipeline {pipeline}"))?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    // ----- chunks ----------------------------------------------------------------

    /// Records the watermark a catch-up used for a table.
    pub async fn set_watermark(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
        created: Option<&str>,
        updated: Option<&str>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (pipeline, schema_name, table_name, created_max, updated_max) \
                     VALUES ($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz) \
                     ON CONFLICT (pipeline, schema_name, table_name) DO UPDATE SET created_max = EXCLUDED.created_max, \
                       updated_max = EXCLUDED.updated_max",
                    self.table("watermarks")
                ),
                &[&pipeline, &table.schema, &table.name, &created, &updated],
            )
            .await
            .pg_context(|| format!("recording the watermark of {table}"))?;
        Ok(())
    }
}
