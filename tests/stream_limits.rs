//! Streamed (large, in-progress) transactions are bounded: at most
//! `--max-stream-connections` of them hold a target connection at once; the rest
//! wait on local disk until they commit, so many concurrent large transactions
//! cannot exhaust the target's `max_connections`.

mod support;

use std::time::Duration;

use support::{run, wait_for_convergence_running, walshuttle, Cluster, ClusterOptions, RunLogs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_large_transactions_fit_twenty_target_connections() {
    // Every transaction over 64 kB is streamed before it commits.
    let source = Cluster::start_with(ClusterOptions {
        extra_conf: vec![
            "logical_decoding_work_mem = '64kB'".into(),
            "max_connections = 60".into(),
        ],
        ..ClusterOptions::default()
    });
    let target = Cluster::start_with(ClusterOptions {
        extra_conf: vec!["max_connections = 20".into()],
        ..ClusterOptions::default()
    });
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, writer int NOT NULL, payload text NOT NULL);
         CREATE TABLE keyless (writer int, payload text);
         ALTER TABLE keyless REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--max-stream-connections", "3"]);
    let mut child = logs.spawn(cmd);
    let tgt = target.client().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(60)).await;

    // Thirty transactions, all open at once, each writing about 200 kB, with a
    // rolled-back subtransaction in the middle; then they commit one by one.
    let mut writers = Vec::new();
    for w in 0..30i64 {
        let c = source.client().await;
        c.batch_execute(&format!(
            "BEGIN;
             INSERT INTO t SELECT {w} * 100000 + g, {w}, repeat(md5(g::text), 4) FROM generate_series(1, 1000) g;
             SAVEPOINT s;
             INSERT INTO t SELECT {w} * 100000 + 50000 + g, {w}, 'rolled back' FROM generate_series(1, 500) g;
             ROLLBACK TO SAVEPOINT s;
             INSERT INTO keyless SELECT {w}, repeat('k', 100) FROM generate_series(1, 300) g;
             UPDATE t SET payload = 'updated' WHERE id = {w} * 100000 + 1;"
        ))
        .await
        .unwrap();
        writers.push(c);
    }
    for (w, c) in writers.iter().enumerate() {
        if w % 7 == 3 {
            c.batch_execute("ROLLBACK").await.unwrap();
        } else {
            c.batch_execute("COMMIT").await.unwrap();
        }
    }
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["t", "keyless"],
        Duration::from_secs(180),
    )
    .await;
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// A streamed transaction that must spill to disk with no usable TMPDIR stops
/// `run` with the reason (a local error a person must fix, exit 1), instead of
/// being retried forever while `status` says `streaming`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_without_a_usable_tmpdir_stops_run_with_the_reason() {
    let source = Cluster::start_with(ClusterOptions {
        extra_conf: vec!["logical_decoding_work_mem = '64kB'".into()],
        ..ClusterOptions::default()
    });
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, payload text NOT NULL)")
        .await
        .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.env("TMPDIR", "/nonexistent/walshuttle-tmp")
        .args(["run", "--max-stream-connections", "1"]);
    let mut child = logs.spawn(cmd);
    let tgt = target.client().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(60)).await;

    // Two large transactions open at once: the second one must be spooled.
    let mut writers = Vec::new();
    for w in 0..2i64 {
        let c = source.client().await;
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO t SELECT {w} * 100000 + g, repeat(md5(g::text), 4) FROM generate_series(1, 2000) g;"
        ))
        .await
        .unwrap();
        writers.push(c);
    }
    for c in &writers {
        c.batch_execute("COMMIT").await.unwrap();
    }
    let status = child.wait_exit(Duration::from_secs(90)).await;
    let log = child.log();
    let last = log.lines().last().unwrap_or_default().to_string();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "run should stop with exit 1; log:\n{}",
        support::tail(&log, 30)
    );
    assert!(last.starts_with("error: "), "{last}");
    assert!(last.contains("TMPDIR"), "{last}");
    assert!(last.contains("/nonexistent/walshuttle-tmp"), "{last}");
}
