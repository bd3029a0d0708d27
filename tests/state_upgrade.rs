//! A state schema written by the first release (version 1) is upgraded in place by
//! this one: a streaming pipeline keeps streaming from its recorded position, and a
//! pipeline the first release left inside its reconcile window (not exact) is
//! repaired by comparing every row before it streams again.

mod support;

use std::time::Duration;

use support::{run, wait_for_convergence_running, walshuttle, Cluster, RunLogs};
use tokio_postgres::Client;

/// Sets up what a version-1 walshuttle leaves behind after a bootstrap: a slot and a
/// publication on the source, the rows copied as of the slot, and the version-1
/// state rows. Returns the slot's consistent point.
async fn version_one_pipeline(src: &Client, tgt: &Client, consistent: bool) -> String {
    src.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL);
         INSERT INTO items SELECT g, 'item ' || g, 0 FROM generate_series(1, 5000) g;
         CREATE PUBLICATION walshuttle FOR TABLE items;",
    )
    .await
    .unwrap();
    let lsn: String = src
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot('walshuttle', 'pgoutput')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tgt.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL);
         INSERT INTO items SELECT g, 'item ' || g, 0 FROM generate_series(1, 5000) g;",
    )
    .await
    .unwrap();
    tgt.batch_execute(&walshuttle::state::schema::V1.replace("{s}", "\"walshuttle\""))
        .await
        .unwrap();
    tgt.execute(
        "INSERT INTO walshuttle.pipelines (pipeline, publication, phase, consistent_lsn, snapshot_lsn, consistent, oldest_xact_at) \
         VALUES ('walshuttle', 'walshuttle', 'streaming', $1::text::pg_lsn, $1::text::pg_lsn, $2, now())",
        &[&lsn, &consistent],
    )
    .await
    .unwrap();
    tgt.batch_execute(&format!(
        "INSERT INTO walshuttle.pipeline_tables VALUES ('walshuttle', 'public', 'items', 0);
         INSERT INTO walshuttle.chunks (pipeline, schema_name, table_name, chunk_no, start_block, end_block, rows_copied, bytes_copied, worker, snapshot_lsn, started_at, done_at)
           VALUES ('walshuttle', 'public', 'items', 0, 0, NULL, 5000, 100000, 0, '{lsn}', now(), now());
         INSERT INTO walshuttle.progress (pipeline, applied_lsn, commit_time) VALUES ('walshuttle', '{lsn}', now());"
    ))
    .await
    .unwrap();
    lsn
}

async fn installed_version(tgt: &Client) -> i32 {
    tgt.query_one("SELECT max(version) FROM walshuttle.schema_version", &[])
        .await
        .unwrap()
        .get(0)
}

fn verify_ok(source: &Cluster, target: &Cluster) {
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_pipeline_of_version_one_streams_on_after_the_upgrade() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    version_one_pipeline(&src, &tgt, true).await;
    // Changes the stream has to deliver after the upgrade.
    src.batch_execute(
        "INSERT INTO items VALUES (9001, 'new', 1);
         UPDATE items SET qty = 5 WHERE id <= 10;
         DELETE FROM items WHERE id BETWEEN 100 AND 109;",
    )
    .await
    .unwrap();

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    assert_eq!(
        installed_version(&tgt).await,
        walshuttle::state::STATE_VERSION
    );
    let start: Option<String> = tgt
        .query_one(
            "SELECT stream_start_lsn::text FROM walshuttle.pipelines WHERE pipeline = 'walshuttle'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        start.is_some(),
        "the slot's position was lost in the upgrade"
    );
    // No recopy: the chunk the first release copied is still the only one, done once.
    let chunks: i64 = tgt
        .query_one("SELECT count(*) FROM walshuttle.chunks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(chunks, 1);
    src.batch_execute("UPDATE items SET name = 'after' WHERE id = 1")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_one_pipeline_inside_its_reconcile_window_is_repaired_first() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    version_one_pipeline(&src, &tgt, false).await;
    // What a reconcile window leaves: the target holds a row twice applied, one
    // missing, one stale.
    src.batch_execute(
        "UPDATE items SET qty = 7 WHERE id = 20; INSERT INTO items VALUES (9002, 'x', 2)",
    )
    .await
    .unwrap();
    tgt.batch_execute("UPDATE items SET qty = -1 WHERE id = 30; DELETE FROM items WHERE id = 31")
        .await
        .unwrap();

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    assert_eq!(
        installed_version(&tgt).await,
        walshuttle::state::STATE_VERSION
    );
    src.batch_execute("UPDATE items SET name = 'after' WHERE id = 20")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    verify_ok(&source, &target);
}
