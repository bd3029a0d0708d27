//! The `pipelines` row of each pipeline: its phase, LSNs, settings, selection,
//! WAL budget, retry note, stop reason and switchover record.

use super::*;

impl StateStore {
    /// Names of every pipeline recorded in this schema.
    pub async fn pipeline_names(&self, client: &impl GenericClient) -> Result<Vec<String>> {
        Ok(client
            .query(
                &format!(
                    "SELECT pipeline FROM {} ORDER BY pipeline",
                    self.table("pipelines")
                ),
                &[],
            )
            .await
            .pg_context(|| "listing the pipelines on the target".into())?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Reads a pipeline's row, `None` when absent.
    pub async fn pipeline(
        &self,
        client: &impl GenericClient,
        name: &str,
    ) -> Result<Option<Pipeline>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT pipeline, publication, phase, stream_start_lsn::text, stop_reason \
                     FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&name],
            )
            .await
            .pg_context(|| format!("reading pipeline {name} from the state schema"))?;
        let Some(row) = row else { return Ok(None) };
        let tables = self
            .table_entries(client, name)
            .await?
            .into_iter()
            .map(|t| t.name)
            .collect();
        Ok(Some(Pipeline {
            name: row.get(0),
            publication: row.get(1),
            phase: Phase::parse(row.get(2))?,
            stream_start_lsn: row
                .get::<_, Option<String>>(3)
                .and_then(|s| s.parse::<Lsn>().ok()),
            tables,
            stop_reason: row.get(4),
        }))
    }

    /// A pipeline's row when the state schema exists and holds one; `None` otherwise
    /// (a target walshuttle never wrote to).
    pub async fn existing_pipeline(
        &self,
        client: &impl GenericClient,
        name: &str,
    ) -> Result<Option<Pipeline>> {
        match self.installed_version(client).await? {
            Some(v) if v >= STATE_VERSION => self.pipeline(client, name).await,
            Some(_) => {
                bail!(
                    "the state schema {} on the target was written by an older walshuttle: run `walshuttle run` or `walshuttle bootstrap` once to upgrade it",
                    self.schema
                )
            }
            None => Ok(None),
        }
    }

    /// Inserts or replaces a pipeline's row (its table list is written by
    /// [`StateStore::set_tables`]).
    pub async fn save_pipeline(&self, client: &impl GenericClient, p: &Pipeline) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} AS p (pipeline, publication, phase, stream_start_lsn, stop_reason) \
                     VALUES ($1, $2, $3, $4::text::pg_lsn, $5) \
                     ON CONFLICT (pipeline) DO UPDATE SET publication = EXCLUDED.publication, phase = EXCLUDED.phase, \
                       stream_start_lsn = EXCLUDED.stream_start_lsn, stop_reason = EXCLUDED.stop_reason, updated_at = now()",
                    self.table("pipelines")
                ),
                &[
                    &p.name,
                    &p.publication,
                    &p.phase.as_str(),
                    &p.stream_start_lsn.map(|l| l.to_string()),
                    &p.stop_reason,
                ],
            )
            .await
            .pg_context(|| format!("saving pipeline {} in the state schema", p.name))?;
        Ok(())
    }

    /// Moves a pipeline to `phase`.
    pub async fn set_phase(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        phase: Phase,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET phase = $2, updated_at = now() WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline, &phase.as_str()],
            )
            .await
            .pg_context(|| format!("recording the phase of pipeline {pipeline}"))?;
        Ok(())
    }

    /// Records the WAL budget `run` watches the slot against (`--max-retained-wal`),
    /// for `status`.
    pub async fn set_wal_budget(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        budget: Option<u64>,
    ) -> Result<()> {
        let budget = budget.map(|b| b.min(i64::MAX as u64) as i64);
        self.set_pipeline_column(
            client,
            pipeline,
            "wal_budget_bytes",
            &budget,
            "the WAL budget",
        )
        .await
    }

    /// Sets one column of a pipeline's row when it differs (no write otherwise).
    pub(super) async fn set_pipeline_column(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        column: &str,
        value: &(dyn tokio_postgres::types::ToSql + Sync),
        what: &str,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET {c} = $2, updated_at = now() WHERE pipeline = $1 \
                     AND {c} IS DISTINCT FROM $2",
                    self.table("pipelines"),
                    c = quote_ident(column)
                ),
                &[&pipeline, value],
            )
            .await
            .pg_context(|| format!("recording {what} of pipeline {pipeline}"))?;
        Ok(())
    }

    /// The WAL budget `run` last recorded for a pipeline.
    pub async fn wal_budget(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<u64>> {
        Ok(client
            .query_opt(
                &format!(
                    "SELECT wal_budget_bytes FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the WAL budget of pipeline {pipeline}"))?
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|b| b.max(0) as u64))
    }

    /// Records (or, with `None`, clears) why `run` stopped for good.
    pub async fn set_stop_reason(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        self.set_pipeline_column(client, pipeline, "stop_reason", &reason, "why it stopped")
            .await
    }

    /// Records the pipeline's table filter (`--schemas`, `--exclude-*`), or none.
    pub async fn set_table_filter(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        filter: &crate::selection::TableFilter,
    ) -> Result<()> {
        let text = (!filter.is_empty()).then(|| filter.to_json());
        self.set_pipeline_column(client, pipeline, "table_filter", &text, "the table filter")
            .await
    }

    /// The pipeline's table filter; empty when none was given.
    pub async fn table_filter(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<crate::selection::TableFilter> {
        let text: Option<String> = client
            .query_opt(
                &format!(
                    "SELECT table_filter FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the table filter of pipeline {pipeline}"))?
            .and_then(|r| r.get(0));
        match text {
            Some(t) => crate::selection::TableFilter::from_json(&t),
            None => Ok(Default::default()),
        }
    }

    /// Records the pipeline's column lists and row filters (`--columns`,
    /// `--row-filter`), or none.
    pub async fn set_row_selection(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        selection: &crate::row_selection::RowSelection,
    ) -> Result<()> {
        let text = selection.to_json();
        self.set_pipeline_column(
            client,
            pipeline,
            "row_selection",
            &text,
            "the column lists and row filters",
        )
        .await
    }

    /// The pipeline's column lists and row filters; empty when it has none (or
    /// does not exist).
    pub async fn row_selection(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<crate::row_selection::RowSelection> {
        let text: Option<String> = client
            .query_opt(
                &format!(
                    "SELECT row_selection FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| {
                format!("reading the column lists and row filters of pipeline {pipeline}")
            })?
            .and_then(|r| r.get(0));
        match text {
            Some(t) => crate::row_selection::RowSelection::from_json(&t),
            None => Ok(Default::default()),
        }
    }

    /// Records (or, with `None`, clears) why `run` is retrying while it retries
    /// (a server down or unreachable), for `status`; `since` is kept while the
    /// reason changes.
    pub async fn set_retrying(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET retrying = $2, \
                     retrying_since = CASE WHEN $2::text IS NULL THEN NULL ELSE coalesce(retrying_since, now()) END \
                     WHERE pipeline = $1 AND retrying IS DISTINCT FROM $2",
                    self.table("pipelines")
                ),
                &[&pipeline, &reason],
            )
            .await
            .pg_context(|| format!("recording why pipeline {pipeline} retries"))?;
        Ok(())
    }

    /// Why `run` retries, and for how long (whole seconds), if it recorded that it
    /// does.
    pub async fn retrying(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<(String, i64)>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT retrying, extract(epoch FROM now() - retrying_since)::bigint \
                     FROM {} WHERE pipeline = $1 AND retrying IS NOT NULL",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading why pipeline {pipeline} retries"))?;
        Ok(row.map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0))))
    }

    /// Records the phase of a `walshuttle switchover` of the pipeline (`fencing`,
    /// `draining`, ..., `done`, `aborted`) with a detail line, for `status`.
    pub async fn set_switchover(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        phase: &str,
        detail: Option<&str>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET switchover_phase = $2, switchover_detail = $3, switchover_at = now() \
                     WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline, &phase, &detail],
            )
            .await
            .pg_context(|| format!("recording the switchover phase of pipeline {pipeline}"))?;
        Ok(())
    }

    /// The last recorded switchover of the pipeline: (phase, detail, when), `None`
    /// when it never had one.
    pub async fn switchover(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Option<(String, Option<String>, String)>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT switchover_phase, switchover_detail, switchover_at::text FROM {} \
                     WHERE pipeline = $1 AND switchover_phase IS NOT NULL",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the switchover phase of pipeline {pipeline}"))?;
        Ok(row.map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get::<_, Option<String>>(2).unwrap_or_default(),
            )
        }))
    }

    /// Records which tables the pipeline was asked to carry: `--tables`, or every
    /// table (`None`).
    pub async fn set_selection(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        tables: Option<&[QualifiedName]>,
    ) -> Result<()> {
        let names: Vec<String> = tables
            .unwrap_or_default()
            .iter()
            .map(QualifiedName::quoted)
            .collect();
        client
            .execute(
                &format!(
                    "UPDATE {} SET selection = $2 WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline, &names],
            )
            .await
            .pg_context(|| format!("recording the table selection of pipeline {pipeline}"))?;
        Ok(())
    }

    /// Which tables the pipeline was asked to carry.
    pub async fn selection(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Selection> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT selection FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the table selection of pipeline {pipeline}"))?;
        let Some(names) = row.and_then(|r| r.get::<_, Option<Vec<String>>>(0)) else {
            return Ok(Selection::Unknown);
        };
        if names.is_empty() {
            return Ok(Selection::EveryTable);
        }
        let mut parsed = Vec::with_capacity(names.len());
        for n in names {
            parsed.push(QualifiedName::parse(&n).map_err(|e| {
                anyhow::anyhow!("pipeline {pipeline} records an unreadable table name: {e}")
            })?);
        }
        Ok(Selection::Named(parsed))
    }

    // ----- tables --------------------------------------------------------------

    /// Records that a pipeline captures DDL on the source (`--capture-ddl`): `run`
    /// then asks for the event trigger's messages.
    pub async fn set_capture_ddl(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        on: bool,
    ) -> Result<()> {
        self.set_pipeline_column(
            client,
            pipeline,
            "capture_ddl",
            &on,
            "whether it captures DDL",
        )
        .await
    }

    /// Whether a pipeline captures DDL on the source.
    pub async fn capture_ddl(&self, client: &impl GenericClient, pipeline: &str) -> Result<bool> {
        Ok(client
            .query_opt(
                &format!(
                    "SELECT capture_ddl FROM {} WHERE pipeline = $1",
                    self.table("pipelines")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading whether pipeline {pipeline} captures DDL"))?
            .is_some_and(|r| r.get::<_, bool>(0)))
    }
}
