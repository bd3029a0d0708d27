//! walshuttle never waits on itself (issue 20; PostgreSQL's subscription test
//! 015_stream, "deadlock among the leader and parallel apply workers"): with a unique
//! index that only the target has, a large streamed transaction holds a key on its
//! own target connection while a smaller transaction, committed first on the source,
//! writes the same key on the main connection. Applied in commit order the small one
//! must go first, and it waits for the large one's row lock. Before the fix two of
//! walshuttle's own sessions waited on each other forever, and nothing said so.

mod support;

use std::time::Duration;

use support::{run, wait_for_convergence_running, walshuttle, Cluster, ClusterOptions, RunLogs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_between_two_of_its_own_sessions_ends_in_a_clear_stop_not_a_stall() {
    let source = Cluster::start_with(ClusterOptions {
        // Every transaction over 64 kB is streamed before it commits.
        extra_conf: vec!["logical_decoding_work_mem = '64kB'".into()],
        ..ClusterOptions::default()
    });
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE \"Test Tab\" (id bigint PRIMARY KEY, a int, note text);
         CREATE TABLE other (id bigint PRIMARY KEY, v text);",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    let tgt = target.client().await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["\"Test Tab\"", "other"],
        Duration::from_secs(90),
    )
    .await;
    // A unique index the source does not have.
    tgt.batch_execute("CREATE UNIQUE INDEX only_on_target ON \"Test Tab\" (a)")
        .await
        .unwrap();

    // The large transaction writes a = 1..5000 and stays open: walshuttle applies
    // its streamed blocks on a connection of its own.
    let large = source.client().await;
    large
        .batch_execute(
            "BEGIN;
             INSERT INTO \"Test Tab\" SELECT g, g, repeat('x', 50) FROM generate_series(1, 5000) g;",
        )
        .await
        .unwrap();
    support::wait_until(
        "the streamed transaction's rows to be held on the target",
        Duration::from_secs(90),
        || async {
            tgt.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walshuttle apply stream' AND state = 'idle in transaction'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
        },
    )
    .await;
    // The small one commits first on the source and writes the same a.
    src.batch_execute("INSERT INTO \"Test Tab\" VALUES (100000, 1, 'small'); INSERT INTO other VALUES (1, 'after')")
        .await
        .unwrap();
    large.batch_execute("COMMIT").await.unwrap();

    // Serially, in commit order, the large transaction's a = 1 breaks the target's
    // index: walshuttle must say so and stop, not wait on itself.
    let Some(status) = child.wait_exit(Duration::from_secs(120)).await else {
        panic!(
            "run neither stopped nor applied the rows within 120 s (waiting on itself?); log:\n{}",
            support::tail(&child.log(), 40)
        );
    };
    let log = child.log();
    assert!(
        !status.success(),
        "run must stop with an error; log:\n{log}"
    );
    assert!(
        log.contains("only_on_target"),
        "the stop names the target's index; log:\n{}",
        support::tail(&log, 40)
    );
    assert!(
        log.contains("waits for walshuttle's own"),
        "the log says which of its sessions waited on which; log:\n{}",
        support::tail(&log, 40)
    );
    // Nothing of walshuttle's is left holding locks: the index can be dropped at
    // once, as PostgreSQL's test does to let the subscriber go on.
    tgt.batch_execute("SET lock_timeout = '10s'; DROP INDEX only_on_target")
        .await
        .unwrap();

    // With the index gone, run applies everything in commit order.
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["\"Test Tab\"", "other"],
        Duration::from_secs(120),
    )
    .await;
    child.sigterm();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
}
