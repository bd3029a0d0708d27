//! Bad input met while running (the bootstrap-time catalogue is in
//! tests/preflight.rs): a second `run` on a slot in use, a publication edited by
//! hand, and state written by a newer walshuttle. Each ends in one clear line and a
//! non-zero exit (or, for the slot in use, waiting without harm), and changes no
//! data on either side. The README's "Bad input catalogue" lists every case and the
//! test that covers it.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::workload::{
    assert_batches_exactly_once, batch_sql, Writer, BATCH_SCHEMA, BATCH_TABLES,
};
use support::{
    applied_lsn, assert_tables_equal, table_fingerprint, tail, try_connect,
    wait_for_convergence_running, wait_while_running, walshuttle, Cluster, RunChild, RunLogs,
    PASSWORD,
};
use tokio_postgres::Client;

const PIPELINE: &str = "walshuttle";

fn spawn_run(logs: &mut RunLogs, source: &Cluster, target: &Cluster, extra: &[&str]) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--jobs", "2"]).args(extra);
    logs.spawn(cmd)
}

async fn applied_any(target: &Cluster) -> bool {
    match try_connect(&target.url()).await {
        Some(t) => applied_lsn(&t, PIPELINE).await.is_some(),
        None => false,
    }
}

/// Runs a command to completion with a deadline (killed after it): (exit code,
/// stdout, stderr); the code is `None` when it had to be killed.
fn run_with_deadline(mut cmd: Command, deadline: Duration) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    cmd.stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()));
    let mut child = cmd.spawn().expect("spawn walshuttle");
    let until = Instant::now() + deadline;
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status.code().unwrap_or(-1));
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        code,
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------
// A second `run` on the same slot while the first streams.
// ---------------------------------------------------------------------------

async fn slot_holder_pid(src: &Client) -> Option<i32> {
    src.query_opt(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        &[&PIPELINE],
    )
    .await
    .unwrap()
    .and_then(|r| r.get(0))
}

/// Starts a streaming `run` with a writer; returns them once streaming.
async fn streaming_pair(
    source: &Cluster,
    target: &Cluster,
    logs: &mut RunLogs,
) -> (RunChild, Writer) {
    source
        .client()
        .await
        .batch_execute(BATCH_SCHEMA)
        .await
        .unwrap();
    let writer = Writer::spawn(source.url(), Duration::from_millis(10), batch_sql);
    let mut first = spawn_run(logs, source, target, &[]);
    wait_while_running(
        "the first run to stream",
        Duration::from_secs(90),
        &mut first,
        || applied_any(target),
    )
    .await;
    let src = source.client().await;
    wait_while_running(
        "the first run to hold the slot",
        Duration::from_secs(30),
        &mut first,
        || support::slot_active(&src, PIPELINE),
    )
    .await;
    (first, writer)
}

/// The second `run` waits (saying why and who holds the slot) instead of touching
/// anything; the first keeps streaming correctly. Waiting for the second to give up
/// takes more than 90 s, too slow for every CI run: see the ignored test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_on_a_slot_in_use_waits_and_harms_nothing() {
    let source = Cluster::start();
    let target = Cluster::start();
    let mut logs = RunLogs::new();
    let (mut first, writer) = streaming_pair(&source, &target, &mut logs).await;
    let src = source.client().await;
    let holder = slot_holder_pid(&src)
        .await
        .expect("the first run holds the slot");

    let mut second = spawn_run(&mut logs, &source, &target, &[]);
    let started = Instant::now();
    wait_while_running(
        "the second run to say the slot is in use",
        Duration::from_secs(15),
        &mut second,
        || async { logs.all().contains("slot is in use") },
    )
    .await;
    let second_log = second.log();
    eprintln!(
        "second run after {:.1}s:\n{}",
        started.elapsed().as_secs_f64(),
        tail(&second_log, 5)
    );
    assert!(second_log.contains("waiting"), "{second_log}");
    assert!(
        second_log.contains(&format!("pid {holder}")) && second_log.contains("127.0.0.1"),
        "the second run does not name the holder (walsender pid {holder}, client 127.0.0.1):\n{second_log}"
    );
    // Both stay up; the first keeps applying.
    writer
        .wait_for_more(&mut first, 100, Duration::from_secs(60), "with two runs")
        .await;
    second.assert_running("the second run should wait, not fail, within 90 s");
    assert_eq!(
        slot_holder_pid(&src).await,
        Some(holder),
        "the slot changed hands"
    );
    // The waiting one stops cleanly on request.
    second.sigterm();
    let status = second.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the waiting run did not stop cleanly on SIGTERM: {status:?}"
    );
    let (committed, _) = writer.stop().await;
    let tgt = target.client().await;
    wait_for_convergence_running(
        &mut first,
        &src,
        &tgt,
        BATCH_TABLES,
        Duration::from_secs(60),
    )
    .await;
    assert_tables_equal(&src, &tgt, BATCH_TABLES).await;
    assert_batches_exactly_once(&tgt).await;
    eprintln!("{committed} writer transactions applied exactly once with two runs on one slot");
}

/// The full contract: after about 90 s the second `run` gives up with one line
/// naming the holder. `cargo test --test bad_input -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes more than 90 s"]
async fn second_run_on_a_slot_in_use_gives_up_after_90s_naming_the_holder() {
    let source = Cluster::start();
    let target = Cluster::start();
    let mut logs = RunLogs::new();
    let (mut first, writer) = streaming_pair(&source, &target, &mut logs).await;
    let src = source.client().await;
    let holder = slot_holder_pid(&src)
        .await
        .expect("the first run holds the slot");
    let mut second = spawn_run(&mut logs, &source, &target, &[]);
    let started = Instant::now();
    let status = second.wait_exit(Duration::from_secs(180)).await;
    let took = started.elapsed();
    let log = second.log();
    let last = log.lines().last().unwrap_or_default().to_string();
    eprintln!("second run: {status:?} after {took:.1?}: {last}");
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "second run: {status:?}\n{}",
        tail(&log, 20)
    );
    assert!(
        last.starts_with("error: ") && last.contains("held by another consumer"),
        "{last}"
    );
    assert!(last.contains(&format!("pid {holder}")), "{last}");
    assert!(last.contains("127.0.0.1"), "{last}");
    first.assert_running("the first run must not be disturbed");
    writer.stop().await;
    let tgt = target.client().await;
    wait_for_convergence_running(
        &mut first,
        &src,
        &tgt,
        BATCH_TABLES,
        Duration::from_secs(60),
    )
    .await;
    assert_batches_exactly_once(&tgt).await;
}

// ---------------------------------------------------------------------------
// The publication edited by hand.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_edited_by_hand_stops_run_with_one_line() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;
         CREATE TABLE other (id int PRIMARY KEY, secret text);",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &["--tables", "items"]);
    let tgt = target.client().await;
    src.batch_execute("UPDATE items SET v = 'streamed' WHERE id <= 10")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(90)).await;
    let items_before = table_fingerprint(&tgt, "items").await;
    let edit_lsn: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);

    src.batch_execute(
        "ALTER PUBLICATION walshuttle ADD TABLE other;
         INSERT INTO other VALUES (1, 'not for the target');",
    )
    .await
    .unwrap();
    let status = child.wait_exit(Duration::from_secs(60)).await;
    let log = child.log();
    let last = log.lines().last().unwrap_or_default().to_string();
    eprintln!("run after the edit: {status:?}: {last}");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "run should stop with exit 1; log:\n{}",
        tail(&log, 20)
    );
    assert!(last.starts_with("error: "), "{}", tail(&log, 20));
    for needle in ["other", "edited by hand", "publication"] {
        assert!(last.contains(needle), "`{needle}` missing from: {last}");
    }
    assert!(!log.contains(PASSWORD), "password in the log");
    // Nothing of `other` reached the target; items and the applied position are as
    // they were.
    let other_on_target: bool = tgt
        .query_one("SELECT to_regclass('public.other') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !other_on_target,
        "the unexpected table was created on the target"
    );
    assert_eq!(table_fingerprint(&tgt, "items").await, items_before);
    let applied_past_edit: bool = tgt
        .query_opt(
            "SELECT applied_lsn > $1::text::pg_lsn FROM walshuttle.progress WHERE pipeline = $2",
            &[&edit_lsn, &PIPELINE],
        )
        .await
        .unwrap()
        .is_some_and(|r| r.get(0));
    assert!(
        !applied_past_edit,
        "the applied position moved past the edit ({edit_lsn}): {:?}",
        applied_lsn(&tgt, PIPELINE).await
    );

    // Running again refuses the same way, and still writes nothing.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--tables", "items"]);
    let (code, _, stderr) = run_with_deadline(cmd, Duration::from_secs(60));
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(code, Some(1), "second attempt: {stderr}");
    assert!(last.contains("edited by hand"), "{last}");
    assert_eq!(table_fingerprint(&tgt, "items").await, items_before);
}

// ---------------------------------------------------------------------------
// State written by a newer walshuttle.
// ---------------------------------------------------------------------------

/// Everything a command could change: every table of the state schema and the
/// replicated table on the target; slots, publications and their tables on the
/// source.
async fn snapshot(src: &Client, tgt: &Client) -> Vec<String> {
    let mut out = Vec::new();
    let tables: Vec<String> = tgt
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables \
             WHERE schemaname IN ('walshuttle', 'public') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in tables {
        let fp = table_fingerprint(tgt, &t).await;
        out.push(format!("target {t}: {fp:?}"));
    }
    for row in src
        .query(
            "SELECT slot_name || ' ' || coalesce(confirmed_flush_lsn::text, '-') || ' ' || coalesce(restart_lsn::text, '-') \
             FROM pg_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
    {
        out.push(format!("source slot {}", row.get::<_, String>(0)));
    }
    for row in src
        .query(
            "SELECT pubname || ' ' || coalesce(string_agg(schemaname || '.' || tablename, ',' ORDER BY tablename), '') \
             FROM pg_publication LEFT JOIN pg_publication_tables USING (pubname) GROUP BY pubname ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
    {
        out.push(format!("source publication {}", row.get::<_, String>(0)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_from_a_newer_walshuttle_is_refused_by_every_command() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v text,
                             created_at timestamptz NOT NULL DEFAULT now(),
                             updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO items (id, v) SELECT g, 'v' || g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, _, stderr) = run_with_deadline(cmd, Duration::from_secs(120));
    assert_eq!(code, Some(0), "bootstrap: {stderr}");
    tgt.batch_execute("UPDATE walshuttle.schema_version SET version = 99")
        .await
        .unwrap();
    // Changes waiting in the slot, which nothing may apply.
    src.batch_execute(
        "INSERT INTO items (id, v) VALUES (1000, 'later'); DELETE FROM items WHERE id = 1",
    )
    .await
    .unwrap();
    let before = snapshot(&src, &tgt).await;

    let commands: &[&[&str]] = &[
        &["bootstrap"],
        &["run"],
        &["status"],
        &["status", "--json"],
        &["catch-up"],
        &["verify"],
        &["verify", "--repair"],
        &["teardown", "--yes"],
    ];
    let mut failures = Vec::new();
    for args in commands {
        let mut cmd = walshuttle(&source, &target);
        cmd.args(*args);
        let (code, stdout, stderr) = run_with_deadline(cmd, Duration::from_secs(60));
        let last = stderr.lines().last().unwrap_or_default().to_string();
        let shown = args.join(" ");
        eprintln!("walshuttle {shown}: exit {code:?}: {last}");
        let refused = matches!(code, Some(c) if c != 0)
            && last.starts_with("error: ")
            && last.contains("newer walshuttle");
        if !refused {
            failures.push(format!(
                "`walshuttle {shown}` did not refuse (exit {code:?}); stdout tail:\n{}\nstderr tail:\n{}",
                tail(&stdout, 8),
                tail(&stderr, 8)
            ));
        }
        assert!(
            !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
            "password shown by {shown}"
        );
        let after = snapshot(&src, &tgt).await;
        if after != before {
            failures.push(format!(
                "`walshuttle {shown}` changed something:\nbefore: {before:#?}\nafter: {after:#?}"
            ));
            break;
        }
    }
    assert!(
        failures.is_empty(),
        "state from a newer walshuttle was not refused everywhere:\n{}",
        failures.join("\n\n")
    );
}
