//! Column lists and row filters: `--columns` and `--row-filter`, carried by the
//! pipeline's publication (PostgreSQL 15+) and by every copy and comparison.
//!
//! Both take a fragment of PostgreSQL's own `CREATE PUBLICATION` syntax after the
//! table name: `--columns 'public.orders (id, total)'`, `--row-filter
//! 'public.orders WHERE total > 0'`. Table and column names are written as
//! `--tables` takes them (as in the catalog; double quotes for names with commas,
//! spaces or dots); the filter is an SQL expression on the source's row, evaluated
//! by PostgreSQL (so its unquoted names fold to lower case as SQL's do).
//!
//! The publication applies them to the stream (pgoutput sends only the listed
//! columns, and only changes to rows the filter keeps: an UPDATE whose old row
//! matches and new row does not arrives as a DELETE, the reverse as an INSERT of
//! the whole new row). Walshuttle applies them to everything it reads itself: the
//! bootstrap's copy and the target table it creates, `verify` (only the listed
//! columns, only source rows the filter keeps, against every target row: a target
//! row outside the filter is a difference), its repair and `catch-up`.
//!
//! PostgreSQL refuses UPDATE and DELETE on a published table whose column list
//! leaves out a replica identity column, or whose filter reads a column outside
//! the replica identity. Walshuttle never makes the source refuse a statement, so
//! [`check_source`] asks PostgreSQL itself, before anything is written: it creates
//! the publication in a transaction it rolls back and plans an UPDATE and a DELETE
//! of each table under it (`EXPLAIN`, which runs no trigger and touches no row).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::catalog::Table;
use crate::pg::{quote_ident, PgResultExt, QualifiedName};

/// The oldest source that takes column lists and row filters (`server_version_num`).
pub const MIN_SERVER_VERSION: i32 = 150000;

/// One table's column list and row filter.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableRows {
    /// The columns replicated, unquoted; `None` means every column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// The SQL expression a source row must satisfy; `None` means every row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

impl TableRows {
    /// PostgreSQL's form after the table name in a publication: ` (a, b) WHERE (f)`.
    pub fn publication_suffix(&self) -> String {
        let mut out = String::new();
        if let Some(cols) = &self.columns {
            let list: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
            out.push_str(&format!(" ({})", list.join(", ")));
        }
        if let Some(f) = &self.filter {
            if one_group(f) {
                out.push_str(&format!(" WHERE {f}"));
            } else {
                out.push_str(&format!(" WHERE ({f})"));
            }
        }
        out
    }
}

/// Whether `expr` is one parenthesized group, `( … )` (as PostgreSQL deparses a
/// filter), so it needs no parentheses of its own. Quotes are skipped.
fn one_group(expr: &str) -> bool {
    let e = expr.trim();
    if !e.starts_with('(') || !e.ends_with(')') {
        return false;
    }
    let (mut depth, mut quote) = (0usize, None::<char>);
    for (i, c) in e.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => {
                depth = depth.saturating_sub(1);
                if depth == 0 && i + 1 < e.len() {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0 && quote.is_none()
}

/// Stored form: a list, since JSON object keys cannot be qualified names.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    schema: String,
    table: String,
    #[serde(flatten)]
    rows: TableRows,
}

/// Every table's column list and row filter in a pipeline (tables without either
/// are absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowSelection {
    tables: BTreeMap<QualifiedName, TableRows>,
}

/// Splits `text` at the first unquoted character for which `at` holds (given the
/// rest of the text from there); `None` when there is none.
fn split_unquoted(text: &str, at: impl Fn(&str) -> bool) -> Option<(&str, &str)> {
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted && at(&text[i..]) {
            return Some((&text[..i], &text[i..]));
        }
    }
    None
}

/// One column name as written: double-quoted (with `""` for a quote), or as is.
fn column_name(text: &str, whole: &str) -> Result<String> {
    let t = text.trim();
    if t.is_empty() {
        bail!("--columns: `{whole}` has an empty column name");
    }
    match t.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) if !inner.is_empty() => Ok(inner.replace("\"\"", "\"")),
        _ if t.contains('"') => bail!("--columns: `{t}` in `{whole}` is not a column name"),
        _ => Ok(t.to_string()),
    }
}

fn table_name(text: &str, flag: &str, whole: &str) -> Result<QualifiedName> {
    QualifiedName::parse(text).map_err(|e| anyhow::anyhow!("{flag}: {e} (in `{whole}`)"))
}

/// Parses `[schema.]table (col, "Col", …)`.
fn parse_columns(spec: &str) -> Result<(QualifiedName, Vec<String>)> {
    let Some((table, rest)) = split_unquoted(spec, |r| r.starts_with('(')) else {
        bail!("--columns: `{spec}` is not `[schema.]table (column, …)`");
    };
    let Some(inner) = rest
        .trim_end()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
    else {
        bail!(
            "--columns: `{spec}` is not `[schema.]table (column, …)`: the list must end with `)`"
        );
    };
    let name = table_name(table, "--columns", spec)?;
    let mut columns = Vec::new();
    let mut rest = inner;
    loop {
        match split_unquoted(rest, |r| r.starts_with(',')) {
            Some((one, after)) => {
                columns.push(column_name(one, spec)?);
                rest = &after[1..];
            }
            None => {
                columns.push(column_name(rest, spec)?);
                break;
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = columns.iter().find(|c| !seen.insert(c.as_str())) {
        bail!(
            "--columns: column {} is listed twice in `{spec}`",
            quote_ident(dup)
        );
    }
    Ok((name, columns))
}

/// Parses `[schema.]table WHERE expression`.
fn parse_filter(spec: &str) -> Result<(QualifiedName, String)> {
    let is_where = |r: &str| {
        let mut chars = r.chars();
        chars.next().is_some_and(char::is_whitespace)
            && r.trim_start().len() > 5
            && r.trim_start()[..5].eq_ignore_ascii_case("where")
            && r.trim_start()[5..]
                .chars()
                .next()
                .is_some_and(|c| c.is_whitespace() || c == '(')
    };
    let Some((table, rest)) = split_unquoted(spec, is_where) else {
        bail!("--row-filter: `{spec}` is not `[schema.]table WHERE expression`");
    };
    let expr = rest.trim_start()[5..].trim();
    if expr.is_empty() {
        bail!("--row-filter: `{spec}` has no expression after WHERE");
    }
    Ok((table_name(table, "--row-filter", spec)?, expr.to_string()))
}

impl RowSelection {
    /// Parses the `--columns` and `--row-filter` values (blank ones are ignored);
    /// a table named twice by the same flag is refused.
    pub fn parse(columns: &[String], filters: &[String]) -> Result<RowSelection> {
        let mut tables: BTreeMap<QualifiedName, TableRows> = BTreeMap::new();
        for spec in columns.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let (name, cols) = parse_columns(spec)?;
            let entry = tables.entry(name.clone()).or_default();
            if entry.columns.is_some() {
                bail!("--columns: table {name} is given two column lists");
            }
            entry.columns = Some(cols);
        }
        for spec in filters.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let (name, expr) = parse_filter(spec)?;
            let entry = tables.entry(name.clone()).or_default();
            if entry.filter.is_some() {
                bail!(
                    "--row-filter: table {name} is given two row filters (combine them with AND)"
                );
            }
            entry.filter = Some(expr);
        }
        Ok(RowSelection { tables })
    }

    /// Whether no table has a column list or a row filter.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The tables named, in name order.
    pub fn names(&self) -> impl Iterator<Item = &QualifiedName> {
        self.tables.keys()
    }

    /// The column list and row filter of `name`, if it has either.
    pub fn get(&self, name: &QualifiedName) -> Option<&TableRows> {
        self.tables.get(name)
    }

    /// Adds (or replaces) the entries of `other`.
    pub fn merge(&mut self, other: &RowSelection) {
        for (name, rows) in &other.tables {
            self.tables.insert(name.clone(), rows.clone());
        }
    }

    /// Keeps only the tables for which `keep` holds (a pipeline's tables).
    pub fn retain(&mut self, keep: impl Fn(&QualifiedName) -> bool) {
        self.tables.retain(|n, _| keep(n));
    }

    /// The publication's entry for `name`: `ONLY t (a, b) WHERE (f)`.
    pub fn publication_item(&self, name: &QualifiedName) -> String {
        let suffix = self
            .get(name)
            .map(TableRows::publication_suffix)
            .unwrap_or_default();
        format!("ONLY {}{suffix}", name.quoted())
    }

    /// Narrows `table`, as read from the source catalog, to what the pipeline
    /// replicates of it: its listed columns (in the source's order) and its row
    /// filter. A listed column the table does not have is refused.
    pub fn narrow(&self, table: &mut Table) -> Result<()> {
        let Some(rows) = self.get(&table.name) else {
            return Ok(());
        };
        if let Some(cols) = &rows.columns {
            if let Some(missing) = cols
                .iter()
                .find(|c| !table.columns.iter().any(|tc| &tc.name == *c))
            {
                bail!(
                    "--columns names column {} of table {}, which has no such column on the source (names are case-sensitive; quote them as in the catalog)",
                    quote_ident(missing),
                    table.name
                );
            }
            table.columns.retain(|c| cols.contains(&c.name));
        }
        table.row_filter = rows.filter.clone();
        Ok(())
    }

    /// [`RowSelection::narrow`] for each table.
    pub fn narrow_all(&self, tables: &mut [Table]) -> Result<()> {
        tables.iter_mut().try_for_each(|t| self.narrow(t))
    }

    /// One table's list and filter for `status` and `tables`: `(a, b) WHERE (f)`.
    pub fn describe(&self, name: &QualifiedName) -> Option<String> {
        self.get(name)
            .map(|r| r.publication_suffix().trim_start().to_string())
    }

    /// The selection as stored in the state (JSON); `None` when empty.
    pub fn to_json(&self) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let stored: Vec<Stored> = self
            .tables
            .iter()
            .map(|(n, r)| Stored {
                schema: n.schema.clone(),
                table: n.name.clone(),
                rows: r.clone(),
            })
            .collect();
        serde_json::to_string(&stored).ok()
    }

    /// A selection stored by [`RowSelection::to_json`].
    pub fn from_json(text: &str) -> Result<RowSelection> {
        let stored: Vec<Stored> = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!("the stored column lists and row filters do not parse: {e}")
        })?;
        Ok(RowSelection {
            tables: stored
                .into_iter()
                .map(|s| (QualifiedName::new(s.schema, s.table), s.rows))
                .collect(),
        })
    }
}

/// The pipeline's column lists and row filters as they stand: as its publication
/// on the source holds them now, else (no publication) as recorded at creation.
/// PostgreSQL keeps a publication's lists and filters through renames of columns
/// and tables (it stores attribute numbers, relation oids and an expression tree),
/// where the recorded names would go stale. Empty when none were recorded.
pub async fn current(
    source: &Client,
    target: &impl tokio_postgres::GenericClient,
    state: &crate::state::StateStore,
    slot: &str,
) -> Result<RowSelection> {
    let stored = state.row_selection(target, slot).await?;
    if stored.is_empty() {
        return Ok(stored);
    }
    let Some(pipeline) = state.existing_pipeline(target, slot).await? else {
        return Ok(stored);
    };
    let exists = source
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&pipeline.publication],
        )
        .await
        .pg_context(|| {
            format!(
                "looking up publication {} on the source",
                pipeline.publication
            )
        })?
        .is_some();
    if !exists {
        return Ok(stored);
    }
    let rows = source
        .query(
            "SELECT n.nspname::text, c.relname::text, \
                    CASE WHEN pr.prattrs IS NULL THEN NULL ELSE \
                      ARRAY(SELECT a.attname::text FROM unnest(pr.prattrs::int2[]) WITH ORDINALITY AS k(num, ord) \
                            JOIN pg_attribute a ON a.attrelid = pr.prrelid AND a.attnum = k.num ORDER BY k.ord) END, \
                    pg_get_expr(pr.prqual, pr.prrelid) \
             FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
             JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE p.pubname = $1 AND (pr.prattrs IS NOT NULL OR pr.prqual IS NOT NULL)",
            &[&pipeline.publication],
        )
        .await
        .pg_context(|| {
            format!(
                "reading the column lists and row filters of publication {} on the source",
                pipeline.publication
            )
        })?;
    Ok(RowSelection {
        tables: rows
            .iter()
            .map(|r| {
                (
                    QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    TableRows {
                        columns: r.get(2),
                        filter: r.get(3),
                    },
                )
            })
            .collect(),
    })
}

/// Refuses column lists or row filters given for an existing pipeline that
/// differ from the ones it was created with (or `tables add` gave it): they are
/// fixed for its life, and ignoring them silently would let a user believe a
/// changed filter applies. A recorded table the flags leave out is not a
/// difference (`tables add` gave it its list and filter).
pub async fn check_unchanged(
    target: &impl tokio_postgres::GenericClient,
    state: &crate::state::StateStore,
    slot: &str,
    given: &RowSelection,
) -> Result<()> {
    if given.is_empty() || state.installed_version(target).await?.is_none() {
        return Ok(());
    }
    match state.existing_pipeline(target, slot).await? {
        Some(p) if p.phase != crate::state::Phase::CreatingSlot => {}
        _ => return Ok(()),
    }
    let stored = state.row_selection(target, slot).await?;
    // Tables the record has and the flags do not were added by `tables add`.
    if given.tables.iter().any(|(n, r)| stored.get(n) != Some(r)) {
        let shown: Vec<String> = stored
            .names()
            .filter_map(|t| stored.describe(t).map(|d| format!("{t} {d}")))
            .collect();
        bail!(
            "pipeline {slot} was created with other column lists and row filters ({}); they are fixed for its life: give the same --columns/--row-filter (or none), or tear it down with `walshuttle teardown --slot {slot}` and bootstrap again",
            if shown.is_empty() { "none".to_string() } else { shown.join("; ") }
        );
    }
    Ok(())
}

/// Refuses, before anything is written, a selection the source cannot take: a
/// source older than PostgreSQL 15, a table that is not replicated, or a column
/// list or row filter that would make PostgreSQL refuse the table's UPDATEs and
/// DELETEs (see the module doc), or that PostgreSQL refuses itself (an expression a
/// publication cannot hold, a generated column, …).
pub async fn check_source(source: &Client, tables: &[Table], sel: &RowSelection) -> Result<()> {
    if sel.is_empty() {
        return Ok(());
    }
    let row = source
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading the source's version: {e}"))?;
    let (num, version): (i32, String) = (row.get(0), row.get(1));
    if num < MIN_SERVER_VERSION {
        bail!(
            "--columns and --row-filter need PostgreSQL 15 or later on the source (publication column lists and row filters); the source runs {version}: upgrade it, or replicate whole tables"
        );
    }
    check_named(tables, sel)?;
    let mut narrowed: Vec<Table> = tables
        .iter()
        .filter(|t| sel.get(&t.name).is_some())
        .cloned()
        .collect();
    sel.narrow_all(&mut narrowed)?;
    let named: Vec<&Table> = tables
        .iter()
        .filter(|t| sel.get(&t.name).is_some())
        .collect();
    let items: Vec<String> = named
        .iter()
        .map(|t| sel.publication_item(&t.name))
        .collect();
    // A name no one else uses; the transaction is rolled back whatever happens.
    let trial = quote_ident(&format!("walshuttle_trial_{}", std::process::id()));
    let begin = format!(
        "BEGIN; SET LOCAL lock_timeout = '10s'; CREATE PUBLICATION {trial} FOR TABLE {}",
        items.join(", ")
    );
    let result = trial_statements(source, &begin, &named).await;
    let _ = source.batch_execute("ROLLBACK").await;
    result
}

/// Refuses a list or filter for a table that is not among `tables`.
pub fn check_named(tables: &[Table], sel: &RowSelection) -> Result<()> {
    for name in sel.names() {
        if !tables.iter().any(|t| &t.name == name) {
            bail!(
                "--columns/--row-filter name table {name}, which this pipeline does not replicate: add it to --tables, or drop its column list and row filter"
            );
        }
    }
    Ok(())
}

/// Runs the trial: the publication, then an UPDATE and a DELETE of each table
/// planned (not run) under it.
async fn trial_statements(source: &Client, begin: &str, named: &[&Table]) -> Result<()> {
    if let Err(e) = source.batch_execute(begin).await {
        lock_wait(&e)?;
        bail!(
            "the source refuses the column lists and row filters: {} (only columns of the table; a filter may use only columns, constants and built-in immutable functions and operators)",
            crate::pg::connect::describe(&e)
        );
    }
    for table in named {
        let Some(first) = table.columns.iter().find(|c| c.is_copied()) else {
            continue;
        };
        let set = quote_ident(&first.name);
        for (what, sql) in [
            (
                "UPDATE",
                format!(
                    "EXPLAIN UPDATE ONLY {} SET {set} = {set}",
                    table.name.quoted()
                ),
            ),
            (
                "DELETE",
                format!("EXPLAIN DELETE FROM ONLY {}", table.name.quoted()),
            ),
        ] {
            if let Err(e) = source.batch_execute(&sql).await {
                lock_wait(&e)?;
                bail!(
                    "with this column list or row filter the source would refuse every {what} of table {}: {}; a column list must include every replica identity column ({}), and a row filter may use only those columns",
                    table.name,
                    crate::pg::connect::describe(&e),
                    identity_columns(table)
                );
            }
        }
    }
    Ok(())
}

/// A trial statement that waited too long for a lock says so (another session
/// holds a conflicting lock on a table: a DDL, a VACUUM FULL), not that the list
/// or filter is wrong.
fn lock_wait(e: &tokio_postgres::Error) -> Result<()> {
    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
        bail!(
            "checking the column lists and row filters on the source waited more than 10 s for a lock on their tables (another session holds a conflicting one, e.g. a DDL or VACUUM FULL): try again when it is done"
        );
    }
    Ok(())
}

/// The replica identity columns of `table`, for messages.
fn identity_columns(table: &Table) -> String {
    match &table.identity {
        crate::catalog::Identity::Key(cols) => cols
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        crate::catalog::Identity::Full => "REPLICA IDENTITY FULL: every column".into(),
        crate::catalog::Identity::Unusable => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lists_and_filters_parse_with_quoted_names() {
        let sel = RowSelection::parse(
            &v(&[
                r#"sales."Order Items" ("Code", qty, "a,""b")"#,
                "orders(id,total)",
            ]),
            &v(&[
                r#"sales."Order Items" WHERE "Code" <> 'x where y'"#,
                "public.orders where(id > 10)",
            ]),
        )
        .unwrap();
        let items = QualifiedName::new("sales", "Order Items");
        let rows = sel.get(&items).unwrap();
        assert_eq!(
            rows.columns.as_deref(),
            Some(&v(&["Code", "qty", "a,\"b"])[..])
        );
        assert_eq!(rows.filter.as_deref(), Some(r#""Code" <> 'x where y'"#));
        assert_eq!(
            sel.publication_item(&items),
            r#"ONLY "sales"."Order Items" ("Code", "qty", "a,""b") WHERE ("Code" <> 'x where y')"#
        );
        let orders = QualifiedName::new("public", "orders");
        assert_eq!(
            sel.describe(&orders).unwrap(),
            r#"("id", "total") WHERE (id > 10)"#
        );
        assert_eq!(
            RowSelection::from_json(&sel.to_json().unwrap()).unwrap(),
            sel
        );
        assert!(RowSelection::parse(&[], &[]).unwrap().to_json().is_none());
        assert!(one_group("(a > 1)") && one_group("((a) OR (b = ')'))"));
        assert!(!one_group("(a) OR (b)") && !one_group("a > (1)"));
    }

    #[test]
    fn malformed_specs_are_refused() {
        for bad in ["orders", "orders ()", "orders (a, a)", "orders (a", "(a)"] {
            assert!(RowSelection::parse(&v(&[bad]), &[]).is_err(), "{bad}");
        }
        for bad in [
            "orders",
            "orders WHERE",
            "orders wherever x",
            "\"t WHERE x\"",
        ] {
            assert!(RowSelection::parse(&[], &v(&[bad])).is_err(), "{bad}");
        }
        assert!(RowSelection::parse(&v(&["t (a)", "t (b)"]), &[]).is_err());
    }
}
