//! Checks that run before bootstrap writes anything anywhere: each failure is one
//! message naming the setting, table or column and the fix.

use anyhow::{bail, Result};
use futures_util::{StreamExt, TryStreamExt};
use tokio_postgres::Client;

use crate::bootstrap::BootstrapOptions;
use crate::catalog::{self, Identity, Table, TargetFit};
use crate::pg::{quote_ident, PgResultExt, QualifiedName};
use crate::publication;
use crate::state::StateStore;
use crate::target_checks::{self, TargetSetup};

/// What preflight learned: the tables to copy and how each fits the target.
pub struct Checked {
    /// Source tables selected, with their definitions.
    pub tables: Vec<Table>,
    /// For each table (same order), how it stands on the target.
    pub fits: Vec<TargetFit>,
    /// For each table (same order), how the target finds the rows the source's
    /// updates and deletes identify.
    pub target_keys: Vec<TargetKey>,
    /// The pipeline's publication, checked to be its own.
    pub publication: publication::Plan,
    /// What every target session writing replicated rows must do (replica mode).
    pub target: TargetSetup,
    /// Column lists and row filters (`tables` are narrowed to them already).
    pub rows: crate::row_selection::RowSelection,
}

/// How the target finds the row a source update or delete identifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetKey {
    /// walshuttle creates (or created) the table and builds the source's keys on it.
    FromSource,
    /// An existing target table with a unique, immediate, non-partial index on
    /// exactly these source identity columns (NOT NULL, or NULLS NOT DISTINCT).
    Key(Vec<String>),
    /// An existing target table without such an index, for a source table with
    /// `REPLICA IDENTITY FULL`: rows are matched on every column.
    Keyless,
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

/// Where a connection is: the server (its `system_identifier`, when the role may
/// read `pg_control_system()`, and its postmaster's start time) and the database.
struct Place {
    system_identifier: Option<i64>,
    started: String,
    database_oid: u32,
    database: String,
}

async fn place(client: &Client, side: &str) -> Result<Place> {
    let row = client
        .query_one(
            "SELECT oid, datname::text, pg_postmaster_start_time()::text FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .pg_context(|| format!("reading which database the {side} is"))?;
    // Executable by PUBLIC by default, but a managed service may revoke it.
    let system_identifier = client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .ok()
        .map(|r| r.get::<_, i64>(0));
    Ok(Place {
        system_identifier,
        started: row.get(2),
        database_oid: row.get(0),
        database: row.get(1),
    })
}

/// Refuses a target that is the source's own database (the same server: same
/// `system_identifier` and postmaster start, since a clone promoted from a base
/// backup shares the identifier; and the same database OID): replicating a
/// database into itself would empty its tables with `--truncate-target`, and
/// creating the slot waits on walshuttle's own sessions. Runs before anything is
/// written. Another database of the same server is allowed, with a warning.
pub async fn refuse_same_database(source: &Client, target: &Client) -> Result<()> {
    let (s, t) = (
        place(source, "source").await?,
        place(target, "target").await?,
    );
    let same_server = s.started == t.started
        && match (s.system_identifier, t.system_identifier) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
    if !same_server {
        return Ok(());
    }
    if s.database_oid == t.database_oid {
        bail!(
            "--target is the same database as --source (database {} on the same PostgreSQL server, system identifier {}): walshuttle copies one database into another; point --target at another database or server",
            s.database,
            s.system_identifier
                .map(|i| i.to_string())
                .unwrap_or_else(|| "unreadable".into())
        );
    }
    tracing::warn!(
        source_database = %s.database,
        target_database = %t.database,
        "the target is another database of the source's own server: WAL, connections and disk are shared"
    );
    Ok(())
}

/// Refuses a target role that could not create what bootstrap creates, before
/// anything is written: the state schema (CREATE on the database, or USAGE and
/// CREATE on an existing state schema) and the schemas of the tables it creates.
pub async fn check_target_privileges(
    target: &Client,
    state_schema: &str,
    table_schemas: &[&str],
) -> Result<()> {
    let ctx = || "checking the target role's privileges".to_string();
    let row = target
        .query_one(
            "SELECT current_user::text, current_database()::text, \
                    has_database_privilege(current_database(), 'CREATE'), \
                    EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1), \
                    coalesce((SELECT has_schema_privilege(oid, 'USAGE') AND has_schema_privilege(oid, 'CREATE') \
                              FROM pg_namespace WHERE nspname = $1), false)",
            &[&state_schema],
        )
        .await
        .pg_context(ctx)?;
    let (user, database, create_db, state_exists, state_ok): (String, String, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let grant_db = format!(
        "GRANT CREATE ON DATABASE {} TO {}",
        quote_ident(&database),
        quote_ident(&user)
    );
    if !state_exists && !create_db {
        bail!(
            "the target role {user} lacks the CREATE privilege on database {database}, needed to create walshuttle's state schema {state_schema}: run {grant_db} on the target as its owner (or create the schema for it: CREATE SCHEMA {} AUTHORIZATION {})",
            quote_ident(state_schema),
            quote_ident(&user)
        );
    }
    if state_exists && !state_ok {
        bail!(
            "the target role {user} lacks USAGE and CREATE on walshuttle's state schema {state_schema}: run GRANT USAGE, CREATE ON SCHEMA {} TO {} on the target",
            quote_ident(state_schema),
            quote_ident(&user)
        );
    }
    if create_db {
        return Ok(());
    }
    let wanted: Vec<String> = table_schemas.iter().map(|s| s.to_string()).collect();
    let missing: Vec<String> = target
        .query(
            "SELECT s FROM unnest($1::text[]) s WHERE NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = s) ORDER BY 1",
            &[&wanted],
        )
        .await
        .pg_context(ctx)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(schema) = missing.first() {
        bail!(
            "schema {schema} does not exist on the target and the target role {user} lacks the CREATE privilege on database {database} to create it: run {grant_db} on the target, or create the schema there first"
        );
    }
    Ok(())
}

/// Refuses a source role that could not create the pipeline's publication or add
/// `tables` to it (CREATE on the database; owning each table), before anything is
/// written on either side. A superuser may do both.
pub async fn check_source_privileges(
    source: &Client,
    publication: &str,
    tables: &[QualifiedName],
) -> Result<()> {
    let ctx = || "checking the source role's privileges".to_string();
    let row = source
        .query_one(
            "SELECT current_user::text, current_database()::text, \
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), \
                    has_database_privilege(current_database(), 'CREATE'), \
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await
        .pg_context(ctx)?;
    let (user, database, superuser, create_db, exists): (String, String, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if superuser {
        return Ok(());
    }
    if !exists && !create_db {
        bail!(
            "the source role {user} lacks the CREATE privilege on database {database}, needed to create publication {publication}: run GRANT CREATE ON DATABASE {} TO {} on the source",
            quote_ident(&database),
            quote_ident(&user)
        );
    }
    let quoted: Vec<String> = tables.iter().map(QualifiedName::quoted).collect();
    let not_owned: Option<i64> = source
        .query_opt(
            "SELECT s.n FROM unnest($1::text[]) WITH ORDINALITY AS s(name, n) \
             JOIN pg_class c ON c.oid = to_regclass(s.name) \
             WHERE NOT pg_has_role(c.relowner, 'USAGE') ORDER BY s.n LIMIT 1",
            &[&quoted],
        )
        .await
        .pg_context(ctx)?
        .map(|r| r.get(0));
    if let Some(table) = not_owned
        .and_then(|n| usize::try_from(n - 1).ok())
        .and_then(|i| tables.get(i))
    {
        bail!(
            "the source role {user} does not own table {table}, and a publication takes only tables its role owns: run ALTER TABLE {} OWNER TO {} on the source, or use the owner or a superuser in --source",
            table.quoted(),
            quote_ident(&user)
        );
    }
    Ok(())
}

/// Runs every check; `owned` names the tables whose rows walshuttle already owns on
/// the target (a resumed pipeline), which may hold rows and get their keys later.
pub async fn check(
    source: &Client,
    target: &Client,
    state: &StateStore,
    opts: &BootstrapOptions,
    selected: Option<&[QualifiedName]>,
    owned: &[QualifiedName],
    truncate_target: bool,
) -> Result<Checked> {
    let slot = opts.slot.as_str();
    refuse_same_database(source, target).await?;
    check_source_replication(source, slot).await?;
    if opts.capture_ddl {
        crate::ddl_capture::trigger::check_privilege(source, slot).await?;
    }
    state.check_version(target).await?;
    let mut tables = catalog::list_tables(source, selected, state.schema()).await?;
    // A fresh selection (a resumed bootstrap carries the tables it began with).
    if owned.is_empty() && !opts.filter.is_empty() {
        tables.retain(|t| opts.filter.keeps(&t.name));
        if tables.is_empty() {
            bail!(
                "no table is left to replicate after {}: loosen the patterns",
                opts.filter.describe()
            );
        }
    }
    if tables.is_empty() {
        bail!("the source has no tables to replicate: create some, or name them with --tables");
    }
    for table in &tables {
        if let Some(problem) = table.replicability_problem() {
            bail!(problem);
        }
    }
    let mut schemas: Vec<&str> = tables.iter().map(|t| t.name.schema.as_str()).collect();
    schemas.sort_unstable();
    schemas.dedup();
    check_target_privileges(target, state.schema(), &schemas).await?;
    let publication =
        publication::plan(source, target, state, slot, opts.publication.as_deref()).await?;
    let names: Vec<QualifiedName> = tables.iter().map(|t| t.name.clone()).collect();
    check_source_privileges(source, &publication.name, &names).await?;
    // Column lists and row filters: a fresh pipeline's from the flags, a resumed
    // one's as it recorded them.
    let rows = match owned.is_empty() {
        true => opts.rows.clone(),
        false => state.row_selection(target, slot).await?,
    };
    if !rows.is_empty() {
        if opts.online && owned.is_empty() {
            bail!("--columns and --row-filter do not work with --online yet: bootstrap without --online");
        }
        if opts.capture_ddl
            && owned.is_empty()
            && rows
                .names()
                .any(|t| rows.get(t).is_some_and(|r| r.columns.is_some()))
        {
            bail!("--columns does not work with --capture-ddl yet (captured DDL on a column left out, e.g. an index, could not be applied on the target): leave out one of them (--row-filter works with --capture-ddl)");
        }
        crate::row_selection::check_source(source, &tables, &rows).await?;
        rows.narrow_all(&mut tables)?;
    }
    // One table's checks are a few round trips; thousands of tables go out
    // pipelined (the futures are made first: a closure inside the stream would not
    // be `Send` for every lifetime).
    let checks: Vec<_> = tables
        .iter()
        .map(|table| check_target_table(target, table, owned, truncate_target))
        .collect();
    let checked: Vec<(TargetFit, TargetKey)> = futures_util::stream::iter(checks)
        .buffered(catalog::PIPELINE_DEPTH)
        .try_collect()
        .await?;
    let (fits, target_keys): (Vec<TargetFit>, Vec<TargetKey>) = checked.into_iter().unzip();
    let target_setup = target_checks::decide(
        target,
        tables.iter().map(|t| &t.name),
        opts.allow_target_triggers,
    )
    .await?;
    Ok(Checked {
        tables,
        fits,
        target_keys,
        publication,
        target: target_setup,
        rows,
    })
}

/// How `table` stands on the target, and how an existing target table finds its
/// rows; refuses an existing table that holds rows walshuttle did not copy.
async fn check_target_table(
    target: &Client,
    table: &Table,
    owned: &[QualifiedName],
    truncate_target: bool,
) -> Result<(TargetFit, TargetKey)> {
    let fit = catalog::check_target(target, table).await?;
    let key = match fit {
        TargetFit::Exists { .. } if !owned.contains(&table.name) => {
            target_key(target, table).await?
        }
        _ => TargetKey::FromSource,
    };
    if matches!(fit, TargetFit::Exists { .. }) && !truncate_target && !owned.contains(&table.name) {
        let own = crate::own_rows::own_rows_on(target, &table.name).await?;
        let has_rows = target
            .query_opt(&format!("SELECT 1 FROM {own} LIMIT 1"), &[])
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
    Ok((fit, key))
}

/// How an existing target table finds the rows the source identifies: it needs a
/// unique index on exactly the source's identity columns, or (for `REPLICA IDENTITY
/// FULL`) it is treated as keyless.
pub async fn target_key(target: &Client, table: &Table) -> Result<TargetKey> {
    let wanted = match &table.identity {
        Identity::Key(cols) => cols.clone(),
        Identity::Full | Identity::Unusable => table.key.clone(),
    };
    let found = !wanted.is_empty() && has_unique_index(target, &table.name, &wanted).await?;
    match (&table.identity, found) {
        (_, true) => Ok(TargetKey::Key(wanted)),
        (Identity::Full, false) => Ok(TargetKey::Keyless),
        _ => {
            let cols = wanted
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ");
            bail!(
                "table {} on the target has no unique index on ({}), the source's replica identity, so replicated updates and deletes could not find their rows: run ALTER TABLE {} ADD PRIMARY KEY ({cols}) on the target (or CREATE UNIQUE INDEX on those columns, NOT NULL), or drop the table to let walshuttle create it",
                table.name,
                wanted.join(", "),
                table.name.quoted()
            )
        }
    }
}

/// Whether `table` on the target has a unique index that identifies rows by exactly
/// `columns`: valid, immediate, not partial, no expressions, and its columns NOT NULL
/// or the index NULLS NOT DISTINCT (PostgreSQL 15+).
async fn has_unique_index(
    target: &Client,
    table: &QualifiedName,
    columns: &[String],
) -> Result<bool> {
    let rows = target
        .query(
            "SELECT ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                          WHERE k.ord <= i.indnkeyatts), \
                    coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false) \
                    OR NOT EXISTS (SELECT 1 FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                          WHERE k.ord <= i.indnkeyatts AND NOT a.attnotnull) \
             FROM pg_index i WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indisvalid \
               AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL",
            &[&table.quoted()],
        )
        .await
        .pg_context(|| format!("reading the unique indexes of {table} on the target"))?;
    let mut wanted = columns.to_vec();
    wanted.sort();
    Ok(rows.iter().any(|r| {
        let mut cols: Vec<String> = r.get(0);
        cols.sort();
        let nulls_ok: bool = r.get(1);
        nulls_ok && cols == wanted
    }))
}
