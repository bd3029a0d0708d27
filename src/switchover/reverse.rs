//! The way back (`--reverse`): a pipeline from the new primary (the old target) to
//! the old source, started without a copy.
//!
//! Both sides are equal at the fence (verified), and nothing has been written on
//! the new primary since, except by the forward stream, which is drained. So a slot
//! created on the new primary now begins exactly where the two sides are equal:
//! its consistent point is the reverse pipeline's stream start and applied
//! position, recorded on the old source as a streaming pipeline, and
//! `walshuttle run --source NEW --target OLD --slot <slot>_reverse` streams from
//! there. The slot is created before the switchover reports done, i.e. before the
//! application is pointed at the new primary: no write there can predate it.
//!
//! The old source stays fenced (read-only by default), so the application cannot
//! write there by mistake. The reverse stream must write there, though: its role
//! gets `ALTER ROLE … IN DATABASE … SET default_transaction_read_only = off`, a
//! setting PostgreSQL gives precedence over the database's. This opens the old
//! source to every session of that role, so the application should not share
//! walshuttle's role (the report says which role it is). The old source's foreign
//! keys and triggers are its own: the reverse `run` writes in replica mode when the
//! role may (checked by the preflight), as for any target.

use anyhow::Result;
use tokio_postgres::Client;

use super::preflight::{Plan, Problem};
use super::{reverse_name, SwitchoverOptions};
use crate::pg::{quote_ident, Lsn, PgResultExt};
use crate::publication::{self, Owner};
use crate::state::{Phase, Pipeline, StateStore, TableEntry, TableState, STATE_VERSION};

/// The reverse pipeline that was started.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReverseInfo {
    /// Its name: slot on the new primary, publication there, pipeline on the old
    /// source.
    pub pipeline: String,
    /// Where its stream starts: the slot's consistent point on the new primary.
    pub start_lsn: Lsn,
    /// The old source's role that may write despite the fence.
    pub writer_role: String,
    /// The old source's database.
    pub database: String,
}

/// Preflight checks for `--reverse` (read-only).
pub async fn check(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    plan: &Plan,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let name = reverse_name(&plan.pipeline);
    let mut fail = |message: String| {
        problems.push(Problem {
            check: "reverse",
            message,
        })
    };
    let row = tgt
        .query_one(
            "SELECT current_setting('wal_level'), \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
                    (SELECT count(*) FROM pg_replication_slots) < current_setting('max_replication_slots')::int",
            &[&name],
        )
        .await
        .pg_context(|| "reading the target's replication settings".into())?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        fail(format!(
            "--reverse needs wal_level = logical on the target (it is {wal_level}): set it and restart the target, or switch over without --reverse"
        ));
    }
    if row.get::<_, bool>(1) {
        fail(format!(
            "replication slot {name} already exists on the target: retire the old reverse pipeline with `walshuttle teardown --source TARGET --target SOURCE --slot {name}`"
        ));
    }
    if !row.get::<_, bool>(2) {
        fail("the target has no free replication slot (max_replication_slots) for the reverse pipeline: raise it".to_string());
    }
    match publication::owner(tgt, &name).await? {
        Owner::Missing => {}
        Owner::Pipeline(p) if p == name => {}
        _ => fail(format!(
            "publication {name} already exists on the target and is not the reverse pipeline's: drop it there if nothing uses it"
        )),
    }
    let back = StateStore::new(state.schema());
    match back.installed_version(src).await? {
        Some(v) if v > STATE_VERSION => fail(format!(
            "the state schema {} on the source was written by a newer walshuttle: upgrade walshuttle",
            state.schema()
        )),
        Some(v) if v == STATE_VERSION && back.pipeline(src, &name).await?.is_some() => fail(format!(
            "pipeline {name} is already recorded on the source: retire it with `walshuttle teardown --source TARGET --target SOURCE --slot {name}`"
        )),
        _ => {}
    }
    let hazards = crate::target_checks::hazards(src, &plan.tables).await?;
    if !hazards.is_empty() && !crate::target_checks::replica_role_available(src).await? {
        fail("the source tables have foreign keys or triggers, and the source role cannot set session_replication_role = replica to write the reverse stream past them: GRANT SET ON PARAMETER session_replication_role to it (PostgreSQL 15+) or connect as a superuser".to_string());
    }
    Ok(())
}

/// Starts the reverse pipeline: publication and slot on the new primary, state on
/// the old source, and the reverse stream's role exempted from the fence.
pub async fn start(
    src: &Client,
    tgt: &Client,
    plan: &Plan,
    opts: &SwitchoverOptions,
) -> Result<ReverseInfo> {
    let name = reverse_name(&opts.slot);
    let publication_plan = publication::Plan {
        name: name.clone(),
        slot: name.clone(),
        adopt_unmarked: false,
    };
    publication::ensure(tgt, &publication_plan, &plan.tables, &Default::default()).await?;
    let start: String = tgt
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await
        .pg_context(|| format!("creating replication slot {name} on the target"))?
        .get(0);
    let start_lsn: Lsn = start
        .parse()
        .map_err(|e| anyhow::anyhow!("the target reported slot position {start:?}: {e}"))?;
    tracing::info!(slot = %name, lsn = %start_lsn, "created the reverse pipeline's slot on the target");

    // The old source is fenced: this session opts out to write the state.
    src.batch_execute("SET default_transaction_read_only = off")
        .await
        .pg_context(|| "preparing to write the reverse pipeline's state on the source".into())?;
    let back = StateStore::new(&opts.state_schema);
    back.migrate(src).await?;
    let pipeline = Pipeline {
        name: name.clone(),
        publication: name.clone(),
        phase: Phase::Streaming,
        stream_start_lsn: Some(start_lsn),
        tables: plan.tables.clone(),
        stop_reason: None,
    };
    let entries: Vec<TableEntry> = plan
        .tables
        .iter()
        .map(|t| TableEntry {
            name: t.clone(),
            state: TableState::Ready,
            chunk_column: None,
        })
        .collect();
    let ctx = || format!("recording pipeline {name} on the source");
    src.batch_execute("BEGIN").await.pg_context(ctx)?;
    let written = async {
        back.save_pipeline(src, &pipeline).await?;
        back.set_selection(src, &name, Some(&plan.tables)).await?;
        back.set_tables(src, &name, &entries).await?;
        back.set_progress(src, &name, start_lsn).await?;
        anyhow::Ok(())
    }
    .await;
    match written {
        Ok(()) => src.batch_execute("COMMIT").await.pg_context(ctx)?,
        Err(e) => {
            let _ = src.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    }
    let row = src
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .pg_context(|| "reading the source role".into())?;
    let (role, database): (String, String) = (row.get(0), row.get(1));
    src.batch_execute(&format!(
        "ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = off",
        quote_ident(&role),
        quote_ident(&database)
    ))
    .await
    .pg_context(|| {
        format!("letting role {role} write the reverse stream into the fenced database {database}")
    })?;
    Ok(ReverseInfo {
        pipeline: name,
        start_lsn,
        writer_role: role,
        database,
    })
}

/// When `pipeline` is the reverse pipeline of a switchover that is done (its
/// source, the new primary, records the forward pipeline as switched over), its
/// target is that switchover's old source, left read-only by walshuttle: this
/// undoes it there (the database's read-only default, the writer role's exemption,
/// a connection limit of 0) and ends the sessions other roles opened while it was
/// read-only, so pools reconnect writable. Called when such a pipeline is switched
/// over (the way back is taken) and when it is torn down. Does nothing when the
/// target carries no read-only default (already undone, or never set). Returns a
/// line saying what it did.
pub async fn lift_old_fence(
    source: &Client,
    target: &Client,
    state_schema: &str,
    pipeline: &str,
) -> Result<Option<String>> {
    let Some(forward) = pipeline.strip_suffix("_reverse") else {
        return Ok(None);
    };
    let back = StateStore::new(state_schema);
    if back.installed_version(source).await? != Some(STATE_VERSION) {
        return Ok(None);
    }
    let done = back
        .switchover(source, forward)
        .await?
        .is_some_and(|(phase, _, _)| phase == "done");
    if !done {
        return Ok(None);
    }
    let row = target
        .query_one(
            "SELECT current_user::text, current_database()::text, d.datconnlimit, \
                    EXISTS (SELECT 1 FROM pg_db_role_setting s, unnest(s.setconfig) c \
                            WHERE s.setdatabase = d.oid AND s.setrole = 0 \
                              AND c = 'default_transaction_read_only=on') \
             FROM pg_database d WHERE d.datname = current_database()",
            &[],
        )
        .await
        .pg_context(|| "reading the old source's settings".into())?;
    let (role, database): (String, String) = (row.get(0), row.get(1));
    let (limit, read_only): (i32, bool) = (row.get(2), row.get(3));
    if !read_only {
        return Ok(None);
    }
    let db = quote_ident(&database);
    let mut sql = format!(
        "ALTER DATABASE {db} RESET default_transaction_read_only; \
         ALTER ROLE {} IN DATABASE {db} RESET default_transaction_read_only",
        quote_ident(&role)
    );
    if limit == 0 {
        sql.push_str(&format!("; ALTER DATABASE {db} CONNECTION LIMIT -1"));
    }
    target.batch_execute(&sql).await.pg_context(|| {
        format!("making database {database} writable again (undoing the fence of pipeline {forward}): run {sql} there")
    })?;
    let ended: i64 = target
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND backend_type = 'client backend' \
               AND pid <> pg_backend_pid() AND usename IS DISTINCT FROM current_user",
            &[],
        )
        .await
        .pg_context(|| "ending the sessions opened while the old source was read-only".into())?
        .get(0);
    tracing::info!(%database, ended, "the old source of pipeline {forward} is writable again");
    Ok(Some(format!(
        "database {database} (the old source of pipeline {forward}) is writable again: its read-only default and role {role}'s exemption are reset{}, and {ended} sessions opened while it was read-only were ended",
        if limit == 0 { ", its connection limit lifted" } else { "" }
    )))
}
