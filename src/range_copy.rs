//! The copy of a held table (`walshuttle tables add|resync` and the online
//! bootstrap, see [`crate::tables`]): key range by key range, each range under a
//! short snapshot of its own, so that no snapshot on the source lives longer than
//! one range's copy; a small table, or one without a single integer key, as one
//! range under one snapshot (recorded as a whole-table position).
//!
//! Each range is one target transaction: its rows are replaced by the snapshot's and
//! the snapshot is recorded as the range's copy position. The stream holds the
//! table's changes until the last range is in; they are then replayed through the
//! position of the range holding each row (the old key for deletes, the new key for
//! inserts), the same rule the stream applies to resumed bootstrap chunks. The first
//! range is open below and the last open above, so a row whose key lies outside the
//! bounds planned at the start (a sequence that kept growing) still falls in one.

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::catalog::{self, Table};
use crate::config::Endpoint;
use crate::pg::{quote_ident, Lsn, PgResultExt};
use crate::rewrite;
use crate::snapshot::SourceSnapshot;
use crate::state::{StateStore, StoredScope, TableState};

/// About how many rows one range holds (one snapshot's length on the source).
const ROWS_PER_RANGE: i64 = 100_000;

/// Bounds of one range of an integer key: `lo <= key < hi`, open where `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Inclusive lower bound.
    pub lo: Option<i64>,
    /// Exclusive upper bound.
    pub hi: Option<i64>,
}

impl Slice {
    /// The whole table, for a table copied under one snapshot.
    pub const WHOLE: Slice = Slice { lo: None, hi: None };

    fn predicate(&self, column: &str) -> String {
        let k = quote_ident(column);
        match (self.lo, self.hi) {
            (Some(lo), Some(hi)) => format!("{k} >= {lo} AND {k} < {hi}"),
            (Some(lo), None) => format!("{k} >= {lo}"),
            (None, Some(hi)) => format!("{k} < {hi}"),
            (None, None) => "true".into(),
        }
    }
}

/// Cuts `[min, max]` into `count` ranges, the first open below and the last open
/// above.
pub fn cut(min: i64, max: i64, count: i64) -> Vec<Slice> {
    if count <= 1 || max <= min {
        return vec![Slice::WHOLE];
    }
    let span = i128::from(max) - i128::from(min) + 1;
    let step = (span / i128::from(count)).max(1);
    let mut bounds = Vec::new();
    let mut b = i128::from(min) + step;
    while b <= i128::from(max) && bounds.len() < (count - 1) as usize {
        if let Ok(v) = i64::try_from(b) {
            bounds.push(v);
        }
        b += step;
    }
    let mut slices = Vec::with_capacity(bounds.len() + 1);
    let mut lo = None;
    for hi in bounds {
        slices.push(Slice { lo, hi: Some(hi) });
        lo = Some(hi);
    }
    slices.push(Slice { lo, hi: None });
    slices
}

/// The key column of `table` and its ranges, when the first column of its identity
/// key is an integer and the table has more rows than one range holds (the
/// planner's estimate, or a count when the table was never analyzed); `None` to
/// copy it whole. A composite key is cut on its first column: every change carries
/// it (in the old key too), so a range's copy position decides exactly as for a
/// single-column key; a skewed first column only makes some ranges larger.
pub async fn plan(src: &Client, table: &Table) -> Result<Option<(String, Vec<Slice>)>> {
    let Some(key) = table.key.first() else {
        return Ok(None);
    };
    let int_key = table
        .columns
        .iter()
        .find(|c| &c.name == key)
        .is_some_and(|c| matches!(c.type_sql.as_str(), "smallint" | "integer" | "bigint"));
    if !int_key {
        return Ok(None);
    }
    if !catalog::ranges_independent(src, table, key).await? {
        tracing::info!(table = %table.name, "copying under one snapshot: a unique or exclusion constraint without the key's first column could collide across ranges copied under different snapshots");
        return Ok(None);
    }
    let k = quote_ident(key);
    let row = src
        .query_one(
            &format!(
                "SELECT min({k})::bigint, max({k})::bigint, \
                        (SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint \
                                     ELSE (SELECT count(*) FROM ONLY {t}) END \
                           FROM pg_catalog.pg_class c WHERE c.oid = $1::text::regclass) \
                   FROM ONLY {t}",
                t = table.name.quoted()
            ),
            &[&table.name.quoted()],
        )
        .await
        .pg_context(|| format!("reading the key span of {} on the source", table.name))?;
    let (Some(min), Some(max)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
    else {
        return Ok(None);
    };
    let rows: i64 = row.get::<_, Option<i64>>(2).unwrap_or(0);
    let count = (rows + ROWS_PER_RANGE - 1) / ROWS_PER_RANGE;
    if count <= 1 {
        return Ok(None);
    }
    Ok(Some((key.clone(), cut(min, max, count))))
}

/// Copies a held table range by range on integer key `column` (see the module
/// docs), or whole under one snapshot when `column` is `None` (`slices` is then
/// [`Slice::WHOLE`]); marks it `copied` with the last range. Returns the rows
/// copied and the last snapshot's position.
pub async fn copy(
    source: &Endpoint,
    tgt: &mut Client,
    state: &StateStore,
    pipeline: &str,
    table: &Table,
    column: Option<&str>,
    slices: &[Slice],
) -> Result<(u64, Lsn)> {
    let binary = catalog::check_target(tgt, table).await?.binary();
    let mut total = 0u64;
    let mut lsn = Lsn(0);
    for (i, slice) in slices.iter().enumerate() {
        let (first, last) = (i == 0, i + 1 == slices.len());
        let snapshot = SourceSnapshot::take(source, std::slice::from_ref(&table.name)).await?;
        let Some(view) = snapshot.view.clone() else {
            bail!("the snapshot of {} has no visibility recorded", table.name);
        };
        lsn = view.lsn;
        let Some(session) = snapshot
            .into_sessions(source, "tables", 1)
            .await?
            .into_iter()
            .next()
        else {
            bail!("no session reads under the snapshot of {}", table.name);
        };
        // Indexes the target table lacks are built with the last range, after
        // every row is in.
        let deferred = if last {
            catalog::index_sql(&session.client, tgt, table).await?
        } else {
            Vec::new()
        };
        let predicate = match column {
            Some(column) => slice.predicate(column),
            None => "true".to_string(),
        };
        let ctx = || format!("copying {} ({predicate}) on the target", table.name);
        let tx = tgt.transaction().await.pg_context(ctx)?;
        if first {
            // Positions of earlier copies of the table are superseded by these.
            state
                .clear_positions(&tx, pipeline, Some(&table.name))
                .await?;
        }
        let own = crate::own_rows::own_rows_on(&tx, &table.name).await?;
        tx.execute(&format!("DELETE FROM {own} WHERE {predicate}"), &[])
            .await
            .pg_context(ctx)?;
        let (copied, _) = rewrite::copy_rows(
            &session.client,
            &tx,
            &table.name,
            &table.copied_column_list(),
            &table.source_rows(&predicate),
            binary,
            &|_| {},
        )
        .await?;
        // The rows are read: the source's snapshot (and its lock) can go.
        let _ = session.client.batch_execute("COMMIT").await;
        for sql in &deferred {
            tx.batch_execute(sql)
                .await
                .pg_context(|| format!("building on the target: {sql}"))?;
        }
        let id = state
            .record_snapshot(&tx, pipeline, &view, "tables")
            .await?;
        let scope = match column {
            Some(column) => StoredScope::Range {
                column: column.to_string(),
                lo: slice.lo,
                hi: slice.hi,
            },
            None => StoredScope::Table,
        };
        state
            .add_position(&tx, pipeline, &table.name, &scope, id)
            .await?;
        if last {
            state
                .put_table(&tx, pipeline, &table.name, TableState::Copied)
                .await?;
            state.bump_positions_version(&tx, pipeline).await?;
        }
        tx.commit().await.pg_context(ctx)?;
        total += copied;
        tracing::debug!(table = %table.name, range = %predicate, rows = copied, "copied a key range under its own snapshot");
    }
    Ok((total, lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_key_with_open_ends() {
        let s = cut(1, 1000, 4);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].lo, None);
        assert_eq!(s[3].hi, None);
        for w in s.windows(2) {
            assert_eq!(w[0].hi, w[1].lo, "{s:?}");
        }
        assert_eq!(cut(5, 5, 10), vec![Slice { lo: None, hi: None }]);
        let wide = cut(i64::MIN, i64::MAX, 3);
        assert_eq!(wide.len(), 3);
        assert_eq!(wide[0].lo, None);
        assert_eq!(wide[2].hi, None);
        let p = Slice {
            lo: Some(3),
            hi: None,
        }
        .predicate("Id");
        assert_eq!(p, "\"Id\" >= 3");
    }
}
