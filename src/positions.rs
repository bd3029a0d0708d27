//! Copy positions: which source transactions a range of target rows already reflects.
//!
//! Every range of rows walshuttle writes to the target outside the stream (a resumed
//! bootstrap chunk, a table rewritten by catch-up or resync, keys rewritten by `verify
//! --repair`) is read from the source under one MVCC snapshot and records that
//! snapshot. A source transaction's effects are in the copy exactly when the snapshot
//! sees the transaction: `xid < xmin`, or `xid < xmax` and not among the transactions
//! in progress (`xip`). The stream therefore applies a change to a row if and only if
//! the snapshot of the newest copy holding the row's key does not see the change's
//! transaction. The rule needs the transaction id only, which pgoutput sends at Begin
//! and at Stream Start, so it works for streamed (in-progress) transactions too, and it
//! needs no replication slot, so any `REPEATABLE READ` snapshot is exact.
//!
//! A snapshot stops mattering once the stream has applied everything up to the
//! source's WAL insert position read right after the snapshot was taken (`lsn`): a
//! transaction the snapshot sees was removed from the proc array before the snapshot,
//! so its commit record lies before that position; every later transaction is one the
//! snapshot cannot see.
//!
//! This module is pure: the snapshots and ranges come from the state schema, the
//! decisions go to the apply path.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

pub use crate::pg::SnapshotView;
use crate::pg::TupleValue;
use crate::pg::{Lsn, QualifiedName};

/// A key value of an integer chunk column, decoded from a tuple.
fn int_value(value: Option<&TupleValue>) -> Option<i64> {
    match value? {
        TupleValue::Binary(b) => match b.len() {
            2 => Some(i64::from(i16::from_be_bytes([b[0], b[1]]))),
            4 => Some(i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
            8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Some(i64::from_be_bytes(a))
            }
            _ => None,
        },
        TupleValue::Text(b) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// What a copy position covers in one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every row of the table.
    Table,
    /// Rows whose integer `column` lies in `[lo, hi)` (an open end is `None`).
    Range {
        /// The chunk column (a single integer identity or primary-key column).
        column: String,
        /// Inclusive lower bound.
        lo: Option<i64>,
        /// Exclusive upper bound.
        hi: Option<i64>,
    },
    /// Rows with exactly these identity keys, each as the stream sends the key
    /// columns (binary or text values, in the order of `columns`).
    Keys {
        /// The identity key columns.
        columns: Vec<String>,
        /// The keys.
        keys: Vec<Vec<Bytes>>,
    },
}

/// One live copy position: a scope and the snapshot it was copied under.
#[derive(Clone, Debug)]
pub struct Position {
    /// Order of writing: a later position overrides an earlier one for the rows both
    /// cover.
    pub id: i64,
    /// The table.
    pub table: QualifiedName,
    /// What it covers.
    pub scope: Scope,
    /// The snapshot the rows were read under.
    pub snapshot: Arc<SnapshotView>,
}

/// A live key range: column, bounds, position id, snapshot.
type LiveRange = (String, Option<i64>, Option<i64>, i64, Arc<SnapshotView>);

#[derive(Clone, Default)]
struct TablePositions {
    whole: Option<(i64, Arc<SnapshotView>)>,
    ranges: Vec<LiveRange>,
    key_columns: Vec<String>,
    keys: HashMap<Vec<Bytes>, (i64, Arc<SnapshotView>)>,
}

/// The copy positions the stream has not yet passed, by table.
#[derive(Default)]
pub struct LivePositions {
    tables: HashMap<QualifiedName, TablePositions>,
}

impl LivePositions {
    /// Builds the lookup from positions read from the state schema.
    pub fn new(positions: Vec<Position>) -> LivePositions {
        let mut live = LivePositions::default();
        for p in positions {
            live.add(p);
        }
        live
    }

    /// Adds one position (later ids override earlier ones).
    pub fn add(&mut self, p: Position) {
        let t = self.tables.entry(p.table).or_default();
        match p.scope {
            Scope::Table => {
                if t.whole.as_ref().is_none_or(|(id, _)| *id < p.id) {
                    t.whole = Some((p.id, p.snapshot));
                }
            }
            Scope::Range { column, lo, hi } => t.ranges.push((column, lo, hi, p.id, p.snapshot)),
            Scope::Keys { columns, keys } => {
                t.key_columns = columns;
                for k in keys {
                    let entry = t.keys.entry(k).or_insert((p.id, Arc::clone(&p.snapshot)));
                    if entry.0 < p.id {
                        *entry = (p.id, Arc::clone(&p.snapshot));
                    }
                }
            }
        }
    }

    /// Whether no position is live (the common case: nothing to check).
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Takes `table`'s positions from `copies` (every copy of the table, as read
    /// when its copy went in), replacing any this set had for it, and forgets those
    /// the stream has passed at `applied`. A table that joins the stream after its
    /// copy is decided by exactly the copies its held changes were replayed through,
    /// however this set was read.
    pub fn adopt(&mut self, table: &QualifiedName, copies: &LivePositions, applied: Lsn) {
        match copies.tables.get(table) {
            Some(t) => {
                self.tables.insert(table.clone(), t.clone());
            }
            None => {
                self.tables.remove(table);
            }
        }
        self.expire(applied);
    }

    /// Whether `table` has live positions.
    pub fn covers_table(&self, table: &QualifiedName) -> bool {
        self.tables.contains_key(table)
    }

    /// Forgets positions whose snapshot the stream has passed (`applied` is the end
    /// of the last applied source transaction).
    pub fn expire(&mut self, applied: Lsn) {
        for t in self.tables.values_mut() {
            if t.whole.as_ref().is_some_and(|(_, s)| s.lsn <= applied) {
                t.whole = None;
            }
            t.ranges.retain(|r| r.4.lsn > applied);
            t.keys.retain(|_, (_, s)| s.lsn > applied);
        }
        self.tables
            .retain(|_, t| t.whole.is_some() || !t.ranges.is_empty() || !t.keys.is_empty());
    }

    /// The snapshot of the newest copy holding the row `tuple` of `table` (whose
    /// column names in tuple order are `columns`), if any copy holds it.
    pub fn newest_copy(
        &self,
        table: &QualifiedName,
        columns: &[String],
        tuple: &[TupleValue],
    ) -> Option<&SnapshotView> {
        let t = self.tables.get(table)?;
        let mut best: Option<(i64, &Arc<SnapshotView>)> = t.whole.as_ref().map(|(i, s)| (*i, s));
        for (column, lo, hi, id, snap) in &t.ranges {
            let Some(pos) = columns.iter().position(|c| c == column) else {
                continue;
            };
            let Some(v) = int_value(tuple.get(pos)) else {
                continue;
            };
            if lo.is_none_or(|lo| v >= lo)
                && hi.is_none_or(|hi| v < hi)
                && best.is_none_or(|(b, _)| b < *id)
            {
                best = Some((*id, snap));
            }
        }
        if !t.keys.is_empty() {
            let key: Option<Vec<Bytes>> = t
                .key_columns
                .iter()
                .map(
                    |name| match tuple.get(columns.iter().position(|c| c == name)?) {
                        Some(TupleValue::Binary(b)) | Some(TupleValue::Text(b)) => Some(b.clone()),
                        _ => None,
                    },
                )
                .collect();
            if let Some((id, snap)) = key.and_then(|k| t.keys.get(&k)) {
                if best.is_none_or(|(b, _)| b < *id) {
                    best = Some((*id, snap));
                }
            }
        }
        best.map(|(_, s)| s.as_ref())
    }

    /// Whether the copies of `table` hold the effect of a TRUNCATE made by `xid`:
    /// `Some(true)` when every row's newest copy saw it (skip it), `Some(false)` when
    /// none did (apply it), `None` when some did and some did not (only a recopy of
    /// the table makes the target right).
    pub fn truncate_seen(&self, table: &QualifiedName, xid: u32) -> Option<bool> {
        let Some(t) = self.tables.get(table) else {
            return Some(false);
        };
        let newest_part = t
            .ranges
            .iter()
            .map(|r| r.3)
            .chain(t.keys.values().map(|(id, _)| *id))
            .max();
        if let Some((id, snap)) = &t.whole {
            if newest_part.is_none_or(|p| p < *id) {
                return Some(snap.sees(xid));
            }
        }
        let any_sees = t.whole.iter().any(|(_, s)| s.sees(xid))
            || t.ranges.iter().any(|r| r.4.sees(xid))
            || t.keys.values().any(|(_, s)| s.sees(xid));
        if any_sees {
            None
        } else {
            Some(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> SnapshotView {
        SnapshotView::parse(text, Lsn(100)).unwrap()
    }

    #[test]
    fn visibility_follows_xmin_xmax_and_in_progress() {
        let s = snap("100:110:103,105");
        assert!(s.sees(99));
        assert!(s.sees(100));
        assert!(!s.sees(103));
        assert!(s.sees(104));
        assert!(!s.sees(105));
        assert!(!s.sees(110));
        assert!(!s.sees(200));
    }

    #[test]
    fn xids_widen_across_the_epoch() {
        // xmax just past a wraparound: 32-bit ids near u32::MAX belong to the
        // previous epoch.
        let s = snap(&format!("{}:{}:", (1u64 << 32) - 10, (1u64 << 32) + 5));
        assert_eq!(s.full_xid(3), (1u64 << 32) + 3);
        assert_eq!(s.full_xid(u32::MAX - 2), (1u64 << 32) - 3);
        assert!(s.sees(u32::MAX - 20));
        assert!(!s.sees(7));
        assert!(s.sees(2));
    }

    #[test]
    fn a_truncate_is_skipped_only_when_every_copy_saw_it() {
        let t = QualifiedName::new("public", "t");
        let saw = Arc::new(SnapshotView::parse("30:40:", Lsn(90)).unwrap()); // sees 25
        let missed = Arc::new(SnapshotView::parse("10:20:", Lsn(50)).unwrap()); // not 25
        let whole = |id, snapshot| Position {
            id,
            table: t.clone(),
            scope: Scope::Table,
            snapshot,
        };
        let range = |id, snapshot| Position {
            id,
            table: t.clone(),
            scope: Scope::Range {
                column: "id".into(),
                lo: Some(0),
                hi: Some(10),
            },
            snapshot,
        };
        let other = QualifiedName::new("public", "u");
        let live = LivePositions::new(vec![whole(1, saw.clone())]);
        assert_eq!(live.truncate_seen(&t, 25), Some(true));
        assert_eq!(live.truncate_seen(&other, 25), Some(false));
        let live = LivePositions::new(vec![whole(1, missed.clone())]);
        assert_eq!(live.truncate_seen(&t, 25), Some(false));
        // A whole-table copy newer than a range decides alone.
        let live = LivePositions::new(vec![range(1, missed.clone()), whole(2, saw.clone())]);
        assert_eq!(live.truncate_seen(&t, 25), Some(true));
        // Copies that disagree: only a recopy makes the target right.
        let live = LivePositions::new(vec![whole(1, missed), range(2, saw)]);
        assert_eq!(live.truncate_seen(&t, 25), None);
    }

    #[test]
    fn newest_position_wins_and_expires() {
        let t = QualifiedName::new("public", "t");
        let old = Arc::new(SnapshotView::parse("10:20:", Lsn(50)).unwrap());
        let new = Arc::new(SnapshotView::parse("30:40:35", Lsn(90)).unwrap());
        let mut live = LivePositions::new(vec![
            Position {
                id: 1,
                table: t.clone(),
                scope: Scope::Range {
                    column: "id".into(),
                    lo: Some(0),
                    hi: Some(100),
                },
                snapshot: old,
            },
            Position {
                id: 2,
                table: t.clone(),
                scope: Scope::Keys {
                    columns: vec!["id".into()],
                    keys: vec![vec![Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 7])]],
                },
                snapshot: new,
            },
        ]);
        let columns = vec!["id".to_string(), "v".to_string()];
        let row = |id: i64| {
            vec![
                TupleValue::Binary(Bytes::copy_from_slice(&id.to_be_bytes())),
                TupleValue::Null,
            ]
        };
        assert_eq!(live.newest_copy(&t, &columns, &row(7)).unwrap().xmin, 30);
        assert_eq!(live.newest_copy(&t, &columns, &row(8)).unwrap().xmin, 10);
        assert!(live.newest_copy(&t, &columns, &row(100)).is_none());
        live.expire(Lsn(60));
        assert!(live.newest_copy(&t, &columns, &row(8)).is_none());
        assert!(live.newest_copy(&t, &columns, &row(7)).is_some());
        live.expire(Lsn(90));
        assert!(live.is_empty());
    }

    #[test]
    fn a_table_joining_the_stream_takes_its_copies_whatever_was_read_before() {
        let t = QualifiedName::new("public", "t");
        let other = QualifiedName::new("public", "o");
        let whole = |id, table: &QualifiedName, snap: &str, lsn| Position {
            id,
            table: table.clone(),
            scope: Scope::Table,
            snapshot: Arc::new(SnapshotView::parse(snap, Lsn(lsn)).unwrap()),
        };
        // Read before `t`'s copy committed: only the other table's position.
        let mut live = LivePositions::new(vec![whole(1, &other, "5:6:", 70)]);
        let copies = LivePositions::new(vec![whole(2, &t, "20:25:22", 80)]);
        live.adopt(&t, &copies, Lsn(50));
        let columns = vec!["id".to_string()];
        let row = [TupleValue::Null];
        let snap = live
            .newest_copy(&t, &columns, &row)
            .expect("t's copy adopted");
        assert!(snap.sees(21) && !snap.sees(22) && !snap.sees(25));
        assert!(live.newest_copy(&other, &columns, &row).is_some());
        // A copy the stream already passed is not kept.
        live.adopt(
            &t,
            &LivePositions::new(vec![whole(3, &t, "20:25:", 40)]),
            Lsn(50),
        );
        assert!(!live.covers_table(&t));
    }

    #[test]
    fn text_and_binary_int_keys_decode() {
        assert_eq!(
            int_value(Some(&TupleValue::Text(Bytes::from_static(b"-42")))),
            Some(-42)
        );
        assert_eq!(
            int_value(Some(&TupleValue::Binary(Bytes::from_static(&[0xff, 0xfe])))),
            Some(-2)
        );
        assert_eq!(int_value(Some(&TupleValue::Null)), None);
    }
}
