//! What one `run` process remembers across its replication sessions (a session ends
//! at every reconnect): which streamed transactions must be applied whole at their
//! commit, the last shape the source described for each table, and whether values
//! must come as text.
//!
//! A reconnect makes the source send again every transaction not yet confirmed; these
//! facts decide how the re-sent ones are taken, so they outlive the session that
//! learnt them.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

/// A column of a table as the source last described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenColumn {
    /// Column name.
    pub name: String,
    /// Its attribute number on the source, when the source catalog agreed with the
    /// description when it arrived (a rename keeps it; a dropped column's is gone).
    pub attnum: Option<i16>,
}

/// Facts kept for the life of the `run` process.
#[derive(Debug, Default)]
pub struct StreamMemory {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Streamed transactions to keep on disk from their first change and apply at
    /// their commit on the main connection.
    whole: HashSet<u32>,
    /// Relation oid → its columns as the last Relation message described them.
    shapes: HashMap<u32, Vec<SeenColumn>>,
    /// Values must arrive as text (a column's type differs between the shape a
    /// transaction was written under and the target).
    text_only: bool,
    /// (relation oid, column) already warned about.
    warned: HashSet<(u32, String)>,
    /// Two apply lanes waited on each other: apply on one connection from now on.
    serial_apply: bool,
}

impl StreamMemory {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave these sets half-written in a way that
        // matters: keep using them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks streamed transaction `xid` to be applied whole at its commit.
    pub fn apply_whole(&self, xid: u32) {
        self.lock().whole.insert(xid);
    }

    /// Whether streamed transaction `xid` is to be applied whole at its commit.
    pub fn is_whole(&self, xid: u32) -> bool {
        self.lock().whole.contains(&xid)
    }

    /// Forgets `xid` (it committed or aborted).
    pub fn forget_whole(&self, xid: u32) {
        self.lock().whole.remove(&xid);
    }

    /// The columns last described for relation `oid`.
    pub fn shape(&self, oid: u32) -> Option<Vec<SeenColumn>> {
        self.lock().shapes.get(&oid).cloned()
    }

    /// Records the columns described for relation `oid`.
    pub fn remember_shape(&self, oid: u32, columns: Vec<SeenColumn>) {
        self.lock().shapes.insert(oid, columns);
    }

    /// From now on, committed transactions are applied on one connection (two
    /// lanes were seen waiting on each other, see `stream::lanes`).
    pub fn apply_serially(&self) {
        self.lock().serial_apply = true;
    }

    /// Whether committed transactions must be applied on one connection.
    pub fn serial_apply(&self) -> bool {
        self.lock().serial_apply
    }

    /// From now on, values arrive as text.
    pub fn require_text(&self) {
        self.lock().text_only = true;
    }

    /// Whether values must arrive as text.
    pub fn text_only(&self) -> bool {
        self.lock().text_only
    }

    /// True the first time it is asked about (`oid`, `column`): for warnings given
    /// once per process.
    pub fn first_warning(&self, oid: u32, column: &str) -> bool {
        self.lock().warned.insert((oid, column.to_string()))
    }
}
