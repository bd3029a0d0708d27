//! The chunk plan: every table cut into ranges so one large table keeps every worker
//! busy, recorded on the target so a rerun copies only what is left.
//!
//! A table with a single integer identity key (or, for `REPLICA IDENTITY FULL`, a
//! single integer primary key) is cut into ranges of that key: a row never moves
//! between key ranges (a key change is a delete and an insert in the log), so a copied
//! chunk stays valid under any later snapshot, with the stream applying to it only
//! what its snapshot did not see. Any other table is cut into heap block ranges, read
//! with TID range scans: the fastest plan, but a row can move between block ranges
//! (a non-HOT update), so block chunks are only consistent within one snapshot, and a
//! table partly copied under a snapshot that is gone is copied again whole.

use anyhow::Result;
use tokio_postgres::Client;

use crate::catalog::Table;
use crate::pg::{quote_ident, PgResultExt, QualifiedName};
use crate::state::{ChunkRange, ChunkRow};

/// Smallest chunk: 1 MiB of heap (8 KiB blocks). Smaller chunks cost more in
/// per-statement overhead than they gain in balance.
const MIN_CHUNK_BLOCKS: i64 = 128;
/// Largest chunk: 64 MiB of heap, so a crash loses little finished work.
const MAX_CHUNK_BLOCKS: i64 = 8192;

/// The WHERE clause selecting a chunk's rows (`column` for key chunks).
pub fn predicate(range: &ChunkRange, column: Option<&str>) -> String {
    match range {
        ChunkRange::Blocks { start, end } => match end {
            Some(end) => format!("ctid >= '({start},0)'::tid AND ctid < '({end},0)'::tid"),
            None => format!("ctid >= '({start},0)'::tid"),
        },
        ChunkRange::Keys { lo, hi } => {
            let c = quote_ident(column.unwrap_or_default());
            match (lo, hi) {
                (Some(lo), Some(hi)) => format!("{c} >= {lo} AND {c} < {hi}"),
                (Some(lo), None) => format!("{c} >= {lo}"),
                (None, Some(hi)) => format!("{c} < {hi}"),
                (None, None) => "true".to_string(),
            }
        }
    }
}

/// Chunk size for a plan: about four chunks per worker over all the data, so the
/// last chunks finish close together, bounded to [1 MiB, 64 MiB] of heap.
pub fn chunk_blocks(total_blocks: i64, jobs: usize) -> i64 {
    let per = total_blocks / (jobs.max(1) as i64 * 4);
    per.clamp(MIN_CHUNK_BLOCKS, MAX_CHUNK_BLOCKS)
}

/// The integer column a table's chunks are key ranges of, if it has one: its single
/// identity key column, or its single primary-key column under `REPLICA IDENTITY
/// FULL` (full row images carry every column).
pub fn chunk_column(table: &Table) -> Option<String> {
    if table.key.len() != 1 {
        return None;
    }
    let name = &table.key[0];
    let col = table.columns.iter().find(|c| &c.name == name)?;
    matches!(col.type_sql.as_str(), "smallint" | "integer" | "bigint").then(|| name.clone())
}

/// Cuts one table of `blocks` heap blocks into block chunks of `size` blocks.
pub fn split_blocks(table: &QualifiedName, blocks: i64, size: i64) -> Vec<ChunkRow> {
    let size = size.max(1);
    let count = ((blocks + size - 1) / size).max(1);
    (0..count)
        .map(|i| ChunkRow {
            table: table.clone(),
            chunk_no: i as i32,
            range: ChunkRange::Blocks {
                start: i * size,
                end: if i + 1 == count {
                    None
                } else {
                    Some((i + 1) * size)
                },
            },
            done: false,
            snapshot_id: None,
            inexact: false,
        })
        .collect()
}

/// Cuts a table into key chunks at `bounds` (sorted, distinct): the first chunk is
/// open below, the last open above, so every row is in exactly one chunk whatever
/// its key.
pub fn split_keys(table: &QualifiedName, bounds: &[i64]) -> Vec<ChunkRow> {
    let mut edges: Vec<Option<i64>> = vec![None];
    edges.extend(bounds.iter().map(|b| Some(*b)));
    edges.push(None);
    edges
        .windows(2)
        .enumerate()
        .map(|(i, w)| ChunkRow {
            table: table.clone(),
            chunk_no: i as i32,
            range: ChunkRange::Keys { lo: w[0], hi: w[1] },
            done: false,
            snapshot_id: None,
            inexact: false,
        })
        .collect()
}

/// Inner boundaries cutting `[min, max]` of an integer column into `count` chunks of
/// about equal key span.
pub fn even_bounds(min: i64, max: i64, count: i64) -> Vec<i64> {
    if count <= 1 || max <= min {
        return Vec::new();
    }
    let span = i128::from(max) - i128::from(min) + 1;
    let step = (span / i128::from(count)).max(1);
    let mut out = Vec::new();
    for i in 1..count {
        let b = i128::from(min) + step * i128::from(i);
        if b > i128::from(max) {
            break;
        }
        if let Ok(b) = i64::try_from(b) {
            if out.last().is_none_or(|l| *l < b) {
                out.push(b);
            }
        }
    }
    out
}

/// Plans one table: key chunks when it has a chunk column (boundaries from the
/// column's span as `client` sees it), block chunks otherwise.
pub async fn plan_table(
    client: &Client,
    table: &Table,
    chunk_size_blocks: i64,
) -> Result<(Vec<ChunkRow>, Option<String>)> {
    let count = ((table.blocks + chunk_size_blocks - 1) / chunk_size_blocks.max(1)).max(1);
    // Key ranges only where they may be copied under different snapshots (a
    // resumed bootstrap does; see [`crate::catalog::ranges_independent`]).
    let column = match chunk_column(table) {
        Some(c) if crate::catalog::ranges_independent(client, table, &c).await? => Some(c),
        _ => None,
    };
    let Some(column) = column else {
        return Ok((
            split_blocks(&table.name, table.blocks, chunk_size_blocks),
            None,
        ));
    };
    let c = quote_ident(&column);
    let row = client
        .query_one(
            &format!(
                "SELECT min({c})::bigint, max({c})::bigint FROM ONLY {}",
                table.name.quoted()
            ),
            &[],
        )
        .await
        .pg_context(|| format!("reading the key span of {} on the source", table.name))?;
    let bounds = match (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)) {
        (Some(min), Some(max)) => even_bounds(min, max, count),
        _ => Vec::new(),
    };
    Ok((split_keys(&table.name, &bounds), Some(column)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_splits_cover_the_table_with_an_open_end() {
        let t = QualifiedName::new("public", "t");
        let chunks = split_blocks(&t, 1000, 300);
        assert_eq!(chunks.len(), 4);
        assert_eq!(
            chunks[0].range,
            ChunkRange::Blocks {
                start: 0,
                end: Some(300)
            }
        );
        assert_eq!(
            chunks[3].range,
            ChunkRange::Blocks {
                start: 900,
                end: None
            }
        );
    }

    #[test]
    fn empty_table_gets_one_open_chunk() {
        let t = QualifiedName::new("public", "t");
        let chunks = split_blocks(&t, 0, 128);
        assert_eq!(chunks.len(), 1);
        assert_eq!(predicate(&chunks[0].range, None), "ctid >= '(0,0)'::tid");
        let keys = split_keys(&t, &[]);
        assert_eq!(keys.len(), 1);
        assert_eq!(predicate(&keys[0].range, Some("id")), "true");
    }

    #[test]
    fn key_splits_are_open_at_both_ends_and_contiguous() {
        let t = QualifiedName::new("public", "t");
        let chunks = split_keys(&t, &even_bounds(1, 1000, 4));
        assert_eq!(chunks.len(), 4);
        assert_eq!(predicate(&chunks[0].range, Some("id")), "\"id\" < 251");
        assert_eq!(
            predicate(&chunks[1].range, Some("id")),
            "\"id\" >= 251 AND \"id\" < 501"
        );
        assert_eq!(predicate(&chunks[3].range, Some("id")), "\"id\" >= 751");
        assert_eq!(even_bounds(i64::MIN, i64::MAX, 3).len(), 2);
        assert!(even_bounds(5, 5, 10).is_empty());
        assert_eq!(even_bounds(1, 3, 10), vec![2, 3]);
    }

    #[test]
    fn chunk_size_is_bounded() {
        assert_eq!(chunk_blocks(10, 2), MIN_CHUNK_BLOCKS);
        assert_eq!(chunk_blocks(10_000_000, 2), MAX_CHUNK_BLOCKS);
        assert_eq!(chunk_blocks(16_000, 2), 2000);
    }
}
