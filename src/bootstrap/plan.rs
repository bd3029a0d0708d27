//! The chunk plan: every table cut into ctid block ranges, so one large table keeps
//! every worker busy, recorded on the target so a rerun copies only what is left.

use anyhow::Result;
use tokio_postgres::GenericClient;

use crate::pg::{PgResultExt, QualifiedName};
use crate::state::StateStore;

/// Smallest chunk: 1 MiB of heap (8 KiB blocks). Smaller chunks cost more in
/// per-statement overhead than they gain in balance.
const MIN_CHUNK_BLOCKS: i64 = 128;
/// Largest chunk: 64 MiB of heap, so a crash loses little finished work.
const MAX_CHUNK_BLOCKS: i64 = 8192;

/// One block range of one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Table the range belongs to.
    pub table: QualifiedName,
    /// Position of the chunk within its table.
    pub chunk_no: i32,
    /// First heap block, inclusive.
    pub start_block: i64,
    /// Last heap block, exclusive; `None` for the final, open-ended chunk, which also
    /// takes whatever the table grew by after planning.
    pub end_block: Option<i64>,
}

impl Chunk {
    /// The WHERE clause selecting this chunk's rows with a TID range scan.
    pub fn ctid_predicate(&self) -> String {
        match self.end_block {
            Some(end) => format!(
                "ctid >= '({},0)'::tid AND ctid < '({end},0)'::tid",
                self.start_block
            ),
            None => format!("ctid >= '({},0)'::tid", self.start_block),
        }
    }
}

/// Chunk size for a plan: about four chunks per worker over all the data, so the
/// last chunks finish close together, bounded to [1 MiB, 64 MiB] of heap.
pub fn chunk_blocks(total_blocks: i64, jobs: usize) -> i64 {
    let per = total_blocks / (jobs.max(1) as i64 * 4);
    per.clamp(MIN_CHUNK_BLOCKS, MAX_CHUNK_BLOCKS)
}

/// Cuts one table of `blocks` heap blocks into chunks of `size` blocks.
pub fn split_table(table: &QualifiedName, blocks: i64, size: i64) -> Vec<Chunk> {
    let size = size.max(1);
    let count = ((blocks + size - 1) / size).max(1);
    (0..count)
        .map(|i| Chunk {
            table: table.clone(),
            chunk_no: i as i32,
            start_block: i * size,
            end_block: if i + 1 == count {
                None
            } else {
                Some((i + 1) * size)
            },
        })
        .collect()
}

/// Writes the plan into `chunks` (inside the caller's transaction).
pub async fn record(
    client: &impl GenericClient,
    state: &StateStore,
    pipeline: &str,
    chunks: &[Chunk],
) -> Result<()> {
    let sql = format!(
        "INSERT INTO {} (pipeline, schema_name, table_name, chunk_no, start_block, end_block) \
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[]) \
         ON CONFLICT DO NOTHING",
        state.table("chunks")
    );
    let schemas: Vec<&str> = chunks.iter().map(|c| c.table.schema.as_str()).collect();
    let names: Vec<&str> = chunks.iter().map(|c| c.table.name.as_str()).collect();
    let nos: Vec<i32> = chunks.iter().map(|c| c.chunk_no).collect();
    let starts: Vec<i64> = chunks.iter().map(|c| c.start_block).collect();
    let ends: Vec<Option<i64>> = chunks.iter().map(|c| c.end_block).collect();
    client
        .execute(&sql, &[&pipeline, &schemas, &names, &nos, &starts, &ends])
        .await
        .pg_context(|| "recording the chunk plan on the target".into())?;
    Ok(())
}

/// The chunks of a pipeline not yet marked done, in plan order.
pub async fn remaining(
    client: &impl GenericClient,
    state: &StateStore,
    pipeline: &str,
) -> Result<Vec<Chunk>> {
    let rows = client
        .query(
            &format!(
                "SELECT schema_name, table_name, chunk_no, start_block, end_block FROM {} \
                 WHERE pipeline = $1 AND done_at IS NULL ORDER BY schema_name, table_name, chunk_no",
                state.table("chunks")
            ),
            &[&pipeline],
        )
        .await
        .pg_context(|| "reading the chunk plan from the target".into())?;
    Ok(rows
        .iter()
        .map(|r| Chunk {
            table: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            chunk_no: r.get(2),
            start_block: r.get(3),
            end_block: r.get(4),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_table_with_an_open_end() {
        let t = QualifiedName::new("public", "t");
        let chunks = split_table(&t, 1000, 300);
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[0].start_block, 0);
        assert_eq!(chunks[0].end_block, Some(300));
        assert_eq!(chunks[3].start_block, 900);
        assert_eq!(chunks[3].end_block, None);
        for pair in chunks.windows(2) {
            assert_eq!(pair[0].end_block, Some(pair[1].start_block));
        }
    }

    #[test]
    fn empty_table_gets_one_open_chunk() {
        let t = QualifiedName::new("public", "t");
        let chunks = split_table(&t, 0, 128);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].end_block, None);
        assert_eq!(chunks[0].ctid_predicate(), "ctid >= '(0,0)'::tid");
    }

    #[test]
    fn chunk_size_is_bounded() {
        assert_eq!(chunk_blocks(10, 2), MIN_CHUNK_BLOCKS);
        assert_eq!(chunk_blocks(10_000_000, 2), MAX_CHUNK_BLOCKS);
        assert_eq!(chunk_blocks(16_000, 2), 2000);
    }
}
