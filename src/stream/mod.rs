//! Streaming: pgoutput decoding, the replication session, and the exactly-once
//! apply of changes to the target.
//!
//! - [`decoder`]: pure pgoutput decoding, bytes in, messages out.
//! - [`relations`]: Relation messages matched against the target; schema drift.
//! - [`drift`]: which columns a Relation message shows renamed, dropped or added.
//! - [`added_columns`]: what existing rows hold in a column added on the source.
//! - [`memory`]: what a `run` process keeps across its replication sessions.
//! - [`constraints`]: the target's unique constraints, which decide set-based updates.
//! - [`values`]: raw values framed as parameters and COPY data, never re-parsed.
//! - [`apply`]: batching changes into target transactions.
//! - [`lanes`]: batches finishing on connections of their own, committed in source order.
//! - [`copy_positions`]: which changes the ranges copied outside the stream already hold.
//! - [`restart_point`]: a clean stop leaves the slot's restart point past what was applied.
//! - [`io`]: the replication connection's own task: read-ahead, keepalives, timeouts.
//! - [`session`]: one replication session, transaction boundaries and feedback.
//! - [`spool`]: streamed transactions past the connection cap, on disk until they commit.
//! - [`held`]: changes of a table being copied while the pipeline streams, held until the copy is in.
//! - [`faults`]: which errors are retried and which stop `run`, and the stop message.

pub mod added_columns;
pub mod apply;
pub mod batch_age;
pub mod constraints;
pub mod copy_positions;
pub mod decoder;
pub mod drift;
pub mod durability;
pub mod faults;
pub mod held;
pub mod io;
pub mod joining;
pub mod lanes;
pub mod memory;
pub mod refetch;
pub mod relations;
pub mod restart_point;
pub mod session;
pub mod spool;
pub mod values;
