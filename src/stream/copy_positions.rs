//! The apply path's side of copy positions: load them from the state schema in the
//! stream's value format, and decide for each change whether the copy holding its
//! row already reflects it (see [`crate::positions`] for the rule).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Client;

use super::apply::Op;
use super::decoder::{OldTuple, TupleData, TupleValue};
use crate::pg::{Lsn, PgResultExt, QualifiedName};
use crate::positions::{LivePositions, Position, Scope};
use crate::rewrite::key_rows;
use crate::state::{StateStore, StoredScope};

/// A column value exactly as the server sent it (binary result format).
struct RawBytes(Vec<u8>);

impl<'a> FromSql<'a> for RawBytes {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawBytes(raw.to_vec()))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// What to do with one change.
#[derive(Debug)]
pub enum Decision {
    /// Apply it as it is.
    Apply(Op),
    /// The copies holding its rows already reflect it.
    Skip,
    /// A key change whose old row is in a copy that already reflects it and whose
    /// new row is not, but the new row lacks unchanged TOASTed values (and no whole
    /// old row carries them): the row must be read from the source again by its
    /// new key (see [`super::refetch`]).
    Refetch {
        /// The relation.
        rel: u32,
        /// The new row as the stream sent it.
        new: TupleData,
    },
}

/// The copy positions a session has not yet passed, with the version they were read
/// at.
pub struct StreamPositions {
    live: LivePositions,
    version: i64,
}

impl StreamPositions {
    /// Reads the live positions of `pipeline` (those the stream has not passed at
    /// `applied`), with identity keys converted to the stream's value format
    /// (`binary` or text) through `target`; key column types come from `source`.
    pub async fn load(
        state: &StateStore,
        target: &Client,
        source: &Client,
        pipeline: &str,
        applied: Lsn,
        binary: bool,
    ) -> Result<StreamPositions> {
        let version = state.positions_version(target, pipeline).await?;
        let stored = state.live_positions(target, pipeline, applied).await?;
        Self::build(target, source, stored, version, binary).await
    }

    /// Every copy position of one table, however far the stream is past them: what
    /// the changes held while the table was copied are replayed through (see
    /// [`super::held`]), range by range when it was copied by key ranges.
    pub async fn for_table(
        state: &StateStore,
        target: &Client,
        source: &Client,
        pipeline: &str,
        table: &QualifiedName,
        binary: bool,
    ) -> Result<StreamPositions> {
        let version = state.positions_version(target, pipeline).await?;
        let stored = state
            .live_positions(target, pipeline, Lsn(0))
            .await?
            .into_iter()
            .filter(|p| &p.table == table)
            .collect();
        Self::build(target, source, stored, version, binary).await
    }

    async fn build(
        target: &Client,
        source: &Client,
        stored: Vec<crate::state::StoredPosition>,
        version: i64,
        binary: bool,
    ) -> Result<StreamPositions> {
        let mut positions = Vec::with_capacity(stored.len());
        let mut tables: HashMap<QualifiedName, Option<crate::catalog::Table>> = HashMap::new();
        for p in stored {
            let scope = match p.scope {
                StoredScope::Table => Scope::Table,
                StoredScope::Range { column, lo, hi } => Scope::Range { column, lo, hi },
                StoredScope::Keys(keys) => {
                    if !tables.contains_key(&p.table) {
                        let t = crate::catalog::load_table(source, &p.table).await?;
                        tables.insert(p.table.clone(), t);
                    }
                    let Some(Some(table)) = tables.get(&p.table) else {
                        continue;
                    };
                    Scope::Keys {
                        columns: table.key.clone(),
                        keys: convert_keys(target, table, &keys, binary).await?,
                    }
                }
            };
            positions.push(Position {
                id: p.id,
                table: p.table,
                scope,
                snapshot: Arc::new(p.snapshot),
            });
        }
        if !positions.is_empty() {
            tracing::info!(
                positions = positions.len(),
                "ranges copied outside the stream: changes they already hold are skipped until the stream passes them"
            );
        }
        Ok(StreamPositions {
            live: LivePositions::new(positions),
            version,
        })
    }

    /// The positions version these were read at.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// Counts these positions as of `version` when it is older than the one they
    /// were read at: whatever committed in between (a table's state) is read again
    /// at the next refresh.
    pub fn as_of(&mut self, version: i64) {
        self.version = self.version.min(version);
    }

    /// Whether nothing is live.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Takes `table`'s positions from `copies` (see [`LivePositions::adopt`]).
    pub fn adopt(&mut self, table: &QualifiedName, copies: &StreamPositions, applied: Lsn) {
        self.live.adopt(table, &copies.live, applied);
    }

    /// Adds a position recorded while the stream runs (a row read again from the
    /// source, see [`super::refetch`]): it decides the row's later changes at once.
    pub fn add(&mut self, position: Position) {
        self.live.add(position);
    }

    /// Forgets positions the stream has passed.
    pub fn expire(&mut self, applied: Lsn) {
        self.live.expire(applied);
    }

    /// Whether a TRUNCATE of `table` by `xid` is applied: `Ok(false)` when the copies
    /// already hold its effect; an error when only some of them do.
    pub fn truncate(&self, table: &QualifiedName, xid: u32) -> Result<bool> {
        match self.live.truncate_seen(table, xid) {
            Some(seen) => Ok(!seen),
            None => Err(crate::stream::faults::Fatal(format!(
                "a TRUNCATE of {table} falls inside the window of a resumed copy that saw it for some rows and not for others: run `walshuttle verify --repair --tables {}` and then `walshuttle run` again",
                table.quoted()
            ))
            .into()),
        }
    }

    /// Decides what to do with `op` on `table` (columns `columns` in tuple order),
    /// made by source transaction `xid`.
    ///
    /// An INSERT lacking unchanged TOASTed values (an UPDATE that moved a row into
    /// a row filter, `--row-filter`: pgoutput sends it as an INSERT of the new row
    /// and restores only the replica identity's values) is read again, as a key
    /// change the copies cannot complete is, unless a copy holds it already.
    pub fn decide(&self, table: &QualifiedName, columns: &[String], xid: u32, op: Op) -> Decision {
        if !self.live.covers_table(table) {
            return match op {
                Op::Insert { rel, new } if lacks_toast(&new) => Decision::Refetch { rel, new },
                op => Decision::Apply(op),
            };
        }
        let held = |tuple: &[TupleValue]| {
            self.live
                .newest_copy(table, columns, tuple)
                .is_some_and(|s| s.sees(xid))
        };
        match op {
            Op::Insert { ref new, .. } => {
                if held(&new.columns) {
                    Decision::Skip
                } else {
                    match op {
                        Op::Insert { rel, new } if lacks_toast(&new) => {
                            Decision::Refetch { rel, new }
                        }
                        op => Decision::Apply(op),
                    }
                }
            }
            Op::Delete { ref old, .. } => {
                if held(&old.tuple().columns) {
                    Decision::Skip
                } else {
                    Decision::Apply(op)
                }
            }
            Op::Update { rel, old, new } => {
                let new_held = held(&new.columns);
                let old_held = match &old {
                    Some(o) => held(&o.tuple().columns),
                    None => new_held,
                };
                match (old_held, new_held) {
                    (true, true) => Decision::Skip,
                    (false, false) => Decision::Apply(Op::Update { rel, old, new }),
                    // The old row's copy already lacks it; the new row's copy does not
                    // have it yet: the change is an insert of the new row.
                    (true, false) => {
                        let new = with_old_values(new, old.as_ref());
                        if new
                            .columns
                            .iter()
                            .any(|v| matches!(v, TupleValue::UnchangedToast))
                        {
                            Decision::Refetch { rel, new }
                        } else {
                            Decision::Apply(Op::Insert { rel, new })
                        }
                    }
                    // The new row's copy has it already; the old row must go.
                    (false, true) => match old {
                        Some(old) => Decision::Apply(Op::Delete { rel, old }),
                        None => Decision::Skip,
                    },
                }
            }
        }
    }
}

/// Whether a new row lacks values pgoutput did not send (unchanged TOAST).
pub fn lacks_toast(new: &TupleData) -> bool {
    new.columns
        .iter()
        .any(|v| matches!(v, TupleValue::UnchangedToast))
}

/// `new` with its unchanged TOASTed values taken from a whole old row (`REPLICA
/// IDENTITY FULL` sends the old row with every value): those columns did not change.
fn with_old_values(mut new: TupleData, old: Option<&OldTuple>) -> TupleData {
    if let Some(OldTuple::Full(old)) = old {
        for (value, before) in new.columns.iter_mut().zip(&old.columns) {
            if matches!(value, TupleValue::UnchangedToast)
                && !matches!(before, TupleValue::UnchangedToast)
            {
                *value = before.clone();
            }
        }
    }
    new
}

/// Converts stored key texts into the values the stream sends for those columns.
async fn convert_keys(
    target: &Client,
    table: &crate::catalog::Table,
    keys: &[Vec<String>],
    binary: bool,
) -> Result<Vec<Vec<Bytes>>> {
    let n = table.key.len();
    if n == 0 || keys.is_empty() {
        return Ok(Vec::new());
    }
    let (types, from) = key_rows(table, keys);
    let exprs: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if binary {
                format!("u.c{i}::{t}")
            } else {
                format!("(u.c{i}::{t})::text")
            }
        })
        .collect();
    let sql = format!("SELECT {} FROM {from}", exprs.join(", "));
    let rows = target
        .query(&sql, &[])
        .await
        .pg_context(|| format!("reading the repaired keys of {}", table.name))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut key = Vec::with_capacity(n);
        for i in 0..n {
            let value = if binary {
                r.try_get::<_, RawBytes>(i).map(|v| Bytes::from(v.0))
            } else {
                r.try_get::<_, String>(i)
                    .map(|v| Bytes::from(v.into_bytes()))
            };
            key.push(value.pg_context(|| format!("reading the repaired keys of {}", table.name))?);
        }
        out.push(key);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(xmin: u64) -> Arc<crate::positions::SnapshotView> {
        Arc::new(crate::positions::SnapshotView {
            xmin,
            xmax: xmin,
            xip: Vec::new(),
            lsn: Lsn(1 << 40),
        })
    }

    fn id(v: i64) -> TupleValue {
        TupleValue::Binary(Bytes::copy_from_slice(&v.to_be_bytes()))
    }

    /// Keys below 100 copied before transaction 50, the rest after it.
    fn positions() -> StreamPositions {
        let table = QualifiedName::new("public", "t");
        let range = |pid, lo, hi, xmin| Position {
            id: pid,
            table: table.clone(),
            scope: Scope::Range {
                column: "id".into(),
                lo,
                hi,
            },
            snapshot: snapshot(xmin),
        };
        StreamPositions {
            live: LivePositions::new(vec![
                range(1, None, Some(100), 40),
                range(2, Some(100), None, 60),
            ]),
            version: 0,
        }
    }

    fn key_change(old: OldTuple) -> Op {
        Op::Update {
            rel: 7,
            old: Some(old),
            new: TupleData {
                columns: vec![id(5), TupleValue::UnchangedToast],
            },
        }
    }

    #[test]
    fn a_key_change_into_an_earlier_copy_without_its_toast_value_is_read_again() {
        let p = positions();
        let table = QualifiedName::new("public", "t");
        let columns = vec!["id".to_string(), "doc".to_string()];
        let old = OldTuple::Key(TupleData {
            columns: vec![id(150), TupleValue::Null],
        });
        match p.decide(&table, &columns, 50, key_change(old)) {
            Decision::Refetch { rel, new } => {
                assert_eq!(rel, 7);
                assert_eq!(new.columns[0], id(5));
            }
            other => panic!("expected a read again, got {other:?}"),
        }
        // A whole old row carries the value: an insert, nothing to read.
        let doc = TupleValue::Binary(Bytes::from_static(b"doc"));
        let old = OldTuple::Full(TupleData {
            columns: vec![id(150), doc.clone()],
        });
        match p.decide(&table, &columns, 50, key_change(old)) {
            Decision::Apply(Op::Insert { new, .. }) => {
                assert_eq!(new.columns, vec![id(5), doc]);
            }
            other => panic!("expected an insert, got {other:?}"),
        }
        // A row read again by key decides that key from then on.
        let mut p = p;
        p.add(Position {
            id: 3,
            table: table.clone(),
            scope: Scope::Keys {
                columns: vec!["id".into()],
                keys: vec![vec![Bytes::copy_from_slice(&5i64.to_be_bytes())]],
            },
            snapshot: snapshot(70),
        });
        let update = Op::Update {
            rel: 7,
            old: None,
            new: TupleData {
                columns: vec![id(5), TupleValue::Null],
            },
        };
        assert!(matches!(
            p.decide(&table, &columns, 65, update),
            Decision::Skip
        ));
    }

    #[test]
    fn an_insert_without_its_toast_value_is_read_again_unless_a_copy_holds_it() {
        // A row moved into a row filter: an INSERT lacking an unchanged TOAST value.
        let insert = |key| Op::Insert {
            rel: 7,
            new: TupleData {
                columns: vec![id(key), TupleValue::UnchangedToast],
            },
        };
        let columns = vec!["id".to_string(), "doc".to_string()];
        let other = QualifiedName::new("public", "other");
        let none = StreamPositions {
            live: LivePositions::new(Vec::new()),
            version: 0,
        };
        assert!(matches!(
            none.decide(&other, &columns, 50, insert(5)),
            Decision::Refetch { rel: 7, .. }
        ));
        let p = positions();
        let table = QualifiedName::new("public", "t");
        // Key 5 was copied before transaction 50 (not held): read again.
        assert!(matches!(
            p.decide(&table, &columns, 50, insert(5)),
            Decision::Refetch { .. }
        ));
        // Key 150 was copied after it: the copy holds the row.
        assert!(matches!(
            p.decide(&table, &columns, 50, insert(150)),
            Decision::Skip
        ));
    }
}
