//! The state schema's migrations, one block per version, each upgrading the one
//! before it in place inside one transaction.
//!
//! Version 1 is frozen exactly as the first release wrote it, so a target written by
//! that release upgrades through the same steps as a fresh one.

/// Version 1, as released: pipelines with a reconcile window, ctid chunks,
/// progress, watermarks. `{s}` is the quoted schema name.
pub const V1: &str = "
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.schema_version (version int NOT NULL, installed_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.pipelines (
    pipeline text PRIMARY KEY,
    publication text NOT NULL,
    phase text NOT NULL,
    consistent_lsn pg_lsn,
    snapshot_lsn pg_lsn,
    consistent boolean NOT NULL DEFAULT false,
    tables text[] NOT NULL DEFAULT '{}',
    oldest_xact_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.pipeline_tables (
    pipeline text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    position int NOT NULL,
    PRIMARY KEY (pipeline, schema_name, table_name));
CREATE TABLE IF NOT EXISTS {s}.chunks (
    pipeline text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    chunk_no int NOT NULL,
    start_block bigint NOT NULL,
    end_block bigint,
    rows_copied bigint,
    bytes_copied bigint,
    worker int,
    snapshot_lsn pg_lsn,
    started_at timestamptz,
    done_at timestamptz,
    PRIMARY KEY (pipeline, schema_name, table_name, chunk_no));
CREATE TABLE IF NOT EXISTS {s}.progress (
    pipeline text PRIMARY KEY,
    applied_lsn pg_lsn NOT NULL,
    commit_time timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.watermarks (
    pipeline text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    created_max timestamptz,
    updated_max timestamptz,
    PRIMARY KEY (pipeline, schema_name, table_name));
INSERT INTO {s}.schema_version (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM {s}.schema_version WHERE version >= 1);
";

/// Version 2: copy positions replace the reconcile window.
///
/// - `pipelines.consistent_lsn` becomes `stream_start_lsn` (where a new slot's stream
///   begins); `snapshot_lsn`, `consistent` and `oldest_xact_at` go. A pipeline that
///   version 1 left inside its reconcile window cannot be made exact from what it
///   recorded, so it is set to finish with a catch-up (which compares every row under
///   a new snapshot and records copy positions) before it streams again.
/// - `pipeline_tables` gains each table's state and its chunking column.
/// - `chunks` gain key ranges and the snapshot each was copied under.
/// - `snapshots`, `copy_positions` and `copy_position_keys` record, for every range
///   written outside the stream, the snapshot its rows reflect.
pub const V2: &str = "
ALTER TABLE {s}.pipelines RENAME COLUMN consistent_lsn TO stream_start_lsn;
ALTER TABLE {s}.pipelines ADD COLUMN positions_version bigint NOT NULL DEFAULT 0;
ALTER TABLE {s}.pipelines ADD COLUMN stop_reason text;
ALTER TABLE {s}.pipelines ADD COLUMN wal_budget_bytes bigint;
UPDATE {s}.pipelines SET phase = 'catching_up'
 WHERE NOT consistent AND phase IN ('copied', 'streaming');
ALTER TABLE {s}.pipelines DROP COLUMN snapshot_lsn, DROP COLUMN consistent, DROP COLUMN oldest_xact_at;
ALTER TABLE {s}.pipeline_tables ADD COLUMN state text NOT NULL DEFAULT 'ready';
ALTER TABLE {s}.pipeline_tables ADD COLUMN chunk_column text;
ALTER TABLE {s}.pipeline_tables ADD COLUMN source_filenode bigint;
UPDATE {s}.pipeline_tables t SET state = 'repairing' FROM {s}.pipelines p
 WHERE p.pipeline = t.pipeline AND p.phase = 'catching_up';
UPDATE {s}.pipeline_tables t SET state = 'copying' FROM {s}.pipelines p
 WHERE p.pipeline = t.pipeline AND p.phase IN ('creating_slot', 'bootstrapping');
ALTER TABLE {s}.chunks ALTER COLUMN start_block DROP NOT NULL;
ALTER TABLE {s}.chunks ADD COLUMN key_lo bigint, ADD COLUMN key_hi bigint, ADD COLUMN snapshot_id bigint;
CREATE TABLE {s}.snapshots (
    pipeline text NOT NULL,
    snapshot_id bigint GENERATED ALWAYS AS IDENTITY,
    snap_xmin bigint NOT NULL,
    snap_xmax bigint NOT NULL,
    snap_xip bigint[] NOT NULL,
    lsn pg_lsn NOT NULL,
    purpose text NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, snapshot_id));
CREATE TABLE {s}.copy_positions (
    pipeline text NOT NULL,
    position_id bigint GENERATED ALWAYS AS IDENTITY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    scope text NOT NULL CHECK (scope IN ('table', 'range', 'keys')),
    key_column text,
    key_lo bigint,
    key_hi bigint,
    snapshot_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, position_id));
CREATE TABLE {s}.copy_position_keys (
    pipeline text NOT NULL,
    position_id bigint NOT NULL,
    key text[] NOT NULL);
CREATE INDEX ON {s}.copy_position_keys (pipeline, position_id);
INSERT INTO {s}.schema_version (version) VALUES (2);
";

/// Version 3: the tables a pipeline was asked to carry, as given
/// (`pipelines.selection`): `--tables` as quoted names, an empty array for every
/// table (no `--tables`), NULL when bootstrapped before it was recorded. `status`
/// names the tables a bootstrap would carry now that the pipeline does not.
///
/// It also holds the changes of tables being copied while the pipeline streams
/// (`walshuttle tables add|resync`): `held_changes`, each change as pgoutput encodes
/// it, with its source transaction, applied once the copy is in.
pub const V3: &str = "
ALTER TABLE {s}.pipelines ADD COLUMN selection text[];
CREATE TABLE {s}.held_changes (
    pipeline text NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    commit_lsn pg_lsn NOT NULL,
    xid bigint NOT NULL,
    binary_values boolean NOT NULL,
    change bytea NOT NULL,
    PRIMARY KEY (pipeline, seq));
INSERT INTO {s}.schema_version (version) VALUES (3);
";

/// Version 4: whether a pipeline captures DDL on the source with an event trigger
/// (`pipelines.capture_ddl`, see `ddl_capture`): `run` then asks pgoutput for the
/// trigger's logical messages.
pub const V4: &str = "
ALTER TABLE {s}.pipelines ADD COLUMN capture_ddl boolean NOT NULL DEFAULT false;
INSERT INTO {s}.schema_version (version) VALUES (4);
";

/// Version 5: the phase of a `walshuttle switchover` of the pipeline, for `status`
/// while it runs and after it ends (`done`, or `aborted` with the reason in the
/// detail).
pub const V5: &str = "
ALTER TABLE {s}.pipelines ADD COLUMN switchover_phase text;
ALTER TABLE {s}.pipelines ADD COLUMN switchover_detail text;
ALTER TABLE {s}.pipelines ADD COLUMN switchover_at timestamptz;
INSERT INTO {s}.schema_version (version) VALUES (5);
";

/// Version 6: an index serving the replay of held changes (`held_changes` in commit
/// order, per table). Without it every replay slice scanned and sorted all the
/// pipeline's held changes to read 250 of them, so a copied table's backlog drained
/// slower than a 200 transactions/s writer added to it.
pub const V6: &str = "
CREATE INDEX IF NOT EXISTS held_changes_replay
    ON {s}.held_changes (pipeline, schema_name, table_name, commit_lsn, seq);
INSERT INTO {s}.schema_version (version) VALUES (6);
";

/// Version 7: why `run` is retrying, while it retries (a server down or
/// unreachable), for `status`: `retrying` is cleared once it streams again. The
/// pipeline's `--schemas`/`--exclude-schemas`/`--exclude-tables` (JSON), for
/// `status`.
pub const V7: &str = "
ALTER TABLE {s}.pipelines ADD COLUMN retrying text;
ALTER TABLE {s}.pipelines ADD COLUMN retrying_since timestamptz;
ALTER TABLE {s}.pipelines ADD COLUMN table_filter text;
INSERT INTO {s}.schema_version (version) VALUES (7);
";

/// Version 8: the pipeline's column lists and row filters (`--columns`,
/// `--row-filter`; JSON, see [`crate::row_selection`]): every copy and comparison
/// reads them, so an older walshuttle (which would compare whole tables) must
/// refuse this state.
pub const V8: &str = "
ALTER TABLE {s}.pipelines ADD COLUMN row_selection text;
INSERT INTO {s}.schema_version (version) VALUES (8);
";

/// Every version's block, in order: `MIGRATIONS[i]` takes version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7, V8];
