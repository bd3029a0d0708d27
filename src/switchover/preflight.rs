//! The switchover's preflight: every fact the move depends on, read without
//! changing anything on either side, and the plan with its estimated timings.
//! Any problem found here ends the switchover before the fence.

use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;

use super::{reverse_name, FenceMethod, SwitchoverOptions};
use crate::catalog::{self, Identity};
use crate::pg::{Lsn, PgResultExt, QualifiedName};
use crate::state::{Phase, StateStore, TableState};

/// A check that failed, and what to do about it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Problem {
    /// Which check: `pipeline`, `lag`, `identity`, `sequences`, `fence`, `reverse`.
    pub check: &'static str,
    /// One line for the user, ending in what to do.
    pub message: String,
}

/// A sequence the target mirrors (see [`crate::sequences`]).
pub type PlannedSequence = crate::sequences::MappedSequence;

/// Estimated seconds of each step, from the current lag and table sizes.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Estimate {
    /// Fence: quick unless write transactions stay open (then up to
    /// `--fence-timeout`).
    pub fence: f64,
    /// Drain: about the current lag.
    pub drain: f64,
    /// Sequences.
    pub sequences: f64,
    /// Verify: every row hashed on both sides.
    pub verify: f64,
    /// The sum: the expected downtime.
    pub total: f64,
}

/// What the preflight found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    /// The pipeline.
    pub pipeline: String,
    /// Its publication on the source.
    pub publication: String,
    /// The tables it carries.
    pub tables: Vec<QualifiedName>,
    /// The source database (fenced by name).
    pub source_database: String,
    /// Whether `run` is attached to the slot.
    pub slot_active: bool,
    /// `pg_current_wal_lsn()` on the source.
    pub source_lsn: Option<Lsn>,
    /// What the target has applied.
    pub applied_lsn: Option<Lsn>,
    /// The slot's confirmed position.
    pub confirmed_lsn: Option<Lsn>,
    /// Lag in seconds (0 when caught up; null when unknown).
    pub lag_seconds: Option<f64>,
    /// Source rows (planner estimate), for the verify estimate.
    pub estimated_rows: i64,
    /// Sequences mirrored on the target.
    pub sequences: Vec<PlannedSequence>,
    /// Keyless tables (`REPLICA IDENTITY FULL` on the source) whose target copy
    /// gets the same identity during the switchover.
    pub identity_fixes: Vec<QualifiedName>,
    /// The reverse pipeline's name (slot and publication), with `--reverse`.
    pub reverse_pipeline: Option<String>,
    /// Estimated timings.
    pub estimate: Estimate,
    /// Failed checks (empty: ready).
    pub problems: Vec<Problem>,
}

/// Reads everything the switchover depends on; changes nothing.
pub async fn check(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    opts: &SwitchoverOptions,
) -> Result<Plan> {
    let mut problems = Vec::new();
    let name = &opts.slot;
    let Some(pipeline) = state.existing_pipeline(tgt, name).await? else {
        anyhow::bail!(
            "no pipeline {name} on the target (state schema {}): bootstrap and run it first, or pass --slot",
            state.schema()
        );
    };
    let source_database: String = src
        .query_one("SELECT current_database()::text", &[])
        .await
        .pg_context(|| "reading the source database".into())?
        .get(0);
    let mut plan = Plan {
        pipeline: name.clone(),
        publication: pipeline.publication.clone(),
        tables: pipeline.tables.clone(),
        source_database,
        slot_active: false,
        source_lsn: None,
        applied_lsn: None,
        confirmed_lsn: None,
        lag_seconds: None,
        estimated_rows: 0,
        sequences: Vec::new(),
        identity_fixes: Vec::new(),
        reverse_pipeline: opts.reverse.then(|| reverse_name(name)),
        estimate: Estimate::default(),
        problems: Vec::new(),
    };

    // The pipeline: streaming, consistent, nothing stopped or being copied.
    if pipeline.phase != Phase::Streaming {
        problems.push(Problem {
            check: "pipeline",
            message: format!(
                "pipeline {name} is {}, not streaming: start `walshuttle run` and let it reach streaming",
                pipeline.phase.as_str()
            ),
        });
    }
    if let Some(reason) = &pipeline.stop_reason {
        problems.push(Problem {
            check: "pipeline",
            message: format!("pipeline {name} stopped: {reason}"),
        });
    }
    let not_ready: Vec<String> = state
        .table_entries(tgt, name)
        .await?
        .into_iter()
        .filter(|e| e.state != TableState::Ready)
        .map(|e| format!("{} ({})", e.name, e.state.as_str()))
        .collect();
    if !not_ready.is_empty() {
        problems.push(Problem {
            check: "pipeline",
            message: format!(
                "tables of pipeline {name} are not ready: {}: let `walshuttle run` finish them",
                not_ready.join(", ")
            ),
        });
    }
    if pipeline.tables.is_empty() {
        problems.push(Problem {
            check: "pipeline",
            message: format!("pipeline {name} carries no tables"),
        });
    }
    // A target holding only some columns or rows of a table is not a copy the
    // applications can move to: what the lists and filters left out would be lost.
    let rows = state.row_selection(tgt, name).await?;
    if !rows.is_empty() {
        let shown: Vec<String> = rows.names().map(|t| t.to_string()).collect();
        problems.push(Problem {
            check: "pipeline",
            message: format!(
                "pipeline {name} carries only some columns or rows of {} (--columns/--row-filter), so the target is not a whole copy to move the applications to: switch over a pipeline of whole tables",
                shown.join(", ")
            ),
        });
    }

    // Lag, sampled a few times: a moment's spike under load is not "above".
    for attempt in 0..4 {
        measure_lag(src, tgt, state, name, &mut plan).await?;
        if !plan.slot_active || plan.lag_seconds.is_some_and(|l| l <= secs(opts.max_lag)) {
            break;
        }
        if attempt < 3 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let pending = state
        .live_positions(tgt, name, plan.applied_lsn.unwrap_or_default())
        .await?
        .len();
    if pending > 0 {
        problems.push(Problem {
            check: "pipeline",
            message: format!(
                "pipeline {name} is not yet consistent ({pending} copied ranges the stream has not passed): let `walshuttle run` stream until `walshuttle status` says consistent"
            ),
        });
    }
    if !plan.slot_active {
        problems.push(Problem {
            check: "pipeline",
            message: format!(
                "nothing streams from replication slot {name} on the source: start `walshuttle run --slot {name}` and switch over while it streams"
            ),
        });
    }
    match plan.lag_seconds {
        Some(l) if l <= secs(opts.max_lag) => {}
        lag => problems.push(Problem {
            check: "lag",
            message: format!(
                "the target lags {} behind the source, above --max-lag {}: wait for `walshuttle run` to catch up (see `walshuttle status`) or raise --max-lag",
                lag.map(super::report::seconds)
                    .unwrap_or_else(|| "an unknown time".into()),
                super::report::seconds(secs(opts.max_lag))
            ),
        }),
    }

    identities(src, tgt, state, &mut plan, &mut problems).await?;
    let (sequences, unmapped) = crate::sequences::plan(src, tgt, &plan.tables).await?;
    plan.sequences = sequences;
    problems.extend(unmapped.into_iter().map(|message| Problem {
        check: "sequences",
        message,
    }));
    if opts.fence == FenceMethod::ReadOnly {
        fence_allowed(src, &mut problems).await?;
    }
    proof_allowed(src, &mut problems).await?;
    if opts.fence_timeout >= opts.max_downtime {
        problems.push(Problem {
            check: "fence",
            message: format!(
                "--fence-timeout {} is not shorter than --max-downtime {}: lower it or raise --max-downtime",
                super::report::seconds(secs(opts.fence_timeout)),
                super::report::seconds(secs(opts.max_downtime))
            ),
        });
    }
    let prepared: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await
        .pg_context(|| "reading prepared transactions on the source".into())?
        .get(0);
    if prepared > 0 {
        problems.push(Problem {
            check: "fence",
            message: format!(
                "{prepared} prepared transactions wait on the source (pg_prepared_xacts): a fence cannot stop COMMIT PREPARED; commit or roll them back first"
            ),
        });
    }
    if opts.reverse {
        super::reverse::check(src, tgt, state, &plan, &mut problems).await?;
    }

    let lag = plan.lag_seconds.unwrap_or(0.0);
    plan.estimate = Estimate {
        fence: 0.3,
        drain: lag + 1.0,
        sequences: 0.05 + 0.01 * plan.sequences.len() as f64,
        verify: 0.2 + 0.1 * plan.tables.len() as f64 + plan.estimated_rows as f64 / 300_000.0,
        total: 0.0,
    };
    let e = &mut plan.estimate;
    e.total = e.fence + e.drain + e.sequences + e.verify;
    plan.problems = problems;
    Ok(plan)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Positions and lag, as `status` computes them: 0 s once the applied or confirmed
/// position has reached the source's current one, else the age of the last applied
/// source commit.
async fn measure_lag(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    name: &str,
    plan: &mut Plan,
) -> Result<()> {
    let row = src
        .query_one(
            "SELECT pg_current_wal_lsn()::text, s.confirmed_flush_lsn::text, coalesce(s.active, false) \
             FROM (VALUES (1)) v LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[&name],
        )
        .await
        .pg_context(|| format!("reading replication slot {name} on the source"))?;
    let lsn = |i: usize| {
        row.get::<_, Option<String>>(i)
            .and_then(|t| t.parse::<Lsn>().ok())
    };
    plan.source_lsn = lsn(0);
    plan.confirmed_lsn = lsn(1);
    plan.slot_active = row.get(2);
    let (applied, since) = match state.progress_detail(tgt, name).await? {
        Some((applied, _, since)) => (applied.and_then(|t| t.parse::<Lsn>().ok()), since),
        None => (None, None),
    };
    plan.applied_lsn = applied;
    let caught_up = plan.source_lsn.is_some_and(|c| {
        applied.is_some_and(|a| a >= c) || plan.confirmed_lsn.is_some_and(|f| f >= c)
    });
    plan.lag_seconds = if caught_up {
        Some(0.0)
    } else {
        since.map(|s| s.max(0.0))
    };
    Ok(())
}

/// Every table on the target with the identity the source has: a key where the
/// source has one; a keyless `REPLICA IDENTITY FULL` table gets FULL on the target
/// too (planned, set during the switchover) so the new primary can publish it.
async fn identities(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    plan: &mut Plan,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let on_source = catalog::list_tables(src, Some(&plan.tables), state.schema()).await?;
    for table in &on_source {
        plan.estimated_rows += table.estimated_rows.max(0);
        let Some(there) = catalog::load_table(tgt, &table.name).await? else {
            problems.push(Problem {
                check: "identity",
                message: format!(
                    "table {} is missing on the target: let `walshuttle run` create it, or `walshuttle tables resync {}`",
                    table.name,
                    table.name.quoted()
                ),
            });
            continue;
        };
        match (&table.identity, &there.identity) {
            (_, Identity::Key(_)) | (Identity::Full | Identity::Unusable, Identity::Full) => {}
            (Identity::Full, _) => plan.identity_fixes.push(table.name.clone()),
            (_, _) => problems.push(Problem {
                check: "identity",
                message: format!(
                    "table {} has no primary key or replica identity on the target although the source has one: create it on the target (as on the source) before switching over",
                    table.name
                ),
            }),
        }
    }
    Ok(())
}

/// Whether the source role may fence: change the database's settings (owner or
/// superuser) and end other sessions (superuser, or `pg_signal_backend`); and that
/// the database is not fenced already.
async fn fence_allowed(src: &Client, problems: &mut Vec<Problem>) -> Result<()> {
    let row = src
        .query_one(
            "SELECT r.rolsuper, pg_has_role(d.datdba, 'MEMBER'), pg_has_role('pg_signal_backend', 'MEMBER'), \
                    current_user::text, d.datname::text, \
                    EXISTS (SELECT 1 FROM pg_db_role_setting s, unnest(s.setconfig) c \
                            WHERE s.setdatabase = d.oid AND s.setrole = 0 \
                              AND c LIKE 'default\\_transaction\\_read\\_only=%'), \
                    d.datallowconn, d.datconnlimit \
             FROM pg_roles r, pg_database d \
             WHERE r.rolname = current_user AND d.datname = current_database()",
            &[],
        )
        .await
        .pg_context(|| "reading the source role's privileges".into())?;
    let (superuser, owner, signal): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    let (role, db): (String, String) = (row.get(3), row.get(4));
    if !(superuser || (owner && signal)) {
        problems.push(Problem {
            check: "fence",
            message: format!(
                "the source role {role} may not fence database {db} (it must own the database and be a member of pg_signal_backend to end other sessions, or be a superuser): GRANT pg_signal_backend TO {} and make it the owner, connect as a superuser, or stop the application and pass --fence none",
                crate::pg::quote_ident(&role)
            ),
        });
    }
    if !row.get::<_, bool>(6) || row.get::<_, i32>(7) == 0 {
        problems.push(Problem {
            check: "fence",
            message: format!(
                "database {db} on the source does not take connections from everyone (ALLOW_CONNECTIONS false or CONNECTION LIMIT 0: a fence left by an earlier switchover?): if writes should go there, run {} from another database, then switch over",
                super::fence::undo_sql(&db)
            ),
        });
    }
    if row.get::<_, bool>(5) {
        problems.push(Problem {
            check: "fence",
            message: format!(
                "database {db} on the source already sets default_transaction_read_only (a fence left by an earlier switchover?): if writes should go there, run ALTER DATABASE {} RESET default_transaction_read_only, then switch over",
                crate::pg::quote_ident(&db)
            ),
        });
    }
    Ok(())
}

/// Whether the source role may create the fence's proof slot (a temporary logical
/// slot: the REPLICATION attribute and a free slot).
async fn proof_allowed(src: &Client, problems: &mut Vec<Problem>) -> Result<()> {
    let row = src
        .query_one(
            "SELECT r.rolreplication OR r.rolsuper, current_user::text, \
                    (SELECT count(*) FROM pg_replication_slots) < current_setting('max_replication_slots')::int \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .pg_context(|| "reading the source role's replication privilege".into())?;
    let role: String = row.get(1);
    if !row.get::<_, bool>(0) {
        problems.push(Problem {
            check: "fence",
            message: format!(
                "the source role {role} lacks the REPLICATION attribute the fence's proof slot needs: ALTER ROLE {} REPLICATION",
                crate::pg::quote_ident(&role)
            ),
        });
    }
    if !row.get::<_, bool>(2) {
        problems.push(Problem {
            check: "fence",
            message: "the source has no free replication slot (max_replication_slots) for the fence's temporary proof slot: raise it by one".to_string(),
        });
    }
    Ok(())
}
