//! Checks that run before bootstrap writes anything anywhere: each failure is one
//! message naming the setting, table or column and the fix.

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::catalog::{self, Table, TargetFit};
use crate::pg::{PgResultExt, QualifiedName};
use crate::state::StateStore;

/// What preflight learned: the tables to copy and how each fits the target.
pub struct Checked {
    /// Source tables selected, with their definitions.
    pub tables: Vec<Table>,
    /// For each table (same order), how it stands on the target.
    pub fits: Vec<TargetFit>,
}

/// Source-side checks shared by every command that reads changes from a slot:
/// `wal_level`, replication privilege, and a free slot unless `slot` exists.
pub async fn check_source_replication(source: &Client, slot: &str) -> Result<()> {
    let ctx = || "checking the source's replication settings".to_string();
    let wal_level: String = source
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .pg_context(ctx)?
        .get(0);
    if wal_level != "logical" {
        bail!(
            "the source has wal_level = {wal_level}, but logical decoding needs wal_level = logical: run ALTER SYSTEM SET wal_level = logical on the source and restart it (or, where that is not allowed, use `walshuttle catch-up --poll`)"
        );
    }
    let row = source
        .query_one(
            "SELECT current_user::text, r.rolsuper OR r.rolreplication FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .pg_context(ctx)?;
    let (user, can_replicate): (String, bool) = (row.get(0), row.get(1));
    if !can_replicate {
        bail!(
            "the source user {user} lacks the REPLICATION privilege: run ALTER ROLE {} REPLICATION on the source",
            crate::pg::quote_ident(&user)
        );
    }
    let row = source
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, \
                    (SELECT count(*)::int FROM pg_replication_slots), \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
                    current_setting('max_wal_senders')::int, \
                    (SELECT count(*)::int FROM pg_stat_replication)",
            &[&slot],
        )
        .await
        .pg_context(ctx)?;
    let (max_slots, used_slots, exists): (i32, i32, bool) = (row.get(0), row.get(1), row.get(2));
    if !exists && used_slots >= max_slots {
        bail!(
            "the source has no free replication slot ({used_slots} of max_replication_slots = {max_slots} in use): drop an unused slot (SELECT pg_drop_replication_slot(name)) or raise max_replication_slots and restart the source"
        );
    }
    let (max_senders, used_senders): (i32, i32) = (row.get(3), row.get(4));
    if used_senders >= max_senders {
        bail!(
            "the source has no free WAL sender ({used_senders} of max_wal_senders = {max_senders} in use): raise max_wal_senders and restart the source"
        );
    }
    Ok(())
}

/// Runs every check; `owned` names the tables whose rows walshuttle already owns on
/// the target (a resumed pipeline), which may hold rows.
pub async fn check(
    source: &Client,
    target: &Client,
    state: &StateStore,
    slot: &str,
    selected: Option<&[QualifiedName]>,
    owned: &[QualifiedName],
    truncate_target: bool,
) -> Result<Checked> {
    check_source_replication(source, slot).await?;
    state.check_version(target).await?;
    let tables = catalog::list_tables(source, selected, state.schema()).await?;
    if tables.is_empty() {
        bail!("the source has no tables to replicate: create some, or name them with --tables");
    }
    for table in &tables {
        if let Some(problem) = table.replicability_problem() {
            bail!(problem);
        }
    }
    let mut fits = Vec::with_capacity(tables.len());
    for table in &tables {
        let fit = catalog::check_target(target, table).await?;
        if matches!(fit, TargetFit::Exists { .. })
            && !truncate_target
            && !owned.contains(&table.name)
        {
            let has_rows = target
                .query_opt(
                    &format!("SELECT 1 FROM {} LIMIT 1", table.name.quoted()),
                    &[],
                )
                .await
                .pg_context(|| format!("checking whether {} is empty on the target", table.name))?
                .is_some();
            if has_rows {
                bail!(
                    "table {} already holds rows on the target that walshuttle did not copy: empty it, or pass --truncate-target to replace them with the source's rows",
                    table.name
                );
            }
        }
        fits.push(fit);
    }
    Ok(Checked { tables, fits })
}
