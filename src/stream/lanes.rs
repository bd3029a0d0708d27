//! Parallel apply: coalesced batches of committed source transactions finishing on
//! target connections of their own while the session decodes and applies the next
//! ones, every batch committing in the source's commit order.
//!
//! The session gathers complete source transactions into one target transaction
//! (a *batch*, see `session.rs`). When a batch is closed it is handed to a *lane*: a
//! task owning the batch's connection sends its remaining statements, and the
//! session goes on with the next batch on another connection. The session commits
//! lanes strictly first in, first out, each with the progress row of its last source
//! transaction, so the target only ever shows a prefix of the source's commit order
//! and a crash at any point leaves exactly the committed prefix recorded.
//!
//! The lane rule, which makes this equivalent to applying one row at a time in
//! commit order: a change may be sent while earlier batches are still in flight
//! only when none of them touches the same row. Rows are named by their
//! [`ConflictKeys`]: (table, replica identity values) of the old and the new row.
//! That is enough only where two different identities can never meet on the target
//! (see [`LaneRule`], decided per table when its shape is taken in): otherwise the
//! change waits for every batch before it ([`ConflictKeys::all`]). A batch whose
//! rows meet those of a batch in flight starts sending only once that batch (and so
//! every one before it) has committed, so its statements see their rows as a serial
//! apply would; meanwhile the session already decodes the next batch. The oldest
//! batch in flight never waits for anything of walshuttle's, so the lanes always
//! move.
//!
//! Everything that is not a plain row change of a committed transaction (TRUNCATE,
//! a table's shape, captured DDL, streamed transactions, held tables, copy
//! positions, rewrites) is a *barrier*: the session drains every lane before it.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::apply::{Op, TargetSession};
use super::decoder::{PgTimestamp, TupleData, TupleValue};
use super::relations::{Relations, TableShape};
use crate::pg::Lsn;

/// How changes of one table may be applied beside those of other batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneRule {
    /// Rows are found by replica identity columns whose values are equal exactly
    /// when their bytes are (integers, uuid, dates and timestamps, booleans), and
    /// every unique index of the target table contains those columns, no exclusion
    /// constraint, partial or expression index, trigger or foreign key exists: two
    /// changes of different identities cannot wait on each other or see each other.
    Keyed,
    /// Rows have no identity the stream can name (`REPLICA IDENTITY FULL`, or none:
    /// inserts only), and the target table has no unique index, trigger or foreign
    /// key: inserts meet nothing; updates and deletes wait for every batch before.
    InsertsFree,
    /// Every change waits for every batch before it.
    Serial,
}

/// Type oids whose equality is equality of the bytes pgoutput sends (in text and
/// binary): bool, int2, int4, int8, oid, date, timestamp, timestamptz, uuid.
const BYTEWISE_TYPES: &[u32] = &[16, 21, 23, 20, 26, 1082, 1114, 1184, 2950];

/// Whether values of the type with oid `type_oid` are equal exactly when the bytes
/// pgoutput sends for them are.
pub fn bytewise_type(type_oid: u32) -> bool {
    BYTEWISE_TYPES.contains(&type_oid)
}

/// The rows a batch touches, as hashes of (table, identity values); or all rows.
/// Two sets meet when they share a hash (a collision only costs a wait).
#[derive(Clone, Debug, Default)]
pub struct ConflictKeys {
    all: bool,
    keys: HashSet<u64>,
}

impl ConflictKeys {
    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        !self.all && self.keys.is_empty()
    }

    /// A set meeting every other non-empty one.
    pub fn all() -> ConflictKeys {
        ConflictKeys {
            all: true,
            keys: HashSet::new(),
        }
    }

    /// Whether the two sets may name one row.
    pub fn meets(&self, other: &ConflictKeys) -> bool {
        if self.is_empty() || other.is_empty() {
            return false;
        }
        if self.all || other.all {
            return true;
        }
        let (small, large) = if self.keys.len() <= other.keys.len() {
            (&self.keys, &other.keys)
        } else {
            (&other.keys, &self.keys)
        };
        small.iter().any(|k| large.contains(k))
    }

    /// Adds every key of `other`.
    pub fn extend(&mut self, other: ConflictKeys) {
        self.all |= other.all;
        if !self.all {
            self.keys.extend(other.keys);
        } else {
            self.keys.clear();
        }
    }

    /// The keys of one change of table `shape` (relation `rel`).
    pub fn of_op(shape: &TableShape, op: &Op) -> ConflictKeys {
        let mut keys = ConflictKeys::default();
        match (shape.lane, op) {
            (LaneRule::Serial, _) => keys.all = true,
            (LaneRule::InsertsFree, Op::Insert { .. }) => {}
            (LaneRule::InsertsFree, _) => keys.all = true,
            (LaneRule::Keyed, Op::Insert { rel, new }) => keys.add_tuple(*rel, shape, new),
            (LaneRule::Keyed, Op::Update { rel, old, new }) => {
                if let Some(old) = old {
                    keys.add_tuple(*rel, shape, old.tuple());
                }
                keys.add_tuple(*rel, shape, new);
            }
            (LaneRule::Keyed, Op::Delete { rel, old }) => keys.add_tuple(*rel, shape, old.tuple()),
        }
        keys
    }

    fn add_tuple(&mut self, rel: u32, shape: &TableShape, tuple: &TupleData) {
        if self.all {
            return;
        }
        let mut h = hasher();
        rel.hash(&mut h);
        for &k in &shape.key {
            match tuple.columns.get(k) {
                Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => {
                    1u8.hash(&mut h);
                    b.as_ref().hash(&mut h);
                }
                Some(TupleValue::Null) => 0u8.hash(&mut h),
                // An identity value not sent (unchanged TOAST) names no row here.
                _ => {
                    self.all = true;
                    self.keys.clear();
                    return;
                }
            }
        }
        self.keys.insert(h.finish());
    }
}

/// One hasher for every key of the process (keys are compared within it only).
fn hasher() -> impl Hasher {
    static STATE: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    STATE
        .get_or_init(std::hash::RandomState::new)
        .build_hasher()
}

/// A closed batch, as the session hands it to a lane.
pub struct Batch {
    /// Its connection, with the target transaction open and ops still buffered.
    pub session: TargetSession,
    /// The connection's backend process id.
    pub pid: i32,
    /// The rows it touches.
    pub keys: ConflictKeys,
    /// End LSN of its last source transaction.
    pub end_lsn: Lsn,
    /// Commit time of its last source transaction.
    pub commit_time: PgTimestamp,
    /// Source transactions in it.
    pub txns: usize,
    /// What its commit runs first (the progress row).
    pub commit_sql: String,
}

/// A batch committed by [`Lanes::commit_oldest`].
pub struct Committed {
    /// End LSN of its last source transaction.
    pub end_lsn: Lsn,
    /// The target's WAL position after its commit.
    pub target_lsn: Option<Lsn>,
    /// Commit time of its last source transaction.
    pub commit_time: PgTimestamp,
    /// Source transactions in it.
    pub txns: usize,
    /// How long its commit took.
    pub commit_took: Option<std::time::Duration>,
}

/// A batch whose remaining statements a task is sending.
struct InFlight {
    /// Its place in commit order.
    seq: u64,
    keys: ConflictKeys,
    pid: i32,
    end_lsn: Lsn,
    commit_time: PgTimestamp,
    txns: usize,
    commit_sql: String,
    task: JoinHandle<(TargetSession, Result<()>)>,
}

/// The lanes of one replication session: batches in flight, in commit order, and
/// idle connections to take the next batch.
pub struct Lanes {
    /// Most connections applying at once, the session's main one included.
    width: usize,
    in_flight: VecDeque<InFlight>,
    idle: Vec<(TargetSession, i32)>,
    /// The place of the next batch handed off.
    next_seq: u64,
    /// The place of the last batch committed (0: none yet).
    committed: watch::Sender<u64>,
}

impl Lanes {
    /// Lanes for `width` connections in all (1: no batch is ever in flight).
    pub fn new(width: usize) -> Lanes {
        Lanes {
            width: width.max(1),
            in_flight: VecDeque::new(),
            idle: Vec::new(),
            next_seq: 1,
            committed: watch::Sender::new(0),
        }
    }

    /// Whether batches may be handed off at all.
    pub fn parallel(&self) -> bool {
        self.width > 1
    }

    /// Whether no batch is in flight.
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Batches in flight.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether every lane besides the main connection is busy.
    pub fn full(&self) -> bool {
        self.in_flight.len() + 1 >= self.width
    }

    /// Backend process ids of the batches in flight.
    pub fn pids(&self) -> impl Iterator<Item = i32> + '_ {
        self.in_flight.iter().map(|f| f.pid)
    }

    /// Whether backend `pid` applies a batch in flight.
    pub fn has_pid(&self, pid: i32) -> bool {
        self.in_flight.iter().any(|f| f.pid == pid)
    }

    /// How many of the oldest batches must commit before a change touching `keys`
    /// may be sent: 0 when it meets none in flight.
    pub fn must_commit_before(&self, keys: &ConflictKeys) -> usize {
        self.in_flight
            .iter()
            .rposition(|f| f.keys.meets(keys))
            .map(|i| i + 1)
            .unwrap_or(0)
    }

    /// Whether the oldest batch in flight has sent everything (its commit will not
    /// wait).
    pub fn oldest_ready(&self) -> bool {
        self.in_flight.front().is_some_and(|f| f.task.is_finished())
    }

    /// An idle connection for the next batch, if one is left from earlier batches.
    pub fn take_idle(&mut self) -> Option<(TargetSession, i32)> {
        self.idle.pop()
    }

    /// Starts sending a batch's remaining statements on its own connection.
    pub fn hand_off(&mut self, batch: Batch, relations: Arc<Relations>) {
        let Batch {
            mut session,
            pid,
            keys,
            end_lsn,
            commit_time,
            txns,
            commit_sql,
        } = batch;
        // The newest batch in flight sharing a row with this one: it must commit
        // before this one sends a statement.
        let after = self
            .in_flight
            .iter()
            .rev()
            .find(|f| f.keys.meets(&keys))
            .map(|f| f.seq);
        let mut committed = self.committed.subscribe();
        let task = tokio::spawn(async move {
            if let Some(after) = after {
                // The sender lives as long as the lanes, which abort this task
                // when they go.
                let _ = committed.wait_for(|&c| c >= after).await;
            }
            let sent = session.flush(&relations).await;
            (session, sent)
        });
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back(InFlight {
            seq,
            keys,
            pid,
            end_lsn,
            commit_time,
            txns,
            commit_sql,
            task,
        });
    }

    /// Waits for the oldest batch to send everything, then commits it; its
    /// connection becomes idle. `None` when no batch is in flight.
    pub async fn commit_oldest(&mut self) -> Result<Option<Committed>> {
        let Some(front) = self.in_flight.front_mut() else {
            return Ok(None);
        };
        let (mut session, sent) = (&mut front.task)
            .await
            .map_err(|e| anyhow::anyhow!("an apply lane ended abnormally: {e}"))?;
        let Some(done) = self.in_flight.pop_front() else {
            return Ok(None);
        };
        sent?;
        let target_lsn = session.commit(&done.commit_sql).await?;
        let session_commit_took = session.last_commit_took();
        self.committed.send_replace(done.seq);
        self.idle.push((session, done.pid));
        Ok(Some(Committed {
            end_lsn: done.end_lsn,
            target_lsn,
            commit_time: done.commit_time,
            txns: done.txns,
            commit_took: session_commit_took,
        }))
    }

    /// Forgets cached statements of idle connections (a table's shape changed).
    pub fn forget_statements(&mut self) {
        for (session, _) in &mut self.idle {
            session.forget_statements();
        }
    }
}

impl Drop for Lanes {
    /// A session ending with batches in flight (an error) abandons them: their
    /// connections close with the tasks and the target rolls them back.
    fn drop(&mut self) {
        for f in &self.in_flight {
            f.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(values: &[u64]) -> ConflictKeys {
        ConflictKeys {
            all: false,
            keys: values.iter().copied().collect(),
        }
    }

    #[test]
    fn key_sets_meet_on_a_shared_key_and_all_meets_any_non_empty_set() {
        assert!(keys(&[1, 2]).meets(&keys(&[2, 3])));
        assert!(!keys(&[1, 2]).meets(&keys(&[3])));
        assert!(ConflictKeys::all().meets(&keys(&[9])));
        assert!(keys(&[9]).meets(&ConflictKeys::all()));
        // A batch that touched nothing waits for nothing and holds nothing up.
        assert!(!ConflictKeys::all().meets(&ConflictKeys::default()));
        let mut k = keys(&[1]);
        k.extend(ConflictKeys::all());
        assert!(k.meets(&keys(&[42])));
    }

    #[test]
    fn only_types_compared_byte_for_byte_name_rows() {
        assert!(bytewise_type(23) && bytewise_type(20) && bytewise_type(2950));
        // numeric (1.0 = 1.00), text (collations), float (-0 = 0), interval.
        for oid in [1700, 25, 701, 1186] {
            assert!(!bytewise_type(oid));
        }
    }
}
