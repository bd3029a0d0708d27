//! A column added on the source, as the apply path learns of it from a Relation
//! message: the statements that add it on the target so that the rows which existed
//! when it was added hold the values they hold on the source.
//!
//! Those rows got their value without any WAL to replicate. PostgreSQL records it:
//! a non-volatile default is evaluated once, at `ADD COLUMN`, and kept as the
//! column's `attmissingval`, which no later `SET DEFAULT` changes; a column added
//! without a default is NULL in them. A volatile default (`random()`,
//! `gen_random_uuid()`, `clock_timestamp()`) rewrites the table with one value per
//! row instead: nothing short of reading the rows again reproduces it, so the table
//! is copied again under a new snapshot (see `session.rs`, `resync`).

use anyhow::Result;
use tokio_postgres::Client;

use crate::pg::{quote_ident, quote_literal, PgResultExt, QualifiedName};

/// What adding one column on the target takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedColumn {
    /// `ALTER TABLE … ADD COLUMN …; ALTER TABLE … ALTER COLUMN … SET DEFAULT …`.
    pub sql: String,
    /// The existing rows' values cannot be derived: copy the table again.
    pub resync: bool,
}

/// Reads how column `column` (type `type_sql`) of `table` was added on the source and
/// builds the statements that add it on the target.
pub async fn plan(
    source: &Client,
    table: &QualifiedName,
    column: &str,
    type_sql: &str,
) -> Result<AddedColumn> {
    let row = source
        .query_opt(
            "SELECT a.atthasmissing, (a.attmissingval::text::text[])[1], pg_get_expr(d.adbin, d.adrelid) \
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1::text::regclass AND a.attname = $2 AND NOT a.attisdropped",
            &[&table.quoted(), &column],
        )
        .await
        .pg_context(|| format!("reading how {table}.{column} was added on the source"))?;
    let (has_missing, missing, default): (bool, Option<String>, Option<String>) = match row {
        Some(r) => (r.get(0), r.get(1), r.get(2)),
        // Dropped again since: the column only needs to exist for the changes that
        // still carry it.
        None => (false, None, None),
    };
    // Sequences are not replicated: a `nextval` default would hand out other values.
    let default = default.filter(|d| !d.contains("nextval("));
    Ok(statements(
        table,
        column,
        type_sql,
        has_missing,
        missing,
        default,
    ))
}

fn statements(
    table: &QualifiedName,
    column: &str,
    type_sql: &str,
    has_missing: bool,
    missing: Option<String>,
    default: Option<String>,
) -> AddedColumn {
    let t = table.quoted();
    let c = quote_ident(column);
    let (existing, resync) = match (has_missing, missing, &default) {
        (true, Some(value), _) => (
            format!(" DEFAULT {}::{type_sql}", quote_literal(&value)),
            false,
        ),
        (true, None, _) | (false, _, None) => (String::new(), false),
        // A default but no recorded value for the existing rows: it was volatile and
        // the table was rewritten (or the default came later, over NULLs).
        (false, _, Some(_)) => (String::new(), true),
    };
    let mut sql = format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {c} {type_sql}{existing}");
    match default {
        Some(expr) => sql.push_str(&format!(
            "; ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT {expr}"
        )),
        None if !existing.is_empty() => {
            sql.push_str(&format!("; ALTER TABLE {t} ALTER COLUMN {c} DROP DEFAULT"))
        }
        None => {}
    }
    AddedColumn { sql, resync }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_rows_get_the_value_recorded_at_add_time() {
        let t = QualifiedName::new("public", "t");
        let a = statements(
            &t,
            "c",
            "integer",
            true,
            Some("42".into()),
            Some("7".into()),
        );
        assert_eq!(
            a.sql,
            "ALTER TABLE \"public\".\"t\" ADD COLUMN IF NOT EXISTS \"c\" integer DEFAULT '42'::integer; \
             ALTER TABLE \"public\".\"t\" ALTER COLUMN \"c\" SET DEFAULT 7"
        );
        assert!(!a.resync);
        let a = statements(&t, "c", "text", false, None, None);
        assert_eq!(
            a.sql,
            "ALTER TABLE \"public\".\"t\" ADD COLUMN IF NOT EXISTS \"c\" text"
        );
        assert!(!a.resync);
        let a = statements(
            &t,
            "c",
            "uuid",
            false,
            None,
            Some("gen_random_uuid()".into()),
        );
        assert!(a.resync);
        assert!(a.sql.ends_with("SET DEFAULT gen_random_uuid()"));
    }
}
