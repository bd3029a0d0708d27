//! Partitions that appear under a carried partitioned table after the bootstrap
//! (`CREATE TABLE … PARTITION OF`, `ATTACH PARTITION`). Naming a partitioned table
//! means all its partitions, now and later; without `--capture-ddl` nothing in the
//! stream announces a new one (its rows are simply not decoded, since the
//! publication lists leaf partitions), so `run` looks for them and brings each in
//! exactly as `walshuttle tables add` does ([`crate::tables`]): created on the
//! target, copied under a snapshot of its own with that snapshot as its copy
//! position, then streamed. `verify` compares them too, so it never calls a
//! parent equal while rows routed to a new partition are missing.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;

use crate::config::Endpoint;
use crate::pg::{connect, PgResultExt, QualifiedName};
use crate::state::{Pipeline, Selection, StateStore};
use crate::tables::{TablesAction, TablesOptions};

/// How often `run` looks for new partitions.
const POLL: Duration = Duration::from_secs(5);

/// The source's partitions that the pipeline's selection carries but the pipeline
/// does not carry yet (created or attached after the bootstrap): the leaf
/// partitions of a named partitioned table, or, in a pipeline of every table, the
/// new partitions of a partitioned table whose other partitions it carries (a
/// partitioned table created later is a new table: `status` names it, a person
/// decides).
pub async fn untracked(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    pipeline: &Pipeline,
) -> Result<Vec<QualifiedName>> {
    let candidates = crate::status::untracked_tables(src, tgt, state, pipeline).await?;
    if candidates.is_empty() {
        return Ok(candidates);
    }
    let quoted: Vec<String> = candidates.iter().map(QualifiedName::quoted).collect();
    let carried: Vec<String> = pipeline.tables.iter().map(QualifiedName::quoted).collect();
    let named = matches!(
        state.selection(tgt, &pipeline.name).await?,
        Selection::Named(_)
    );
    let partitions: Vec<String> = src
        .query(
            "SELECT s.name FROM unnest($1::text[]) AS s(name) \
             JOIN pg_class c ON c.oid = to_regclass(s.name) \
             WHERE c.relispartition AND ($3 OR pg_partition_root(c.oid) IN ( \
                 SELECT pg_partition_root(to_regclass(t.name)) FROM unnest($2::text[]) AS t(name)))",
            &[&quoted, &carried, &named],
        )
        .await
        .pg_context(|| "reading which new tables are partitions on the source".into())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(candidates
        .into_iter()
        .filter(|t| partitions.contains(&t.quoted()))
        .collect())
}

/// `run`'s task that brings new partitions of carried partitioned tables into the
/// pipeline; ended when dropped (a copy in flight is rolled back on the target and
/// its table stays `held`, which `run`'s copier finishes).
pub struct PartitionWatch(tokio::task::JoinHandle<()>);

impl Drop for PartitionWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PartitionWatch {
    /// Every few seconds, adds the pipeline's new partitions (see [`untracked`]). A
    /// pipeline with `--capture-ddl` is left to its trigger, which adds them in the
    /// creating transaction. A partition without a usable replica identity is not
    /// added (published, the source would refuse its UPDATEs and DELETEs): it is
    /// logged once with the statement that fixes it, as `status` names it.
    pub fn start(
        source: &Endpoint,
        target: &Endpoint,
        state: &StateStore,
        pipeline: &str,
        allow_target_triggers: bool,
    ) -> PartitionWatch {
        let (source, target, state) = (source.clone(), target.clone(), state.clone());
        let pipeline = pipeline.to_string();
        PartitionWatch(tokio::spawn(async move {
            // What was last said about each table that could not join, so it is
            // said once.
            let mut told: BTreeMap<QualifiedName, String> = BTreeMap::new();
            let mut failing: Option<String> = None;
            // The sessions that look, kept across rounds.
            let mut sessions: Option<(Client, Client)> = None;
            loop {
                tokio::time::sleep(POLL).await;
                let round = async {
                    let (src, tgt) = match sessions.take() {
                        Some((s, t)) if !s.is_closed() && !t.is_closed() => (s, t),
                        _ => (
                            connect(&source, "partitions").await?,
                            connect(&target, "partitions").await?,
                        ),
                    };
                    let result = adopt(
                        &source,
                        &target,
                        (&src, &tgt),
                        &state,
                        &pipeline,
                        allow_target_triggers,
                        &mut told,
                    )
                    .await;
                    sessions = Some((src, tgt));
                    result
                };
                match round.await {
                    Ok(()) => failing = None,
                    Err(e) => {
                        let text = format!("{e:#}");
                        if failing.as_ref() != Some(&text) {
                            tracing::warn!(error = %text, "could not look for new partitions of the carried tables; trying again");
                            failing = Some(text);
                        }
                    }
                }
            }
        }))
    }
}

/// One look: adds every new partition that can join.
async fn adopt(
    source: &Endpoint,
    target: &Endpoint,
    (src, tgt): (&Client, &Client),
    state: &StateStore,
    pipeline: &str,
    allow_target_triggers: bool,
    told: &mut BTreeMap<QualifiedName, String>,
) -> Result<()> {
    let Some(p) = state.pipeline(tgt, pipeline).await? else {
        return Ok(());
    };
    if !p.phase.copied() || state.capture_ddl(tgt, pipeline).await? {
        return Ok(());
    }
    let new = untracked(src, tgt, state, &p).await?;
    told.retain(|t, _| new.contains(t));
    for name in new {
        let problem = crate::catalog::load_table(src, &name)
            .await?
            .and_then(|t| t.replicability_problem());
        if let Some(problem) = problem {
            if told.get(&name) != Some(&problem) {
                tracing::warn!(table = %name, "a new partition of a carried table is left out because {problem}; it joins by itself once it has one");
                told.insert(name, problem);
            }
            continue;
        }
        tracing::info!(table = %name, "a new partition of a carried table: adding it to the pipeline, copied under a snapshot of its own as `walshuttle tables add` does");
        let opts = TablesOptions {
            action: TablesAction::Add,
            tables: vec![name.clone()],
            slot: pipeline.to_string(),
            state_schema: state.schema().to_string(),
            truncate_target: false,
            allow_target_triggers,
            rows: Default::default(),
        };
        match crate::tables::change(source, target, &opts).await {
            Ok(lines) => {
                told.remove(&name);
                for line in lines {
                    tracing::info!(table = %name, "{line}");
                }
            }
            Err(e) => {
                let text = format!("{e:#}");
                if told.get(&name) != Some(&text) {
                    tracing::warn!(table = %name, error = %text, "could not add the new partition of a carried table; trying again");
                    told.insert(name, text);
                }
            }
        }
    }
    Ok(())
}
