//! `walshuttle switchover` on real clusters while `run` streams: under a writer at a
//! few hundred transactions per second the source refuses writes from the fence on,
//! the target equals the source at the fence and hands out the next ids; the abort
//! paths (lag above --max-lag, a drain past --max-downtime) leave the source
//! writable and streaming going; --reverse carries the new primary's writes back;
//! and the same switchover from 15 to 17 and from 16 to 18. The fence holds against
//! every way a session can choose to write (each seen passing the first fence), a
//! write past it is caught by the proof, an abort leaves pooled sessions writable,
//! every sequence arrives, the old pipeline stops after done, and a round trip
//! leaves exactly one side writable after each step.

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
    support::wait_streaming(&mut child, src).await;
    child
}

/// Waits until a running switchover records `phase` on the target (or ends).
async fn wait_for_phase<T>(tgt: &Client, switching: &tokio::task::JoinHandle<T>, phase: &str) {
    wait_until(
        &format!("the switchover to be {phase}"),
        Duration::from_secs(60),
        || async {
            switching.is_finished()
                || tgt
                    .query_one("SELECT switchover_phase FROM walshuttle.pipelines", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, Option<String>>(0).as_deref() == Some(phase))
        },
    )
    .await;
}

/// Why a write through a new session on `cluster` failed: the SQLSTATE of the
/// refused write, or `connect` when no session could be opened (`None`: it
/// committed).
async fn write_refusal(cluster: &Cluster) -> Option<String> {
    write_refusal_at(&cluster.url()).await
}

/// [`write_refusal`] through a given URL (another role).
async fn write_refusal_at(url: &str) -> Option<String> {
    let Some(client) = support::try_connect(url).await else {
        return Some("connect".into());
    };
    client
        .batch_execute("INSERT INTO acc (id, v) VALUES (1000 + (random() * 1e6)::int, -1)")
        .await
        .err()
        .map(|e| e.code().map(|c| c.code().to_string()).unwrap_or_default())
}

/// After a switchover left the old source closed, opens it again by hand, as the
/// README says (from another database), and returns a session on it.
async fn reopen(source: &Cluster) -> Client {
    let admin = source.client_for("template1").await;
    admin
        .batch_execute(
            "ALTER DATABASE postgres ALLOW_CONNECTIONS true;
             ALTER DATABASE postgres CONNECTION LIMIT -1;
             ALTER DATABASE postgres RESET default_transaction_read_only;",
        )
        .await
        .expect("reopening the old source by hand");
    source.client().await
}

/// Creates the application's role `app` (LOGIN, not a superuser) with `extra` SQL
/// about it; returns its URL with `query` appended.
async fn app_role(src: &Client, source: &Cluster, extra: &str, query: &str) -> String {
    src.batch_execute(&format!(
        "CREATE ROLE app LOGIN PASSWORD 'app-pw';
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO app;
         {extra}"
    ))
    .await
    .unwrap();
    format!(
        "postgresql://app:app-pw@127.0.0.1:{}/postgres{query}",
        source.port
    )
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
    let mut child = streaming(&mut logs, &source, &target, &src, &tgt, free_port()).await;

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
    assert!(write_refusal(&source).await.is_some());
    let refused_from = writer.tries();
    wait_until(
        "the writer to have had its next transactions refused",
        Duration::from_secs(10),
        || async { writer.tries() > refused_from + 5 },
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
    // The test's own source session started before the fence and was ended by it,
    // and the old source takes no connection until opened again by hand.
    let src = reopen(&source).await;
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

    // The old pipeline is finished: `run` stops by itself and says why.
    let status = child.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "run did not stop after the switchover: {status:?}"
    );
    assert!(child.log().contains("was switched over"), "{}", child.log());
    // A new `run` refuses to stream it.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run"]);
    let (code, _, err) = run_blocking(cmd).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was switched over"), "{err}");

    // status shows the switchover, and the pipeline as switched over.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["status", "--json"]);
    let (code, out, err) = run_blocking(cmd).await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["pipelines"][0]["switchover"]["phase"], "done");
    assert_eq!(status["pipelines"][0]["phase"], "switched_over");
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
    let metrics_port = free_port();
    let mut child = streaming(&mut logs, &source, &target, &src, &tgt, metrics_port).await;

    // A dry run changes nothing and plans the sequences.
    let (code, report, err) = switchover(&source, &target, &["--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["outcome"], "dry_run");
    assert_eq!(report["plan"]["sequences"][0]["columns"][0], "public.ev.id");
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
    // So does run's /metrics.
    wait_until(
        "/metrics to show the switchover aborted",
        Duration::from_secs(30),
        || async move {
            tokio::task::spawn_blocking(move || http_get(metrics_port, "/metrics"))
                .await
                .ok()
                .flatten()
                .is_some_and(|(_, body)| {
                    body.lines().any(|l| {
                        l.starts_with("walshuttle_switchover_phase")
                            && l.contains("phase=\"aborted\"")
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

    // Retiring the way back resets what walshuttle set on the old source.
    let settings =
        "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase \
                    WHERE d.datname = current_database()";
    let before: i64 = src.query_one(settings, &[]).await.unwrap().get(0);
    assert_eq!(
        before, 2,
        "the read-only default and the writer's exemption"
    );
    let mut cmd = walshuttle_urls(&target.url(), &source.url());
    cmd.args(["teardown", "--slot", "walshuttle_reverse", "--yes"]);
    let (code, out, err) = run_blocking(cmd).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("writable again"), "{out}");
    let src = source.client().await;
    let after: i64 = src.query_one(settings, &[]).await.unwrap().get(0);
    assert_eq!(after, 0);
}

/// A writer of role `app` that chooses to write in its own way (`txn`, through
/// `url`), ahead of and during a switchover: the switchover is done, the writer
/// commits nothing on the source after it, and every write the source took is on
/// the target.
async fn fence_holds_against(role_sql: &str, query: &str, txn: fn(u64) -> String) {
    fence_holds_between(Cluster::start(), Cluster::start(), role_sql, query, txn).await;
}

/// [`fence_holds_against`] between given clusters.
async fn fence_holds_between(
    source: Cluster,
    target: Cluster,
    role_sql: &str,
    query: &str,
    txn: fn(u64) -> String,
) {
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(BATCH_SCHEMA).await.unwrap();
    let url = app_role(&src, &source, role_sql, query).await;
    let mut logs = RunLogs::new();
    let mut child = streaming(&mut logs, &source, &target, &src, &tgt, free_port()).await;
    let writer = Writer::spawn(url.clone(), Duration::from_millis(2), txn);
    writer
        .wait_for_more(
            &mut child,
            200,
            Duration::from_secs(60),
            "before the switchover",
        )
        .await;

    let (code, report, err) = switchover(
        &source,
        &target,
        &["--max-downtime", "60s", "--fence-timeout", "2s"],
    )
    .await;
    assert_eq!(code, 0, "switchover failed: {err}");
    assert_eq!(report["outcome"], "done");
    let committed_at_done = writer.committed();
    let tries = writer.tries();
    wait_until(
        "the writer to try 30 more times",
        Duration::from_secs(30),
        || async { writer.tries() > tries + 30 },
    )
    .await;
    assert!(
        write_refusal_at(&url).await.is_some(),
        "a new session of role app wrote on the old source after DONE"
    );
    assert_eq!(
        writer.committed(),
        committed_at_done,
        "the writer committed on the old source after the switchover said DONE"
    );
    let (committed, _) = writer.stop().await;
    assert!(committed >= 200);
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
    // Nothing the source took is missing on the target.
    let src = reopen(&source).await;
    support::assert_tables_equal(&src, &tgt, BATCH_TABLES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_holds_against_begin_read_write() {
    fence_holds_against("", "", |i| {
        small_txn(i).replacen("BEGIN;", "BEGIN READ WRITE;", 1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_holds_against_session_characteristics_read_write() {
    fence_holds_against("", "", |i| {
        format!(
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; COMMIT; {}",
            small_txn(i)
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_holds_against_a_role_setting() {
    fence_holds_against(
        "ALTER ROLE app SET default_transaction_read_only = off;",
        "",
        small_txn,
    )
    .await;
}

/// Every way round the fence at once, from 15 to 17.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_holds_from_15_to_17() {
    fence_holds_between(
        Cluster::start_version(15),
        Cluster::start_version(17),
        "ALTER ROLE app SET default_transaction_read_only = off;",
        "?application_name=walshuttle%20x",
        |i| {
            format!(
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; COMMIT; {}",
                small_txn(i).replacen("BEGIN;", "BEGIN READ WRITE;", 1)
            )
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_holds_against_a_walshuttle_application_name() {
    fence_holds_against("", "?application_name=walshuttle%20x", small_txn).await;
}

/// An abort lifts the fence for every session: a pool that (re)connects during the
/// fence writes with its session once the switchover has aborted (reconnecting only
/// when its connection was closed, as pools do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_leaves_sessions_of_the_fence_writable() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(BATCH_SCHEMA).await.unwrap();
    let url = app_role(&src, &source, "", "").await;
    let mut logs = RunLogs::new();
    let mut child = streaming(&mut logs, &source, &target, &src, &tgt, free_port()).await;
    src.batch_execute(&batch_sql(1)).await.unwrap();
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        BATCH_TABLES,
        Duration::from_secs(60),
    )
    .await;
    // The drain cannot finish while the target's table is locked.
    let mut locker = target.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE acc IN EXCLUSIVE MODE")
        .await
        .unwrap();
    src.batch_execute(&batch_sql(2)).await.unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args([
        "switchover",
        "--json",
        "--max-lag",
        "60s",
        "--max-downtime",
        "6s",
        "--fence-timeout",
        "1s",
    ]);
    let switching = tokio::spawn(run_blocking(cmd));
    wait_for_phase(&tgt, &switching, "draining").await;
    // The pool connects as soon as it can while the switchover runs.
    let mut pooled = None;
    while !switching.is_finished() {
        if let Some(c) = support::try_connect(&url).await {
            pooled = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out, err) = switching.await.unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["outcome"], "aborted", "{report}");
    assert_eq!(report["fence_lifted"], true, "{report}");
    let pooled = match pooled {
        Some(c) if !c.is_closed() => c,
        _ => support::try_connect(&url)
            .await
            .expect("the pool reconnects"),
    };
    let wrote = pooled
        .batch_execute("BEGIN; INSERT INTO acc (id, v) VALUES (5000, 1); COMMIT;")
        .await;
    let wrote = match wrote {
        Err(e) if pooled.is_closed() => {
            eprintln!("the pooled session was ended ({e}): reconnecting");
            support::try_connect(&url)
                .await
                .expect("the pool reconnects")
                .batch_execute("BEGIN; INSERT INTO acc (id, v) VALUES (5000, 1); COMMIT;")
                .await
        }
        other => other,
    };
    assert!(
        wrote.is_ok(),
        "a session of the pool is still read-only after the abort: {wrote:?}"
    );
    // The database is as it was: connections allowed, no read-only default left.
    let src = source.client().await;
    let row = src
        .query_one(
            "SELECT datallowconn, datconnlimit, \
                    (SELECT count(*) FROM pg_db_role_setting s WHERE s.setdatabase = d.oid) \
             FROM pg_database d WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i32>(1), -1);
    assert_eq!(row.get::<_, i64>(2), 0);
    lock.rollback().await.unwrap();
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
}

/// The proof: a session the fence keeps (it holds the advisory lock `run`'s own
/// session would) writes after the fence LSN, a write verify cannot see (a row
/// inserted and deleted again): the switchover aborts, never done. It writes while
/// the drain waits on a stream that cannot reach the fence (`run` is frozen, and
/// the fence ended its lookup session, which the new change needs): the abort
/// comes from the proof at once, not from `--max-downtime` with a drain that
/// "did not finish".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_fence_aborts_the_switchover() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(BATCH_SCHEMA).await.unwrap();
    // Enough rows for the verify to take a moment.
    src.batch_execute("INSERT INTO ev (batch, n) SELECT 0, g FROM generate_series(1, 200000) g")
        .await
        .unwrap();
    // Taken before `run` starts, so this session holds it, not run's.
    let sneaky = source.client().await;
    sneaky
        .batch_execute("SELECT pg_advisory_lock(2004052082, hashtext('walshuttle') & 2147483647)")
        .await
        .unwrap();
    let mut logs = RunLogs::new();
    let mut child = streaming(&mut logs, &source, &target, &src, &tgt, free_port()).await;
    // An open transaction with an xid holds the creation of the fence's proof
    // slot up, so `run` is frozen after the preflight (which needs it to stream)
    // and before the fence.
    let blocker = source.client().await;
    blocker
        .batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["switchover", "--json", "--max-downtime", "60s"]);
    let switching = tokio::spawn(run_blocking(cmd));
    wait_for_phase(&tgt, &switching, "fencing").await;
    child.pause();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    wait_for_phase(&tgt, &switching, "draining").await;
    assert!(
        !switching.is_finished(),
        "the switchover ended before the drain: {:?}",
        switching.await
    );
    sneaky
        .batch_execute("INSERT INTO acc (id, v) VALUES (9999, 0)")
        .await
        .expect("the kept session writes past the fence");
    sneaky
        .batch_execute("DELETE FROM acc WHERE id = 9999")
        .await
        .unwrap();
    let (code, out, err) = switching.await.unwrap();
    child.resume();
    assert_eq!(code, 1, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["outcome"], "aborted", "{report}");
    let reason = report["reason"].as_str().unwrap();
    eprintln!("abort reason: {reason}");
    assert!(reason.contains("after the fence LSN"), "{reason}");
    assert_eq!(report["fence_lifted"], true);
    assert_eq!(write_refusal(&source).await, None);
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
}

/// Every sequence: standalone ones the application calls with `nextval`, one shared
/// by two tables, one in a schema without replicated tables (missing on the
/// target), a descending one and one never called. After the switchover each
/// exists on the target with its parameters, the columns' defaults call them, and
/// the new primary hands out the next values without a conflict.
async fn every_sequence_arrives(source: Cluster, target: Cluster) {
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE SCHEMA billing;
         CREATE SEQUENCE invoice_no;
         CREATE SEQUENCE billing.invoice_no INCREMENT 5 START 100;
         CREATE SEQUENCE countdown INCREMENT -1;
         CREATE SEQUENCE never_called START 42 CACHE 3;
         CREATE TABLE invoice (id bigint PRIMARY KEY DEFAULT nextval('invoice_no'), note text);
         CREATE TABLE credit_note (id bigint PRIMARY KEY DEFAULT nextval('invoice_no'), note text);
         CREATE TABLE \"Ledger Lines\" (id bigint PRIMARY KEY DEFAULT nextval('billing.invoice_no'),
                               down int NOT NULL DEFAULT nextval('countdown'), note text);
         CREATE TABLE ser (id serial PRIMARY KEY, v text);
         INSERT INTO invoice (note) SELECT 'i' FROM generate_series(1, 10);
         INSERT INTO credit_note (note) SELECT 'c' FROM generate_series(1, 5);
         INSERT INTO \"Ledger Lines\" (note) SELECT 'l' FROM generate_series(1, 3);
         INSERT INTO ser (v) SELECT 's' FROM generate_series(1, 4);",
    )
    .await
    .unwrap();
    let tables = ["invoice", "credit_note", "\"Ledger Lines\"", "ser"];
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--status-interval", "0.2"]);
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(90)).await;
    support::wait_streaming(&mut child, &src).await;
    // The bootstrap made them, with the defaults that call them.
    for (sql, what) in [
        (
            "SELECT to_regclass('billing.invoice_no') IS NOT NULL",
            "billing.invoice_no",
        ),
        (
            "SELECT to_regclass('public.never_called') IS NOT NULL",
            "never_called",
        ),
        (
            "SELECT pg_get_expr(adbin, adrelid) LIKE '%invoice_no%' FROM pg_attrdef \
             WHERE adrelid = 'credit_note'::regclass",
            "credit_note's default",
        ),
    ] {
        let made: bool = tgt.query_one(sql, &[]).await.unwrap().get(0);
        assert!(made, "the bootstrap did not make {what} on the target");
    }
    // A default that names its sequence in text cannot be mapped: the preflight
    // says so and what to do.
    src.batch_execute(
        "ALTER TABLE credit_note ALTER COLUMN note SET DEFAULT nextval('invoice_no'::text)::text",
    )
    .await
    .unwrap();
    let (code, report, _) = switchover(&source, &target, &["--dry-run"]).await;
    assert_eq!(code, 1);
    let problems = report["plan"]["problems"].to_string();
    assert!(
        problems.contains("credit_note.note") && problems.contains("regclass"),
        "{problems}"
    );
    src.batch_execute("ALTER TABLE credit_note ALTER COLUMN note DROP DEFAULT")
        .await
        .unwrap();
    // Writes between the steps: more values used, one burnt by a rollback.
    src.batch_execute(
        "INSERT INTO invoice (note) VALUES ('later');
         INSERT INTO \"Ledger Lines\" (note) VALUES ('later');
         BEGIN; INSERT INTO credit_note (note) VALUES ('burnt'); ROLLBACK;",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(60)).await;

    let (code, report, err) = switchover(&source, &target, &["--sequence-gap", "10"]).await;
    assert_eq!(code, 0, "switchover failed: {err}");
    assert_eq!(report["outcome"], "done");
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());

    // Parameters as on the source.
    for (seq, increment, min, max) in [
        ("public.invoice_no", 1i64, 1i64, i64::MAX),
        ("billing.invoice_no", 5, 1, i64::MAX),
        ("public.countdown", -1, i64::MIN, -1),
        ("public.never_called", 1, 1, i64::MAX),
    ] {
        let row = tgt
            .query_opt(
                "SELECT seqincrement, seqmin, seqmax FROM pg_sequence WHERE seqrelid = to_regclass($1)",
                &[&seq],
            )
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("sequence {seq} is missing on the target"));
        assert_eq!(
            (
                row.get::<_, i64>(0),
                row.get::<_, i64>(1),
                row.get::<_, i64>(2)
            ),
            (increment, min, max),
            "{seq}"
        );
    }
    // The new primary hands out values past the source's (and the gap), through
    // the columns' defaults.
    let id = |sql: &'static str| {
        let tgt = &tgt;
        async move {
            tgt.query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get::<_, i64>(0)
        }
    };
    // invoice_no: 16 used and one burnt (17), so the source's next is 18.
    assert_eq!(
        id("INSERT INTO invoice (note) VALUES ('new') RETURNING id").await,
        28
    );
    assert_eq!(
        id("INSERT INTO credit_note (note) VALUES ('new') RETURNING id").await,
        29
    );
    // billing.invoice_no: 100 .. 115 used, next 120, and the gap.
    assert_eq!(
        id("INSERT INTO \"Ledger Lines\" (note) VALUES ('new') RETURNING id").await,
        130
    );
    assert_eq!(
        id("SELECT down::bigint FROM \"Ledger Lines\" WHERE note = 'new'").await,
        -15
    );
    assert_eq!(id("SELECT nextval('never_called')").await, 52);
    assert_eq!(
        id("INSERT INTO ser (v) VALUES ('new') RETURNING id::bigint").await,
        15
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sequence_arrives_with_its_defaults() {
    every_sequence_arrives(Cluster::start(), Cluster::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sequence_arrives_from_15_to_17() {
    every_sequence_arrives(Cluster::start_version(15), Cluster::start_version(17)).await;
}

/// `switchover --json` from `from` to `to` with extra flags.
async fn switchover_between(
    from: &Cluster,
    to: &Cluster,
    flags: &[&str],
) -> (i32, serde_json::Value, String) {
    let mut cmd = walshuttle_urls(&from.url(), &to.url());
    cmd.args(["switchover", "--json"]).args(flags);
    let (code, out, err) = run_blocking(cmd).await;
    let report: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("switchover printed no JSON report ({e}):\n{out}\n{err}"));
    assert_eq!(code, 0, "switchover {flags:?} failed: {report}\n{err}");
    assert_eq!(report["outcome"], "done");
    (code, report, err)
}

/// Streams `slot` from `from` to `to` until the batch tables are equal.
async fn stream_between(logs: &mut RunLogs, from: &Cluster, to: &Cluster, slot: &str) -> RunChild {
    let mut cmd = walshuttle_urls(&from.url(), &to.url());
    cmd.args(["run", "--slot", slot, "--status-interval", "0.2"]);
    let mut child = logs.spawn(cmd);
    let (f, t) = (from.client().await, to.client().await);
    f.batch_execute(&batch_sql(1_000 + slot.len() as u64))
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &f, &t, BATCH_TABLES, Duration::from_secs(90)).await;
    child
}

/// A round trip: switch over with --reverse, stream back, switch back (with
/// --reverse), stream forward and switch forward again. After each switchover
/// exactly one side takes the application's writes, and the pipeline it left stops
/// by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_leaves_exactly_one_side_writable() {
    let a = Cluster::start();
    let b = Cluster::start();
    let sa = a.client().await;
    let sb = b.client().await;
    sa.batch_execute(BATCH_SCHEMA).await.unwrap();
    // The application's role, on both (roles are not replicated).
    let app_a = app_role(&sa, &a, "", "").await;
    let mut logs = RunLogs::new();
    let mut forward = streaming(&mut logs, &a, &b, &sa, &sb, free_port()).await;
    let app_b = app_role(&sb, &b, "", "").await;

    // 1. A -> B, with a way back.
    switchover_between(&a, &b, &["--reverse"]).await;
    assert!(forward.wait_exit(Duration::from_secs(30)).await.is_some());
    assert!(
        write_refusal_at(&app_a).await.is_some(),
        "A took a write after step 1"
    );
    assert_eq!(
        write_refusal_at(&app_b).await,
        None,
        "B refused a write after step 1"
    );

    // 2. B -> A streams; 3. switch back, with a way forward again.
    let mut back = stream_between(&mut logs, &b, &a, "walshuttle_reverse").await;
    switchover_between(&b, &a, &["--slot", "walshuttle_reverse", "--reverse"]).await;
    assert!(back.wait_exit(Duration::from_secs(30)).await.is_some());
    assert_eq!(
        write_refusal_at(&app_a).await,
        None,
        "A refused the application's write after switching back"
    );
    assert!(
        write_refusal_at(&app_b).await.is_some(),
        "B took a write after step 3"
    );

    // 4. A -> B streams again; 5. switch forward again.
    let mut again = stream_between(&mut logs, &a, &b, "walshuttle_reverse_reverse").await;
    switchover_between(&a, &b, &["--slot", "walshuttle_reverse_reverse"]).await;
    assert!(again.wait_exit(Duration::from_secs(30)).await.is_some());
    assert_eq!(
        write_refusal_at(&app_b).await,
        None,
        "B refused a write at the end"
    );
    assert!(
        write_refusal_at(&app_a).await.is_some(),
        "A took a write at the end"
    );
}

/// A background worker writes too: the apply worker of a subscription in the source
/// database, fed by a third server the fence does not touch. The fence ends it and
/// it cannot start again; after done the old source takes none of its writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_holds_against_a_subscriptions_apply_worker() {
    let source = Cluster::start();
    let target = Cluster::start();
    let feeder = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    let fd = feeder.client().await;
    let feed = "CREATE TABLE feed (id bigint PRIMARY KEY, v int NOT NULL)";
    fd.batch_execute(&format!(
        "{feed}; CREATE PUBLICATION feedpub FOR TABLE feed"
    ))
    .await
    .unwrap();
    src.batch_execute(BATCH_SCHEMA).await.unwrap();
    src.batch_execute(feed).await.unwrap();
    src.batch_execute(&format!(
        "CREATE SUBSCRIPTION feedsub CONNECTION 'host=127.0.0.1 port={} dbname=postgres user=postgres password={}' PUBLICATION feedpub",
        feeder.port,
        support::PASSWORD
    ))
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = streaming(&mut logs, &source, &target, &src, &tgt, free_port()).await;
    let writer = Writer::spawn(feeder.url(), Duration::from_millis(2), |i| {
        format!("INSERT INTO feed VALUES ({i}, 1)")
    });
    // The subscription applies the feeder's rows on the source.
    support::wait_while_running(
        "the subscription to apply rows on the source",
        Duration::from_secs(60),
        &mut child,
        || async {
            src.query_one("SELECT count(*) > 100 FROM feed", &[])
                .await
                .is_ok_and(|r| r.get::<_, bool>(0))
        },
    )
    .await;

    let (code, report, err) = switchover(
        &source,
        &target,
        &["--max-downtime", "60s", "--fence-timeout", "2s"],
    )
    .await;
    assert_eq!(code, 0, "switchover failed: {err}");
    assert_eq!(report["outcome"], "done");
    // Everything the source took is on the target, and the feeder goes on writing
    // while the old source takes none of it.
    let on_target: i64 = tgt
        .query_one("SELECT count(*) FROM feed", &[])
        .await
        .unwrap()
        .get(0);
    let fed = writer.committed();
    wait_until(
        "the feeder to write 300 more rows",
        Duration::from_secs(60),
        || async { writer.committed() > fed + 300 },
    )
    .await;
    writer.stop().await;
    // The old source lets superusers in after done (read-only by default).
    let src = source.client().await;
    let on_source: i64 = src
        .query_one("SELECT count(*) FROM feed", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        on_source, on_target,
        "the subscription wrote on the source after the fence"
    );
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
}
