//! `--online` bootstrap: the slot is created without a snapshot, every table starts
//! `held`, and `run` copies each under a short snapshot of its own while it streams.
//! Under a writer that inserts, updates and deletes in every table (one with a
//! secondary UNIQUE reused within a transaction, one keyless with REPLICA IDENTITY
//! FULL) from before the bootstrap to the end: every change lands exactly once, the
//! slot's confirmed position moves while the big table is still being copied, and a
//! `run` killed mid-copy copies the table again on restart.

mod support;

use std::time::Duration;

use support::workload::Writer;
use support::{
    free_port, http_get, run, wait_for_convergence_running, wait_while_running, walshuttle,
    Cluster, RunLogs,
};
use tokio_postgres::Client;

const BIG_ROWS: i64 = 300_000;

const SCHEMA: &str = "
    CREATE TABLE big (id bigserial PRIMARY KEY, v int NOT NULL, pad text);
    INSERT INTO big (v, pad) SELECT 0, repeat('x', 200) FROM generate_series(1, 300000);
    CREATE TABLE uq (id int PRIMARY KEY, code text NOT NULL UNIQUE, v int NOT NULL);
    INSERT INTO uq SELECT g, 'c' || g, 0 FROM generate_series(1, 120000) g;
    CREATE TABLE kl (k int NOT NULL, v text NOT NULL);
    ALTER TABLE kl REPLICA IDENTITY FULL;
    INSERT INTO kl SELECT g % 50, 'v' || g FROM generate_series(1, 5000) g;
    CREATE TABLE small (id bigserial PRIMARY KEY, i bigint NOT NULL);
    CREATE TABLE pairs (a int NOT NULL, b int NOT NULL, v int NOT NULL, PRIMARY KEY (a, b));
    INSERT INTO pairs SELECT g / 100, g % 100, 0 FROM generate_series(0, 119999) g;
";

const TABLES: &[&str] = &["big", "uq", "kl", "small", "pairs"];

/// One writer transaction touching every table: the new `uq` row takes the code of
/// the row deleted just before it (applied out of order, the UNIQUE would fail).
fn write_sql(i: u64) -> String {
    format!(
        "BEGIN;
         INSERT INTO big (v, pad) VALUES ({i}, 'w');
         UPDATE big SET v = v + 1 WHERE id = {};
         DELETE FROM big WHERE id = {};
         WITH d AS (DELETE FROM uq WHERE id = (SELECT min(id) FROM uq) RETURNING code)
           INSERT INTO uq (id, code, v) SELECT 1000000 + {i}, code, {i} FROM d;
         UPDATE uq SET v = v + 1 WHERE id = (SELECT max(id) FROM uq);
         INSERT INTO kl VALUES ({}, 'n{i}');
         UPDATE kl SET v = v || '+' WHERE ctid = (SELECT ctid FROM kl WHERE k = {} LIMIT 1);
         DELETE FROM kl WHERE ctid = (SELECT ctid FROM kl WHERE k = {} LIMIT 1);
         INSERT INTO small (i) VALUES ({i});
         INSERT INTO pairs VALUES (5000 + {i}, {i} % 100, {i});
         UPDATE pairs SET v = v + 1 WHERE a = ({i} * 37) % 1200 AND b = {i} % 100;
         DELETE FROM pairs WHERE a = ({i} * 53 + 7) % 1200 AND b = ({i} + 3) % 100;
         UPDATE pairs SET a = a + 2000 WHERE a = ({i} * 71 + 11) % 1200 AND b = ({i} + 5) % 100;
         COMMIT;",
        1 + (i * 7919) % BIG_ROWS as u64,
        1 + (i * 104_729 + 13) % BIG_ROWS as u64,
        i % 50,
        (i + 7) % 50,
        (i + 25) % 50,
    )
}

async fn one<T: for<'a> tokio_postgres::types::FromSql<'a>>(client: &Client, sql: &str) -> T {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The state of a table in the pipeline, `None` before the bootstrap recorded it.
async fn table_state(tgt: &Client, table: &str) -> Option<String> {
    tgt.query_opt(
        "SELECT state FROM walshuttle.pipeline_tables WHERE pipeline = 'walshuttle' AND table_name = $1",
        &[&table],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get(0))
}

/// Whether a session other than the writer reads `big` on the source: the copy's
/// snapshot holds ACCESS SHARE on it for as long as the copy runs (the writer only
/// takes ROW EXCLUSIVE).
async fn big_being_read(src: &Client) -> bool {
    one::<i64>(
        src,
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
         WHERE c.relname = 'big' AND l.mode = 'AccessShareLock' AND l.granted AND l.pid <> pg_backend_pid()",
    )
    .await
        > 0
}

async fn setup() -> (Cluster, Cluster, Client, Client) {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(SCHEMA).await.expect("source schema");
    let tgt = target.client().await;
    (source, target, src, tgt)
}

fn run_cmd(source: &Cluster, target: &Cluster, online: bool) -> std::process::Command {
    run_cmd_serving(source, target, online, free_port())
}

/// `run_cmd`, serving `/metrics` and `/healthz` on `port`.
fn run_cmd_serving(
    source: &Cluster,
    target: &Cluster,
    online: bool,
    port: u16,
) -> std::process::Command {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--jobs", "2", "--status-interval", "0.2"]);
    cmd.args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
    if online {
        cmd.arg("--online");
    }
    cmd
}

/// Stops the writer, waits until the target equals the source, and checks that
/// `verify` agrees.
async fn finish(
    writer: Writer,
    child: &mut support::RunChild,
    source: &Cluster,
    target: &Cluster,
    src: &Client,
    tgt: &Client,
) {
    let (committed, _) = writer.stop().await;
    assert!(
        committed > 50,
        "the writer committed only {committed} transactions"
    );
    wait_for_convergence_running(child, src, tgt, TABLES, Duration::from_secs(60)).await;
    // The rows can be equal a moment before the last copied table, its held changes
    // applied, is marked ready.
    wait_all_ready(child, tgt, "every table ready at the end", 60).await;
    for t in TABLES {
        assert_eq!(table_state(tgt, t).await.as_deref(), Some("ready"), "{t}");
    }
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify");
    let (code, out, err) = tokio::task::spawn_blocking(move || run(cmd))
        .await
        .expect("verify");
    assert_eq!(code, 0, "verify after the online bootstrap:\n{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_online_copies_while_streaming_and_the_slot_moves() {
    let (source, target, src, tgt) = setup().await;
    // `big` exists (empty) on the target, and a session holds it in SHARE mode: the
    // copy takes its snapshot, then waits to replace the rows, for as long as the
    // test needs to watch the slot during a copy.
    tgt.batch_execute("CREATE TABLE big (id bigserial PRIMARY KEY, v int NOT NULL, pad text)")
        .await
        .expect("target big");
    let blocker = target.client().await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE big IN SHARE MODE")
        .await
        .expect("lock target big");
    let writer = Writer::spawn(source.url(), Duration::from_millis(10), write_sql);
    let mut logs = RunLogs::new();
    let port = free_port();
    let mut child = logs.spawn(run_cmd_serving(&source, &target, true, port));

    // The big table's copy is under way: its snapshot reads it on the source.
    wait_while_running(
        "the copy of big to start",
        Duration::from_secs(60),
        &mut child,
        || big_being_read(&src),
    )
    .await;
    let started: String = one(&src, "SELECT pg_current_wal_lsn()::text").await;
    assert_eq!(table_state(&tgt, "big").await.as_deref(), Some("held"));

    let mut status = walshuttle(&source, &target);
    status.args(["status", "--json"]);
    let (code, out, err) = tokio::task::spawn_blocking(move || run(status))
        .await
        .expect("status");
    assert_eq!(code, 0, "status:\n{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("status json");
    let p = &report["pipelines"][0];
    assert_eq!(p["consistent"], false, "{p:#}");
    assert!(
        p["copy_progress"]
            .as_str()
            .is_some_and(|c| c.ends_with("of 5 tables copied")),
        "{p:#}"
    );
    // /healthz and /metrics say how many tables have not joined the stream yet.
    wait_while_running(
        "/healthz to count the tables still copying",
        Duration::from_secs(30),
        &mut child,
        || async {
            let body = tokio::task::spawn_blocking(move || http_get(port, "/healthz"))
                .await
                .ok()
                .flatten()
                .map(|(_, b)| b)
                .unwrap_or_default();
            serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["tables_copying"].as_u64())
                .is_some_and(|n| n >= 1)
        },
    )
    .await;
    let (_, metrics) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .expect("metrics")
        .expect("/metrics answers");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("walshuttle_tables_copying") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // The slot keeps confirming while the big table is copied: the source keeps no
    // WAL for the length of the copy.
    let moved_before_ready = std::cell::Cell::new(false);
    wait_while_running(
        "the slot to confirm past a position taken during the copy",
        Duration::from_secs(60),
        &mut child,
        || async {
            let past: bool = one(
                &src,
                &format!(
                    "SELECT confirmed_flush_lsn > '{started}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'walshuttle'"
                ),
            )
            .await;
            if past {
                moved_before_ready.set(table_state(&tgt, "big").await.as_deref() != Some("ready"));
            }
            past
        },
    )
    .await;
    assert!(
        moved_before_ready.get(),
        "the slot's confirmed position moved only once the big table was ready"
    );
    assert!(big_being_read(&src).await, "the copy of big ended early");
    blocker
        .batch_execute("COMMIT")
        .await
        .expect("unlock target big");

    wait_all_ready(&mut child, &tgt, "every table ready", 90).await;
    writer
        .wait_for_more(&mut child, 30, Duration::from_secs(30), "after the copy")
        .await;
    let (_, health) = tokio::task::spawn_blocking(move || http_get(port, "/healthz"))
        .await
        .expect("healthz")
        .expect("/healthz answers");
    assert!(health.contains("\"tables_copying\":0"), "{health}");
    finish(writer, &mut child, &source, &target, &src, &tgt).await;
    assert!(
        child.log().contains("copied online"),
        "run did the copies:\n{}",
        support::tail(&child.log(), 40)
    );
    // 300,000 rows: copied in key ranges, each under a snapshot of its own, and the
    // changes held meanwhile replayed range by range (the tables end equal above).
    assert!(
        child.log().contains("copying by key ranges") && child.log().contains("ranges=3"),
        "big was not copied by key ranges:\n{}",
        support::tail(&child.log(), 40)
    );
    // A composite key is cut on its first column.
    assert!(
        child.log().contains("table=public.pairs ranges=2"),
        "pairs was not copied by key ranges:\n{}",
        support::tail(&child.log(), 40)
    );
}

/// Starts an online `run` under `writer`'s load, kills it (-9) while the copy of
/// `big` is under way, and waits until nothing of it is left on the source: `big`
/// is still `held`, its copy rolled back.
async fn kill_run_mid_copy(
    logs: &mut RunLogs,
    source: &Cluster,
    target: &Cluster,
    src: &Client,
    tgt: &Client,
) {
    let mut child = logs.spawn(run_cmd(source, target, true));
    wait_while_running(
        "the copy of big to start",
        Duration::from_secs(60),
        &mut child,
        || big_being_read(src),
    )
    .await;
    child.kill9();
    // The copy was one target transaction: rolled back, the table still held.
    assert_eq!(table_state(tgt, "big").await.as_deref(), Some("held"));
    support::wait_until(
        "the killed run's source sessions to end",
        Duration::from_secs(30),
        || async {
            !big_being_read(src).await
                && one::<i64>(
                    src,
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walshuttle' AND active",
                )
                .await
                    == 0
        },
    )
    .await;
}

/// Waits while `child` runs until every table of the pipeline is `ready`.
async fn wait_all_ready(child: &mut support::RunChild, tgt: &Client, what: &str, secs: u64) {
    wait_while_running(what, Duration::from_secs(secs), child, || async {
        let ready: i64 = one(
            tgt,
            "SELECT count(*) FROM walshuttle.pipeline_tables WHERE state = 'ready'",
        )
        .await;
        ready == TABLES.len() as i64
    })
    .await;
}

/// Waits until `writer` committed `more` transactions beyond what it has now.
async fn writes_meanwhile(writer: &Writer, more: u64, what: &str) {
    let before = writer.committed();
    support::wait_until(what, Duration::from_secs(30), || async {
        writer.committed() >= before + more
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_killed_mid_copy_copies_the_table_again() {
    let (source, target, src, tgt) = setup().await;
    let writer = Writer::spawn(source.url(), Duration::from_millis(10), write_sql);
    let mut logs = RunLogs::new();
    kill_run_mid_copy(&mut logs, &source, &target, &src, &tgt).await;
    writes_meanwhile(&writer, 30, "writes while run is down").await;

    let mut child = logs.spawn(run_cmd(&source, &target, false));
    finish(writer, &mut child, &source, &target, &src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_online_then_run() {
    let (source, target, src, tgt) = setup().await;
    let writer = Writer::spawn(source.url(), Duration::from_millis(10), write_sql);
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--online"]);
    let (code, out, err) = tokio::task::spawn_blocking(move || run(cmd))
        .await
        .expect("bootstrap");
    assert_eq!(code, 0, "bootstrap --online:\n{out}\n{err}");
    assert!(out.contains("online bootstrap"), "{out}");
    // Nothing copied yet: every table held, the target tables exist and are empty.
    for t in TABLES {
        assert_eq!(table_state(&tgt, t).await.as_deref(), Some("held"), "{t}");
    }
    assert_eq!(one::<i64>(&tgt, "SELECT count(*) FROM big").await, 0);
    // No snapshot was exported: nothing reads the tables on the source.
    assert!(!big_being_read(&src).await);
    // A held table may also be copied by `tables add` (the copy lock keeps it the
    // only copier); `run` then only applies what the stream held meanwhile.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["tables", "add", "kl"]);
    let (code, out, err) = tokio::task::spawn_blocking(move || run(cmd))
        .await
        .expect("tables add");
    assert_eq!(code, 0, "tables add of a held table:\n{out}\n{err}");
    assert_eq!(table_state(&tgt, "kl").await.as_deref(), Some("copied"));

    let mut logs = RunLogs::new();
    let mut child = logs.spawn(run_cmd(&source, &target, false));
    wait_all_ready(&mut child, &tgt, "every table ready", 90).await;
    writer
        .wait_for_more(&mut child, 30, Duration::from_secs(30), "after the copy")
        .await;
    finish(writer, &mut child, &source, &target, &src, &tgt).await;
}

/// The slot is lost while tables are still held (one mid-copy, the others with
/// changes held): the next `run` repairs every table from a new slot's snapshot,
/// drops the changes held for the old slot, and streams; nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_lost_while_tables_are_held_is_repaired() {
    let (source, target, src, tgt) = setup().await;
    let writer = Writer::spawn(source.url(), Duration::from_millis(10), write_sql);
    let mut logs = RunLogs::new();
    kill_run_mid_copy(&mut logs, &source, &target, &src, &tgt).await;
    src.batch_execute("SELECT pg_drop_replication_slot('walshuttle')")
        .await
        .expect("drop the slot");
    writes_meanwhile(&writer, 30, "writes while the slot is gone").await;

    let mut child = logs.spawn(run_cmd(&source, &target, false));
    wait_all_ready(&mut child, &tgt, "every table ready after the repair", 120).await;
    assert_eq!(
        one::<i64>(&tgt, "SELECT count(*) FROM walshuttle.held_changes").await,
        0,
        "changes held for the lost slot are gone"
    );
    writer
        .wait_for_more(&mut child, 30, Duration::from_secs(30), "after the repair")
        .await;
    finish(writer, &mut child, &source, &target, &src, &tgt).await;
    assert!(
        child.log().contains("the replication slot is gone"),
        "{}",
        support::tail(&child.log(), 40)
    );
}
