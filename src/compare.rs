//! Comparing one table between source and target by key ranges: row counts and an
//! order-independent hash per range, narrowed down to the differing keys where a
//! range does not match. Shared by `verify` (whole rows) and `catch-up` (keys only,
//! to find rows deleted on the source).

use std::collections::HashMap;

use anyhow::Result;
use tokio_postgres::GenericClient;

use crate::catalog::{Column, Table, TypeSpec};
/// Which side a query reads: the source's rows are narrowed to the pipeline's row
/// filter (`--row-filter`), the target's never are (a target row outside the
/// filter is a difference), and the target's may be a partitioned table
/// ([`crate::own_rows`]).
pub use crate::config::Side;
use crate::own_rows::own_rows;
use crate::pg::{quote_ident, PgResultExt};
use crate::rewrite::{keys_predicate, text_array};

/// A row's identity: its key columns' text (or, for a keyless table, the row's
/// text as one element).
pub type Key = Vec<String>;

/// Renders a key for people: `(42)`, `(a,b)`.
pub fn show_key(key: &Key) -> String {
    format!("({})", key.join(","))
}

/// Session settings that make `::text` of every value identical on both sides.
/// Every session already starts with them ([`crate::pg::session_settings`]), so
/// this only restores them; callers may drop it.
pub const CANONICAL_TEXT: &str = crate::pg::session_settings::SET_ALL;

/// Rows per range aimed for when a table is split by an integer key.
const ROWS_PER_RANGE: i64 = 200_000;

/// Which part of each row is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compared {
    /// Every copied column: finds changed, missing and extra rows.
    WholeRows,
    /// Only the key: finds missing and extra rows (deletes), cheaply.
    KeysOnly,
}

/// `predicate` on `side`: on the source, ANDed with the table's row filter.
fn on_side(table: &Table, side: Side, predicate: String) -> String {
    match side {
        Side::Source => table.source_rows(&predicate),
        Side::Target => predicate,
    }
}

/// A slice of a table by key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRange {
    /// The whole table (composite or non-integer keys, keyless tables).
    All,
    /// `lo <= key < hi` on a single integer key column.
    Int {
        /// Inclusive lower bound.
        lo: i64,
        /// Exclusive upper bound.
        hi: i64,
    },
}

impl KeyRange {
    /// The WHERE clause for this range on `table`.
    pub fn predicate(&self, table: &Table) -> String {
        match (self, table.key.first()) {
            (KeyRange::Int { lo, hi }, Some(k)) => {
                let k = quote_ident(k);
                format!("{k} >= {lo} AND {k} < {hi}")
            }
            _ => "true".into(),
        }
    }

    /// Human form for reports.
    pub fn describe(&self, table: &Table) -> String {
        match (self, table.key.first()) {
            (KeyRange::Int { lo, hi }, Some(k)) => format!("{k} in [{lo}, {hi})"),
            _ => "whole table".into(),
        }
    }
}

/// Count and hash of one range on one side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// Rows in the range.
    pub rows: i64,
    /// Sum of the rows' 64-bit hashes, as text (a numeric).
    pub hash: String,
}

/// A column's value as hashed: the same expression runs on both sides, so it must
/// give the same text exactly when the target holds the source's value, identical
/// in the source's type. A column of the same type on both sides is compared by its
/// text, as is: `json` keeps the text it was given (key order, spacing, duplicate
/// keys), `numeric` its scale. A column widened on the target
/// ([`crate::catalog::types_compatible`]) is read as the source's type would hold
/// the target's value, and only where that reading is exact:
/// - `numeric(p,s)` (a wider scale pads zeros): the target's value rounded to the
///   source's scale when rounding does not change it (`1.230000` is `1.23`), else
///   its own text (`1.234900`), which no value of scale `s` prints as;
/// - `timestamp` (widened to `timestamptz`): cast to `timestamp`, which under the
///   pinned UTC time zone gives back the source's value (no modifier: a fraction
///   the source could not hold stays visible);
/// - `character(n)` (a longer one pads blanks): as `text`, without trailing blanks,
///   which that type ignores;
/// - `json` widened to `jsonb`: as `jsonb` on both sides, since `jsonb` cannot hold
///   the text `json` does; equal means the same JSON value (docs/design.md).
///
/// Widenings that print a value the same way (`integer`/`bigint`,
/// `varchar(10)`/`text`, `real`/`double precision` as replicated through text,
/// `timestamp(0)`/`timestamp(6)`) are compared by their text.
fn compared_value(column: &Column, target_type: Option<&str>) -> String {
    let name = quote_ident(&column.name);
    if target_type == Some(column.type_sql.as_str()) {
        return name;
    }
    let spec = TypeSpec::parse(&column.type_sql);
    let array = if spec.array { "[]" } else { "" };
    match (spec.name.as_str(), spec.modifier.as_deref()) {
        ("timestamp without time zone", _) => format!("{name}::timestamp without time zone{array}"),
        ("character", _) => format!("{name}::text{array}"),
        ("json", _) => match target_type.map(TypeSpec::parse) {
            Some(t) if t.name == "jsonb" => format!("{name}::jsonb{array}"),
            _ => name,
        },
        ("numeric", Some(modifier)) => {
            let scale = modifier
                .split(',')
                .nth(1)
                .map_or(Some(0), |s| s.trim().parse::<i32>().ok());
            match scale {
                Some(scale) if !spec.array => format!(
                    "CASE WHEN {name} = round({name}, {scale}) THEN round({name}, {scale})::text ELSE {name}::text END"
                ),
                // An array: read in the source's type when that is exact.
                _ => format!(
                    "CASE WHEN {name} = {name}::{ty} THEN {name}::{ty}::text ELSE {name}::text END",
                    ty = column.type_sql
                ),
            }
        }
        _ => name,
    }
}

/// The table's own rows on `side`, for a FROM clause: `ONLY` the table, unless it is
/// partitioned on the target (see [`crate::own_rows`]).
fn rows_on(table: &Table, side: Side) -> String {
    own_rows(
        &table.name,
        side == Side::Target && table.target_partitioned,
    )
}

/// Records the target copy's column types in `table` (see [`compared_value`]), and
/// whether it is partitioned there, read through `target`; a table missing there
/// keeps none.
pub async fn note_target_types(target: &impl GenericClient, table: &mut Table) -> Result<()> {
    table.target_partitioned = crate::own_rows::is_partitioned(target, &table.name).await?;
    let rows = target
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table.name.quoted()],
        )
        .await
        .pg_context(|| format!("reading the column types of {} on the target", table.name))?;
    table.target_types = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    Ok(())
}

/// `ROW(…)::text` of the named columns, each as [`compared_value`] reads it.
fn row_text<'a>(table: &Table, names: impl Iterator<Item = &'a str>) -> String {
    let values: Vec<String> = names
        .map(|n| match table.columns.iter().find(|c| c.name == n) {
            Some(c) => compared_value(c, table.target_types.get(n).map(String::as_str)),
            None => quote_ident(n),
        })
        .collect();
    format!("ROW({})::text", values.join(", "))
}

/// The row expression hashed for `compared`, in the source's column order.
fn row_expr(table: &Table, compared: Compared) -> String {
    match compared {
        Compared::KeysOnly if !table.key.is_empty() => key_expr(table),
        _ => row_text(
            table,
            table.copied_columns().iter().map(|c| c.name.as_str()),
        ),
    }
}

/// The key expression identifying rows (the whole row for keyless tables).
pub fn key_expr(table: &Table) -> String {
    if table.key.is_empty() {
        row_expr(table, Compared::WholeRows)
    } else {
        row_text(table, table.key.iter().map(String::as_str))
    }
}

/// Splits a table into ranges: by value of a single integer key, spanning the key
/// values present on either side, else one range for the whole table.
pub async fn plan_ranges(
    source: &impl GenericClient,
    target: &impl GenericClient,
    table: &Table,
    jobs: usize,
) -> Result<Vec<KeyRange>> {
    let int_key = table.key.len() == 1
        && table
            .columns
            .iter()
            .find(|c| c.name == table.key[0])
            .is_some_and(|c| matches!(c.type_sql.as_str(), "smallint" | "integer" | "bigint"));
    if !int_key {
        return Ok(vec![KeyRange::All]);
    }
    let k = quote_ident(&table.key[0]);
    let sql = |side| {
        format!(
            "SELECT min({k})::bigint, max({k})::bigint, count(*) FROM {}",
            rows_on(table, side)
        )
    };
    let mut lo = i64::MAX;
    let mut hi = i64::MIN;
    let mut rows = 0i64;
    let spans = [
        source
            .query_one(&sql(Side::Source), &[])
            .await
            .pg_context(|| format!("reading the key span of {} on the source", table.name))?,
        target
            .query_one(&sql(Side::Target), &[])
            .await
            .pg_context(|| format!("reading the key span of {} on the target", table.name))?,
    ];
    for r in spans {
        if let (Some(a), Some(b)) = (r.get::<_, Option<i64>>(0), r.get::<_, Option<i64>>(1)) {
            lo = lo.min(a);
            hi = hi.max(b);
        }
        rows = rows.max(r.get::<_, i64>(2));
    }
    if lo > hi {
        return Ok(vec![KeyRange::All]);
    }
    let count = ((rows / ROWS_PER_RANGE) + 1)
        .max(jobs as i64 * 2)
        .clamp(1, 4096);
    let span = (i128::from(hi) - i128::from(lo) + 1) as u128;
    let step = span.div_ceil(count as u128).max(1);
    let mut ranges = Vec::new();
    let mut start = i128::from(lo);
    let end = i128::from(hi) + 1;
    while start < end {
        let stop = (start + step as i128).min(end);
        // i64 bounds: the exclusive end of the last range may be i64::MAX + 1.
        let hi_bound = i64::try_from(stop).unwrap_or(i64::MAX);
        let lo_bound = i64::try_from(start).unwrap_or(i64::MAX);
        ranges.push(KeyRange::Int {
            lo: lo_bound,
            hi: hi_bound,
        });
        start = stop;
    }
    if let Some(KeyRange::Int { hi, .. }) = ranges.last() {
        if *hi == i64::MAX {
            // Cover a row whose key is i64::MAX itself.
            let last = ranges.len() - 1;
            if let KeyRange::Int { lo, .. } = ranges[last] {
                ranges[last] = KeyRange::Int { lo, hi: i64::MAX };
                ranges.push(KeyRange::Int {
                    lo: i64::MAX - 1,
                    hi: i64::MAX,
                });
            }
        }
    }
    Ok(ranges)
}

/// Count and hash of a range on one side (`client` reaches `side`).
pub async fn digest(
    client: &impl GenericClient,
    side: Side,
    table: &Table,
    range: &KeyRange,
    compared: Compared,
) -> Result<Digest> {
    let sql = format!(
        "SELECT count(*), coalesce(sum(hashtextextended({}, 0)), 0)::text FROM {} WHERE {}",
        row_expr(table, compared),
        rows_on(table, side),
        on_side(table, side, range.predicate(table))
    );
    let r = client
        .query_one(&sql, &[])
        .await
        .pg_context(|| format!("hashing {} ({})", table.name, range.describe(table)))?;
    Ok(Digest {
        rows: r.get(0),
        hash: r.get(1),
    })
}

/// Row hashes by key within a range on one side (`client` reaches `side`; for
/// keyless tables the key is the row and the value counts its copies).
pub async fn row_hashes(
    client: &impl GenericClient,
    side: Side,
    table: &Table,
    range: &KeyRange,
    compared: Compared,
    only: Option<&[Key]>,
) -> Result<HashMap<Key, i64>> {
    row_hashes_where(client, side, table, range, compared, only, None).await
}

/// [`row_hashes`], narrowed further by `extra` (a predicate on the row).
async fn row_hashes_where(
    client: &impl GenericClient,
    side: Side,
    table: &Table,
    range: &KeyRange,
    compared: Compared,
    only: Option<&[Key]>,
    extra: Option<&str>,
) -> Result<HashMap<Key, i64>> {
    let mut filter = on_side(table, side, range.predicate(table));
    if let Some(extra) = extra {
        filter = format!("{filter} AND {extra}");
    }
    if let Some(keys) = only {
        if table.key.is_empty() {
            filter = format!(
                "{filter} AND {} = ANY({})",
                key_expr(table),
                text_array(keys.iter().map(|k| k.join(",")))
            );
        } else {
            filter = format!("{filter} AND {}", keys_predicate(table, keys));
        }
    }
    let rows = if table.key.is_empty() {
        let sql = format!(
            "SELECT {}, count(*) FROM {} WHERE {filter} GROUP BY 1",
            key_expr(table),
            rows_on(table, side),
        );
        client
            .query(&sql, &[])
            .await
            .pg_context(|| {
                format!(
                    "reading the rows of {} ({})",
                    table.name,
                    range.describe(table)
                )
            })?
            .iter()
            .map(|r| (vec![r.get::<_, String>(0)], r.get::<_, i64>(1)))
            .collect()
    } else {
        let keys = table
            .key
            .iter()
            .map(|k| format!("{}::text", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT hashtextextended({}, 0), {keys} FROM {} WHERE {filter}",
            row_expr(table, compared),
            rows_on(table, side),
        );
        let n = table.key.len();
        client
            .query(&sql, &[])
            .await
            .pg_context(|| {
                format!(
                    "reading the rows of {} ({})",
                    table.name,
                    range.describe(table)
                )
            })?
            .iter()
            .map(|r| {
                let key: Key = (1..=n).map(|i| r.get::<_, String>(i)).collect();
                (key, r.get::<_, i64>(0))
            })
            .collect()
    };
    Ok(rows)
}

/// Keys that differ within a range: on the source only or changed (to copy), and on
/// the target only (to delete).
#[derive(Clone, Debug, Default)]
pub struct KeyDiff {
    /// Keys whose source row is missing or different on the target.
    pub to_copy: Vec<Key>,
    /// Keys present only on the target.
    pub to_delete: Vec<Key>,
}

impl KeyDiff {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.to_copy.is_empty() && self.to_delete.is_empty()
    }

    /// Every differing key, once.
    pub fn keys(&self) -> Vec<Key> {
        let mut all: Vec<Key> = self
            .to_copy
            .iter()
            .chain(&self.to_delete)
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// Narrows a mismatching range down to its keys (only among `only`, when given:
/// to look again at keys that differed before).
pub async fn diff_keys(
    source: &impl GenericClient,
    target: &impl GenericClient,
    table: &Table,
    range: &KeyRange,
    compared: Compared,
    only: Option<&[Key]>,
) -> Result<KeyDiff> {
    if only.is_some_and(|k| k.is_empty()) {
        return Ok(KeyDiff::default());
    }
    // A range of an integer key is narrowed to its differing buckets first: one
    // grouped pass per side returns a few thousand bucket digests instead of every
    // row's hash, and only the rows of differing buckets are hashed one by one.
    let buckets = match (range, only) {
        (KeyRange::Int { .. }, None) if table.key.len() == 1 => {
            Some(differing_buckets(source, target, table, range, compared).await?)
        }
        _ => None,
    };
    let extra = match &buckets {
        Some(b) if b.ids.is_empty() => return Ok(KeyDiff::default()),
        Some(b) => Some(b.predicate(table)),
        None => None,
    };
    let (s, t) = tokio::try_join!(
        row_hashes_where(
            source,
            Side::Source,
            table,
            range,
            compared,
            only,
            extra.as_deref()
        ),
        row_hashes_where(
            target,
            Side::Target,
            table,
            range,
            compared,
            only,
            extra.as_deref()
        )
    )?;
    let mut diff = KeyDiff::default();
    for (k, h) in &s {
        if t.get(k) != Some(h) {
            diff.to_copy.push(k.clone());
        }
    }
    for (k, h) in &t {
        match s.get(k) {
            None => diff.to_delete.push(k.clone()),
            // Keyless: more copies on the target than on the source.
            Some(sh) if table.key.is_empty() && h > sh => diff.to_delete.push(k.clone()),
            _ => {}
        }
    }
    diff.to_copy.sort();
    diff.to_delete.sort();
    Ok(diff)
}

/// How many buckets a key range is cut into to narrow a difference down.
const BUCKETS_PER_RANGE: i128 = 4096;

/// The buckets of a key range (`key / width`) whose count or hash differ.
struct Buckets {
    width: i64,
    ids: Vec<i64>,
}

impl Buckets {
    /// The rows of these buckets.
    fn predicate(&self, table: &Table) -> String {
        let ids = self
            .ids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "({} / {}) = ANY('{{{ids}}}'::bigint[])",
            quote_ident(&table.key[0]),
            self.width
        )
    }
}

/// Compares the digests of a key range's buckets on both sides; returns the ones
/// that differ.
async fn differing_buckets(
    source: &impl GenericClient,
    target: &impl GenericClient,
    table: &Table,
    range: &KeyRange,
    compared: Compared,
) -> Result<Buckets> {
    let width = match range {
        KeyRange::Int { lo, hi } => {
            let span = i128::from(*hi) - i128::from(*lo);
            i64::try_from((span / BUCKETS_PER_RANGE).max(1)).unwrap_or(i64::MAX)
        }
        KeyRange::All => i64::MAX,
    };
    let sql = |side| {
        format!(
            "SELECT ({k} / {width})::bigint, count(*), coalesce(sum(hashtextextended({}, 0)), 0)::text \
               FROM {} WHERE {} GROUP BY 1",
            row_expr(table, compared),
            rows_on(table, side),
            on_side(table, side, range.predicate(table)),
            k = quote_ident(&table.key[0]),
        )
    };
    let (source_sql, target_sql) = (sql(Side::Source), sql(Side::Target));
    let (s, t) = tokio::try_join!(
        bucket_digests(source, &source_sql, table, range),
        bucket_digests(target, &target_sql, table, range)
    )?;
    let mut ids: Vec<i64> = s
        .iter()
        .filter(|(b, d)| t.get(b) != Some(d))
        .map(|(b, _)| *b)
        .chain(t.keys().filter(|b| !s.contains_key(b)).copied())
        .collect();
    ids.sort_unstable();
    Ok(Buckets { width, ids })
}

/// Bucket digests by bucket id, from one side.
async fn bucket_digests(
    client: &impl GenericClient,
    sql: &str,
    table: &Table,
    range: &KeyRange,
) -> Result<HashMap<i64, (i64, String)>> {
    Ok(client
        .query(sql, &[])
        .await
        .pg_context(|| {
            format!(
                "hashing the buckets of {} ({})",
                table.name,
                range.describe(table)
            )
        })?
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                (r.get::<_, i64>(1), r.get::<_, String>(2)),
            )
        })
        .collect())
}
