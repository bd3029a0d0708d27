//! walshuttle keeps a target PostgreSQL database an exact, continuously updated copy
//! of tables in a source database.
//!
//! The pieces, in the order data flows through them:
//!
//! - [`config`]: connection strings for both sides, and their redaction.
//! - [`pg`]: connections, the replication-protocol client, [`pg::Lsn`], quoting.
//! - [`catalog`]: table metadata from `pg_catalog`, compatibility checks, target DDL.
//! - [`state`]: the `walshuttle.*` schema on the target that makes every step resumable.
//! - [`snapshot`]: source snapshots that copies read under, and the locks that keep them valid.
//! - [`slot`]: a replication slot's facts on the source, and whether it can be streamed from.
//! - [`positions`]: which source transactions a range of target rows already reflects.
//! - [`bootstrap`]: preflight, slot + exported snapshot, chunk plan, parallel binary COPY.
//! - [`stream`]: pgoutput decoding and the exactly-once apply of changes.
//! - [`run`]: the sidecar loop: bootstrap if needed, stream, retry with backoff.
//! - [`partitions`]: partitions created or attached under a carried parent join by themselves.
//! - [`compare`]: key-range hashing shared by verify and catch-up.
//! - [`rewrite`]: the one range copier behind bootstrap chunks, catch-up, repair and resync.
//! - [`verify`]: proves both sides equal, optionally repairs.
//! - [`catchup`]: gap repair from watermarks when the WAL is gone.
//! - [`observe`]: metrics, `/metrics` and `/healthz` for `run --metrics-addr`.
//! - [`status`]: where every pipeline stands (`walshuttle status`).
//! - [`switchover`]: the verified move to the target, with a way back (`walshuttle switchover`).
//! - [`teardown`]: retiring a pipeline (`walshuttle teardown`).
//! - [`wal_budget`]: the slot's retained WAL against `--max-retained-wal`.
//! - [`publication`]: each pipeline's own publication, never another's.
//! - [`target_checks`]: foreign keys and triggers on existing target tables.
//! - [`own_rows`]: `ONLY t`, or `t` where it is partitioned (the target's choice).
//! - [`sequences`]: target sequences kept at or past the source's (`run --sync-sequences`).
//! - [`selection`]: `--schemas`, `--exclude-schemas`, `--exclude-tables` patterns.
//! - [`settings`]: the `--config` file and its precedence under env and flags.
//! - [`cli`]: the command-line contract users script against.
//! - [`exit`]: exit codes a supervisor can act on (75: try again later).

pub mod apply_waits;
pub mod bootstrap;
pub mod catalog;
pub mod catchup;
pub mod cli;
pub mod compare;
pub mod config;
pub mod copier;
pub mod ddl_capture;
pub mod demo;
pub mod exit;
pub mod localpg;
pub mod observe;
pub mod own_rows;
pub mod partitions;
pub mod pg;
pub mod positions;
pub mod publication;
pub mod range_copy;
pub mod rewrite;
pub mod row_selection;
pub mod run;
pub mod selection;
pub mod sequences;
pub mod settings;
pub mod slot;
pub mod snapshot;
pub mod state;
pub mod status;
pub mod stream;
pub mod switchover;
pub mod tables;
pub mod target_checks;
pub mod teardown;
pub mod verify;
pub mod wal_budget;
