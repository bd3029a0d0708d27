//! Tables joining the stream while it runs, and tables leaving it to be copied again:
//! the assemble stage's own state for them.
//!
//! A table's way through (its `pipeline_tables.state`):
//!
//! - **held** (`walshuttle tables add|resync`, online bootstrap): its copy runs
//!   outside the stream; the stream writes the table's changes to `held_changes`
//!   instead of applying them ([`TableJoins::held`]).
//! - **copied**: the copy is in, under a recorded snapshot; its held changes replay
//!   through that copy position, in slices between transactions
//!   ([`TableJoins::replaying`]); drained, the table is **ready** and streams with the
//!   others.
//! - **resync**: its rows changed on the source in a way the stream cannot carry (a
//!   column added with a volatile default): copied again between transactions
//!   ([`TableJoins::resync`]), and once more when its new shape arrives if the source
//!   had columns the target lacked ([`TableJoins::resync_on_shape`]).

use std::collections::HashSet;

use crate::pg::QualifiedName;

/// What the session knows of tables joining or re-joining the stream.
#[derive(Default)]
pub struct TableJoins {
    /// Tables being copied while the pipeline streams: their changes are held on the
    /// target until the copy is in.
    pub held: HashSet<QualifiedName>,
    /// Held changes not yet written, as `held_changes` rows.
    pub held_rows: Vec<String>,
    /// Held tables whose copy is in: their held changes are applied next.
    pub replaying: HashSet<QualifiedName>,
    /// Tables whose rows must be copied again before more of their changes are
    /// trusted (a column added with a volatile default rewrote them on the source).
    pub resync: Vec<QualifiedName>,
    /// Tables copied again while the source had columns the target had not yet:
    /// copied once more when their shape arrives.
    pub resync_on_shape: HashSet<QualifiedName>,
}

impl TableJoins {
    /// Starts from the tables recorded `held`/`copied`, and those left to copy again.
    pub fn new(
        held: HashSet<QualifiedName>,
        replaying: HashSet<QualifiedName>,
        resync: Vec<QualifiedName>,
    ) -> TableJoins {
        TableJoins {
            held,
            replaying,
            resync,
            ..TableJoins::default()
        }
    }

    /// Whether no table is joining (held or replaying).
    pub fn none_joining(&self) -> bool {
        self.held.is_empty() && self.replaying.is_empty()
    }
}
