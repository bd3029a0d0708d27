//! `run --max-retained-wal`: while the target is down the slot piles up WAL on the
//! source; at the budget walshuttle drops the slot on purpose (the source frees the
//! WAL) and, once the target is back, repairs the gap with catch-up and streams on.

mod support;

use std::time::Duration;

use support::{
    run, wait_for_convergence_running, wait_while_running, walshuttle, Cluster, RunLogs,
};
use tokio_postgres::Client;

async fn slot_exists(src: &Client) -> bool {
    src.query_one(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walshuttle'",
        &[],
    )
    .await
    .map(|r| r.get::<_, i64>(0) > 0)
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_released_at_its_wal_budget_and_the_gap_repaired() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL,
                         created_at timestamptz NOT NULL DEFAULT now(),
                         updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO t (id, v) SELECT g, 'v' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--max-retained-wal", "48MB"]);
    let mut child = logs.spawn(cmd);
    let tgt = target.client().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(60)).await;
    // status shows the budget once run streams.
    let status_budget = || {
        let mut cmd = walshuttle(&source, &target);
        cmd.args(["status", "--json"]);
        let (code, stdout, _) = run(cmd);
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
        (code == 0)
            .then(|| json["pipelines"][0]["wal_budget_bytes"].as_u64())
            .flatten()
    };
    wait_while_running(
        "status to show the WAL budget",
        Duration::from_secs(60),
        &mut child,
        || async { status_budget() == Some(48 << 20) },
    )
    .await;

    // The target goes away; the source keeps writing about 100 MB of WAL.
    drop(tgt);
    target.stop("fast");
    for i in 0..10i64 {
        src.batch_execute(&format!(
            "INSERT INTO t (id, v) SELECT g, repeat(md5(g::text), 30) FROM generate_series({lo}, {hi}) g",
            lo = 100_000 + i * 10_000,
            hi = 100_000 + i * 10_000 + 9_999
        ))
        .await
        .unwrap();
    }
    src.batch_execute(
        "UPDATE t SET v = 'changed while the target was down', updated_at = now() WHERE id <= 10",
    )
    .await
    .unwrap();
    wait_while_running(
        "the slot to be released at its budget",
        Duration::from_secs(120),
        &mut child,
        || async { !slot_exists(&src).await },
    )
    .await;
    let log = child.log();
    assert!(
        log.contains("WAL budget"),
        "no word of the budget:\n{}",
        support::tail(&log, 30)
    );

    // The target is back: catch-up repairs the gap, streaming goes on.
    target.restart_stopped();
    let tgt = target.client().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(180)).await;
    assert!(slot_exists(&src).await, "no new slot after the catch-up");
    src.batch_execute("UPDATE t SET v = 'after' WHERE id = 500")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(60)).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
}
