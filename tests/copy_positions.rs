//! Every write walshuttle makes outside the stream (a resumed bootstrap chunk, a
//! range rewritten by `verify --repair` or `catch-up`) records the source snapshot it
//! was read under, and the stream applies a change to those rows only when the
//! change's transaction is not already in that snapshot. These tests write on the
//! source between every two steps (a kill and its resume, a stop and a repair) and
//! end with row-by-row equality and `verify` exit 0.

mod support;

use std::time::Duration;

use support::{
    kill_bootstrap_after_first_chunk, run, scalar_i64, wait_for_convergence_running, wait_until,
    walshuttle, Cluster, RunChild, RunLogs,
};
use tokio_postgres::Client;

fn verify_exit(source: &Cluster, target: &Cluster) -> (i32, String) {
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    (code, format!("{stdout}{stderr}"))
}

fn spawn_run(logs: &mut RunLogs, source: &Cluster, target: &Cluster, extra: &[&str]) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.arg("run").args(extra);
    logs.spawn(cmd)
}

/// A 400,000-row table packed full (fillfactor 100), with a TOASTed column on some
/// rows and a secondary UNIQUE: non-HOT updates move rows between heap ranges.
async fn seed_big(src: &Client) {
    src.batch_execute(
        "CREATE TABLE big (id bigint PRIMARY KEY, u text NOT NULL UNIQUE, n int NOT NULL, doc text)
           WITH (fillfactor = 100);
         ALTER TABLE big ALTER COLUMN doc SET STORAGE EXTERNAL;
         INSERT INTO big SELECT g, 'u' || g, 0,
                CASE WHEN g % 500 = 0 THEN repeat(md5(g::text), 120) END
           FROM generate_series(1, 400000) g;
         CREATE TABLE small (id int PRIMARY KEY, v text);
         INSERT INTO small SELECT g, 's' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_bootstrap_is_exact_when_rows_move_between_ranges() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed_big(&src).await;
    kill_bootstrap_after_first_chunk(&source, &target, "big").await;

    // Between the kill and the resume: rows of the first (copied) range are updated
    // (their new versions move to the end of the heap); space is freed at the start
    // and rows from the end are updated into it, leaving their TOASTed column
    // unchanged; a value of the secondary UNIQUE passes from row to row.
    src.batch_execute(
        "UPDATE big SET n = n + 1 WHERE id BETWEEN 3001 AND 4000;
         DELETE FROM big WHERE id BETWEEN 1 AND 3000;",
    )
    .await
    .unwrap();
    // A value of the secondary UNIQUE passes from a row of the range copied before
    // the kill to a row of a range copied after it.
    src.batch_execute("UPDATE big SET u = 'u5' WHERE id = 390001")
        .await
        .unwrap();
    src.batch_execute("VACUUM big").await.unwrap();
    src.batch_execute("UPDATE big SET n = n + 7, u = u || 'm' WHERE id > 399000 AND id % 2 = 0")
        .await
        .unwrap();
    for (a, b) in [(399_001i64, 399_003i64), (398_001, 398_003)] {
        src.batch_execute(&format!(
            "UPDATE big SET u = 'v{a}' WHERE id = {a};
             UPDATE big SET u = 'w{a}' WHERE id = {a};
             UPDATE big SET u = 'v{a}' WHERE id = {b};"
        ))
        .await
        .unwrap();
    }

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "1"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "resumed bootstrap failed:\n{stdout}{stderr}");

    // Between the resume and the first `run`.
    src.batch_execute(
        "UPDATE big SET n = n + 100 WHERE id BETWEEN 200000 AND 200500;
         INSERT INTO big VALUES (500001, 'late', 1, repeat('z', 9000));
         DELETE FROM big WHERE id BETWEEN 300000 AND 300010;",
    )
    .await
    .unwrap();

    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["big", "small"],
        Duration::from_secs(120),
    )
    .await;
    // Streaming goes on after the copy positions are passed.
    src.batch_execute("UPDATE big SET n = -1 WHERE id = 399001; DELETE FROM big WHERE id = 5000")
        .await
        .unwrap();
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["big", "small"],
        Duration::from_secs(60),
    )
    .await;
    let (code, out) = verify_exit(&source, &target);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_keyless_table_is_copied_again_whole() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE bag (a int, b text) WITH (fillfactor = 100);
         ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO bag SELECT g % 1000, repeat('b', 60) FROM generate_series(1, 400000) g;",
    )
    .await
    .unwrap();
    kill_bootstrap_after_first_chunk(&source, &target, "bag").await;

    // Inserts of rows identical to existing ones, updates that move rows, deletes.
    src.batch_execute(
        "INSERT INTO bag SELECT g % 1000, repeat('b', 60) FROM generate_series(1, 500) g;
         UPDATE bag SET b = 'moved' WHERE ctid >= '(0,0)'::tid AND ctid < '(3,0)'::tid;
         DELETE FROM bag WHERE a = 7;",
    )
    .await
    .unwrap();

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "1"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "resumed bootstrap failed:\n{stdout}{stderr}");
    src.batch_execute(
        "INSERT INTO bag VALUES (1, 'after'), (1, 'after'); DELETE FROM bag WHERE a = 8",
    )
    .await
    .unwrap();

    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_for_convergence_running(&mut child, &src, &tgt, &["bag"], Duration::from_secs(120)).await;
    let (code, out) = verify_exit(&source, &target);
    assert_eq!(code, 0, "{out}");
}

async fn seed_items(src: &Client) {
    src.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL UNIQUE, qty int NOT NULL,
                             created_at timestamptz NOT NULL DEFAULT now(),
                             updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO items (id, name, qty, created_at, updated_at)
           SELECT g, 'item ' || g, 0, now() - interval '1 day', now() - interval '1 day'
           FROM generate_series(1, 20000) g;",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_repair_with_run_stopped_then_started() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed_items(&src).await;
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());

    // While run is stopped: changes the stream will deliver later, which repair
    // copies now.
    src.batch_execute(
        "INSERT INTO items (id, name, qty) VALUES (30001, 'new', 1);
         UPDATE items SET qty = 5 WHERE id = 10;
         DELETE FROM items WHERE id = 11;",
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["verify", "--repair"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        scalar_i64(&tgt, "SELECT count(*) FROM items WHERE id = 30001").await,
        1,
        "repair did not copy the new row"
    );
    // After the repair, before run starts again.
    src.batch_execute(
        "UPDATE items SET qty = 6 WHERE id = 30001;
         INSERT INTO items (id, name, qty) VALUES (30002, 'newer', 2);",
    )
    .await
    .unwrap();

    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    src.batch_execute("UPDATE items SET qty = 7 WHERE id = 30001")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    let (code, out) = verify_exit(&source, &target);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_repair_while_streaming_hot_rows() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed_items(&src).await;
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;

    // A writer on twenty hot rows, and the target damaged on those rows.
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
                    &[&(n % 20 + 1)],
                )
                .await
                .unwrap();
        }
        n
    });
    for round in 0..3 {
        // The damage locks the hot rows in key order while run's apply locks them in
        // the source's order: PostgreSQL may end either in a deadlock, and run
        // retries when it is the one; so does this.
        let damage = format!(
            "UPDATE items SET name = 'damaged {round} ' || id WHERE id BETWEEN 1 AND 20 AND id % 3 = {round};
             DELETE FROM items WHERE id = 100 + {round};"
        );
        loop {
            match tgt.batch_execute(&damage).await {
                Ok(()) => break,
                Err(e)
                    if e.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {}
                Err(e) => panic!("{damage}: {e}"),
            }
        }
        let mut cmd = walshuttle(&source, &target);
        cmd.args(["verify", "--repair"]);
        let (code, stdout, stderr) = tokio::task::spawn_blocking(move || run(cmd)).await.unwrap();
        assert!(
            code == 0 || code == 1,
            "verify --repair failed: {stdout}{stderr}"
        );
        child.assert_running("after verify --repair");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = handle.await.unwrap();
    assert!(writes > 50, "the writer barely ran ({writes} updates)");
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    let (code, out) = verify_exit(&source, &target);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_repairs_a_stale_update_from_a_long_transaction() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    seed_items(&src).await;
    // A replication role that is not a superuser, owning the table.
    src.batch_execute(&format!(
        "CREATE ROLE repl LOGIN REPLICATION PASSWORD '{pw}';
         ALTER TABLE items OWNER TO repl;
         GRANT CREATE ON DATABASE postgres TO repl;",
        pw = support::PASSWORD
    ))
    .await
    .unwrap();
    let repl_url = source.url().replacen("postgres:", "repl:", 1);
    let with_repl = |args: &[&str]| {
        let mut cmd = walshuttle(&source, &target);
        cmd.env("WALSHUTTLE_SOURCE", &repl_url).args(args);
        cmd
    };
    let mut logs = RunLogs::new();
    let mut child = logs.spawn(with_repl(&["run"]));
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;

    // A long transaction of another role: it reads first (no transaction id yet), so
    // its later UPDATE stamps updated_at with its start time.
    let long = source.client().await;
    long.batch_execute("BEGIN; SELECT count(*) FROM items")
        .await
        .unwrap();
    // Later transactions move the watermark well past the long one's start.
    src.batch_execute(
        "UPDATE items SET qty = 1, updated_at = now() + interval '1 hour' WHERE id = 2;
         INSERT INTO items (id, name, qty, created_at, updated_at)
           VALUES (40000, 'later', 1, now() + interval '1 hour', now() + interval '1 hour');",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    long.batch_execute("UPDATE items SET qty = 99, updated_at = now() WHERE id = 5")
        .await
        .unwrap();
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());

    // The slot is lost; then the long transaction commits.
    src.batch_execute("SELECT pg_drop_replication_slot('walshuttle')")
        .await
        .unwrap();
    long.batch_execute("COMMIT").await.unwrap();

    let (code, stdout, stderr) = run(with_repl(&["catch-up", "--margin", "0s"]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        scalar_i64(&tgt, "SELECT qty::bigint FROM items WHERE id = 5").await,
        99,
        "the long transaction's UPDATE was missed: {stdout}{stderr}"
    );
    // Streaming continues from the new slot.
    let mut child = logs.spawn(with_repl(&["run"]));
    src.batch_execute("UPDATE items SET qty = 3 WHERE id = 6")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    let (code, out) = verify_exit(&source, &target);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_rewritten_during_bootstrap_keeps_its_rows() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE big (id bigint PRIMARY KEY, v text NOT NULL);
         INSERT INTO big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 600000) g;
         CREATE TABLE small (id int PRIMARY KEY, v text);
         INSERT INTO small SELECT g, 's' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .unwrap();

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "1"]);
    let child = cmd.spawn().expect("spawn bootstrap");
    wait_until("the copy started", Duration::from_secs(120), || async {
        tgt.query_one(
            "SELECT count(*) FROM walshuttle.chunks WHERE table_name = 'big' AND done_at IS NOT NULL",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) >= 1)
        .unwrap_or(false)
    })
    .await;
    // While big is copied, small (not reached yet) is rewritten.
    let alter = source.client().await;
    let rewrite = tokio::spawn(async move {
        alter
            .batch_execute("ALTER TABLE small ADD COLUMN x uuid DEFAULT gen_random_uuid()")
            .await
    });
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("wait for bootstrap");
    assert!(out.status.success(), "bootstrap failed");
    rewrite.await.unwrap().expect("the rewrite failed");
    assert_eq!(
        scalar_i64(&tgt, "SELECT count(*) FROM small").await,
        1000,
        "the rewritten table was copied empty"
    );

    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    src.batch_execute("INSERT INTO small (id, v) VALUES (1001, 'after')")
        .await
        .unwrap();
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["big", "small"],
        Duration::from_secs(120),
    )
    .await;
    let (code, out) = verify_exit(&source, &target);
    assert_eq!(code, 0, "{out}");
}
