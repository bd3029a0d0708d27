//! The flush position walshuttle confirms to the source is never ahead of what the
//! target has on disk, also for the position it starts from after a restart.

mod support;

use std::time::Duration;

use support::{
    wait_for_convergence_running, wait_until, walshuttle, Cluster, ClusterOptions, RunLogs,
};
use tokio_postgres::Client;

async fn confirmed_at_least(src: &Client, lsn: &str) -> bool {
    src.query_opt(
        "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'walshuttle'",
        &[&lsn],
    )
    .await
    .ok()
    .flatten()
    .and_then(|r| r.get::<_, Option<bool>>(0))
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_flush_after_a_restart_waits_for_the_target_disk() {
    let source = Cluster::start();
    // Asynchronous commits reach the target's disk only every 10 s.
    let target = Cluster::start_with(ClusterOptions {
        extra_conf: vec!["wal_writer_delay = '10s'".into()],
        ..ClusterOptions::default()
    });
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut first = logs.spawn(cmd);
    let tgt = target.client().await;
    wait_for_convergence_running(&mut first, &src, &tgt, &["t"], Duration::from_secs(60)).await;

    // A transaction applied (committed, not yet flushed on the target), then the
    // process is killed before it could confirm it.
    src.batch_execute("INSERT INTO t SELECT g, 'late' FROM generate_series(101, 200) g")
        .await
        .unwrap();
    let end: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_until(
        "the transaction applied",
        Duration::from_secs(30),
        || async {
            tgt.query_one("SELECT count(*) FROM t", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 200)
                .unwrap_or(false)
        },
    )
    .await;
    first.kill9();

    // The next process starts from the progress row it reads, which is not on disk.
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut second = logs.spawn(cmd);
    wait_until(
        "the slot confirms the transaction",
        Duration::from_secs(60),
        || async { confirmed_at_least(&src, &end).await },
    )
    .await;
    // Only now may the target crash: what the source freed must have been on disk.
    drop(tgt);
    target.restart("immediate");
    let tgt = target.client().await;
    wait_for_convergence_running(&mut second, &src, &tgt, &["t"], Duration::from_secs(90)).await;
}
