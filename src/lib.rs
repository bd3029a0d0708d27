//! walshuttle keeps a target PostgreSQL database an exact, continuously updated copy
//! of tables in a source database.
//!
//! The pieces, in the order data flows through them:
//!
//! - [`config`]: connection strings for both sides, and their redaction.
//! - [`pg`]: connections, the replication-protocol client, [`pg::Lsn`], quoting.
//! - [`catalog`]: table metadata from `pg_catalog`, compatibility checks, target DDL.
//! - [`state`]: the `walshuttle.*` schema on the target that makes every step resumable.
//! - [`bootstrap`]: preflight, slot + exported snapshot, chunk plan, parallel binary COPY.
//! - [`stream`]: pgoutput decoding and the exactly-once apply of changes.
//! - [`run`]: the sidecar loop: bootstrap if needed, stream, retry with backoff.
//! - [`compare`]: key-range hashing shared by verify and catch-up.
//! - [`verify`]: proves both sides equal, optionally repairs.
//! - [`catchup`]: gap repair from watermarks when the WAL is gone.
//! - [`cli`]: the command-line contract users script against.

pub mod bootstrap;
pub mod catalog;
pub mod catchup;
pub mod cli;
pub mod compare;
pub mod config;
pub mod pg;
pub mod run;
pub mod state;
pub mod stream;
pub mod verify;
