//! `catch-up` and `verify` against real clusters: a lost slot repaired from
//! watermarks with work proportional to the change, `run` repairing by itself (a long
//! transaction's stale update: `copy_positions.rs`), polling a source without logical decoding,
//! and verify's exit codes and repair.

mod support;

use std::time::Duration;

use support::{
    run, wait_for_convergence, wait_for_convergence_running, walshuttle, Cluster, ClusterOptions,
    RunLogs,
};
use tokio_postgres::Client;

const TABLES: &[&str] = &["public.items", "public.tags"];

/// A keyed table with watermark columns whose rows are a day old or older (one a
/// second), and a small table without watermark columns.
async fn seed(src: &Client, rows: i64) {
    src.batch_execute(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int,
                             created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL);
         INSERT INTO items SELECT g, 'item ' || g, g % 100,
                now() - interval '1 day' - g * interval '1 second', now() - interval '1 day' - g * interval '1 second'
           FROM generate_series(1, {rows}) g;
         CREATE TABLE tags (id int PRIMARY KEY, label text);
         INSERT INTO tags SELECT g, 'tag ' || g FROM generate_series(1, 50) g;"
    ))
    .await
    .unwrap();
}

/// Changes made while nothing streams: 30 inserts, 20 updates, 10 deletes on items,
/// and a delete and an insert on tags.
async fn change_while_down(src: &Client) {
    src.batch_execute(
        "INSERT INTO items SELECT g, 'new ' || g, 1, now(), now() FROM generate_series(1000001, 1000030) g;
         UPDATE items SET qty = -1, updated_at = now() WHERE id BETWEEN 100 AND 119;
         DELETE FROM items WHERE id BETWEEN 5000 AND 5009;
         DELETE FROM tags WHERE id = 7;
         INSERT INTO tags VALUES (1000, 'late tag');",
    )
    .await
    .unwrap();
}

fn parse_count(text: &str, label: &str) -> u64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("`{label}` not in {text}"));
    let before = text[..at].trim_end();
    let num = before.rsplit([' ', ',']).next().unwrap_or_default();
    num.parse()
        .unwrap_or_else(|_| panic!("no number before `{label}` in {text}"))
}

async fn bootstrap(source: &Cluster, target: &Cluster) {
    let mut cmd = walshuttle(source, target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_slot_is_repaired_from_watermarks_in_proportion_to_the_change() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed(&src, 100_000).await;
    bootstrap(&source, &target).await;

    src.batch_execute("SELECT pg_drop_replication_slot('walshuttle')")
        .await
        .unwrap();
    change_while_down(&src).await;

    let mut cmd = walshuttle(&source, &target);
    cmd.arg("catch-up");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("SlotMissing"), "{stdout}");
    // Work proportional to the change, not the table: 30 + 20 changed item rows, one
    // new tag, and the rows within the 5-minute margin below the watermark (one a
    // second: 300) were upserted; 11 rows deleted.
    let upserted = parse_count(&stdout, "rows upserted");
    let deleted = parse_count(&stdout, "rows deleted");
    assert!(
        (51..=400).contains(&upserted),
        "upserted {upserted}: {stdout}"
    );
    assert_eq!(deleted, 11, "{stdout}");
    assert!(
        stdout.contains("public.tags has no created/updated columns"),
        "{stdout}"
    );

    // `run` streams from the new slot.
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    src.batch_execute(
        "UPDATE items SET name = 'after' WHERE id = 1; DELETE FROM tags WHERE id = 8",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, TABLES, Duration::from_secs(60)).await;

    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "verify: {stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_notices_the_lost_slot_and_repairs_by_itself() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed(&src, 20_000).await;
    bootstrap(&source, &target).await;
    src.batch_execute("SELECT pg_drop_replication_slot('walshuttle')")
        .await
        .unwrap();
    change_while_down(&src).await;

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, &src, &tgt, TABLES, Duration::from_secs(60)).await;
    // And it keeps streaming afterwards.
    src.batch_execute("INSERT INTO items VALUES (2000000, 'later', 1, now(), now())")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, TABLES, Duration::from_secs(60)).await;
    let log = child.log();
    assert!(
        log.contains("slot is gone"),
        "no warning about the lost slot:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_keeps_a_source_without_logical_decoding_in_step() {
    let source = Cluster::start_with(ClusterOptions {
        wal_level: "replica",
        ..Default::default()
    });
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed(&src, 5_000).await;

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["catch-up", "--poll", "1s"]);
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, &src, &tgt, TABLES, Duration::from_secs(60)).await;
    change_while_down(&src).await;
    wait_for_convergence_running(&mut child, &src, &tgt, TABLES, Duration::from_secs(60)).await;
    child.sigterm();
    let status = child.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "poll did not stop cleanly: {status:?}"
    );

    // `run` cannot stream from such a source, and says what to do.
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let (code, _, stderr) = run(cmd);
    assert_ne!(code, 0);
    assert!(stderr.contains("catch-up --poll"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_differences_and_repairs_them() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed(&src, 50_000).await;
    src.batch_execute(
        "CREATE TABLE bag (a int, b text); ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO bag VALUES (1, 'x'), (1, 'x'), (2, 'y');",
    )
    .await
    .unwrap();
    bootstrap(&source, &target).await;
    let all = ["public.items", "public.tags", "public.bag"];

    let verify = |extra: &[&str]| {
        let mut cmd = walshuttle(&source, &target);
        cmd.arg("verify").args(extra);
        run(cmd)
    };
    let (code, stdout, stderr) = verify(&[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("3 of 3 tables equal"), "{stdout}");

    // A changed, a deleted and an added row on the target, and one copy too many
    // of an identical row.
    tgt.batch_execute(
        "UPDATE items SET qty = 12345 WHERE id = 42;
         DELETE FROM items WHERE id = 43;
         INSERT INTO items VALUES (-1, 'stray', 0, now(), now());
         INSERT INTO bag VALUES (1, 'x');",
    )
    .await
    .unwrap();
    let (code, stdout, _) = verify(&[]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("public.items: DIFFERENT"), "{stdout}");
    assert!(
        stdout.contains("(42)") && stdout.contains("(43)") && stdout.contains("(-1)"),
        "{stdout}"
    );
    assert!(stdout.contains("public.bag: DIFFERENT"), "{stdout}");
    assert!(stdout.contains("public.tags: equal"), "{stdout}");

    let (code, stdout, stderr) = verify(&["--repair"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    support::assert_tables_equal(&src, &tgt, &all).await;
    let (code, stdout, _) = verify(&[]);
    assert_eq!(code, 0, "{stdout}");

    // Errors exit 2.
    let mut cmd = walshuttle(&source, &target);
    cmd.env("WALSHUTTLE_TARGET", "postgresql://nobody@127.0.0.1:1/none");
    cmd.arg("verify");
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 2, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_while_streaming_does_not_report_changes_in_flight() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed(&src, 20_000).await;
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, &src, &tgt, TABLES, Duration::from_secs(60)).await;
    // Converged by the bootstrap alone; verify waits for changes in flight only
    // while a stream consumes the slot, so wait for that.
    support::wait_while_running(
        "run to stream from the slot",
        Duration::from_secs(60),
        &mut child,
        || async { support::slot_active(&src, "walshuttle").await },
    )
    .await;

    // A steady writer while verify runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer_stop = stop.clone();
    let writer = source.client().await;
    let handle = tokio::spawn(async move {
        let mut n = 0i64;
        while !writer_stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            writer
                .execute(
                    "UPDATE items SET qty = qty + 1, updated_at = now() WHERE id = $1",
                    &[&(n % 20_000 + 1)],
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    });
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || run(cmd)).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = handle.await.unwrap();
    assert!(writes > 5, "the writer did not run");
    assert_eq!(
        code, 0,
        "changes in flight reported as differences: {stdout}{stderr}"
    );
    wait_for_convergence(&src, &tgt, TABLES, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_catch_up_is_finished_before_streaming() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed(&src, 10_000).await;
    bootstrap(&source, &target).await;
    src.batch_execute("SELECT pg_drop_replication_slot('walshuttle')")
        .await
        .unwrap();
    change_while_down(&src).await;
    // What a catch-up killed after creating its new slot leaves behind: a healthy
    // slot past the changes, and the pipeline still catching up.
    src.batch_execute("SELECT pg_create_logical_replication_slot('walshuttle', 'pgoutput')")
        .await
        .unwrap();
    tgt.batch_execute("UPDATE walshuttle.pipelines SET phase = 'catching_up'")
        .await
        .unwrap();

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, &src, &tgt, TABLES, Duration::from_secs(60)).await;
    src.batch_execute("UPDATE items SET name = 'streamed' WHERE id = 2")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, TABLES, Duration::from_secs(60)).await;
}
