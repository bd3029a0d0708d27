//! Connection strings with several hosts and `target_session_attrs=read-write`, as
//! libpq has them, on every kind of connection (including replication): walshuttle
//! passes over a read-only server and uses the writable one.

mod support;

use std::time::Duration;

use support::{run, wait_for_convergence_running, walshuttle_urls, Cluster, RunLogs, PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_first_host_is_passed_over() {
    let source = Cluster::start();
    let target = Cluster::start();
    // A server listed first that only takes reads (as a standby would).
    let decoy = Cluster::start();
    let d = decoy.client().await;
    d.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    d.batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    d.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .unwrap();
    let source_url = format!(
        "postgresql://postgres:{PASSWORD}@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        decoy.port, source.port
    );
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle_urls(&source_url, &target.url());
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    let tgt = target.client().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(60)).await;
    src.batch_execute("UPDATE t SET v = 'streamed' WHERE id <= 10; DELETE FROM t WHERE id = 500")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(60)).await;
    let slots: i64 = d
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a slot was created on the read-only server");
    let mut cmd = walshuttle_urls(&source_url, &target.url());
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stderr.contains(PASSWORD) && !stdout.contains(PASSWORD));
}
