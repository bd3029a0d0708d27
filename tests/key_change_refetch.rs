//! Issue 22, item 6: a key change that moves a row with an unchanged TOASTed value
//! from a key range copied after it (by a resumed bootstrap) into a range copied
//! before it leaves the stream without the row's TOASTed value and without an old
//! row on the target to take it from. `run` reads the row again from the source by
//! its new key, records that read as the row's copy position, and goes on; it never
//! stops to ask for `verify --repair`.

mod support;

use std::time::Duration;

use support::{
    exec, kill_bootstrap_after_first_chunk, run, scalar_i64, wait_for_convergence_running,
    wait_until, walshuttle, Cluster, ClusterOptions, RunLogs,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_into_an_earlier_copied_range_refetches_the_toasted_row() {
    scenario(ClusterOptions::default(), &[], "", "").await;
}

/// The same with values received as text (the target widened a column).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_refetches_in_text_mode() {
    let log = scenario(
        ClusterOptions::default(),
        &[],
        "",
        r#"CREATE TABLE "Big Docs" (id bigint PRIMARY KEY, u text NOT NULL, n bigint NOT NULL, doc text)"#,
    )
    .await;
    assert!(log.contains("binary=false"), "not in text mode:\n{log}");
}

/// The same with the key changes inside transactions large enough to be streamed
/// while still open (applied whole at their commit instead, since an open
/// transaction's row cannot be read yet) and batches applied on several lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_in_a_streamed_transaction_refetches_at_its_commit_on_lanes() {
    let options = ClusterOptions {
        extra_conf: vec!["logical_decoding_work_mem = '64kB'".into()],
        ..ClusterOptions::default()
    };
    let log = scenario(
        options,
        &["--apply-lanes", "3"],
        r#"UPDATE "Big Docs" SET n = n + 1 WHERE id BETWEEN 100000 AND 103000;"#,
        "",
    )
    .await;
    assert!(
        log.contains("apply it whole at its commit"),
        "the key changes were not in streamed transactions:\n{log}"
    );
}

/// Kills a bootstrap after its first key range, moves rows into that range
/// (each transaction also running `bulk`), resumes, and runs; `target_sql` makes
/// the target's own tables first. Returns `run`'s log.
async fn scenario(
    options: ClusterOptions,
    run_args: &[&str],
    bulk: &str,
    target_sql: &str,
) -> String {
    let source = Cluster::start_with(options);
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    // Key ranges (no UNIQUE beside the key) need a big table; the doc column is
    // stored out of line, so an update that leaves it alone sends it as
    // "unchanged TOAST".
    exec(
        &src,
        r#"CREATE TABLE "Big Docs" (id bigint PRIMARY KEY, u text NOT NULL, n int NOT NULL, doc text)
             WITH (fillfactor = 100);
           ALTER TABLE "Big Docs" ALTER COLUMN doc SET STORAGE EXTERNAL;
           INSERT INTO "Big Docs" SELECT g, 'u' || g, 0,
                  CASE WHEN g % 500 = 0 THEN repeat(md5(g::text), 120) END
             FROM generate_series(1, 400000) g;"#,
    )
    .await;
    let toasted = scalar_i64(
        &src,
        r#"SELECT count(*) FROM "Big Docs" WHERE pg_column_size(doc) > 2000"#,
    )
    .await;
    assert_eq!(toasted, 800, "docs are not stored uncompressed out of line");
    if !target_sql.is_empty() {
        exec(&tgt, target_sql).await;
    }
    kill_bootstrap_after_first_chunk(&source, &target, "Big Docs").await;

    // Between the kill and the resume, rows of the range not yet copied move into
    // the range copied before the kill, leaving their TOASTed doc unchanged:
    // - 399500 -> 10, then its doc changes (the read from the source holds that);
    // - 399000 -> 20 -> 30 (by 20 it is gone when read: its next move reads it);
    // - 398500 -> 40, then deleted (gone when read; the delete is skipped);
    // - 398000 -> 50, and its other columns change in a later transaction.
    exec(
        &src,
        r#"DELETE FROM "Big Docs" WHERE id IN (10, 20, 30, 40, 50);"#,
    )
    .await;
    for step in [
        r#"UPDATE "Big Docs" SET id = 10 WHERE id = 399500;"#,
        r#"UPDATE "Big Docs" SET doc = repeat('changed', 1000) WHERE id = 10;
           UPDATE "Big Docs" SET id = 20 WHERE id = 399000;"#,
        r#"UPDATE "Big Docs" SET id = 30 WHERE id = 20;"#,
        r#"UPDATE "Big Docs" SET id = 40 WHERE id = 398500;
           UPDATE "Big Docs" SET id = 50 WHERE id = 398000;"#,
    ] {
        exec(&src, &format!("BEGIN; {bulk} {step} COMMIT;")).await;
    }
    exec(&src, r#"DELETE FROM "Big Docs" WHERE id = 40"#).await;
    exec(
        &src,
        r#"UPDATE "Big Docs" SET n = 7, u = 'moved 50' WHERE id = 50"#,
    )
    .await;

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "1"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "resumed bootstrap failed:\n{stdout}{stderr}");

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run").args(run_args);
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["\"Big Docs\""],
        Duration::from_secs(180),
    )
    .await;
    let docs = scalar_i64(
        &tgt,
        r#"SELECT count(*) FROM "Big Docs" WHERE id IN (10, 30, 50) AND length(doc) > 2000"#,
    )
    .await;
    assert_eq!(docs, 3, "a moved row lost its TOASTed doc");
    assert!(
        child.log().contains("read again from the source"),
        "run did not log the rows it read again:\n{}",
        child.log()
    );

    // Streaming goes on, also for the rows read again.
    exec(
        &src,
        r#"UPDATE "Big Docs" SET n = -1 WHERE id IN (10, 30, 50);
           DELETE FROM "Big Docs" WHERE id = 60;
           UPDATE "Big Docs" SET id = 60 WHERE id = 397500;"#,
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["\"Big Docs\""],
        Duration::from_secs(120),
    )
    .await;
    child.assert_running("after streaming the moved rows");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "verify:\n{stdout}{stderr}");
    child.log()
}

/// The same while `run --online` copies a table range by range: the key change is
/// held while the table's copy runs and read again when the held changes are
/// replayed through the ranges' copy positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_held_during_an_online_copy_refetches_at_replay() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        "CREATE TABLE docs (id bigint PRIMARY KEY, n int NOT NULL, doc text) WITH (fillfactor = 100);
         ALTER TABLE docs ALTER COLUMN doc SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT g, 0, CASE WHEN g % 500 = 0 THEN repeat(md5(g::text), 120) END
           FROM generate_series(1, 300000) g;",
    )
    .await;
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--online", "--jobs", "1"]);
    let mut child = logs.spawn(cmd);
    // While the first key range is being copied (its transaction holds ROW
    // EXCLUSIVE on the target table), ask for a SHARE lock: it is granted when that
    // range commits, and the next range's copy queues behind it, so rows of the last
    // range can move into the first, already copied. (Asked for only once the first
    // range showed, the lock raced with the next ranges on a quiet machine.)
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let copying: bool = tgt
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = to_regclass('public.docs')
                   AND mode = 'RowExclusiveLock' AND granted AND pid <> pg_backend_pid())",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(false);
        if copying {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first key range of docs was never seen being copied"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let locker = target.client().await;
    let lock = tokio::spawn(async move {
        locker
            .batch_execute("BEGIN; LOCK TABLE docs IN SHARE MODE")
            .await
            .expect("lock docs on the target");
        locker
    });
    wait_until(
        "the first key range copied",
        Duration::from_secs(180),
        || async {
            tgt.query_one("SELECT count(*) FROM docs", &[])
                .await
                .map(|r| r.get::<_, i64>(0) > 0)
                .unwrap_or(false)
        },
    )
    .await;
    let locker = lock.await.expect("the lock task");
    let last = scalar_i64(&tgt, "SELECT coalesce(max(id), 0) FROM docs").await;
    assert!(
        last < 200_000,
        "the last key range was copied before the rows could move ({last})"
    );
    exec(
        &src,
        "DELETE FROM docs WHERE id IN (10, 20);
         UPDATE docs SET id = 10 WHERE id = 299500;",
    )
    .await;
    exec(&src, "UPDATE docs SET id = 20 WHERE id = 299000").await;
    exec(&src, "DELETE FROM docs WHERE id = 20").await;
    locker
        .batch_execute("ROLLBACK")
        .await
        .expect("release the lock");
    wait_for_convergence_running(&mut child, &src, &tgt, &["docs"], Duration::from_secs(240)).await;
    assert_eq!(
        scalar_i64(
            &tgt,
            "SELECT count(*) FROM docs WHERE id = 10 AND length(doc) > 2000"
        )
        .await,
        1,
        "the moved row lost its TOASTed doc"
    );
    assert!(
        child.log().contains("read again from the source"),
        "run did not read the row again:\n{}",
        child.log()
    );
    child.assert_running("after replaying the held key changes");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "verify:\n{stdout}{stderr}");
}
