//! Apply with the source's semantics: rows are found by the source's replica
//! identity (not the target's primary key), keyless rows by identical values, set-based
//! statements only where PostgreSQL would accept them one row at a time, two apply
//! sessions never wait on each other, and an error that retrying cannot fix stops
//! `run` with where it happened instead of looping.

mod support;

use std::time::Duration;

use support::{
    assert_tables_equal, free_port, run, wait_for_convergence_running, wait_until, walshuttle,
    Cluster, ClusterOptions, RunChild, RunLogs,
};
use tokio_postgres::Client;

/// Starts a source and a target, creates `schema` on the source.
async fn clusters(schema: &str) -> (Cluster, Cluster, Client, Client) {
    clusters_with(ClusterOptions::default(), schema).await
}

async fn clusters_with(
    source_options: ClusterOptions,
    schema: &str,
) -> (Cluster, Cluster, Client, Client) {
    let source = Cluster::start_with(source_options);
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(schema).await.unwrap();
    (source, target, src, tgt)
}

fn spawn_run(logs: &mut RunLogs, source: &Cluster, target: &Cluster) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--jobs", "2"]);
    logs.spawn(cmd)
}

/// `walshuttle verify` exits 0: every table equal.
fn assert_verify_equal(source: &Cluster, target: &Cluster) {
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "verify: {stdout}{stderr}");
}

/// No `run` of the test retried after an error (every change was taken at once).
fn assert_no_retries(logs: &RunLogs) {
    let all = logs.all();
    assert!(
        !all.contains("retrying with backoff"),
        "run retried after an error:\n{all}"
    );
}

/// Stops `run` with SIGTERM and waits for it to exit 0.
async fn stop_run(child: &mut RunChild) {
    child.sigterm();
    let status = child
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("run to stop after SIGTERM");
    assert!(status.success(), "run stopped with {status}");
}

/// Waits until `run` has applied something (the pipeline is streaming).
async fn wait_streaming(child: &mut RunChild, target: &Cluster) {
    let tgt = target.client().await;
    support::wait_while_running(
        "run to start streaming",
        Duration::from_secs(60),
        child,
        || async {
            tgt.query_opt(
                "SELECT 1 FROM walshuttle.pipelines WHERE phase = 'streaming'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .is_some()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_found_by_an_identity_index_beside_the_primary_key() {
    let (source, target, src, tgt) = clusters(
        "CREATE TABLE ri (id int PRIMARY KEY, code text NOT NULL, v int,
                          CONSTRAINT ri_code_key UNIQUE (code));
         ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_code_key;
         INSERT INTO ri SELECT g, 'c' || g, g FROM generate_series(1, 60) g;",
    )
    .await;
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_for_convergence_running(&mut child, &src, &tgt, &["ri"], Duration::from_secs(60)).await;

    src.batch_execute(
        // The primary key changes, the identity does not: no old key is sent.
        "UPDATE ri SET id = id + 1000 WHERE code = 'c1';
         UPDATE ri SET v = -1 WHERE code = 'c2';
         -- The identity changes: the old key is sent.
         UPDATE ri SET code = 'z3', v = 33 WHERE code = 'c3';
         -- A delete names only the identity columns.
         DELETE FROM ri WHERE code = 'c4';
         -- A run of updates that set the primary key, in one transaction.
         UPDATE ri SET id = id + 2000, v = v + 1 WHERE id BETWEEN 10 AND 30;
         DELETE FROM ri WHERE code IN ('c40', 'c41');",
    )
    .await
    .unwrap();
    for i in 50..60 {
        src.execute(
            "UPDATE ri SET id = id + 5000, v = 0 WHERE code = $1",
            &[&format!("c{i}")],
        )
        .await
        .unwrap();
    }
    wait_for_convergence_running(&mut child, &src, &tgt, &["ri"], Duration::from_secs(60)).await;
    assert_verify_equal(&source, &target);
    assert_no_retries(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_swap_under_a_deferred_unique_key_is_applied_row_by_identical_row() {
    let (source, target, src, tgt) = clusters(
        "CREATE TABLE sw (k int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text NOT NULL);
         ALTER TABLE sw REPLICA IDENTITY FULL;
         INSERT INTO sw VALUES (1, 'one'), (2, 'two'), (3, 'three'), (4, 'four');
         CREATE TABLE sw2 (k int NOT NULL, v text NOT NULL,
                           CONSTRAINT sw2_k UNIQUE (k) DEFERRABLE INITIALLY IMMEDIATE);
         ALTER TABLE sw2 REPLICA IDENTITY FULL;
         INSERT INTO sw2 VALUES (1, 'one'), (2, 'two'), (3, 'three');",
    )
    .await;
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["sw", "sw2"],
        Duration::from_secs(60),
    )
    .await;

    // A rotation of keys, valid under the deferred check at commit.
    src.batch_execute(
        "BEGIN;
         UPDATE sw SET k = 2 WHERE v = 'one';
         UPDATE sw SET k = 3 WHERE v = 'two';
         UPDATE sw SET k = 1 WHERE v = 'three';
         COMMIT;
         BEGIN;
         SET CONSTRAINTS ALL DEFERRED;
         UPDATE sw2 SET k = 2 WHERE v = 'one';
         UPDATE sw2 SET k = 1 WHERE v = 'two';
         COMMIT;
         UPDATE sw SET v = 'FOUR' WHERE k = 4;
         DELETE FROM sw WHERE v = 'two';",
    )
    .await
    .unwrap();
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["sw", "sw2"],
        Duration::from_secs(60),
    )
    .await;
    assert_verify_equal(&source, &target);
    assert_no_retries(&logs);
}

const RENAME_SCHEMA: &str = "
    CREATE TABLE rn (id int PRIMARY KEY, name text NOT NULL UNIQUE, n int NOT NULL DEFAULT 0,
                     created_at timestamptz NOT NULL DEFAULT now(),
                     updated_at timestamptz NOT NULL DEFAULT now());
    INSERT INTO rn (id, name) SELECT g, 'name' || g FROM generate_series(1, 40) g;";

/// Swaps the names of rows (1, 2), (3, 4), … (19, 20) through a free value:
/// `a → x, b → a, x → b`, each statement legal on its own under the UNIQUE name.
/// Round 0 swaps them, round 1 swaps them back, and so on.
fn rename_statements(round: u32) -> Vec<String> {
    let mut out = Vec::new();
    for pair in 0..10 {
        let (a, b) = (2 * pair + 1, 2 * pair + 2);
        let (name_of_a, name_of_b) = if round % 2 == 0 { (a, b) } else { (b, a) };
        out.push(format!(
            "UPDATE rn SET name = 'free{round}_{pair}', updated_at = now() WHERE name = 'name{name_of_a}'"
        ));
        out.push(format!(
            "UPDATE rn SET name = 'name{name_of_a}', updated_at = now() WHERE name = 'name{name_of_b}'"
        ));
        out.push(format!(
            "UPDATE rn SET name = 'name{name_of_b}', updated_at = now() WHERE name = 'free{round}_{pair}'"
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_through_a_free_value_in_one_transaction_is_applied() {
    let (source, target, src, tgt) = clusters(RENAME_SCHEMA).await;
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_for_convergence_running(&mut child, &src, &tgt, &["rn"], Duration::from_secs(60)).await;

    let script = format!("BEGIN; {}; COMMIT;", rename_statements(0).join("; "));
    src.batch_execute(&script).await.unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["rn"], Duration::from_secs(60)).await;
    assert_verify_equal(&source, &target);
    assert_no_retries(&logs);
}

/// The body of `GET /metrics` on 127.0.0.1:`port`, `None` when nothing answers.
fn metrics(port: u16) -> Option<String> {
    support::http_get(port, "/metrics").map(|(_, body)| body)
}

/// A sample's value from Prometheus text: the first line starting with `series`
/// and containing `label`.
fn sample(body: &str, series: &str, label: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_in_separate_transactions_coalesced_after_a_restart_are_applied() {
    let (source, target, src, tgt) = clusters(RENAME_SCHEMA).await;
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_for_convergence_running(&mut child, &src, &tgt, &["rn"], Duration::from_secs(60)).await;
    stop_run(&mut child).await;

    // While nothing streams, each statement its own source transaction: the next
    // `run` finds them buffered and coalesces them into shared target transactions.
    for round in 0..20 {
        for stmt in rename_statements(round) {
            src.execute(stmt.as_str(), &[]).await.unwrap();
        }
    }
    let port = free_port();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")]);
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, &src, &tgt, &["rn"], Duration::from_secs(60)).await;
    // They were coalesced: some target transaction held more than ten.
    let body = metrics(port).expect("/metrics answers");
    let batches = sample(&body, "walshuttle_apply_batch_transactions_count", "").unwrap_or(0.0);
    let small = sample(
        &body,
        "walshuttle_apply_batch_transactions_bucket",
        "le=\"10\"",
    )
    .unwrap_or(0.0);
    assert!(
        batches > small,
        "no target transaction held more than ten source transactions:\n{body}"
    );
    // Applied as PostgreSQL takes them the first time, not by retrying until the
    // batches happen to fall apart small enough (below).
    assert_verify_equal(&source, &target);
    assert_no_retries(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_repaired_by_catch_up_after_the_slot_is_lost() {
    let (source, target, src, tgt) = clusters(RENAME_SCHEMA).await;
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_for_convergence_running(&mut child, &src, &tgt, &["rn"], Duration::from_secs(60)).await;
    stop_run(&mut child).await;
    src.batch_execute("SELECT pg_drop_replication_slot('walshuttle')")
        .await
        .unwrap();
    for round in 0..2 {
        for stmt in rename_statements(round) {
            src.execute(stmt.as_str(), &[]).await.unwrap();
        }
    }
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("catch-up");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "catch-up: {stdout}{stderr}");
    assert_tables_equal(&src, &tgt, &["rn"]).await;

    // Streaming goes on from the new slot, renames included.
    let mut child = spawn_run(&mut logs, &source, &target);
    let script = format!("BEGIN; {}; COMMIT;", rename_statements(2).join("; "));
    src.batch_execute(&script).await.unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["rn"], Duration::from_secs(60)).await;
    assert_verify_equal(&source, &target);
    assert_no_retries(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_rows_equal_but_not_identical_are_told_apart() {
    // Each table holds pairs of values that are equal (`=`) but not identical:
    // the source changes the second of each pair.
    let (source, target, src, tgt) = clusters(
        "CREATE TABLE kn (n numeric);
         CREATE TABLE kf (f float8);
         CREATE TABLE kj (j jsonb, t text);
         ALTER TABLE kn REPLICA IDENTITY FULL;
         ALTER TABLE kf REPLICA IDENTITY FULL;
         ALTER TABLE kj REPLICA IDENTITY FULL;
         INSERT INTO kn VALUES (1.0), (1.00), (1.0), (1.00);
         INSERT INTO kf VALUES ('0'), ('-0'), ('0'), ('-0');
         INSERT INTO kj VALUES ('{\"a\": 1.0}', 'x'), ('{\"a\": 1.00}', 'x'),
                               ('{\"a\": 1.0}', 'x'), ('{\"a\": 1.00}', 'x');",
    )
    .await;
    let tables = ["kn", "kf", "kj"];
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(60)).await;

    src.batch_execute(
        "UPDATE kn SET n = 7 WHERE ctid = (SELECT ctid FROM kn WHERE n::text = '1.00' LIMIT 1);
         DELETE FROM kn WHERE ctid = (SELECT ctid FROM kn WHERE n::text = '1.00' LIMIT 1);
         UPDATE kf SET f = 7 WHERE ctid = (SELECT ctid FROM kf WHERE f::text = '-0' LIMIT 1);
         DELETE FROM kf WHERE ctid = (SELECT ctid FROM kf WHERE f::text = '-0' LIMIT 1);
         UPDATE kj SET t = 'y' WHERE ctid = (SELECT ctid FROM kj WHERE j::text = '{\"a\": 1.00}' LIMIT 1);
         DELETE FROM kj WHERE ctid = (SELECT ctid FROM kj WHERE j::text = '{\"a\": 1.00}' LIMIT 1);",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(60)).await;
    assert_verify_equal(&source, &target);
    assert_no_retries(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_and_a_small_transaction_on_identical_keyless_rows_do_not_deadlock() {
    // Transactions past 64 kB of changes are streamed while still open, and applied
    // on a target session of their own.
    let options = ClusterOptions {
        extra_conf: vec!["logical_decoding_work_mem = '64kB'".into()],
        ..ClusterOptions::default()
    };
    let (source, target, src, tgt) = clusters_with(
        options,
        "CREATE TABLE dd (a int, b text);
         ALTER TABLE dd REPLICA IDENTITY FULL;
         INSERT INTO dd VALUES (1, 'same'), (1, 'same');
         CREATE TABLE bulk (id int PRIMARY KEY, pad text);",
    )
    .await;
    let tables = ["dd", "bulk"];
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(60)).await;

    // The large transaction changes one of the identical rows first, then writes
    // far more than 64 kB, and stays open.
    let large = source.client().await;
    large
        .batch_execute(
            "BEGIN;
             UPDATE dd SET b = 'large' WHERE ctid = (SELECT ctid FROM dd LIMIT 1);
             INSERT INTO bulk SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g;",
        )
        .await
        .unwrap();
    // Its change of `dd` is applied (and its row locked) by the streamed
    // transaction's own target session.
    wait_until(
        "the streamed transaction to hold a lock on dd on the target",
        Duration::from_secs(60),
        || async {
            tgt.query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE a.application_name = 'walshuttle apply stream' \
                   AND l.relation = 'public.dd'::regclass",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
        },
    )
    .await;
    // The small transaction changes the other identical row and commits first.
    src.batch_execute(
        "UPDATE dd SET b = 'small' WHERE ctid = (SELECT ctid FROM dd WHERE b = 'same' LIMIT 1 FOR UPDATE SKIP LOCKED)",
    )
    .await
    .unwrap();
    large.batch_execute("COMMIT").await.unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(60)).await;
    assert_verify_equal(&source, &target);
    assert_no_retries(&logs);
}

/// `walshuttle status --json`, parsed.
fn status_json(source: &Cluster, target: &Cluster) -> serde_json::Value {
    let mut cmd = walshuttle(source, target);
    cmd.args(["status", "--json"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "status: {stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status --json ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_target_refuses_stops_run_with_where_and_what_to_do() {
    let (source, target, src, tgt) = clusters(
        "CREATE TABLE ck (id int PRIMARY KEY, v int);
         INSERT INTO ck SELECT g, g FROM generate_series(1, 10) g;",
    )
    .await;
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_for_convergence_running(&mut child, &src, &tgt, &["ck"], Duration::from_secs(60)).await;
    wait_streaming(&mut child, &target).await;

    // A CHECK constraint the source does not have.
    tgt.batch_execute("ALTER TABLE ck ADD CONSTRAINT ck_v_nonnegative CHECK (v >= 0)")
        .await
        .unwrap();
    let before: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    src.batch_execute("INSERT INTO ck VALUES (100, -5)")
        .await
        .unwrap();

    let status = child
        .wait_exit(Duration::from_secs(60))
        .await
        .unwrap_or_else(|| {
            panic!(
                "run kept going (retrying?) instead of stopping; log:\n{}",
                support::tail(&child.log(), 40)
            )
        });
    assert!(!status.success(), "run exited 0 on a refused row");
    let log = child.log();
    let line = log
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{log}"));
    eprintln!("run stopped with: {line}");
    for needle in [
        "ck_v_nonnegative",
        "public.ck",
        "committed at",
        "walshuttle run",
    ] {
        assert!(line.contains(needle), "`{needle}` missing from: {line}");
    }
    // The commit LSN named is the insert's, after `before`.
    let lsn = line
        .split("committed at ")
        .nth(1)
        .and_then(|rest| rest.split([' ', ',', ';', ')']).next())
        .unwrap_or_else(|| panic!("no LSN in: {line}"));
    let later: bool = src
        .query_one(
            "SELECT $1::text::pg_lsn > $2::text::pg_lsn",
            &[&lsn, &before],
        )
        .await
        .unwrap()
        .get(0);
    assert!(later, "LSN {lsn} is not after {before}: {line}");
    assert!(
        !log.contains("retrying with backoff"),
        "the refused row was retried:\n{log}"
    );

    let report = status_json(&source, &target);
    let reason = report["pipelines"][0]["stop_reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no stop_reason in status: {report:#}"));
    assert!(reason.contains("ck_v_nonnegative"), "{reason}");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (code, text, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("ck_v_nonnegative"), "status text: {text}");

    // Fixed on the target: `run` goes on from that transaction.
    tgt.batch_execute("ALTER TABLE ck DROP CONSTRAINT ck_v_nonnegative")
        .await
        .unwrap();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_for_convergence_running(&mut child, &src, &tgt, &["ck"], Duration::from_secs(60)).await;
    wait_streaming(&mut child, &target).await;
    wait_until(
        "the stop reason to be cleared",
        Duration::from_secs(30),
        || async { status_json(&source, &target)["pipelines"][0]["stop_reason"].is_null() },
    )
    .await;
    assert_verify_equal(&source, &target);
    assert_no_retries(&logs);
}
