//! Sequences of the replicated tables, kept on the target at or past the source.
//!
//! Logical replication carries rows, not sequences: a target promoted to primary would
//! hand out ids the source already used. For every column of a replicated table whose
//! values come from a sequence on the source (an identity column, or a `serial`-style
//! `nextval` default), the target gets the sequence (created, owned by the column and
//! made its default when missing) and is set to at least the source's next value plus
//! an optional gap. Sequences only move forward: a target that is ahead keeps its value.

use anyhow::Result;
use tokio_postgres::Client;

use crate::pg::{quote_ident, quote_literal, PgResultExt, QualifiedName};

/// One sequence-fed column and what was done to its sequence on the target.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SyncedSequence {
    /// The table.
    pub table: QualifiedName,
    /// The column.
    pub column: String,
    /// The sequence on the target (schema-qualified, as SQL needs it).
    pub target_sequence: String,
    /// The next value the source would hand out.
    pub source_next: i64,
    /// The next value the target hands out now.
    pub target_next: i64,
    /// Whether the sequence had to be created on the target.
    pub created: bool,
}

/// Brings the target's sequences of `tables` to at least the source's next value
/// plus `gap`; returns what it did for each sequence-fed column.
pub async fn sync(
    source: &Client,
    target: &Client,
    tables: &[QualifiedName],
    gap: i64,
) -> Result<Vec<SyncedSequence>> {
    let mut out = Vec::new();
    for table in tables {
        let rows = source
            .query(
                "SELECT a.attname::text, pg_get_serial_sequence($1, a.attname), \
                        format_type(a.atttypid, NULL), \
                        s.seqincrement, s.seqmin, s.seqmax, s.seqcycle, format_type(s.seqtypid, NULL) \
                 FROM pg_attribute a \
                 JOIN pg_depend d ON d.refobjid = a.attrelid AND d.refobjsubid = a.attnum \
                   AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
                 JOIN pg_sequence s ON s.seqrelid = d.objid \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table.quoted()],
            )
            .await
            .pg_context(|| format!("reading the sequences of {table} on the source"))?;
        for r in rows {
            let column: String = r.get(0);
            let Some(seq) = r.get::<_, Option<String>>(1) else {
                continue;
            };
            let (increment, min, max, cycle, seq_type): (i64, i64, i64, bool, String) =
                (r.get(3), r.get(4), r.get(5), r.get(6), r.get(7));
            // The source's next value (`last_value` of a sequence never called is
            // itself the next one).
            let next: i64 = source
                .query_one(
                    &format!(
                        "SELECT CASE WHEN is_called THEN last_value + {increment} ELSE last_value END FROM {seq}"
                    ),
                    &[],
                )
                .await
                .pg_context(|| format!("reading sequence {seq} on the source"))?
                .get(0);
            let existing: Option<String> = target
                .query_one(
                    "SELECT pg_get_serial_sequence($1, $2)",
                    &[&table.quoted(), &column],
                )
                .await
                .pg_context(|| {
                    format!("looking up the sequence of {table}.{column} on the target")
                })?
                .get(0);
            let created = existing.is_none();
            let target_seq = match existing {
                Some(s) => s,
                None => {
                    // The copy leaves `nextval` defaults out (sequences are not
                    // replicated): create the sequence as the source has it and make it
                    // the column's default again, ready for a promotion.
                    target
                        .batch_execute(&format!(
                            "CREATE SEQUENCE IF NOT EXISTS {seq} AS {seq_type} INCREMENT BY {increment} \
                               MINVALUE {min} MAXVALUE {max} {} OWNED BY {}.{}; \
                             ALTER TABLE {} ALTER COLUMN {} SET DEFAULT nextval({})",
                            if cycle { "CYCLE" } else { "NO CYCLE" },
                            table.quoted(),
                            quote_ident(&column),
                            table.quoted(),
                            quote_ident(&column),
                            quote_literal(&seq)
                        ))
                        .await
                        .pg_context(|| format!("creating sequence {seq} on the target"))?;
                    seq
                }
            };
            let wanted = next.saturating_add(gap.saturating_mul(increment.signum()));
            // Only forward (in the sequence's direction): a target that is ahead keeps
            // its value.
            let target_next: i64 = target
                .query_one(
                    &format!(
                        "WITH cur AS (SELECT CASE WHEN is_called THEN last_value + {increment} ELSE last_value END AS next FROM {target_seq}) \
                         SELECT CASE WHEN ({increment} > 0 AND $1 > next) OR ({increment} < 0 AND $1 < next) \
                                     THEN setval({lit}, $1, false) ELSE next END FROM cur",
                        lit = quote_literal(&target_seq)
                    ),
                    &[&wanted],
                )
                .await
                .pg_context(|| format!("setting sequence {target_seq} on the target"))?
                .get(0);
            out.push(SyncedSequence {
                table: table.clone(),
                column,
                target_sequence: target_seq,
                source_next: next,
                target_next,
                created,
            });
        }
    }
    Ok(out)
}
