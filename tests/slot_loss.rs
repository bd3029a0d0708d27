//! The replication slot lost while `run` streams: dropped by an operator, or
//! invalidated by `max_slot_wal_keep_size` while walshuttle was frozen. `run` must
//! notice, repair the gap from the watermark columns (catch-up), stream from the new
//! slot, and end with both sides equal.

mod support;

use std::time::{Duration, Instant};

use rand::Rng;
use support::workload::Writer;
use support::{
    assert_tables_equal, run, slot_active, tail, wait_for_convergence_running, wait_while_running,
    walshuttle, Cluster, ClusterOptions, RunChild, RunLogs,
};
use tokio_postgres::Client;

const TABLES: &[&str] = &["items", "tags"];

/// `items` (keyed, with watermark columns; rows a day old) and `tags` (keyed, no
/// watermark columns; only inserted into, which catch-up repairs as missing rows).
const SCHEMA: &str = "
    CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int,
                        created_at timestamptz NOT NULL DEFAULT now(),
                        updated_at timestamptz NOT NULL DEFAULT now());
    INSERT INTO items SELECT g, 'item ' || g, g % 100,
           now() - interval '1 day' - g * interval '1 second',
           now() - interval '1 day' - g * interval '1 second'
      FROM generate_series(1, 20000) g;
    CREATE TABLE tags (id bigint PRIMARY KEY, label text);
    INSERT INTO tags SELECT g, 'tag ' || g FROM generate_series(1, 100) g;";

/// A writer inserting, updating (touching updated_at) and deleting items, and
/// inserting tags.
fn spawn_writer(source: &Cluster) -> Writer {
    let mut rng = rand::thread_rng();
    let seed: u64 = rng.gen();
    eprintln!("writer seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    Writer::spawn(source.url(), Duration::from_millis(5), move |i| {
        let mut sql = format!(
            "BEGIN; INSERT INTO items (id, name, qty) VALUES ({}, 'new {i}', 1);
             UPDATE items SET qty = qty + 1, updated_at = now() WHERE id = {};",
            1_000_000 + i,
            rng.gen_range(1..=20000)
        );
        if i % 3 == 0 {
            sql.push_str(&format!(
                "DELETE FROM items WHERE id = {};",
                rng.gen_range(1..=20000)
            ));
        }
        if i % 5 == 0 {
            sql.push_str(&format!(
                "INSERT INTO tags VALUES ({}, 'tag new {i}');",
                1000 + i
            ));
        }
        sql.push_str("COMMIT;");
        sql
    })
}

fn spawn_run(logs: &mut RunLogs, source: &Cluster, target: &Cluster) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--jobs", "2"]);
    logs.spawn(cmd)
}

async fn applied_any(target: &Cluster) -> bool {
    match support::try_connect(&target.url()).await {
        Some(t) => support::applied_lsn(&t, "walshuttle").await.is_some(),
        None => false,
    }
}

async fn slot_state(src: &Client) -> Option<(Option<i32>, Option<String>, Option<String>)> {
    src.query_opt(
        "SELECT active_pid, wal_status, restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walshuttle'",
        &[],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Terminates the slot's consumer and drops the slot, retrying while walshuttle
/// reconnects in between. Returns the number of attempts.
async fn drop_slot_like_an_operator(src: &Client) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempts = 0;
    loop {
        attempts += 1;
        src.batch_execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = 'walshuttle' AND active_pid IS NOT NULL",
        )
        .await
        .unwrap();
        match src
            .batch_execute("SELECT pg_drop_replication_slot('walshuttle')")
            .await
        {
            Ok(()) => return attempts,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "could not drop the slot within 60 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Waits until both sides are equal, then runs `verify` (exit 0: equal).
async fn converge_and_verify(
    run_child: &mut RunChild,
    source: &Cluster,
    target: &Cluster,
    timeout: Duration,
) {
    let src = source.client().await;
    let tgt = target.client().await;
    wait_for_convergence_running(run_child, &src, &tgt, TABLES, timeout).await;
    assert_tables_equal(&src, &tgt, TABLES).await;
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "verify after the repair: {stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped_by_an_operator_while_streaming_is_repaired() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(SCHEMA).await.unwrap();
    let writer = spawn_writer(&source);
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_while_running(
        "the first applied transaction",
        Duration::from_secs(90),
        &mut child,
        || applied_any(&target),
    )
    .await;
    writer
        .wait_for_more(&mut child, 100, Duration::from_secs(60), "while streaming")
        .await;

    let before = slot_state(&src).await;
    let attempts = drop_slot_like_an_operator(&src).await;
    let dropped_at = Instant::now();
    eprintln!("slot dropped after {attempts} attempt(s); it was {before:?}");

    // run notices, repairs, and streams from a new slot while the writer goes on.
    wait_while_running(
        "run to notice the lost slot",
        Duration::from_secs(60),
        &mut child,
        || async { child_log_contains_gone(&logs) },
    )
    .await;
    wait_while_running(
        "a new slot with walshuttle attached",
        Duration::from_secs(120),
        &mut child,
        || slot_active(&src, "walshuttle"),
    )
    .await;
    eprintln!(
        "streaming from a new slot {:.1}s after the drop: {:?}",
        dropped_at.elapsed().as_secs_f64(),
        slot_state(&src).await
    );
    writer
        .wait_for_more(&mut child, 100, Duration::from_secs(60), "after the repair")
        .await;
    let (committed, errors) = writer.stop().await;
    eprintln!("writer: {committed} committed, {errors} errors");
    converge_and_verify(&mut child, &source, &target, Duration::from_secs(90)).await;
    let log = child.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("catch-up"))
        .collect();
    eprintln!("walshuttle warnings:\n{}", lines.join("\n"));
    child.assert_running("after the repair");
}

fn child_log_contains_gone(logs: &RunLogs) -> bool {
    logs.all().contains("slot is gone")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_invalidated_by_max_slot_wal_keep_size_while_frozen_is_repaired() {
    let source = Cluster::start_with(ClusterOptions {
        extra_conf: vec![
            "max_slot_wal_keep_size = '32MB'".into(),
            "max_wal_size = '64MB'".into(),
            "min_wal_size = '32MB'".into(),
        ],
        ..Default::default()
    });
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(SCHEMA).await.unwrap();
    let writer = spawn_writer(&source);
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    wait_while_running(
        "the first applied transaction",
        Duration::from_secs(90),
        &mut child,
        || applied_any(&target),
    )
    .await;
    writer
        .wait_for_more(&mut child, 100, Duration::from_secs(60), "while streaming")
        .await;

    // Freeze walshuttle; keep writing; push > 100 MB of WAL through an unreplicated
    // table and checkpoint until the slot is lost.
    let pid = child.pid() as libc::pid_t;
    // SAFETY: kill(2) on our own unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
    let frozen_at = Instant::now();
    // The writer goes on meanwhile: those changes are in the WAL about to be lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    src.batch_execute("CREATE TABLE filler (id int, pad text)")
        .await
        .unwrap();
    let mut written_mb = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        src.batch_execute(
            "INSERT INTO filler SELECT g, repeat('x', 1000) FROM generate_series(1, 25000) g;
             TRUNCATE filler; CHECKPOINT;",
        )
        .await
        .unwrap();
        written_mb += 27;
        let info = slot_state(&src).await;
        let lost = matches!(&info, Some((_, Some(status), _)) if status == "lost");
        if written_mb >= 100 && (lost || info.is_none()) {
            eprintln!("slot after ~{written_mb} MB of WAL: {info:?}");
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            panic!("the slot was not invalidated after ~{written_mb} MB of WAL: {info:?}");
        }
    }
    let (committed_frozen, _) = (writer.committed(), writer.errors());
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0, "SIGCONT");
    eprintln!(
        "walshuttle frozen for {:.1}s; writer committed {committed_frozen} so far",
        frozen_at.elapsed().as_secs_f64()
    );

    wait_while_running(
        "run to notice the invalidated slot",
        Duration::from_secs(90),
        &mut child,
        || async { child_log_contains_gone(&logs) },
    )
    .await;
    wait_while_running(
        "a new slot with walshuttle attached",
        Duration::from_secs(120),
        &mut child,
        || async { matches!(slot_state(&src).await, Some((Some(_), Some(s), _)) if s != "lost") },
    )
    .await;
    writer
        .wait_for_more(&mut child, 100, Duration::from_secs(60), "after the repair")
        .await;
    let (committed, errors) = writer.stop().await;
    eprintln!("writer: {committed} committed, {errors} errors");
    converge_and_verify(&mut child, &source, &target, Duration::from_secs(90)).await;
    let log = child.log();
    eprintln!(
        "walshuttle log (warnings):\n{}",
        log.lines()
            .filter(|l| l.contains("WARN") || l.contains("catch-up"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        log.contains("slot is gone"),
        "no warning about the lost slot:\n{}",
        tail(&log, 40)
    );
}
