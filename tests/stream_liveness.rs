//! A long but valid step on the target (here: updates of a large keyless table, each
//! a scan) finishes, however long it takes, while the source still hears from
//! walshuttle within its `wal_sender_timeout`.

mod support;

use std::time::{Duration, Instant};

use support::{run, wait_for_convergence_running, walshuttle, Cluster, ClusterOptions, RunLogs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_longer_than_the_sources_timeout_finishes() {
    let source = Cluster::start_with(ClusterOptions {
        extra_conf: vec!["wal_sender_timeout = '5s'".into()],
        ..ClusterOptions::default()
    });
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE bag (a int, b text);
         ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO bag SELECT g, repeat('x', 40) FROM generate_series(1, 1000000) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    let tgt = target.client().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["bag"], Duration::from_secs(120)).await;

    // One transaction of updates to rows near the end of the heap: on the target
    // each is a scan of the whole keyless table.
    let started = Instant::now();
    src.batch_execute("UPDATE bag SET b = 'changed' WHERE a % 333 = 0")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["bag"], Duration::from_secs(300)).await;
    eprintln!(
        "applied {:.1}s after the source committed",
        started.elapsed().as_secs_f64()
    );
    let log = child.log();
    assert!(
        !log.contains("retrying"),
        "the long step was cut short and retried:\n{}",
        support::tail(&log, 30)
    );
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
}
