//! `--capture-ddl`: DDL captured on the source by an event trigger and applied on the
//! target at its place in the log, under a running writer: a column dropped and
//! another renamed in a stream of inserts, with an index created; a drop inside a
//! large streamed transaction; columns added with volatile and stable defaults; a
//! table created and filled in one transaction; partitions created and attached
//! under a carried parent; a command outside the list stopping the pipeline; a
//! source role that may not create event triggers refused at preflight; teardown
//! removing the trigger. Each (but the stops) ends with `verify` exit 0.

mod support;

use std::time::Duration;

use support::workload::RowWriter;
use support::{
    run, scalar_i64, wait_for_convergence_running, wait_streaming, walshuttle, Cluster,
    ClusterOptions, RunChild, RunLogs,
};
use tokio_postgres::Client;

fn spawn_run(logs: &mut RunLogs, source: &Cluster, target: &Cluster) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--jobs", "1", "--capture-ddl"]);
    logs.spawn(cmd)
}

fn assert_verify_ok(source: &Cluster, target: &Cluster) {
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        code, 0,
        "verify did not find both sides equal:\n{stdout}{stderr}"
    );
}

/// The target's columns of `public.<table>`, in order.
async fn columns(client: &Client, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = ('public.' || $1)::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn converge(run: &mut RunChild, src: &Client, tgt: &Client, tables: &[&str]) {
    wait_for_convergence_running(run, src, tgt, tables, Duration::from_secs(90)).await;
}

async fn stop(mut child: RunChild) {
    child.sigterm();
    assert!(
        child.wait_exit(Duration::from_secs(30)).await.is_some(),
        "run did not stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_dropped_and_another_renamed_under_inserts_and_an_index_created() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, a text, b text, c int);
         INSERT INTO t SELECT g, 'a' || g, 'b' || g, g FROM generate_series(1, 200) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_streaming(&mut child, &src).await;
    let writer = RowWriter::start(
        source.client().await,
        "INSERT INTO t (id, c) VALUES ($1, 7)",
        1000,
    );
    writer.wait_for(20).await;
    src.batch_execute("ALTER TABLE t DROP COLUMN a")
        .await
        .unwrap();
    writer.wait_for(20).await;
    src.batch_execute("ALTER TABLE t RENAME COLUMN b TO bee; CREATE INDEX t_c_idx ON t (c)")
        .await
        .unwrap();
    writer.wait_for(20).await;
    writer.stop().await;
    converge(&mut child, &src, &tgt, &["t"]).await;
    assert_eq!(columns(&tgt, "t").await, ["id", "bee", "c"]);
    // The renamed column kept its values (a drop and an add would have emptied it).
    assert_eq!(
        scalar_i64(&tgt, "SELECT count(*) FROM t WHERE bee = 'b' || id").await,
        200
    );
    assert_eq!(
        scalar_i64(
            &tgt,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 't_c_idx'"
        )
        .await,
        1,
        "CREATE INDEX did not reach the target"
    );
    child.assert_running("after the changes");
    stop(child).await;
    assert_verify_ok(&source, &target);

    // teardown removes the trigger and its schema on the source.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["teardown", "--yes"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "teardown failed: {out}{err}");
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'walshuttle%'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_i64(
            &src,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'walshuttle_ddl'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_inside_a_large_streamed_transaction() {
    let source = Cluster::start_with(ClusterOptions {
        extra_conf: vec!["logical_decoding_work_mem = '64kB'".into()],
        ..Default::default()
    });
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE big (id bigint PRIMARY KEY, gone text, v text);
         CREATE TABLE small (id bigint PRIMARY KEY);",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_streaming(&mut child, &src).await;
    let writer = RowWriter::start(source.client().await, "INSERT INTO small VALUES ($1)", 1);
    src.batch_execute(
        "BEGIN;
         INSERT INTO big SELECT g, repeat('x', 200), 'v' || g FROM generate_series(1, 5000) g;
         ALTER TABLE big DROP COLUMN gone;
         INSERT INTO big SELECT g, 'w' || g FROM generate_series(5001, 10000) g;
         COMMIT;",
    )
    .await
    .unwrap();
    writer.wait_for(20).await;
    writer.stop().await;
    converge(&mut child, &src, &tgt, &["big", "small"]).await;
    assert_eq!(columns(&tgt, "big").await, ["id", "v"]);
    let streamed = scalar_i64(
        &src,
        "SELECT coalesce(max(stream_txns), 0) FROM pg_stat_replication_slots WHERE slot_name = 'walshuttle'",
    )
    .await;
    assert!(streamed > 0, "the transaction was not streamed in progress");
    stop(child).await;
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_with_volatile_and_stable_defaults() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE d (id bigint PRIMARY KEY, v int);
         INSERT INTO d SELECT g, g FROM generate_series(1, 300) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_streaming(&mut child, &src).await;
    let writer = RowWriter::start(
        source.client().await,
        "INSERT INTO d (id, v) VALUES ($1, 1)",
        1000,
    );
    writer.wait_for(10).await;
    // Stable: evaluated once at ADD COLUMN, kept in attmissingval; a later SET
    // DEFAULT must not leak into the old rows. Volatile: one value per row.
    src.batch_execute(
        "ALTER TABLE d ADD COLUMN born timestamptz DEFAULT now();
         ALTER TABLE d ALTER COLUMN born SET DEFAULT '2000-01-01 00:00:00+00';
         ALTER TABLE d ADD COLUMN tag uuid NOT NULL DEFAULT gen_random_uuid();",
    )
    .await
    .unwrap();
    writer.wait_for(20).await;
    writer.stop().await;
    converge(&mut child, &src, &tgt, &["d"]).await;
    assert_eq!(columns(&tgt, "d").await, ["id", "v", "born", "tag"]);
    assert_eq!(
        scalar_i64(
            &tgt,
            "SELECT count(*) FROM d WHERE born = '2000-01-01 00:00:00+00'"
        )
        .await,
        scalar_i64(
            &src,
            "SELECT count(*) FROM d WHERE born = '2000-01-01 00:00:00+00'"
        )
        .await,
    );
    child.assert_running("after the added columns");
    stop(child).await;
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_and_filled_in_one_transaction_and_new_partitions() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE base (id bigint PRIMARY KEY);
         CREATE TABLE m (id bigint, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
         CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (100);
         INSERT INTO m SELECT g, g % 100, 'v' FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_streaming(&mut child, &src).await;
    let writer = RowWriter::start(source.client().await, "INSERT INTO base VALUES ($1)", 1);
    src.batch_execute(
        "BEGIN;
         CREATE TABLE fresh (id int PRIMARY KEY, v text);
         INSERT INTO fresh SELECT g, 'f' || g FROM generate_series(1, 500) g;
         COMMIT;
         CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (100) TO (200);
         INSERT INTO m SELECT g, 100 + g % 100, 'w' FROM generate_series(1, 100) g;
         CREATE TABLE m3 (id bigint NOT NULL, k int NOT NULL, v text);
         INSERT INTO m3 SELECT g, 200 + g % 100, 'x' FROM generate_series(1, 50) g;
         ALTER TABLE m ATTACH PARTITION m3 FOR VALUES FROM (200) TO (300);
         INSERT INTO m SELECT g, 250, 'y' FROM generate_series(1000, 1020) g;",
    )
    .await
    .unwrap();
    writer.wait_for(20).await;
    writer.stop().await;
    converge(&mut child, &src, &tgt, &["base", "fresh", "m1", "m2", "m3"]).await;
    child.assert_running("after the new tables");
    assert_eq!(
        scalar_i64(
            &tgt,
            "SELECT count(*) FROM walshuttle.pipeline_tables WHERE table_name IN ('fresh', 'm2', 'm3') AND state = 'ready'"
        )
        .await,
        3,
        "the new tables did not join the pipeline"
    );
    stop(child).await;
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_outside_the_list_stops_the_pipeline() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE s (id bigint PRIMARY KEY, v int);
         INSERT INTO s SELECT g, g FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_streaming(&mut child, &src).await;
    src.batch_execute(
        "CREATE RULE s_keep AS ON DELETE TO s DO INSTEAD NOTHING; INSERT INTO s VALUES (11, 11)",
    )
    .await
    .unwrap();
    let status = child
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("run did not stop on a command it cannot apply");
    assert!(!status.success());
    let log = logs.all();
    assert!(
        log.contains("the source ran CREATE RULE on public.s")
            && log.contains("walshuttle tables remove"),
        "run did not say why it stopped and what to do:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_role_that_may_not_create_event_triggers_fails_preflight() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(&format!(
        "CREATE TABLE p (id bigint PRIMARY KEY);
         CREATE ROLE repl LOGIN REPLICATION PASSWORD '{pw}';
         ALTER TABLE p OWNER TO repl;
         GRANT CREATE ON DATABASE postgres TO repl;",
        pw = support::PASSWORD
    ))
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.env(
        "WALSHUTTLE_SOURCE",
        source.url().replacen("postgres:", "repl:", 1),
    )
    .args(["bootstrap", "--capture-ddl"]);
    let (code, out, err) = run(cmd);
    assert_ne!(code, 0, "bootstrap passed preflight without the privilege");
    let text = format!("{out}{err}");
    assert!(
        text.contains("--capture-ddl") && text.contains("superuser") && text.contains("repl"),
        "the refusal does not say what is missing:\n{text}"
    );
    assert_eq!(
        scalar_i64(&src, "SELECT count(*) FROM pg_replication_slots").await,
        0,
        "preflight wrote before refusing"
    );
}
