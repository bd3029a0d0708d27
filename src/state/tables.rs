//! `pipeline_tables`: the tables each pipeline carries and where each stands
//! (copying, held, copied, ready, resync).

use super::*;

impl StateStore {
    /// Replaces a pipeline's table list.
    pub async fn set_tables(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        tables: &[TableEntry],
    ) -> Result<()> {
        let ctx = || format!("saving the tables of pipeline {pipeline}");
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE pipeline = $1",
                    self.table("pipeline_tables")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(ctx)?;
        let schemas: Vec<&str> = tables.iter().map(|t| t.name.schema.as_str()).collect();
        let names: Vec<&str> = tables.iter().map(|t| t.name.name.as_str()).collect();
        let states: Vec<&str> = tables.iter().map(|t| t.state.as_str()).collect();
        let columns: Vec<Option<&str>> = tables.iter().map(|t| t.chunk_column.as_deref()).collect();
        client
            .execute(
                &format!(
                    "INSERT INTO {} (pipeline, schema_name, table_name, position, state, chunk_column) \
                     SELECT $1, s, t, (o - 1)::int, st, c \
                     FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS u(s, t, st, c, o)",
                    self.table("pipeline_tables")
                ),
                &[&pipeline, &schemas, &names, &states, &columns],
            )
            .await
            .pg_context(ctx)?;
        Ok(())
    }

    /// Adds `table` to a pipeline (at the end of its list) or sets its state.
    pub async fn put_table(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
        state: TableState,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {t} (pipeline, schema_name, table_name, position, state) \
                     SELECT $1, $2, $3, coalesce(max(position) + 1, 0), $4 FROM {t} WHERE pipeline = $1 \
                     ON CONFLICT (pipeline, schema_name, table_name) DO UPDATE SET state = EXCLUDED.state",
                    t = self.table("pipeline_tables")
                ),
                &[&pipeline, &table.schema, &table.name, &state.as_str()],
            )
            .await
            .pg_context(|| format!("recording {table} in pipeline {pipeline}"))?;
        Ok(())
    }

    /// Forgets every change held for a pipeline's tables (its stream starts afresh
    /// from a new slot, after everything they describe).
    pub async fn clear_held(&self, client: &impl GenericClient, pipeline: &str) -> Result<()> {
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE pipeline = $1",
                    self.table("held_changes")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("clearing the held changes of pipeline {pipeline}"))?;
        Ok(())
    }

    /// Removes `table` from a pipeline, with its plan, positions and held changes.
    pub async fn remove_table(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: &QualifiedName,
    ) -> Result<()> {
        for t in ["pipeline_tables", "chunks", "held_changes"] {
            client
                .execute(
                    &format!(
                        "DELETE FROM {} WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                        self.table(t)
                    ),
                    &[&pipeline, &table.schema, &table.name],
                )
                .await
                .pg_context(|| format!("removing {table} from pipeline {pipeline}"))?;
        }
        self.clear_positions(client, pipeline, Some(table)).await
    }

    /// Follows a table renamed on the source (`--capture-ddl`): every row of the
    /// pipeline that names it takes the new name (inside the caller's transaction).
    pub async fn rename_table(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        from: &QualifiedName,
        to: &QualifiedName,
    ) -> Result<()> {
        for t in [
            "pipeline_tables",
            "chunks",
            "held_changes",
            "copy_positions",
            "watermarks",
        ] {
            client
                .execute(
                    &format!(
                        "UPDATE {} SET schema_name = $4, table_name = $5 \
                         WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                        self.table(t)
                    ),
                    &[&pipeline, &from.schema, &from.name, &to.schema, &to.name],
                )
                .await
                .pg_context(|| {
                    format!("recording that {from} is now {to} in pipeline {pipeline}")
                })?;
        }
        Ok(())
    }

    /// A pipeline's tables with their states, in plan order.
    pub async fn table_entries(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
    ) -> Result<Vec<TableEntry>> {
        Ok(client
            .query(
                &format!(
                    "SELECT schema_name, table_name, state, chunk_column FROM {} \
                     WHERE pipeline = $1 ORDER BY position",
                    self.table("pipeline_tables")
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading the tables of pipeline {pipeline}"))?
            .iter()
            .map(|r| TableEntry {
                name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                state: TableState::parse(r.get(2)),
                chunk_column: r.get(3),
            })
            .collect())
    }

    /// Moves one table (or, with `None`, every table) of a pipeline to `state`.
    pub async fn set_table_state(
        &self,
        client: &impl GenericClient,
        pipeline: &str,
        table: Option<&QualifiedName>,
        state: TableState,
    ) -> Result<()> {
        let (schema, name) = match table {
            Some(t) => (Some(t.schema.as_str()), Some(t.name.as_str())),
            None => (None, None),
        };
        client
            .execute(
                &format!(
                    "UPDATE {} SET state = $4 WHERE pipeline = $1 \
                     AND ($2::text IS NULL OR (schema_name = $2 AND table_name = $3))",
                    self.table("pipeline_tables")
                ),
                &[&pipeline, &schema, &name, &state.as_str()],
            )
            .await
            .pg_context(|| format!("recording the state of the tables of pipeline {pipeline}"))?;
        Ok(())
    }

    /// Whether the state schema holds anything about `table` for this pipeline
    /// (then walshuttle owns that table's rows on the target).
    pub async fn owns_table(
        &self,
        client: &Client,
        pipeline: &str,
        table: &QualifiedName,
    ) -> Result<bool> {
        if self.installed_version(client).await?.is_none() {
            return Ok(false);
        }
        Ok(client
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                    self.table("pipeline_tables")
                ),
                &[&pipeline, &table.schema, &table.name],
            )
            .await
            .pg_context(|| format!("reading the state of {table}"))?
            .is_some())
    }

    // ----- progress -------------------------------------------------------------
}
