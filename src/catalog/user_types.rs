//! Creating on the target every type a replicated table's columns use: enums,
//! domains, composites and ranges (with their multiranges) from any schema, at any
//! depth (a composite with an enum field, a domain over a composite, an array of a
//! range), dependencies first, always schema-qualified; and the extensions that
//! provide the rest.
//!
//! The order comes from the types' dependencies, not their oids: `ALTER TYPE … ADD
//! ATTRIBUTE` makes an older composite depend on a newer type.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use tokio_postgres::Client;

use super::Table;
use crate::pg::{quote_ident, quote_literal, PgResultExt, QualifiedName};

/// One type in the closure of the types a table uses.
struct UsedType {
    oid: u32,
    name: QualifiedName,
    /// `typtype`: `b` base, `c` composite, `d` domain, `e` enum, `r` range,
    /// `m` multirange, `p` pseudo.
    kind: String,
    /// An array type made by PostgreSQL along with its element type.
    implicit_array: bool,
    /// Multiranges come with their range type.
    multirange: bool,
    /// For a composite, the kind of its relation (`c` for a standalone type).
    relkind: Option<String>,
    /// The extension (and its schema) the type belongs to, if any.
    extension: Option<(String, String)>,
    /// The types this one is made of.
    deps: Vec<u32>,
}

/// Every type the table's columns use, and every type those are made of.
const CLOSURE_SQL: &str = "WITH RECURSIVE edges(parent, child) AS ( \
        SELECT 0::oid, c FROM unnest($1::oid[]) AS c \
      UNION \
        SELECT e.child, d.dep FROM edges e CROSS JOIN LATERAL ( \
            SELECT t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = e.child AND t.typtype = 'd' \
            UNION ALL SELECT t.typelem FROM pg_catalog.pg_type t WHERE t.oid = e.child AND t.typelem <> 0 \
            UNION ALL SELECT a.atttypid FROM pg_catalog.pg_type t \
                JOIN pg_catalog.pg_attribute a ON a.attrelid = t.typrelid \
                WHERE t.oid = e.child AND t.typtype = 'c' AND a.attnum > 0 AND NOT a.attisdropped \
            UNION ALL SELECT r.rngsubtype FROM pg_catalog.pg_range r WHERE r.rngtypid = e.child \
            UNION ALL SELECT r.rngtypid FROM pg_catalog.pg_range r WHERE r.rngmultitypid = e.child \
        ) AS d(dep)) \
    SELECT t.oid, n.nspname, t.typname, t.typtype::text, \
           EXISTS (SELECT 1 FROM pg_catalog.pg_type e WHERE e.typarray = t.oid), \
           EXISTS (SELECT 1 FROM pg_catalog.pg_range r WHERE r.rngmultitypid = t.oid), \
           (SELECT c.relkind::text FROM pg_catalog.pg_class c WHERE c.oid = t.typrelid), \
           x.extname, xn.nspname, \
           ARRAY(SELECT DISTINCT e.child FROM edges e WHERE e.parent = t.oid) \
    FROM (SELECT DISTINCT child FROM edges) u \
    JOIN pg_catalog.pg_type t ON t.oid = u.child \
    JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
    LEFT JOIN pg_catalog.pg_depend dep ON dep.classid = 'pg_catalog.pg_type'::regclass \
         AND dep.objid = t.oid AND dep.deptype = 'e' \
    LEFT JOIN pg_catalog.pg_extension x ON x.oid = dep.refobjid \
    LEFT JOIN pg_catalog.pg_namespace xn ON xn.oid = x.extnamespace \
    ORDER BY t.oid";

/// PostgreSQL's `FirstNormalObjectId`: every object made after initdb has an oid at
/// or above it.
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

/// Creates on the target the types `table` uses that are missing there (and the
/// extensions that provide types), dependencies first.
pub async fn create_missing_types(
    source: &Client,
    target: &impl tokio_postgres::GenericClient,
    table: &Table,
) -> Result<()> {
    let oids: Vec<u32> = table.columns.iter().map(|c| c.type_oid).collect();
    // Types made by initdb (all in pg_catalog and information_schema, which are
    // never created) have oids below this, and so have the types they are built
    // from: a table of such types needs no look (one round trip and a recursive
    // query per table was about 8 of a 28 s bootstrap of 2,000 small tables).
    if oids.iter().all(|&oid| oid < FIRST_NORMAL_OBJECT_ID) {
        return Ok(());
    }
    let types: BTreeMap<u32, UsedType> = source
        .query(CLOSURE_SQL, &[&oids])
        .await
        .pg_context(|| format!("reading the types used by {}", table.name))?
        .iter()
        .map(|r| {
            let extension = match (r.get::<_, Option<String>>(7), r.get::<_, Option<String>>(8)) {
                (Some(name), Some(schema)) => Some((name, schema)),
                _ => None,
            };
            let t = UsedType {
                oid: r.get(0),
                name: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                kind: r.get(3),
                implicit_array: r.get(4),
                multirange: r.get(5),
                relkind: r.get(6),
                extension,
                deps: r.get(9),
            };
            (t.oid, t)
        })
        .collect();

    // Extensions first: their types may be fields of the user's types.
    let extensions: BTreeSet<&(String, String)> = types
        .values()
        .filter_map(|t| t.extension.as_ref())
        .collect();
    for (ext, schema) in extensions {
        create_extension(target, table, ext, schema).await?;
    }

    for oid in dependency_order(&types) {
        let Some(t) = types.get(&oid) else { continue };
        if !needs_creating(t) || exists_on_target(target, &t.name).await? {
            continue;
        }
        let ddl = match t.kind.as_str() {
            "e" => enum_ddl(source, t).await?,
            "d" => domain_ddl(source, t).await?,
            "c" if t.relkind.as_deref() == Some("c") => composite_ddl(source, t).await?,
            "c" => bail!(
                "table {} uses the row type of table {} as a column type, which does not exist on the target: create table {} on the target first",
                table.name,
                t.name,
                t.name.quoted()
            ),
            "r" => range_ddl(source, t).await?,
            _ => bail!(
                "table {} uses type {}, which does not exist on the target and cannot be created from SQL: create it on the target (or install what provides it), then run walshuttle again",
                table.name,
                t.name
            ),
        };
        let script = format!(
            "CREATE SCHEMA IF NOT EXISTS {}; {ddl}",
            quote_ident(&t.name.schema)
        );
        target.batch_execute(&script).await.map_err(|e| {
            anyhow::anyhow!(
                "creating type {} on the target: {}; create it on the target yourself, then run walshuttle again",
                t.name,
                crate::pg::connect::describe(&e)
            )
        })?;
        tracing::info!(type_name = %t.name, "created type on the target");
    }
    Ok(())
}

/// Whether walshuttle creates this type itself: a user's type, not built in, not
/// an extension's, not made along with another type (arrays, multiranges).
fn needs_creating(t: &UsedType) -> bool {
    !matches!(t.name.schema.as_str(), "pg_catalog" | "information_schema")
        && t.extension.is_none()
        && !t.implicit_array
        && !t.multirange
        && t.kind != "p"
}

/// Every type after the types it is made of (depth-first, dependencies first).
fn dependency_order(types: &BTreeMap<u32, UsedType>) -> Vec<u32> {
    fn visit(
        oid: u32,
        types: &BTreeMap<u32, UsedType>,
        seen: &mut BTreeSet<u32>,
        out: &mut Vec<u32>,
    ) {
        if !seen.insert(oid) {
            return;
        }
        if let Some(t) = types.get(&oid) {
            for dep in &t.deps {
                visit(*dep, types, seen, out);
            }
        }
        out.push(oid);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(types.len());
    for oid in types.keys() {
        visit(*oid, types, &mut seen, &mut out);
    }
    out
}

async fn create_extension(
    target: &impl tokio_postgres::GenericClient,
    table: &Table,
    ext: &str,
    schema: &str,
) -> Result<()> {
    // In the source's schema, so the schema-qualified type names match; under the
    // pinned search_path an unplaced extension would land in pg_catalog.
    let mut sql = String::new();
    if schema != "pg_catalog" {
        sql.push_str(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}; ",
            quote_ident(schema)
        ));
    }
    sql.push_str(&format!(
        "CREATE EXTENSION IF NOT EXISTS {} SCHEMA {} CASCADE",
        quote_ident(ext),
        quote_ident(schema)
    ));
    target.batch_execute(&sql).await.map_err(|e| {
        anyhow::anyhow!(
            "table {} needs extension {ext} on the target, which cannot be created: {}; install it on the target (CREATE EXTENSION {ext} SCHEMA {schema})",
            table.name,
            crate::pg::connect::describe(&e)
        )
    })
}

async fn exists_on_target(
    target: &impl tokio_postgres::GenericClient,
    name: &QualifiedName,
) -> Result<bool> {
    Ok(target
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
             WHERE n.nspname = $1 AND t.typname = $2",
            &[&name.schema, &name.name],
        )
        .await
        .pg_context(|| format!("looking up type {name} on the target"))?
        .is_some())
}

/// `schema.collation`, quoted, from a query's two columns.
fn collation(schema: Option<String>, name: Option<String>) -> Option<String> {
    Some(format!("{}.{}", quote_ident(&schema?), quote_ident(&name?)))
}

async fn enum_ddl(source: &Client, t: &UsedType) -> Result<String> {
    let labels: Vec<String> = source
        .query(
            "SELECT enumlabel::text FROM pg_catalog.pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
            &[&t.oid],
        )
        .await
        .pg_context(|| format!("reading enum {} on the source", t.name))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(format!(
        "CREATE TYPE {} AS ENUM ({})",
        t.name.quoted(),
        labels
            .iter()
            .map(|l| quote_literal(l))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

async fn domain_ddl(source: &Client, t: &UsedType) -> Result<String> {
    let ctx = || format!("reading domain {} on the source", t.name);
    let row = source
        .query_one(
            "SELECT format_type(t.typbasetype, t.typtypmod), t.typnotnull, \
                    pg_get_expr(t.typdefaultbin, 0), cn.nspname::text, c.collname::text \
             FROM pg_catalog.pg_type t JOIN pg_catalog.pg_type b ON b.oid = t.typbasetype \
             LEFT JOIN pg_catalog.pg_collation c ON c.oid = t.typcollation AND t.typcollation <> b.typcollation \
             LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = c.collnamespace \
             WHERE t.oid = $1",
            &[&t.oid],
        )
        .await
        .pg_context(ctx)?;
    let base: String = row.get(0);
    let mut ddl = format!("CREATE DOMAIN {} AS {base}", t.name.quoted());
    if let Some(coll) = collation(row.get(3), row.get(4)) {
        ddl.push_str(&format!(" COLLATE {coll}"));
    }
    if let Some(default) = row.get::<_, Option<String>>(2) {
        ddl.push_str(&format!(" DEFAULT {default}"));
    }
    if row.get::<_, bool>(1) {
        ddl.push_str(" NOT NULL");
    }
    // Checks in name order; one not validated on the source (NOT VALID) is added
    // the same way, so rows the source holds are not refused.
    let checks = source
        .query(
            "SELECT conname::text, pg_get_constraintdef(oid), convalidated FROM pg_catalog.pg_constraint \
             WHERE contypid = $1 AND contype = 'c' ORDER BY conname",
            &[&t.oid],
        )
        .await
        .pg_context(ctx)?;
    for check in &checks {
        let (name, def, validated): (String, String, bool) =
            (check.get(0), check.get(1), check.get(2));
        if validated {
            ddl.push_str(&format!(" CONSTRAINT {} {def}", quote_ident(&name)));
        }
    }
    for check in &checks {
        let (name, def, validated): (String, String, bool) =
            (check.get(0), check.get(1), check.get(2));
        if !validated {
            ddl.push_str(&format!(
                "; ALTER DOMAIN {} ADD CONSTRAINT {} {def}",
                t.name.quoted(),
                quote_ident(&name)
            ));
        }
    }
    Ok(ddl)
}

async fn composite_ddl(source: &Client, t: &UsedType) -> Result<String> {
    let fields = source
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), cn.nspname::text, c.collname::text \
             FROM pg_catalog.pg_type t JOIN pg_catalog.pg_attribute a ON a.attrelid = t.typrelid \
             JOIN pg_catalog.pg_type at ON at.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_collation c ON c.oid = a.attcollation AND a.attcollation <> at.typcollation \
             LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = c.collnamespace \
             WHERE t.oid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&t.oid],
        )
        .await
        .pg_context(|| format!("reading composite type {} on the source", t.name))?
        .iter()
        .map(|r| {
            let mut field = format!("{} {}", quote_ident(&r.get::<_, String>(0)), r.get::<_, String>(1));
            if let Some(coll) = collation(r.get(2), r.get(3)) {
                field.push_str(&format!(" COLLATE {coll}"));
            }
            field
        })
        .collect::<Vec<_>>();
    Ok(format!(
        "CREATE TYPE {} AS ({})",
        t.name.quoted(),
        fields.join(", ")
    ))
}

async fn range_ddl(source: &Client, t: &UsedType) -> Result<String> {
    let row = source
        .query_one(
            "SELECT format_type(r.rngsubtype, NULL), \
                    CASE WHEN NOT oc.opcdefault THEN opn.nspname::text END, oc.opcname::text, \
                    cn.nspname::text, c.collname::text, \
                    CASE WHEN r.rngcanonical::oid <> 0 THEN r.rngcanonical::regproc::text END, \
                    CASE WHEN r.rngsubdiff::oid <> 0 THEN r.rngsubdiff::regproc::text END, \
                    mn.nspname::text, m.typname::text \
             FROM pg_catalog.pg_range r \
             JOIN pg_catalog.pg_type st ON st.oid = r.rngsubtype \
             JOIN pg_catalog.pg_opclass oc ON oc.oid = r.rngsubopc \
             JOIN pg_catalog.pg_namespace opn ON opn.oid = oc.opcnamespace \
             LEFT JOIN pg_catalog.pg_collation c ON c.oid = r.rngcollation AND r.rngcollation <> st.typcollation \
             LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = c.collnamespace \
             LEFT JOIN pg_catalog.pg_type m ON m.oid = r.rngmultitypid \
             LEFT JOIN pg_catalog.pg_namespace mn ON mn.oid = m.typnamespace \
             WHERE r.rngtypid = $1",
            &[&t.oid],
        )
        .await
        .pg_context(|| format!("reading range type {} on the source", t.name))?;
    let mut options = vec![format!("SUBTYPE = {}", row.get::<_, String>(0))];
    if let Some(schema) = row.get::<_, Option<String>>(1) {
        options.push(format!(
            "SUBTYPE_OPCLASS = {}.{}",
            quote_ident(&schema),
            quote_ident(&row.get::<_, String>(2))
        ));
    }
    if let Some(coll) = collation(row.get(3), row.get(4)) {
        options.push(format!("COLLATION = {coll}"));
    }
    if let Some(canonical) = row.get::<_, Option<String>>(5) {
        options.push(format!("CANONICAL = {canonical}"));
    }
    if let Some(diff) = row.get::<_, Option<String>>(6) {
        options.push(format!("SUBTYPE_DIFF = {diff}"));
    }
    if let (Some(schema), Some(name)) = (
        row.get::<_, Option<String>>(7),
        row.get::<_, Option<String>>(8),
    ) {
        options.push(format!(
            "MULTIRANGE_TYPE_NAME = {}",
            QualifiedName::new(schema, name).quoted()
        ));
    }
    Ok(format!(
        "CREATE TYPE {} AS RANGE ({})",
        t.name.quoted(),
        options.join(", ")
    ))
}
