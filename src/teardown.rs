//! `walshuttle teardown`: retires a pipeline. Drops its replication slot (so the
//! source stops keeping WAL for it), its publication, and its rows in the state
//! schema (and the schema itself when no other pipeline is left in it). Replicated
//! tables and rows on the target are left alone. Idempotent: what is already gone is
//! skipped, and a teardown with nothing left says so and succeeds.

use std::io::IsTerminal;

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::bootstrap::{drop_slot_if_exists, slot_info};
use crate::config::Endpoint;
use crate::pg::{connect, quote_ident, PgResultExt};
use crate::state::StateStore;

/// Settings of `teardown`.
#[derive(Clone, Debug)]
pub struct TeardownOptions {
    /// Slot (= pipeline) name.
    pub slot: String,
    /// Publication; `None`: the one recorded for the pipeline, else the slot's name.
    /// Only the pipeline's own is dropped (see `publication::droppable`).
    pub publication: Option<String>,
    /// State schema on the target.
    pub state_schema: String,
}

/// The state tables walshuttle creates in its schema.
use crate::state::STATE_TABLES;

/// What exists and would be removed.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// The slot exists on the source (and whether a consumer holds it).
    pub slot: Option<bool>,
    /// The publication to drop: it exists and is this pipeline's own.
    pub publication: Option<String>,
    /// Why the publication is kept, when it exists but is not this pipeline's own.
    pub publication_kept: Option<String>,
    /// The state schema holds rows of this pipeline.
    pub state_rows: bool,
    /// No other pipeline is left in the state schema (so the schema goes too).
    pub drop_schema: bool,
    /// The pipeline's DDL capture trigger is installed on the source
    /// (`--capture-ddl`).
    pub ddl_trigger: bool,
}

impl Plan {
    /// Whether anything is left to remove.
    pub fn is_empty(&self) -> bool {
        self.slot.is_none()
            && self.publication.is_none()
            && !self.state_rows
            && !self.drop_schema
            && !self.ddl_trigger
    }

    /// One line per thing to remove.
    pub fn describe(&self, opts: &TeardownOptions) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(active) = self.slot {
            lines.push(format!(
                "replication slot {} on the source{}",
                opts.slot,
                if active {
                    " (in use now: its consumer must stop first)"
                } else {
                    ""
                }
            ));
        }
        if let Some(p) = &self.publication {
            lines.push(format!("publication {p} on the source"));
        }
        if self.ddl_trigger {
            lines.push(format!(
                "the DDL capture event trigger of pipeline {} on the source",
                opts.slot
            ));
        }
        if self.state_rows {
            lines.push(format!(
                "the state of pipeline {} in schema {} on the target",
                opts.slot, opts.state_schema
            ));
        }
        if self.drop_schema {
            lines.push(format!(
                "the state schema {} on the target (no other pipeline is left in it)",
                opts.state_schema
            ));
        }
        lines
    }
}

/// Works out what exists for the pipeline on both sides.
pub async fn plan(src: &Client, tgt: &Client, opts: &TeardownOptions) -> Result<Plan> {
    let state = StateStore::new(&opts.state_schema);
    let mut plan = Plan::default();
    let mut recorded_publication = None;
    let mut other_publications: Vec<(String, String)> = Vec::new();
    if state.installed_version(tgt).await?.is_some() {
        StateStore::open_upgrading(tgt, &opts.state_schema).await?;
        recorded_publication = state
            .pipeline(tgt, &opts.slot)
            .await?
            .map(|p| p.publication);
        let others = tgt
            .query(
                &format!(
                    "SELECT pipeline, publication FROM {} WHERE pipeline <> $1 ORDER BY 1",
                    state.table("pipelines")
                ),
                &[&opts.slot],
            )
            .await
            .pg_context(|| "listing the other pipelines on the target".into())?;
        other_publications = others.iter().map(|r| (r.get(0), r.get(1))).collect();
        plan.state_rows = has_state_rows(tgt, &state, &opts.slot).await?;
        plan.drop_schema = others.is_empty();
    }
    plan.slot = slot_info(src, &opts.slot).await?.map(|s| s.active);
    plan.ddl_trigger = crate::ddl_capture::trigger::installed(src, &opts.slot).await?;
    let publication = opts
        .publication
        .clone()
        .or(recorded_publication.clone())
        .unwrap_or_else(|| opts.slot.clone());
    let recorded_here = recorded_publication.as_deref() == Some(publication.as_str());
    let recorded_by_other = other_publications
        .iter()
        .find(|(_, p)| *p == publication)
        .map(|(pipeline, _)| pipeline.as_str());
    match crate::publication::droppable(
        src,
        &publication,
        &opts.slot,
        recorded_here,
        recorded_by_other,
    )
    .await?
    {
        Ok(true) => plan.publication = Some(publication),
        Ok(false) => {}
        Err(kept) => plan.publication_kept = Some(kept),
    }
    Ok(plan)
}

async fn has_state_rows(tgt: &Client, state: &StateStore, pipeline: &str) -> Result<bool> {
    for table in STATE_TABLES {
        if table == "schema_version" || !state_table_exists(tgt, state, table).await? {
            continue;
        }
        let found = tgt
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE pipeline = $1 LIMIT 1",
                    state.table(table)
                ),
                &[&pipeline],
            )
            .await
            .pg_context(|| format!("reading {} on the target", state.table(table)))?
            .is_some();
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn state_table_exists(
    tgt: &impl tokio_postgres::GenericClient,
    state: &StateStore,
    table: &str,
) -> Result<bool> {
    Ok(tgt
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&state.table(table)])
        .await
        .pg_context(|| "looking up the state tables on the target".into())?
        .get(0))
}

/// What a teardown did, one line per step, for the user.
#[derive(Clone, Debug, Default)]
pub struct TeardownSummary {
    /// What was removed or kept, in order.
    pub lines: Vec<String>,
    /// True when nothing was left to remove.
    pub nothing_left: bool,
}

/// Asks on the terminal whether to go ahead. Without a terminal on stdin it refuses:
/// scripts must pass `--yes`.
pub async fn confirm_on_terminal(what: &[String]) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("teardown needs confirmation and stdin is not a terminal: pass --yes to drop the pipeline without asking");
    }
    let mut prompt = String::from("This drops:\n");
    for line in what {
        prompt.push_str(&format!("  - {line}\n"));
    }
    prompt.push_str("Replicated tables on the target are left as they are.\nProceed? [y/N] ");
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut err = std::io::stderr();
        let _ = err.write_all(prompt.as_bytes());
        let _ = err.flush();
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| anyhow::anyhow!("reading the confirmation failed: {e}"))?
    .map_err(|e| anyhow::anyhow!("reading the confirmation failed: {e}"))?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// Tears the pipeline down. `yes` skips the confirmation.
pub async fn teardown(
    source: &Endpoint,
    target: &Endpoint,
    opts: &TeardownOptions,
    yes: bool,
) -> Result<TeardownSummary> {
    let src = connect(source, "teardown").await?;
    let mut tgt = connect(target, "teardown").await?;
    let plan = plan(&src, &tgt, opts).await?;
    let mut summary = TeardownSummary::default();
    if let Some(kept) = &plan.publication_kept {
        summary.lines.push(kept.clone());
    }
    if plan.is_empty() {
        summary.nothing_left = true;
        summary.lines.push(format!(
            "nothing to tear down: no replication slot {slot} on the source, no publication to drop, and no state for pipeline {slot} in schema {} on the target",
            opts.state_schema,
            slot = opts.slot
        ));
        return Ok(summary);
    }
    if !yes && !confirm_on_terminal(&plan.describe(opts)).await? {
        bail!("teardown cancelled: nothing was dropped");
    }

    if plan.slot.is_some() {
        drop_slot_if_exists(&src, &opts.slot).await?;
        summary.lines.push(format!(
            "dropped replication slot {} on the source",
            opts.slot
        ));
    }
    if let Some(p) = &plan.publication {
        src.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(p)))
            .await
            .pg_context(|| format!("dropping publication {p} on the source"))?;
        summary
            .lines
            .push(format!("dropped publication {p} on the source"));
    }
    if plan.ddl_trigger {
        crate::ddl_capture::trigger::remove(&src, &opts.slot).await?;
        summary.lines.push(format!(
            "dropped the DDL capture event trigger of pipeline {} on the source",
            opts.slot
        ));
    }
    // A reverse pipeline's target is the old source of a switchover: walshuttle's
    // read-only settings there go with the way back.
    if let Some(line) =
        crate::switchover::reverse::lift_old_fence(&src, &tgt, &opts.state_schema, &opts.slot)
            .await?
    {
        summary.lines.push(line);
    }
    if plan.state_rows || plan.drop_schema {
        let state = StateStore::new(&opts.state_schema);
        let tx = tgt
            .transaction()
            .await
            .pg_context(|| "removing the pipeline's state".into())?;
        // Serialises with migrations and with another teardown of this schema.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('walshuttle state ' || $1))",
            &[&opts.state_schema],
        )
        .await
        .pg_context(|| "locking the state schema".into())?;
        for table in STATE_TABLES {
            if table == "schema_version" || !state_table_exists(&tx, &state, table).await? {
                continue;
            }
            tx.execute(
                &format!("DELETE FROM {} WHERE pipeline = $1", state.table(table)),
                &[&opts.slot],
            )
            .await
            .pg_context(|| format!("removing pipeline {} from {}", opts.slot, table))?;
        }
        if plan.state_rows {
            summary.lines.push(format!(
                "removed the state of pipeline {} from schema {} on the target",
                opts.slot, opts.state_schema
            ));
        }
        let remaining: i64 = if state_table_exists(&tx, &state, "pipelines").await? {
            tx.query_one(
                &format!("SELECT count(*) FROM {}", state.table("pipelines")),
                &[],
            )
            .await
            .pg_context(|| "counting the pipelines left".into())?
            .get(0)
        } else {
            0
        };
        if remaining == 0 {
            let tables = STATE_TABLES
                .iter()
                .map(|t| state.table(t))
                .collect::<Vec<_>>()
                .join(", ");
            tx.batch_execute(&format!("DROP TABLE IF EXISTS {tables}"))
                .await
                .pg_context(|| "dropping the state tables".into())?;
            let schema = quote_ident(&opts.state_schema);
            // Only an otherwise empty schema is dropped (RESTRICT): objects someone
            // else put there keep it alive.
            let empty = opts.state_schema != "public"
                && tx
                    .query_one(
                        "SELECT NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1) \
                            AND NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1) \
                            AND NOT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = $1)",
                        &[&opts.state_schema],
                    )
                    .await
                    .pg_context(|| "checking the state schema is empty".into())?
                    .get::<_, bool>(0);
            if empty {
                tx.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} RESTRICT"))
                    .await
                    .pg_context(|| format!("dropping the state schema {schema}"))?;
                summary.lines.push(format!(
                    "dropped the state schema {} on the target (no other pipeline left)",
                    opts.state_schema
                ));
            } else {
                summary.lines.push(format!(
                    "dropped walshuttle's state tables; kept schema {} on the target: it holds other objects",
                    opts.state_schema
                ));
            }
        }
        tx.commit()
            .await
            .pg_context(|| "removing the pipeline's state".into())?;
    }
    summary
        .lines
        .push("replicated tables and rows on the target were left as they are".into());
    Ok(summary)
}
