//! Table metadata read from `pg_catalog`: what to replicate, whether the target can
//! take it, and the DDL that creates it on the target when it is missing.

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use tokio_postgres::Client;

use crate::pg::{quote_ident, quote_literal, PgResultExt, QualifiedName};

mod type_compat;
mod user_types;

pub use type_compat::{types_compatible, TypeSpec};
pub use user_types::create_missing_types;

/// Schemas never replicated: the system's own, and walshuttle's own on the source
/// (the `--capture-ddl` trigger's, [`crate::ddl_capture::trigger::SCHEMA`]); the
/// state schema is excluded by name where it is known.
const SYSTEM_SCHEMAS: &[&str] = &[
    "pg_catalog",
    "information_schema",
    "pg_toast",
    crate::ddl_capture::trigger::SCHEMA,
];

/// One column of a source table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Column {
    /// Column name, unquoted.
    pub name: String,
    /// Type as `format_type` prints it (`numeric(12,2)`, `"Mood"[]`), valid SQL.
    pub type_sql: String,
    /// Type oid on the server it was read from.
    pub type_oid: u32,
    /// NOT NULL constraint.
    pub not_null: bool,
    /// Default expression, if any (not for generated columns).
    pub default: Option<String>,
    /// Generation expression of a `GENERATED ALWAYS AS (…) STORED` column.
    pub generated: Option<String>,
    /// Identity kind: `a` always, `d` by default, empty when not an identity column.
    pub identity: String,
    /// Whether the binary form of this type is the same in every database, so
    /// values may pass between servers in binary (see [`binary_portable_sql`]).
    pub binary_portable: bool,
    /// The type whose send/receive functions define the binary form: the column's
    /// type with domains resolved to their base type, without modifier.
    pub binary_form: String,
}

impl Column {
    /// Whether rows carry this column's value (generated columns are recomputed).
    pub fn is_copied(&self) -> bool {
        self.generated.is_none()
    }
}

/// A table as walshuttle needs to know it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Table {
    /// Relation oid on the server it was read from.
    pub oid: u32,
    /// Schema-qualified name.
    pub name: QualifiedName,
    /// Columns in attribute order, dropped columns excluded.
    pub columns: Vec<Column>,
    /// Columns that identify a row: the replica identity's when it is a key, else
    /// the primary key's when PostgreSQL could use it (immediate); empty otherwise.
    pub key: Vec<String>,
    /// `relreplident`: `d` default (primary key), `f` full, `i` index, `n` nothing.
    pub replica_identity: String,
    /// Whether the table has a primary key.
    pub has_primary_key: bool,
    /// How updates and deletes identify their old row, as PostgreSQL decides it.
    pub identity: Identity,
    /// Why the identity is unusable, when it is (for the message).
    #[serde(skip)]
    identity_gap: IdentityGap,
    /// Heap size in blocks when read.
    pub blocks: i64,
    /// Planner's row estimate, for progress display.
    pub estimated_rows: i64,
    /// The target copy's column types (`format_type`), by column name, once a
    /// comparison has read them ([`crate::compare::note_target_types`]): a widened
    /// column is compared as exactly as its target type allows.
    #[serde(skip)]
    pub target_types: std::collections::BTreeMap<String, String>,
    /// Whether the target copy is a partitioned table, read with the target types:
    /// its rows are then read whole, not `ONLY` ([`crate::own_rows`]).
    #[serde(skip)]
    pub target_partitioned: bool,
    /// The pipeline's row filter for this table (`--row-filter`), an SQL expression
    /// on the source's row; set by [`crate::row_selection::RowSelection::narrow`].
    pub row_filter: Option<String>,
}

impl Table {
    /// Names of the columns that rows carry (generated columns excluded).
    pub fn copied_columns(&self) -> Vec<&Column> {
        self.columns.iter().filter(|c| c.is_copied()).collect()
    }

    /// `predicate` narrowed to the source rows the pipeline replicates: ANDed
    /// with the row filter, if any. For queries on the source only (a target row
    /// outside the filter is a difference, not something to skip).
    pub fn source_rows(&self, predicate: &str) -> String {
        match &self.row_filter {
            Some(f) => format!("({predicate}) AND ({f})"),
            None => predicate.to_string(),
        }
    }

    /// Quoted, comma-separated list of the copied columns.
    pub fn copied_column_list(&self) -> String {
        self.copied_columns()
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Why this table cannot be replicated, if it cannot. Publishing a table whose
    /// replica identity cannot carry an old key makes the *source* refuse its
    /// UPDATEs and DELETEs (`... does not have a replica identity and publishes
    /// updates`), so such a table must never reach the publication.
    pub fn replicability_problem(&self) -> Option<String> {
        let (name, quoted) = (&self.name, self.name.quoted());
        let fix = format!("run ALTER TABLE {quoted} REPLICA IDENTITY FULL on the source");
        let harm = "the source would refuse its UPDATEs and DELETEs once it is published";
        match (&self.identity, &self.identity_gap) {
            (Identity::Key(_) | Identity::Full, _) => None,
            (Identity::Unusable, IdentityGap::DeferrablePrimaryKey) => Some(format!(
                "table {name} has a DEFERRABLE primary key, which PostgreSQL cannot use as replica identity, so {harm}: {fix} (or make the primary key NOT DEFERRABLE, or set REPLICA IDENTITY USING INDEX on a unique, immediate index of NOT NULL columns)"
            )),
            (Identity::Unusable, IdentityGap::Nothing) => Some(format!(
                "table {name} has REPLICA IDENTITY NOTHING, so {harm}: {fix} (or ALTER TABLE {quoted} REPLICA IDENTITY DEFAULT when it has a primary key)"
            )),
            (Identity::Unusable, IdentityGap::IndexUnusable(index)) => Some(format!(
                "table {name} has REPLICA IDENTITY USING INDEX {index}, which is missing, invalid, partial or deferrable, so {harm}: {fix} (or ALTER TABLE {quoted} REPLICA IDENTITY USING INDEX on a valid unique index)"
            )),
            (Identity::Unusable, IdentityGap::IndexMissing) => Some(format!(
                "table {name} has REPLICA IDENTITY USING INDEX on an index that no longer exists, so {harm}: {fix} (or ALTER TABLE {quoted} REPLICA IDENTITY USING INDEX on a valid unique index)"
            )),
            (Identity::Unusable, _) => Some(format!(
                "table {name} has no primary key or replica identity, so {harm}: add a primary key, or {fix}"
            )),
        }
    }
}

/// How updates and deletes of a table identify the old row on the source: its
/// effective replica identity, decided by PostgreSQL's own rules (relcache): the
/// primary key for `DEFAULT` only when it is immediate, the `USING INDEX` index only
/// when it is valid, unique, immediate and not partial.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Identity {
    /// The old key is these columns (primary key or identity index), in index order.
    Key(Vec<String>),
    /// `REPLICA IDENTITY FULL`: the whole old row.
    Full,
    /// No old key at all: publishing the table breaks the source's UPDATE and DELETE.
    Unusable,
}

/// Why a table's identity is unusable, for the message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum IdentityGap {
    /// Nothing missing.
    #[default]
    None,
    /// `DEFAULT` with no primary key.
    NoPrimaryKey,
    /// `DEFAULT` with a deferrable primary key.
    DeferrablePrimaryKey,
    /// `NOTHING`.
    Nothing,
    /// `USING INDEX` on an index that is invalid, partial or deferrable.
    IndexUnusable(String),
    /// `USING INDEX` on an index that was dropped.
    IndexMissing,
}

/// Lists the tables to replicate: `selected` when given (each must exist), else every
/// ordinary table outside system schemas and `exclude_schema`.
pub async fn list_tables(
    client: &Client,
    selected: Option<&[QualifiedName]>,
    exclude_schema: &str,
) -> Result<Vec<Table>> {
    let names: Vec<QualifiedName> = match selected {
        Some(list) => expand_selection(client, list).await?,
        None => every_table_name(client, exclude_schema).await?,
    };
    let mut seen = BTreeSet::new();
    let names: Vec<QualifiedName> = names
        .into_iter()
        .filter(|n| seen.insert(n.clone()))
        .collect();
    // The futures are made first: a closure inside the stream would not be `Send`
    // for every lifetime, which spawned callers need.
    let reads: Vec<_> = names
        .into_iter()
        .map(|name| async move {
            let table = load_table(client, &name).await?;
            Ok::<_, anyhow::Error>((name, table))
        })
        .collect();
    let loaded: Vec<(QualifiedName, Option<Table>)> = futures_util::stream::iter(reads)
        .buffered(PIPELINE_DEPTH)
        .try_collect()
        .await?;
    let mut tables = Vec::with_capacity(loaded.len());
    for (name, table) in loaded {
        match table {
            Some(t) => tables.push(t),
            None => bail!(
                "table {name} does not exist on the source: check --tables (names are case-sensitive; write schema.table)"
            ),
        }
    }
    Ok(tables)
}

/// How many tables' catalog reads are in flight at once on one connection
/// (tokio-postgres pipelines the queries of concurrent futures): with thousands of
/// tables, start-up is bound by round trips, not by the server's work.
pub const PIPELINE_DEPTH: usize = 16;

/// Every permanent ordinary table outside system schemas and `exclude_schema`,
/// partitions included (each is replicated as a table of its own), but not tables
/// that belong to an extension: what a pipeline without `--tables` carries.
pub async fn every_table_name(client: &Client, exclude_schema: &str) -> Result<Vec<QualifiedName>> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname <> ALL($1) \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
               AND n.nspname <> $2 \
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                               AND d.objid = c.oid AND d.deptype = 'e') \
             ORDER BY 1, 2",
            &[&SYSTEM_SCHEMAS, &exclude_schema],
        )
        .await
        .pg_context(|| "listing tables on the source".into())?;
    Ok(rows
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// The permanent tables `list` stands for now: each named ordinary table, and the
/// leaf partitions of each named partitioned table. Unlike [`list_tables`], a name
/// that resolves to nothing replicable is left out rather than refused.
pub async fn selected_table_names(
    client: &Client,
    list: &[QualifiedName],
) -> Result<Vec<QualifiedName>> {
    let quoted: Vec<String> = list.iter().map(QualifiedName::quoted).collect();
    let rows = client
        .query(
            "SELECT DISTINCT n.nspname, c.relname \
             FROM unnest($1::text[]) AS s(name) \
             CROSS JOIN LATERAL pg_partition_tree(to_regclass(s.name)) t \
             JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE t.isleaf AND c.relkind = 'r' AND c.relpersistence = 'p' ORDER BY 1, 2",
            &[&quoted],
        )
        .await
        .pg_context(|| "resolving the table selection on the source".into())?;
    Ok(rows
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Resolves named tables: a partitioned table stands for its leaf partitions, and an
/// unlogged table (which logical replication cannot carry) is refused.
async fn expand_selection(client: &Client, list: &[QualifiedName]) -> Result<Vec<QualifiedName>> {
    let mut out = Vec::with_capacity(list.len());
    for name in list {
        let row = client
            .query_opt(
                "SELECT c.relkind::text, c.relpersistence::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&name.schema, &name.name],
            )
            .await
            .pg_context(|| format!("looking up {name} on the source"))?;
        match row.map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))) {
            Some((kind, _)) if kind == "p" => {
                let leaves = client
                    .query(
                        "SELECT n.nspname, c.relname FROM pg_partition_tree($1::text::regclass) t \
                         JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE t.isleaf ORDER BY 1, 2",
                        &[&name.quoted()],
                    )
                    .await
                    .pg_context(|| format!("listing the partitions of {name}"))?;
                out.extend(leaves.iter().map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1))));
            }
            Some((_, persistence)) if persistence != "p" => bail!(
                "table {name} is unlogged or temporary, and logical replication cannot carry it: run ALTER TABLE {} SET LOGGED on the source, or leave it out of --tables",
                name.quoted()
            ),
            _ => out.push(name.clone()),
        }
    }
    Ok(out)
}

/// Whether key ranges of `column` of `table` may be copied under different
/// snapshots: no two rows of different ranges can collide on a unique or exclusion
/// constraint, since every unique index has `column` among its keys (equal keys,
/// one range) and there is no exclusion constraint. Otherwise a value that passed
/// from a row of a range copied earlier to a row of one copied later would be on the
/// target twice until the stream caught up, and the constraint would refuse it.
pub async fn ranges_independent(client: &Client, table: &Table, column: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = $1 \
                 AND (i.indisexclusion OR (i.indisunique AND NOT EXISTS ( \
                     SELECT 1 FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS u(k, o) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.k \
                     WHERE u.o <= i.indnkeyatts AND a.attname = $2))))",
            &[&table.oid, &column],
        )
        .await
        .pg_context(|| format!("reading the unique indexes of {}", table.name))?
        .get(0))
}

/// Reads one table's definition, or `None` when it does not exist.
pub async fn load_table(client: &Client, name: &QualifiedName) -> Result<Option<Table>> {
    let ctx = || format!("reading the definition of {name}");
    let Some(rel) = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, \
                    (pg_relation_size(c.oid) / current_setting('block_size')::bigint)::bigint, \
                    greatest(c.reltuples, 0)::bigint \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&name.schema, &name.name],
        )
        .await
        .pg_context(ctx)?
    else {
        return Ok(None);
    };
    let oid: u32 = rel.get(0);
    let columns = client
        .query(
            &format!(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, a.attnotnull, \
                        pg_get_expr(d.adbin, d.adrelid), a.attgenerated::text, a.attidentity::text, \
                        {}, {} \
                 FROM pg_attribute a \
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                binary_portable_sql("a.atttypid"),
                binary_form_sql("a.atttypid")
            ),
            &[&oid],
        )
        .await
        .pg_context(ctx)?
        .iter()
        .map(|r| {
            let expr: Option<String> = r.get(4);
            let generated = r.get::<_, String>(5) == "s";
            Column {
                name: r.get(0),
                type_sql: r.get(1),
                type_oid: r.get(2),
                not_null: r.get(3),
                default: if generated { None } else { expr.clone() },
                generated: if generated { expr } else { None },
                identity: r.get(6),
                binary_portable: r.get(7),
                binary_form: r.get::<_, Option<String>>(8).unwrap_or_default(),
            }
        })
        .collect();
    let replica_identity: String = rel.get(1);
    let (identity, identity_gap, key, has_primary_key) =
        load_identity(client, oid, &replica_identity)
            .await
            .with_context(ctx)?;
    Ok(Some(Table {
        oid,
        name: name.clone(),
        columns,
        key,
        replica_identity,
        has_primary_key,
        identity,
        identity_gap,
        blocks: rel.get(2),
        estimated_rows: rel.get(3),
        target_types: Default::default(),
        target_partitioned: false,
        row_filter: None,
    }))
}

/// The effective replica identity of table `oid` (PostgreSQL's relcache rules: an
/// index serves as identity only when valid, unique, immediate and not partial), the
/// key walshuttle uses to find rows, and whether a primary key exists.
async fn load_identity(
    client: &Client,
    oid: u32,
    replident: &str,
) -> Result<(Identity, IdentityGap, Vec<String>, bool)> {
    let rows = client
        .query(
            "SELECT i.indexrelid::regclass::text, i.indisprimary, i.indisreplident, \
                    (i.indisvalid AND i.indisunique AND i.indimmediate AND i.indpred IS NULL), \
                    ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                          WHERE k.ord <= i.indnkeyatts ORDER BY k.ord) \
             FROM pg_index i WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident)",
            &[&oid],
        )
        .await
        .pg_context(|| "reading the primary key and replica identity".into())?;
    struct Ix {
        name: String,
        primary: bool,
        replident: bool,
        usable: bool,
        columns: Vec<String>,
    }
    let indexes: Vec<Ix> = rows
        .iter()
        .map(|r| Ix {
            name: r.get(0),
            primary: r.get(1),
            replident: r.get(2),
            usable: r.get(3),
            columns: r.get(4),
        })
        .collect();
    let pk = indexes.iter().find(|i| i.primary);
    let usable_pk = pk.filter(|i| i.usable).map(|i| dedup(i.columns.clone()));
    let chosen = indexes.iter().find(|i| i.replident);
    let (identity, gap) = match replident {
        "f" => (Identity::Full, IdentityGap::None),
        "d" => match (&usable_pk, pk) {
            (Some(cols), _) => (Identity::Key(cols.clone()), IdentityGap::None),
            (None, Some(_)) => (Identity::Unusable, IdentityGap::DeferrablePrimaryKey),
            (None, None) => (Identity::Unusable, IdentityGap::NoPrimaryKey),
        },
        "i" => match chosen {
            Some(ix) if ix.usable => (Identity::Key(dedup(ix.columns.clone())), IdentityGap::None),
            Some(ix) => (
                Identity::Unusable,
                IdentityGap::IndexUnusable(ix.name.clone()),
            ),
            None => (Identity::Unusable, IdentityGap::IndexMissing),
        },
        _ => (Identity::Unusable, IdentityGap::Nothing),
    };
    let key = match &identity {
        Identity::Key(cols) => cols.clone(),
        Identity::Full | Identity::Unusable => usable_pk.unwrap_or_default(),
    };
    Ok((identity, gap, key, pk.is_some()))
}

/// Oids below PostgreSQL's `FirstGenbkiObjectId` are assigned in its source code:
/// the same type in every database and version. Everything above was assigned by
/// one database (initdb's own scripts, extensions, users).
const FIXED_OIDS: u32 = 10_000;

/// Built-in types whose values name database objects by oid (reg*), and `tsquery`,
/// whose binary receive function rejects an empty query that text accepts.
const NOT_PORTABLE_BUILTINS: &[&str] = &[
    "regclass",
    "regtype",
    "regproc",
    "regprocedure",
    "regoper",
    "regoperator",
    "regconfig",
    "regdictionary",
    "regnamespace",
    "regrole",
    "regcollation",
    "tsquery",
];

/// SQL that is true when the binary form of the type `type_oid` (an SQL expression)
/// is the same in every database: the one place that decides binary or text.
///
/// The type and every type its binary form is made of (domain base types, array
/// elements, range subtypes, a multirange's range) must each be
/// - built in with a fixed oid, or an enum (sent as its label), or a domain (sent
///   as its base type), since arrays, ranges and multirange headers embed type
///   oids and extension types may differ between installations;
/// - not a composite (its binary form carries each field's type oid);
/// - not one of [`NOT_PORTABLE_BUILTINS`], and not without binary send/receive
///   functions (`aclitem`).
pub fn binary_portable_sql(type_oid: &str) -> String {
    let names = NOT_PORTABLE_BUILTINS
        .iter()
        .map(|n| quote_literal(n))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "NOT EXISTS (WITH RECURSIVE parts(oid) AS ( \
            SELECT {type_oid} \
          UNION \
            SELECT x.part FROM parts p JOIN pg_catalog.pg_type t ON t.oid = p.oid \
            CROSS JOIN LATERAL (VALUES (t.typbasetype), (t.typelem), \
              ((SELECT r.rngsubtype FROM pg_catalog.pg_range r WHERE r.rngtypid = t.oid)), \
              ((SELECT r.rngtypid FROM pg_catalog.pg_range r WHERE r.rngmultitypid = t.oid))) AS x(part) \
            WHERE x.part IS NOT NULL AND x.part <> 0) \
         SELECT FROM parts JOIN pg_catalog.pg_type t ON t.oid = parts.oid \
         WHERE t.typtype IN ('c', 'p') \
            OR (t.typtype IN ('b', 'r', 'm') AND t.oid >= {FIXED_OIDS}) \
            OR (t.typtype = 'b' AND (t.typsend::oid = 0 OR t.typreceive::oid = 0)) \
            OR (t.typnamespace = 'pg_catalog'::regnamespace AND t.typname IN ({names})))"
    )
}

/// SQL naming the type whose send/receive functions carry values of `type_oid`:
/// the type itself, or a domain's innermost base type.
fn binary_form_sql(type_oid: &str) -> String {
    format!(
        "(WITH RECURSIVE b(oid) AS ( \
            SELECT {type_oid} \
          UNION ALL \
            SELECT t.typbasetype FROM b JOIN pg_catalog.pg_type t ON t.oid = b.oid WHERE t.typtype = 'd') \
         SELECT format_type(b.oid, NULL) FROM b JOIN pg_catalog.pg_type t ON t.oid = b.oid \
         WHERE t.typtype <> 'd')"
    )
}

/// Whether values of type `oid` may travel in binary (see [`binary_portable_sql`]).
pub async fn type_binary_portable(client: &Client, oid: u32) -> Result<bool> {
    Ok(client
        .query_one(
            &format!("SELECT {}", binary_portable_sql("$1::oid")),
            &[&oid],
        )
        .await
        .pg_context(|| format!("checking the binary form of type {oid}"))?
        .get(0))
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    v.into_iter().filter(|c| seen.insert(c.clone())).collect()
}

impl TargetFit {
    /// Whether rows can pass through in binary COPY format without decoding.
    pub fn binary(self) -> bool {
        match self {
            TargetFit::Missing { binary } | TargetFit::Exists { binary } => binary,
        }
    }
}

/// How a source table stands on the target.
#[derive(Clone, Copy, Debug)]
pub enum TargetFit {
    /// The table is missing and will be created with the source's types; `binary`
    /// says whether every copied type's binary form is portable.
    Missing {
        /// Whether binary COPY is safe.
        binary: bool,
    },
    /// The table exists with every source column. `binary` is true when every copied
    /// column has exactly the source's type, so binary COPY can pass bytes through.
    Exists {
        /// Whether binary COPY is safe.
        binary: bool,
    },
}

/// Checks that the target can take the source table's rows: every copied source
/// column exists on the target with a compatible type.
pub async fn check_target(target: &Client, table: &Table) -> Result<TargetFit> {
    let existing = load_table(target, &table.name).await?;
    target_fit(table, existing.as_ref())
}

/// [`check_target`] against a target table already read (`None`: there is none);
/// its errors are only of the fit, never of a server.
pub fn target_fit(table: &Table, existing: Option<&Table>) -> Result<TargetFit> {
    let Some(existing) = existing else {
        return Ok(TargetFit::Missing {
            binary: table.copied_columns().iter().all(|c| c.binary_portable),
        });
    };
    let mut binary = true;
    for col in table.copied_columns() {
        let Some(tcol) = existing.columns.iter().find(|c| c.name == col.name) else {
            bail!(
                "column {}.{} ({}) is missing on the target: run ALTER TABLE {} ADD COLUMN {} {} on the target, or drop the target table to let walshuttle create it",
                table.name,
                col.name,
                col.type_sql,
                table.name.quoted(),
                quote_ident(&col.name),
                col.type_sql
            );
        };
        if tcol.generated.is_some() {
            bail!(
                "column {}.{} is a generated column on the target but not on the source: make it an ordinary column on the target",
                table.name,
                col.name
            );
        }
        if !types_compatible(&col.type_sql, &tcol.type_sql) {
            let narrower =
                TypeSpec::parse(&col.type_sql).name == TypeSpec::parse(&tcol.type_sql).name;
            bail!(
                "column {}.{} is {} on the source but {} on the target{}: run ALTER TABLE {} ALTER COLUMN {} TYPE {} on the target",
                table.name,
                col.name,
                col.type_sql,
                tcol.type_sql,
                if narrower {
                    ", which would round or refuse source values"
                } else {
                    ""
                },
                table.name.quoted(),
                quote_ident(&col.name),
                col.type_sql
            );
        }
        // Bytes pass through only between identical types whose binary form is the
        // same everywhere (a domain of the same name over another base type is not).
        binary &= col.type_sql == tcol.type_sql
            && col.binary_portable
            && tcol.binary_portable
            && col.binary_form == tcol.binary_form;
    }
    Ok(TargetFit::Exists { binary })
}

/// DDL creating the table on the target: columns, types, defaults, NOT NULL and
/// generated columns, without keys or indexes (built after the data is in).
///
/// Identity columns become `GENERATED BY DEFAULT AS IDENTITY` so replicated rows keep
/// their values; defaults that call `nextval` are left out (sequences are not
/// replicated) and the column keeps the values the source assigned.
pub fn create_table_sql(table: &Table) -> String {
    let cols = table
        .columns
        .iter()
        .map(|c| {
            let mut def = format!("{} {}", quote_ident(&c.name), c.type_sql);
            if let Some(expr) = &c.generated {
                def.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED"));
            } else if !c.identity.is_empty() {
                def.push_str(" GENERATED BY DEFAULT AS IDENTITY");
            } else if let Some(expr) = &c.default {
                if !expr.contains("nextval(") {
                    def.push_str(&format!(" DEFAULT {expr}"));
                }
            }
            if c.not_null {
                def.push_str(" NOT NULL");
            }
            def
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} ({cols})",
        quote_ident(&table.name.schema),
        table.name.quoted()
    )
}

/// The partition key columns of `name` when it is a partitioned table on the
/// server `client` reaches (an expression column as `""`, which no index column
/// matches); `None` otherwise.
async fn target_partition_key(
    client: &Client,
    name: &QualifiedName,
) -> Result<Option<Vec<String>>> {
    Ok(client
        .query_opt(
            "SELECT ARRAY(SELECT coalesce(a.attname::text, '') FROM unnest(p.partattrs::int2[]) AS k(n) \
                          LEFT JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = k.n) \
             FROM pg_partitioned_table p WHERE p.partrelid = to_regclass($1)",
            &[&name.quoted()],
        )
        .await
        .pg_context(|| format!("reading the partition key of {name} on the target"))?
        .map(|r| r.get(0)))
}

/// Statements that build the table's primary key, unique constraints and indexes on
/// the target, each idempotent, each independent (so they can run in parallel).
pub async fn index_sql(source: &Client, target: &Client, table: &Table) -> Result<Vec<String>> {
    indexes_sql(source, target, table, false).await
}

/// [`index_sql`] for the primary key and the replica identity index only: what the
/// stream needs to apply changes. An online bootstrap builds the others inside each
/// table's copy, after its rows are in.
pub async fn identity_index_sql(
    source: &Client,
    target: &Client,
    table: &Table,
) -> Result<Vec<String>> {
    indexes_sql(source, target, table, true).await
}

async fn indexes_sql(
    source: &Client,
    target: &Client,
    table: &Table,
    identity_only: bool,
) -> Result<Vec<String>> {
    let ctx = || format!("reading the indexes of {}", table.name);
    // Indexes of a partitioned table (an existing target may be one) are `I`.
    let existing: BTreeSet<String> = target
        .query(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind IN ('i', 'I')",
            &[&table.name.schema],
        )
        .await
        .pg_context(ctx)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let partition_key = target_partition_key(target, &table.name).await?;
    let rows = source
        .query(
            "SELECT ic.relname, pg_get_indexdef(i.indexrelid), con.conname, pg_get_constraintdef(con.oid), con.contype::text, \
                    i.indisunique AND NOT i.indisprimary AND NOT i.indisreplident, \
                    ARRAY(SELECT coalesce(a.attname::text, '') FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(n, o) \
                          LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n \
                          WHERE k.o <= i.indnkeyatts), \
                    ARRAY(SELECT a.attname::text FROM pg_depend d JOIN pg_attribute a \
                            ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid \
                            AND d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indrelid \
                            AND d.refobjsubid > 0 \
                          UNION SELECT a.attname::text FROM pg_attribute a \
                          WHERE a.attrelid = i.indrelid AND a.attnum > 0 AND a.attnum = ANY(i.indkey)) \
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
             LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x') \
             WHERE i.indrelid = $1 AND (NOT $2 OR i.indisprimary OR i.indisreplident) \
             ORDER BY i.indisprimary DESC, ic.relname",
            &[&table.oid, &identity_only],
        )
        .await
        .pg_context(ctx)?;
    let mut out = Vec::new();
    for row in rows {
        let index_name: String = row.get(0);
        if existing.contains(&index_name) {
            continue;
        }
        // An index on a column the pipeline leaves out (`--columns`) cannot exist
        // on the target.
        let uses: Vec<String> = row.get(7);
        if uses
            .iter()
            .any(|u| !table.columns.iter().any(|c| &c.name == u))
        {
            continue;
        }
        // A table partitioned on the target (the user's choice) can hold a unique
        // index only over its partition key: one that cannot be built is left out
        // (the rows come from the source, whose own index keeps them unique).
        if let Some(part_cols) = &partition_key {
            let secondary_unique: bool = row.get(5);
            let cols: Vec<String> = row.get(6);
            if secondary_unique && !part_cols.iter().all(|p| cols.contains(p)) {
                tracing::warn!(
                    table = %table.name,
                    index = %index_name,
                    "the table is partitioned on the target by ({}), and a unique index there must include those columns: the source's unique index {index_name} is left out on the target",
                    part_cols.join(", ")
                );
                continue;
            }
        }
        let conname: Option<String> = row.get(2);
        match conname {
            Some(con) => {
                let def: String = row.get(3);
                out.push(format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} {def}",
                    table.name.quoted(),
                    quote_ident(&con)
                ));
            }
            None => {
                let def: String = row.get(1);
                out.push(def);
            }
        }
    }
    Ok(out)
}
