//! `walshuttle switchover` on real clusters while `run` streams: under a writer at a
//! few hundred transactions per second the source refuses writes from the fence on,
//! the target equals the source at the fence and hands out the next ids; the abort
//! paths (lag above --max-lag, a drain past --max-downtime) leave the source
//! writable and streaming going; --reverse carries the new primary's writes back;
//! and the same switchover from 15 to 17 and from 16 to 18.

mod support;

use std::process::Command;
use std::time::Duration;

use support::workload::{batch_sql, Writer, BATCH_SCHEMA, BATCH_TABLES};
use support::{
    free_port, http_get, run, wait_for_convergence_running, wait_until, walshuttle,
    walshuttle_urls, Cluster, RunChild, RunLogs,
};
use tokio_postgres::Client;

/// Runs a walshuttle command off the async threads; returns (exit code, stdout,
/// stderr).
async fn run_blocking(cmd: Command) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || run(cmd))
        .await
        .expect("walshuttle command thread")
}

/// `walshuttle switchover --json` with extra flags; the exit code and the report.
async fn switchover(
    source: &Cluster,
    target: &Cluster,
    flags: &[&str],
) -> (i32, serde_json::Value, String) {
    let mut cmd = walshuttle(source, target);
    cmd.args(["switchover", "--json"]).args(flags);
    let (code, out, err) = run_blocking(cmd).await;
    let report: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("switchover printed no JSON report ({e}):\n{out}\n{err}"));
    eprintln!(
        "switchover exit {code}:\n{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    (code, report, err)
}

/// Starts `run` and waits until the batch tables have converged.
async fn streaming(
    logs: &mut RunLogs,
    source: &Cluster,
    target: &Cluster,
    src: &Client,
    tgt: &Client,
    metrics_port: u16,
) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--status-interval", "0.2"]);
    cmd.args(["--metrics-addr", &format!("127.0.0.1:{}", metrics_port)]);
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, src, tgt, BATCH_TABLES, Duration::from_secs(90)).await;
    // Converged by the bootstrap alone: wait for the stream itself.
    support::wait_while_running("run to stream", Duration::from_secs(60), &mut child, || {
        support::slot_active(src, "walshuttle")
    })
    .await;
    child
}

/// The SQLSTATE of a write through a new session on `cluster` (`None`: it committed).
async fn write_refusal(cluster: &Cluster) -> Option<String> {
    let client = cluster.client().await;
    client
        .batch_execute("INSERT INTO acc (id, v) VALUES (1000 + (random() * 1e6)::int, -1)")
        .await
        .err()
        .map(|e| e.code().map(|c| c.code().to_string()).unwrap_or_default())
}

/// One small writer transaction: a row in `ev` and `ev_log`, an `acc` update.
fn small_txn(i: u64) -> String {
    format!(
        "BEGIN; INSERT INTO ev (batch, n) VALUES ({i}, 1); INSERT INTO ev_log (batch, n) VALUES ({i}, 1);
         UPDATE acc SET v = v + 1, updated_at = now() WHERE id = {}; COMMIT;",
        i % 100
    )
}

/// The switchover under a writer: fence, drain, sequences, verify; then the checks
/// a move needs. Shared by the default-version test and the cross-version ones.
async fn switch_over_under_writes(source: Cluster, target: Cluster) {
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(BATCH_SCHEMA).await.unwrap();
    src.batch_execute(
        "INSERT INTO ev (batch, n) SELECT 0, g FROM generate_series(1, 2000) g;
         CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
         INSERT INTO ident (v) SELECT 'x' FROM generate_series(1, 40);",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let metrics_port = free_port();
    let mut child = streaming(&mut logs, &source, &target, &src, &tgt, metrics_port).await;

    // A few hundred small transactions a second, riding through errors by
    // reconnecting.
    let writer = Writer::spawn(source.url(), Duration::from_millis(2), small_txn);
    writer
        .wait_for_more(
            &mut child,
            300,
            Duration::from_secs(60),
            "before the switchover",
        )
        .await;
    let rate_from = (writer.committed(), std::time::Instant::now());
    writer
        .wait_for_more(
            &mut child,
            200,
            Duration::from_secs(60),
            "to measure the rate",
        )
        .await;
    let rate = (writer.committed() - rate_from.0) as f64 / rate_from.1.elapsed().as_secs_f64();
    eprintln!("writer rate before the switchover: {rate:.0} transactions/s");
    let errors_before = writer.errors();

    let (code, report, err) = switchover(
        &source,
        &target,
        &["--max-downtime", "60s", "--fence-timeout", "2s"],
    )
    .await;
    assert_eq!(code, 0, "switchover failed: {err}");
    assert_eq!(report["outcome"], "done");
    let committed_after = writer.committed();

    // The writer's writes are refused from the fence on: it saw errors, commits
    // nothing more, and a new session is refused as read-only (25006).
    assert!(
        writer.errors() > errors_before,
        "the writer saw no refused write"
    );
    assert_eq!(write_refusal(&source).await.as_deref(), Some("25006"));
    let refused_from = writer.errors();
    wait_until(
        "the writer to have had its next transactions refused",
        Duration::from_secs(10),
        || async { writer.errors() > refused_from + 5 },
    )
    .await;
    assert_eq!(
        writer.committed(),
        committed_after,
        "the writer committed on the fenced source"
    );
    let (committed, _) = writer.stop().await;
    assert!(committed > 500);

    // The target equals the source at the fence: the stream reached the fence LSN
    // and every row is the same (the source no longer changes).
    // The test's own source session started before the fence and was ended by it.
    let src = source.client().await;
    let fence: walshuttle::pg::Lsn = report["fence"]["lsn"].as_str().unwrap().parse().unwrap();
    let drained: walshuttle::pg::Lsn = report["drained_to"].as_str().unwrap().parse().unwrap();
    assert!(drained >= fence);
    support::assert_tables_equal(&src, &tgt, &["ev", "ev_log", "acc", "ident"]).await;
    assert_eq!(report["tables_verified"], 4);
    assert!(report["rows_verified"].as_i64().unwrap() > 2000);
    assert!(report["times"]["downtime"].as_f64().unwrap() > 0.0);

    // Sequences included: the target hands out the next ids without a conflict.
    let src_max: i64 = src
        .query_one("SELECT max(id) FROM ev", &[])
        .await
        .unwrap()
        .get(0);
    let new_id: i64 = tgt
        .query_one(
            "INSERT INTO ev (batch, n) VALUES (-1, -1) RETURNING id",
            &[],
        )
        .await
        .expect("an insert on the new primary takes the next id")
        .get(0);
    assert!(new_id > src_max, "new id {new_id} <= source max {src_max}");
    let ident: i32 = tgt
        .query_one("INSERT INTO ident (v) VALUES ('new') RETURNING id", &[])
        .await
        .expect("an identity insert on the new primary")
        .get(0);
    assert_eq!(ident, 41);

    // status shows the switchover.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["status", "--json"]);
    let (code, out, err) = run_blocking(cmd).await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["pipelines"][0]["switchover"]["phase"], "done");
    // So does run's /metrics.
    wait_until(
        "/metrics to show the switchover done",
        Duration::from_secs(30),
        || async move {
            tokio::task::spawn_blocking(move || http_get(metrics_port, "/metrics"))
                .await
                .ok()
                .flatten()
                .is_some_and(|(_, body)| {
                    body.lines().any(|l| {
                        l.starts_with("walshuttle_switchover_phase")
                            && l.contains("phase=\"done\"")
                            && l.ends_with(" 1")
                    })
                })
        },
    )
    .await;
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_a_writer_fences_drains_and_verifies() {
    switch_over_under_writes(Cluster::start(), Cluster::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_from_15_to_17() {
    switch_over_under_writes(Cluster::start_version(15), Cluster::start_version(17)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_from_16_to_18() {
    switch_over_under_writes(Cluster::start_version(16), Cluster::start_version(18)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborts_leave_the_source_writable_and_streaming() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(BATCH_SCHEMA).await.unwrap();
    let mut logs = RunLogs::new();
    let mut child = streaming(&mut logs, &source, &target, &src, &tgt, free_port()).await;

    // A dry run changes nothing and plans the sequences.
    let (code, report, err) = switchover(&source, &target, &["--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["outcome"], "dry_run");
    assert_eq!(report["plan"]["sequences"][0]["column"], "id");
    assert_eq!(write_refusal(&source).await, None);

    // The target's table is locked against writes: `run` stays attached but falls
    // behind, and the lag stays above --max-lag.
    let writer = Writer::spawn(source.url(), Duration::from_millis(5), batch_sql);
    writer
        .wait_for_more(&mut child, 50, Duration::from_secs(60), "before the lock")
        .await;
    let mut locker = target.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE acc IN EXCLUSIVE MODE")
        .await
        .unwrap();
    wait_until(
        "the target to lag 1.5 s",
        Duration::from_secs(30),
        || async {
            tgt.query_one(
                "SELECT extract(epoch FROM clock_timestamp() - commit_time)::float8 > 1.5 \
             FROM walshuttle.progress",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, bool>(0))
        },
    )
    .await;
    let (code, report, _) = switchover(&source, &target, &["--max-lag", "1s"]).await;
    assert_eq!(code, 1);
    assert_eq!(report["outcome"], "aborted");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("above --max-lag"), "{reason}");
    assert!(!reason.contains("nothing streams"), "{reason}");
    assert!(report["fence"].is_null());
    assert_eq!(write_refusal(&source).await, None);

    // The drain cannot finish while the table is locked: past --max-downtime the
    // fence is lifted.
    let (code, report, _) = switchover(
        &source,
        &target,
        &[
            "--max-lag",
            "60s",
            "--max-downtime",
            "3s",
            "--fence-timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert_eq!(report["outcome"], "aborted");
    assert_eq!(report["fence_lifted"], true);
    assert!(report["fence"]["lsn"].is_string());
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("the drain") && reason.contains("--max-downtime"),
        "{reason}"
    );
    // The fence ended the test's own source session.
    let src = source.client().await;
    // Writable again, and the writer's new sessions commit.
    assert_eq!(write_refusal(&source).await, None);
    let from = writer.committed();
    wait_until(
        "the writer to commit again",
        Duration::from_secs(30),
        || async { writer.committed() > from + 20 },
    )
    .await;
    lock.rollback().await.unwrap();
    writer.stop().await;
    // Streaming continued.
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        BATCH_TABLES,
        Duration::from_secs(60),
    )
    .await;
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["status", "--json"]);
    let (_, out, _) = run_blocking(cmd).await;
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["pipelines"][0]["switchover"]["phase"], "aborted");
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_carries_the_new_primarys_writes_back() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(BATCH_SCHEMA).await.unwrap();
    // The old source keeps a trigger that would rewrite values and a foreign key:
    // the reverse stream writes past them, as a replica.
    src.batch_execute(
        "CREATE TABLE note (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                            acc_id int REFERENCES acc (id), body text);
         CREATE FUNCTION shout() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN NEW.body := upper(NEW.body); RETURN NEW; END $$;
         CREATE TRIGGER shout BEFORE INSERT OR UPDATE ON note FOR EACH ROW EXECUTE FUNCTION shout();
         INSERT INTO note (acc_id, body) SELECT g, 'n' || g FROM generate_series(0, 9) g;",
    )
    .await
    .unwrap();
    let tables = ["ev", "ev_log", "acc", "note"];
    let mut logs = RunLogs::new();
    let mut child = streaming(&mut logs, &source, &target, &src, &tgt, free_port()).await;
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(60)).await;
    for i in 1..=20 {
        src.batch_execute(&batch_sql(i)).await.unwrap();
    }

    let (code, report, err) = switchover(&source, &target, &["--reverse"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["reverse"]["pipeline"], "walshuttle_reverse");
    // The fence ended the test's own source session.
    let src = source.client().await;
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());

    // The new primary takes writes; the reverse pipeline streams them back.
    let mut back = walshuttle_urls(&target.url(), &source.url());
    back.args([
        "run",
        "--slot",
        "walshuttle_reverse",
        "--status-interval",
        "0.2",
    ]);
    let mut reverse = logs.spawn(back);
    tgt.batch_execute(
        "INSERT INTO ev (batch, n) VALUES (-5, 1), (-5, 2);
         UPDATE acc SET v = v + 100 WHERE id < 10;
         DELETE FROM ev WHERE batch = 3;
         INSERT INTO note (acc_id, body) VALUES (5, 'lower case');
         UPDATE note SET body = 'still lower' WHERE id = 1;",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut reverse, &tgt, &src, &tables, Duration::from_secs(60)).await;
    let body: String = src
        .query_one("SELECT body FROM note WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "still lower", "the old source's trigger fired");
    reverse.sigterm();
    assert!(reverse.wait_exit(Duration::from_secs(30)).await.is_some());
}
