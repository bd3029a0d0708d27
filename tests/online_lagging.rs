//! Online copies that finish while the stream is still far behind their snapshots.
//!
//! After `bootstrap --online`, a writer builds a backlog before `run` starts, so the
//! stream drains old transactions while `run` copies many small tables, each under a
//! snapshot newer than what the stream has reached. Every table joins the stream
//! after its copy with the stream still behind that copy's snapshot: the changes
//! the snapshot already saw (each writer transaction deletes a row and inserts a new
//! one with the deleted row's UNIQUE code) must be skipped, however the session's
//! reads of the tables' states and of the copy positions interleave with the copies'
//! commits. One missed position is a duplicate key and a stopped `run`.

mod support;

use std::time::Duration;

use support::workload::Writer;
use support::{run, wait_for_convergence_running, wait_while_running, walshuttle, RunLogs};

const TABLES: usize = 16;

fn names() -> Vec<String> {
    (0..TABLES).map(|i| format!("t{i}")).collect()
}

/// Each transaction moves one row of four tables: the lowest id is deleted and a
/// new id takes its code.
fn write_sql(i: u64) -> String {
    let mut sql = String::from("BEGIN;");
    for k in 0..4u64 {
        let t = (i * 4 + k) % TABLES as u64;
        sql.push_str(&format!(
            "WITH d AS (DELETE FROM t{t} WHERE id = (SELECT min(id) FROM t{t}) RETURNING code)
               INSERT INTO t{t} (id, code, v) SELECT 100000 + {i}, code, {i} FROM d;
             UPDATE t{t} SET v = v + 1 WHERE id = (SELECT max(id) FROM t{t});"
        ));
    }
    sql.push_str("COMMIT;");
    sql
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_joining_a_lagging_stream_skip_what_their_copies_saw() {
    let source = support::Cluster::start();
    let target = support::Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    let mut schema = String::new();
    for t in names() {
        schema.push_str(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, code text NOT NULL UNIQUE, v int NOT NULL);
             INSERT INTO {t} SELECT g, 'c' || g, 0 FROM generate_series(1, 400) g;"
        ));
    }
    src.batch_execute(&schema).await.expect("source schema");
    let writer = Writer::spawn(source.url(), Duration::from_millis(3), write_sql);

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--online"]);
    let (code, out, err) = tokio::task::spawn_blocking(move || run(cmd))
        .await
        .expect("bootstrap");
    assert_eq!(code, 0, "bootstrap --online:\n{out}\n{err}");

    // A backlog: the stream starts well behind the snapshots the copies will take.
    let before = writer.committed();
    support::wait_until(
        "a backlog of writes before run starts",
        Duration::from_secs(60),
        || async { writer.committed() >= before + 400 },
    )
    .await;

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "2", "--status-interval", "0.2"]);
    let mut child = logs.spawn(cmd);
    wait_while_running(
        "every table ready",
        Duration::from_secs(120),
        &mut child,
        || async {
            let ready: i64 = tgt
                .query_one(
                    "SELECT count(*) FROM walshuttle.pipeline_tables WHERE state = 'ready'",
                    &[],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            ready == TABLES as i64
        },
    )
    .await;
    writer
        .wait_for_more(&mut child, 30, Duration::from_secs(30), "after the copies")
        .await;
    let (committed, _) = writer.stop().await;
    assert!(committed > 400, "the writer committed only {committed}");
    let tables = names();
    let refs: Vec<&str> = tables.iter().map(String::as_str).collect();
    wait_for_convergence_running(&mut child, &src, &tgt, &refs, Duration::from_secs(60)).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = tokio::task::spawn_blocking(move || run(cmd))
        .await
        .expect("verify");
    assert_eq!(code, 0, "verify:\n{out}\n{err}");
}
