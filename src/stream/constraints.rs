//! The target table's unique and exclusion constraints, read once when its Relation
//! message is taken in (not per batch).
//!
//! They decide two things. Whether a run of updates may become one set-based
//! statement: PostgreSQL checks a constraint that is not `DEFERRABLE` row by row as a
//! statement goes, so `UPDATE … FROM unnest(…)` can trip over a value that the same
//! changes, one statement per row in the source's order, pass through (a rename
//! `a → x, b → a, x → b` under a UNIQUE name). And whether the source's identity has
//! a unique index on the target that finds its rows.

use anyhow::Result;
use tokio_postgres::Client;

use crate::pg::{PgResultExt, QualifiedName};

/// One unique index or exclusion constraint of the target table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UniqueIndex {
    /// The index's name.
    pub name: String,
    /// Its plain key columns (INCLUDE columns and expressions not listed).
    pub columns: Vec<String>,
    /// Partial, or with expressions: which columns it depends on is not tracked,
    /// so it counts as covering every column.
    pub covers_all: bool,
    /// Checked row by row as a statement goes (not `DEFERRABLE`).
    pub immediate: bool,
    /// An exclusion constraint rather than a unique index.
    pub exclusion: bool,
    /// Identifies rows by exactly `columns`: valid, unique, immediate, not partial,
    /// no expressions, its columns NOT NULL or the index NULLS NOT DISTINCT.
    pub identifies: bool,
}

/// What the apply path knows about one target table's constraints.
#[derive(Clone, Debug, Default)]
pub struct TargetConstraints {
    /// Unique indexes and exclusion constraints enforced for new rows (including an
    /// index still being built concurrently, which already checks them).
    pub indexes: Vec<UniqueIndex>,
    /// Columns whose type has a default btree operator class, so `column = value`
    /// can narrow a whole-row match through an index.
    pub ordered: Vec<String>,
    /// Whether any trigger (foreign keys' included) is enabled on the table: its
    /// changes may touch or wait for rows of other tables.
    pub has_triggers: bool,
}

impl TargetConstraints {
    /// Reads the constraints of `table` through `client` (the target).
    pub async fn load(client: &Client, table: &QualifiedName) -> Result<TargetConstraints> {
        let ctx = || format!("reading the unique constraints of {table} on the target");
        let rows = client
            .query(
                "SELECT c.relname::text, i.indisunique, i.indisexclusion, i.indimmediate, \
                        (i.indpred IS NOT NULL OR i.indexprs IS NOT NULL), \
                        ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                              WHERE k.ord <= i.indnkeyatts ORDER BY k.ord), \
                        i.indisvalid, \
                        coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false) \
                        OR NOT EXISTS (SELECT 1 FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                              WHERE k.ord <= i.indnkeyatts AND NOT a.attnotnull) \
                 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE i.indrelid = $1::text::regclass AND i.indisready \
                   AND (i.indisunique OR i.indisexclusion) \
                 ORDER BY 1",
                &[&table.quoted()],
            )
            .await
            .pg_context(ctx)?;
        let indexes = rows
            .iter()
            .map(|r| {
                let unique: bool = r.get(1);
                let immediate: bool = r.get(3);
                let covers_all: bool = r.get(4);
                let valid: bool = r.get(6);
                let nulls_ok: bool = r.get(7);
                UniqueIndex {
                    name: r.get(0),
                    columns: r.get(5),
                    covers_all,
                    immediate,
                    exclusion: r.get(2),
                    identifies: unique && valid && immediate && !covers_all && nulls_ok,
                }
            })
            .collect();
        let ordered = client
            .query(
                "SELECT a.attname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                   AND EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod \
                               WHERE am.amname = 'btree' AND oc.opcdefault \
                                 AND (oc.opcintype = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
                                      OR EXISTS (SELECT 1 FROM pg_cast k WHERE k.castmethod = 'b' \
                                                 AND k.castsource = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
                                                 AND k.casttarget = oc.opcintype)))",
                &[&table.quoted()],
            )
            .await
            .pg_context(ctx)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let has_triggers = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgenabled <> 'D')",
                &[&table.quoted()],
            )
            .await
            .pg_context(ctx)?
            .get(0);
        Ok(TargetConstraints {
            indexes,
            ordered,
            has_triggers,
        })
    }

    /// Whether rows of different identities (`key`) can never wait on or collide
    /// with each other on the target: no trigger, no exclusion constraint, and every
    /// unique index holds every identity column among its plain columns (so two
    /// rows of different identities differ in it, partial or not). With an empty
    /// `key`, whether the table has no unique index at all.
    pub fn identities_independent(&self, key: &[String]) -> bool {
        !self.has_triggers
            && self.indexes.iter().all(|ix| {
                !key.is_empty() && !ix.exclusion && key.iter().all(|k| ix.columns.contains(k))
            })
    }

    /// The unique index that identifies rows by exactly the columns `key`.
    pub fn identity_index(&self, key: &[String]) -> Option<&UniqueIndex> {
        let mut wanted = key.to_vec();
        wanted.sort();
        self.indexes.iter().find(|ix| {
            let mut cols = ix.columns.clone();
            cols.sort();
            ix.identifies && cols == wanted
        })
    }

    /// For each of `columns`, whether one set-based UPDATE setting it could violate a
    /// constraint that the same changes one statement per row would not: some
    /// immediate unique index or exclusion constraint covers it (partial and
    /// expression indexes cover every column). A unique index containing every column
    /// of the identity `key` is harmless: a set-based run changes each key once and
    /// keeps it, so no two of its rows (nor one of them and any other row) can
    /// collide in it.
    pub fn guarded(&self, key: &[String], columns: &[String]) -> Vec<bool> {
        let mut guarded = vec![false; columns.len()];
        for ix in self.indexes.iter().filter(|ix| ix.immediate) {
            let holds_key =
                !ix.exclusion && !key.is_empty() && key.iter().all(|k| ix.columns.contains(k));
            if holds_key {
                continue;
            }
            for (g, col) in guarded.iter_mut().zip(columns) {
                if ix.covers_all || ix.columns.contains(col) {
                    *g = true;
                }
            }
        }
        guarded
    }

    /// Whether `column = value` may narrow a whole-row match.
    pub fn is_ordered(&self, column: &str) -> bool {
        self.ordered.iter().any(|c| c == column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(columns: &[&str], covers_all: bool, immediate: bool, exclusion: bool) -> UniqueIndex {
        UniqueIndex {
            name: "ix".into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            covers_all,
            immediate,
            exclusion,
            identifies: !covers_all && immediate && !exclusion,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn only_constraints_without_the_whole_key_guard_columns() {
        let cols = names(&["id", "name", "n", "code"]);
        let key = names(&["id"]);
        let c = TargetConstraints {
            indexes: vec![
                index(&["id"], false, true, false),
                // Contains the whole key: harmless.
                index(&["id", "n"], false, true, false),
                // A secondary UNIQUE: guards `name`.
                index(&["name"], false, true, false),
                // Deferrable: checked at the end, like a set-based statement.
                index(&["code"], false, false, false),
            ],
            ordered: vec![],
            has_triggers: false,
        };
        assert_eq!(c.guarded(&key, &cols), vec![false, true, false, false]);
        assert!(c.identity_index(&key).is_some());
        assert!(c.identity_index(&names(&["name", "id"])).is_none());
    }

    #[test]
    fn partial_expression_and_exclusion_indexes_guard_everything_they_may_touch() {
        let cols = names(&["id", "a", "b"]);
        let key = names(&["id"]);
        let partial = TargetConstraints {
            indexes: vec![index(&["a"], true, true, false)],
            ordered: vec![],
            has_triggers: false,
        };
        assert_eq!(partial.guarded(&key, &cols), vec![true, true, true]);
        // A partial index holding the key still cannot collide.
        let partial_key = TargetConstraints {
            indexes: vec![index(&["id", "a"], true, true, false)],
            ordered: vec![],
            has_triggers: false,
        };
        assert_eq!(partial_key.guarded(&key, &cols), vec![false, false, false]);
        let exclusion = TargetConstraints {
            indexes: vec![index(&["id", "b"], false, true, true)],
            ordered: vec![],
            has_triggers: false,
        };
        assert_eq!(exclusion.guarded(&key, &cols), vec![true, false, true]);
    }

    #[test]
    fn identities_are_independent_only_when_every_unique_index_holds_the_key() {
        let key = names(&["id"]);
        let with = |indexes: Vec<UniqueIndex>, has_triggers: bool| TargetConstraints {
            indexes,
            ordered: vec![],
            has_triggers,
        };
        assert!(with(vec![index(&["id"], false, true, false)], false).identities_independent(&key));
        assert!(
            with(vec![index(&["id", "a"], true, false, false)], false).identities_independent(&key)
        );
        assert!(
            !with(vec![index(&["name"], false, true, false)], false).identities_independent(&key)
        );
        assert!(
            !with(vec![index(&["id", "b"], false, true, true)], false).identities_independent(&key)
        );
        assert!(!with(vec![index(&["id"], false, true, false)], true).identities_independent(&key));
        // No identity: independent only without any unique index.
        assert!(with(vec![], false).identities_independent(&[]));
        assert!(!with(vec![index(&["a"], false, true, false)], false).identities_independent(&[]));
    }
}
