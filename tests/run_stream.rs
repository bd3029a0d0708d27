//! `walshuttle run` against real clusters: bootstrap then stream under concurrent
//! writes, transactions never applied partially across kill -9, clean SIGTERM, added
//! columns, WAL not held back by unreplicated traffic, bounded memory for a huge
//! transaction.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{
    applied_beyond, applied_lsn, assert_tables_equal, scalar_i64, slot_active, table_fingerprint,
    wait_for_convergence_running, wait_while_running, walshuttle, Cluster, RunChild, RunLogs,
};
use tokio_postgres::Client;

const PIPELINE: &str = "walshuttle";

/// Spawns `walshuttle run --jobs 2 <extra>` with its output in `logs`.
fn spawn_run(logs: &mut RunLogs, source: &Cluster, target: &Cluster, extra: &[&str]) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--jobs", "2"]).args(extra);
    logs.spawn(cmd)
}

fn seeded_rng(test: &str) -> StdRng {
    let seed: u64 = rand::random();
    eprintln!("{test}: rng seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// Batches on the target that do not have exactly `per_batch` rows, and whether
/// the batches present are exactly 1..=max (a prefix of the commit order). `None`
/// while the table does not exist on the target yet.
async fn batch_check(tgt: &Client, table: &str, per_batch: i64) -> Option<(Vec<(i32, i64)>, bool)> {
    let exists: bool = tgt
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0);
    if !exists {
        return None;
    }
    let partial = tgt
        .query(
            &format!(
                "SELECT batch, count(*) FROM {table} GROUP BY batch HAVING count(*) <> {per_batch} ORDER BY batch"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let prefix: bool = tgt
        .query_one(
            &format!("SELECT coalesce(max(batch), 0) = count(DISTINCT batch) FROM {table}"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    Some((partial, prefix))
}

/// Writer committing transactions of ten single-row INSERT statements into each
/// of `tables` (all with columns `batch int, n int`), batch numbers 1, 2, 3, …,
/// until `stop`. Returns the number of batches committed.
fn spawn_batch_writer(
    client: Client,
    tables: &'static [&'static str],
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut batch: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            batch += 1;
            let mut sql = String::from("BEGIN;");
            for n in 1..=10 {
                for table in tables {
                    sql.push_str(&format!(
                        "INSERT INTO {table} (batch, n) VALUES ({batch}, {n});"
                    ));
                }
            }
            sql.push_str("COMMIT;");
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("writer batch {batch}: {e}"));
            committed.store(batch, Ordering::Relaxed);
        }
        batch
    })
}

// ---------------------------------------------------------------------------
// 1. Mixed workload during bootstrap and streaming.
// ---------------------------------------------------------------------------

/// Flags between the test and the mixed writer.
#[derive(Default)]
struct MixedControl {
    stop: AtomicBool,
    truncate: AtomicBool,
    truncated: AtomicBool,
    iterations: AtomicU64,
}

/// One iteration's statements of the mixed writer.
fn mixed_statements(i: u64, rng: &mut StdRng) -> Vec<String> {
    let mut s = Vec::new();
    // accounts: inserts (some with a big out-of-line doc), updates that leave the
    // TOASTed doc alone, deletes of small rows.
    let big = i % 20 == 0;
    s.push(format!(
        "INSERT INTO accounts VALUES ({id}, 'new {i}', {i}.25, {doc})",
        id = 100_000 + i,
        doc = if big {
            format!("repeat(md5('{i}'), 5000)")
        } else {
            format!("'small new {i}'")
        }
    ));
    let upd = if rng.gen_bool(0.6) {
        rng.gen_range(1..=200u64) * 10 // a row with a big TOASTed doc
    } else {
        rng.gen_range(1..=2000u64)
    };
    s.push(format!(
        "UPDATE accounts SET balance = balance + 1, owner = 'upd {i}' WHERE id = {upd}"
    ));
    if i % 3 == 0 {
        let del = rng.gen_range(1..=2000u64);
        if del % 10 != 0 {
            s.push(format!("DELETE FROM accounts WHERE id = {del}"));
        }
    }
    // "Order Items": quoted identifiers and awkward text.
    s.push(format!(
        r#"INSERT INTO "Order Items" ("Id", "we""ird") VALUES ({id}, E'it''s a "quote", tab\t, newline\n, ü {i}')"#,
        id = 10_000 + i
    ));
    s.push(format!(
        r#"UPDATE "Order Items" SET "we""ird" = 'changed {i}' WHERE "Id" = {}"#,
        rng.gen_range(1..=500u64)
    ));
    if i % 4 == 0 {
        s.push(format!(
            r#"DELETE FROM "Order Items" WHERE "Id" = {}"#,
            rng.gen_range(1..=500u64)
        ));
    }
    // kv: inserts, value updates, primary key changes, deletes.
    s.push(format!("INSERT INTO kv VALUES ({}, 'ins {i}')", 50_000 + i));
    s.push(format!(
        "UPDATE kv SET v = 'v {i}' WHERE k = {}",
        rng.gen_range(1..=1000u64)
    ));
    s.push(format!(
        "UPDATE kv SET k = k + 100000 WHERE k = {}",
        rng.gen_range(1..=1000u64)
    ));
    if i % 3 == 1 {
        s.push(format!(
            "DELETE FROM kv WHERE k = {}",
            rng.gen_range(1..=1000u64)
        ));
    }
    // dups (no key, REPLICA IDENTITY FULL): change exactly one of several identical rows.
    let a = rng.gen_range(1..=5);
    s.push(format!(
        "INSERT INTO dups VALUES ({a}, 'same'), ({a}, 'same')"
    ));
    let a = rng.gen_range(1..=5);
    s.push(format!(
        "DELETE FROM dups WHERE ctid = (SELECT ctid FROM dups WHERE a = {a} LIMIT 1)"
    ));
    let a = rng.gen_range(1..=5);
    s.push(format!(
        "UPDATE dups SET b = 'x{}' WHERE ctid = (SELECT ctid FROM dups WHERE a = {a} AND b = 'same' LIMIT 1)",
        i % 3
    ));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_then_stream_converges_under_concurrent_writes() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        r#"
        CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance numeric, doc text);
        -- EXTERNAL: stored out of line uncompressed, so an UPDATE that does not touch
        -- doc sends it as 'unchanged TOAST' ('u') in pgoutput.
        ALTER TABLE accounts ALTER COLUMN doc SET STORAGE EXTERNAL;
        INSERT INTO accounts
            SELECT g, 'owner ' || g, g * 1.5,
                   CASE WHEN g % 10 = 0 THEN repeat(md5(g::text), 5000) ELSE 'small ' || g END
            FROM generate_series(1, 2000) g;
        CREATE TABLE "Order Items" ("Id" int PRIMARY KEY, "we""ird" text);
        INSERT INTO "Order Items" SELECT g, 'item "' || g || '"' FROM generate_series(1, 500) g;
        CREATE TABLE dups (a int, b text);
        ALTER TABLE dups REPLICA IDENTITY FULL;
        INSERT INTO dups SELECT a, 'same' FROM generate_series(1, 5) a, generate_series(1, 6);
        CREATE TABLE kv (k int PRIMARY KEY, v text);
        INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 1000) g;
        "#,
    )
    .await
    .unwrap();
    let toasted: i64 = scalar_i64(
        &src,
        "SELECT count(*) FROM accounts WHERE pg_column_size(doc) >= 160000",
    )
    .await;
    assert_eq!(toasted, 200, "big docs are not stored uncompressed");

    let ctl = Arc::new(MixedControl::default());
    let writer_ctl = ctl.clone();
    let mut writer_client = source.client().await;
    let mut rng = seeded_rng("mixed writer");
    let writer = tokio::spawn(async move {
        let mut i: u64 = 0;
        while !writer_ctl.stop.load(Ordering::Relaxed) {
            i += 1;
            if writer_ctl.truncate.load(Ordering::Relaxed)
                && !writer_ctl.truncated.load(Ordering::Relaxed)
            {
                writer_client.batch_execute("TRUNCATE kv").await.unwrap();
                writer_client
                    .batch_execute(
                        "INSERT INTO kv SELECT g, 're ' || g FROM generate_series(1, 1000) g",
                    )
                    .await
                    .unwrap();
                writer_ctl.truncated.store(true, Ordering::Relaxed);
            }
            let statements = mixed_statements(i, &mut rng);
            if i % 2 == 0 {
                // One transaction with every statement of this iteration.
                let tx = writer_client.transaction().await.unwrap();
                for sql in &statements {
                    tx.batch_execute(sql)
                        .await
                        .unwrap_or_else(|e| panic!("writer: {sql}: {e}"));
                }
                tx.commit().await.unwrap();
            } else {
                // One transaction per statement.
                for sql in &statements {
                    writer_client
                        .batch_execute(sql)
                        .await
                        .unwrap_or_else(|e| panic!("writer: {sql}: {e}"));
                }
            }
            writer_ctl.iterations.store(i, Ordering::Relaxed);
        }
        i
    });

    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target, &[]);
    let tgt = target.client().await;
    wait_while_running(
        "the first streamed transaction to be applied",
        Duration::from_secs(90),
        &mut run,
        || async { applied_lsn(&tgt, PIPELINE).await.is_some() || writer.is_finished() },
    )
    .await;
    // Keep writing while streaming, TRUNCATE kv in the middle, keep writing.
    for phase in ["before the truncate", "after the truncate"] {
        let from = ctl.iterations.load(Ordering::Relaxed);
        wait_while_running(
            &format!("200 writer iterations while streaming {phase}"),
            Duration::from_secs(60),
            &mut run,
            || async {
                ctl.iterations.load(Ordering::Relaxed) >= from + 200 || writer.is_finished()
            },
        )
        .await;
        if phase == "before the truncate" {
            ctl.truncate.store(true, Ordering::Relaxed);
            wait_until_flag(&ctl.truncated, &writer).await;
        }
    }
    ctl.stop.store(true, Ordering::Relaxed);
    let iterations = writer.await.expect("writer panicked");
    eprintln!("writer ran {iterations} iterations");

    let tables = ["accounts", r#""Order Items""#, "dups", "kv"];
    wait_for_convergence_running(&mut run, &src, &tgt, &tables, Duration::from_secs(120)).await;
    assert_tables_equal(&src, &tgt, &tables).await;

    // Rows whose big doc was left alone by an UPDATE still carry the whole doc.
    let intact_sql = "SELECT count(*) FROM accounts \
                      WHERE owner LIKE 'upd %' AND id % 10 = 0 AND id <= 2000 \
                        AND length(doc) = 160000 AND doc = repeat(md5(id::text), 5000)";
    let updated_big_src = scalar_i64(&src, intact_sql).await;
    let updated_big_tgt = scalar_i64(&tgt, intact_sql).await;
    assert!(
        updated_big_src > 0,
        "the writer never updated a row with a TOASTed doc"
    );
    assert_eq!(
        updated_big_tgt, updated_big_src,
        "rows updated without touching their TOASTed doc lost the doc on the target"
    );
    let nulls = scalar_i64(&tgt, "SELECT count(*) FROM accounts WHERE doc IS NULL").await;
    assert_eq!(nulls, 0, "target has NULL docs");

    // Identical rows in the keyless table: the same multiset on both sides.
    let groups_sql = "SELECT a, b, count(*) FROM dups GROUP BY a, b ORDER BY a, b";
    let groups = |rows: Vec<tokio_postgres::Row>| -> Vec<(i32, String, i64)> {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    let src_groups = groups(src.query(groups_sql, &[]).await.unwrap());
    let tgt_groups = groups(tgt.query(groups_sql, &[]).await.unwrap());
    assert!(
        src_groups.iter().any(|(_, _, n)| *n > 1),
        "dups has no duplicate rows left: {src_groups:?}"
    );
    assert_eq!(tgt_groups, src_groups, "dups counts per (a, b) differ");

    // The TRUNCATE reached the target: none of the original kv rows survive there.
    assert!(
        ctl.truncated.load(Ordering::Relaxed),
        "the writer never truncated kv"
    );
    let originals = scalar_i64(&tgt, "SELECT count(*) FROM kv WHERE v ~ '^v[0-9]+$'").await;
    assert_eq!(
        originals, 0,
        "kv rows from before the TRUNCATE survive on the target"
    );
    run.assert_running("after convergence");
}

/// Polls until `flag` is set (or the writer task ended, whose panic surfaces when
/// it is awaited).
async fn wait_until_flag(flag: &AtomicBool, writer: &tokio::task::JoinHandle<u64>) {
    support::wait_until(
        "the writer to truncate kv",
        Duration::from_secs(30),
        || async { flag.load(Ordering::Relaxed) || writer.is_finished() },
    )
    .await;
}

// ---------------------------------------------------------------------------
// 2. kill -9 never leaves a partial transaction.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_row_transactions_are_never_partial_across_kill_9() {
    const KILLS: usize = 6;
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE tx10 (id bigserial PRIMARY KEY, batch int NOT NULL, n int NOT NULL)",
    )
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = spawn_batch_writer(
        source.client().await,
        &["tx10"],
        stop.clone(),
        committed.clone(),
    );

    let mut rng = seeded_rng("kill -9");
    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target, &[]);
    let tgt = target.client().await;
    let mut streaming_kills = 0;
    for kill in 1..=KILLS {
        // The first kills land anywhere (likely during bootstrap); later ones only
        // once this process has applied a streamed transaction itself.
        if kill > 2 {
            let before = applied_lsn(&tgt, PIPELINE).await;
            wait_while_running(
                &format!("process #{kill} to apply a streamed transaction"),
                Duration::from_secs(60),
                &mut run,
                || async { applied_beyond(&tgt, PIPELINE, before.as_deref()).await },
            )
            .await;
            streaming_kills += 1;
        }
        let delay = rng.gen_range(300..=1500);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        assert!(!writer.is_finished(), "the writer stopped");
        run.assert_running(&format!("before kill {kill}"));
        run.kill9();
        let applied = applied_lsn(&tgt, PIPELINE).await;
        match batch_check(&tgt, "tx10", 10).await {
            None => eprintln!("kill {kill} after {delay} ms: tx10 not on the target yet"),
            Some((partial, prefix)) => {
                let rows = scalar_i64(&tgt, "SELECT count(*) FROM tx10").await;
                eprintln!(
                    "kill {kill} after {delay} ms: {rows} rows on the target, applied_lsn {applied:?}, writer at batch {}",
                    committed.load(Ordering::Relaxed)
                );
                assert!(
                    partial.is_empty(),
                    "after kill {kill}: transactions applied partially (batch, rows): {partial:?}"
                );
                assert!(
                    prefix,
                    "after kill {kill}: the batches on the target are not 1..=max (a transaction was skipped)"
                );
            }
        }
        run = spawn_run(&mut logs, &source, &target, &[]);
    }
    eprintln!("{streaming_kills} of {KILLS} kills hit a process that was streaming");

    stop.store(true, Ordering::Relaxed);
    let batches = writer.await.expect("writer panicked");
    eprintln!("writer committed {batches} batches");
    wait_for_convergence_running(&mut run, &src, &tgt, &["tx10"], Duration::from_secs(120)).await;
    assert_tables_equal(&src, &tgt, &["tx10"]).await;
    let dupes = scalar_i64(&tgt, "SELECT count(*) - count(DISTINCT id) FROM tx10").await;
    assert_eq!(dupes, 0, "duplicate ids on the target");
    let (partial, prefix) = batch_check(&tgt, "tx10", 10).await.unwrap();
    assert!(partial.is_empty() && prefix, "{partial:?} {prefix}");
    let rows = scalar_i64(&tgt, "SELECT count(*) FROM tx10").await;
    assert_eq!(rows, batches as i64 * 10);
}

// ---------------------------------------------------------------------------
// 3. SIGTERM: clean exit, then exactly-once continuation.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_next_run_neither_loses_nor_repeats() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    // ev_log has no key: a transaction applied twice shows up as duplicate rows.
    src.batch_execute(
        "CREATE TABLE ev (id bigserial PRIMARY KEY, batch int NOT NULL, n int NOT NULL);
         CREATE TABLE ev_log (batch int NOT NULL, n int NOT NULL);
         ALTER TABLE ev_log REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = spawn_batch_writer(
        source.client().await,
        &["ev", "ev_log"],
        stop.clone(),
        committed.clone(),
    );

    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target, &[]);
    let tgt = target.client().await;
    wait_while_running(
        "a streamed transaction to be applied",
        Duration::from_secs(90),
        &mut run,
        || async { applied_lsn(&tgt, PIPELINE).await.is_some() },
    )
    .await;
    // And some more, so the process is busy applying when the signal arrives.
    let first = applied_lsn(&tgt, PIPELINE).await;
    wait_while_running(
        "streaming to continue",
        Duration::from_secs(60),
        &mut run,
        || async { applied_beyond(&tgt, PIPELINE, first.as_deref()).await },
    )
    .await;
    // While streaming, the flush position reported to the source keeps up with
    // what was applied (status updates every second), so the slot frees WAL.
    let first = first.expect("applied_lsn");
    let flush_sql = "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn >= $1::text::pg_lsn \
                       FROM pg_replication_slots WHERE slot_name = 'walshuttle'";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut streaming_flush_problem = None;
    loop {
        let row = src.query_one(flush_sql, &[&first]).await.unwrap();
        if row.get::<_, bool>(1) {
            break;
        }
        run.assert_running("waiting for the slot's flush position to advance");
        if Instant::now() >= deadline {
            streaming_flush_problem = Some(format!(
                "while streaming, the slot's confirmed_flush_lsn stayed at {} for 20 s, behind the applied {first}",
                row.get::<_, String>(0)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    run.sigterm();
    let signalled = Instant::now();
    let status = run.wait_exit(Duration::from_secs(10)).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "walshuttle did not exit within 10 s of SIGTERM; log tail:\n{}",
            support::tail(&run.log(), 60)
        )
    });
    eprintln!(
        "exited {:.2}s after SIGTERM with {status}",
        signalled.elapsed().as_secs_f64()
    );
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM; log tail:\n{}",
        support::tail(&run.log(), 60)
    );

    // Whole transactions only, and the final flush position reached the slot.
    for table in ["ev", "ev_log"] {
        let (partial, prefix) = batch_check(&tgt, table, 10).await.unwrap();
        assert!(
            partial.is_empty(),
            "{table}: partial transactions after SIGTERM: {partial:?}"
        );
        assert!(
            prefix,
            "{table}: batches on the target are not 1..=max after SIGTERM"
        );
    }
    let applied = applied_lsn(&tgt, PIPELINE)
        .await
        .expect("applied_lsn after SIGTERM");
    // The walsender ends a moment after the process has gone (on a loaded machine,
    // not always before the next query here).
    let released = Instant::now() + Duration::from_secs(10);
    while slot_active(&src, PIPELINE).await && Instant::now() < released {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let row = src
        .query_one(
            "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn >= $1::text::pg_lsn, active \
               FROM pg_replication_slots WHERE slot_name = $2",
            &[&applied, &PIPELINE],
        )
        .await
        .unwrap();
    let (flushed, covers, active): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    assert!(!active, "the slot is still in use after walshuttle exited");
    // Checked at the end, so that a failure here still shows whether the next run
    // continues exactly once.
    let flush_problem = (!covers).then(|| {
        format!(
            "after SIGTERM the slot's confirmed_flush_lsn {flushed} is behind applied_lsn {applied}: \
             the final flush position sent was not the last applied one"
        )
    });

    // The writer kept going; a new run continues exactly where the last one stopped.
    let mut run = spawn_run(&mut logs, &source, &target, &[]);
    let at_restart = committed.load(Ordering::Relaxed);
    wait_while_running(
        "the writer to commit 100 more batches",
        Duration::from_secs(60),
        &mut run,
        || async { committed.load(Ordering::Relaxed) >= at_restart + 100 || writer.is_finished() },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let batches = writer.await.expect("writer panicked");
    wait_for_convergence_running(
        &mut run,
        &src,
        &tgt,
        &["ev", "ev_log"],
        Duration::from_secs(90),
    )
    .await;
    assert_tables_equal(&src, &tgt, &["ev", "ev_log"]).await;
    let dupes = scalar_i64(&tgt, "SELECT count(*) - count(DISTINCT id) FROM ev").await;
    assert_eq!(dupes, 0, "duplicate ids in ev");
    let log_rows = scalar_i64(&tgt, "SELECT count(*) FROM ev_log").await;
    assert_eq!(
        log_rows,
        batches as i64 * 10,
        "ev_log rows lost or repeated"
    );
    let distinct = scalar_i64(
        &tgt,
        "SELECT count(*) FROM (SELECT DISTINCT batch, n FROM ev_log) d",
    )
    .await;
    assert_eq!(distinct, log_rows, "ev_log has repeated rows");
    let problems: Vec<String> = [streaming_flush_problem, flush_problem]
        .into_iter()
        .flatten()
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// 4. ADD COLUMN on the source.
// ---------------------------------------------------------------------------

async fn target_has_column(tgt: &Client, table: &str, column: &str) -> Option<String> {
    tgt.query_opt(
        "SELECT data_type FROM information_schema.columns \
          WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
        &[&table, &column],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_added_on_source_arrives_with_data() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();

    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target, &[]);
    let tgt = target.client().await;
    wait_while_running(
        "the slot to be streamed from",
        Duration::from_secs(90),
        &mut run,
        || async { slot_active(&src, PIPELINE).await },
    )
    .await;
    src.batch_execute("UPDATE t SET v = 'streamed ' || id WHERE id <= 10; INSERT INTO t VALUES (101, 'before alter');")
        .await
        .unwrap();
    wait_for_convergence_running(&mut run, &src, &tgt, &["t"], Duration::from_secs(60)).await;

    // A column with a default, then writes that set it.
    src.batch_execute("ALTER TABLE t ADD COLUMN extra text DEFAULT 'x'")
        .await
        .unwrap();
    src.batch_execute(
        "INSERT INTO t (id, v, extra) SELECT g, 'after alter', 'new ' || g FROM generate_series(1001, 1050) g;
         UPDATE t SET extra = 'upd ' || id WHERE id <= 20;
         INSERT INTO t (id, v) VALUES (1100, 'default extra');",
    )
    .await
    .unwrap();
    wait_while_running(
        "the rows written after ADD COLUMN to arrive",
        Duration::from_secs(60),
        &mut run,
        || async {
            tgt.query_one("SELECT count(*) FROM t WHERE id > 1000", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 51)
                .unwrap_or(false)
        },
    )
    .await;
    assert_eq!(
        target_has_column(&tgt, "t", "extra").await.as_deref(),
        Some("text"),
        "column extra missing on the target"
    );
    let wrong: Vec<(i32, Option<String>)> = tgt
        .query(
            "SELECT id, extra FROM t WHERE id BETWEEN 21 AND 101 AND extra IS DISTINCT FROM 'x' ORDER BY id LIMIT 5",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        wrong.is_empty(),
        "rows that existed before ADD COLUMN extra text DEFAULT 'x' do not read 'x' on the target (first few): {wrong:?}"
    );
    wait_for_convergence_running(&mut run, &src, &tgt, &["t"], Duration::from_secs(60)).await;

    // A column added in the same transaction as the writes that use it.
    src.batch_execute(
        "BEGIN;
         ALTER TABLE t ADD COLUMN n2 bigint;
         UPDATE t SET n2 = id * 2 WHERE id % 3 = 0;
         INSERT INTO t (id, v, extra, n2) VALUES (2000, 'same tx', 'y', 42);
         COMMIT;",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut run, &src, &tgt, &["t"], Duration::from_secs(60)).await;
    assert_eq!(
        target_has_column(&tgt, "t", "n2").await.as_deref(),
        Some("bigint"),
        "column n2 missing on the target"
    );
    assert_tables_equal(&src, &tgt, &["t"]).await;
    run.assert_running("at the end");
}

// ---------------------------------------------------------------------------
// 5. Unreplicated traffic does not make the slot hold WAL.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_replicated_tables_do_not_hold_wal() {
    const MB: i64 = 1024 * 1024;
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE replicated (id int PRIMARY KEY, v text);
         INSERT INTO replicated SELECT g, 'r' || g FROM generate_series(1, 10) g;
         CREATE TABLE noise (id bigint, payload text);",
    )
    .await
    .unwrap();

    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target, &["--tables", "replicated"]);
    let tgt = target.client().await;
    wait_while_running(
        "the slot to be streamed from",
        Duration::from_secs(90),
        &mut run,
        || async { slot_active(&src, PIPELINE).await },
    )
    .await;
    assert_tables_equal(&src, &tgt, &["replicated"]).await;

    let start_lsn: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for round in 0..30 {
        src.batch_execute(&format!(
            "INSERT INTO noise SELECT g + {round} * 20000, repeat(md5(g::text), 6) FROM generate_series(1, 20000) g"
        ))
        .await
        .unwrap();
    }
    let written: i64 = src
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&start_lsn],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!("noise wrote {} MB of WAL", written / MB);
    assert!(
        written > 100 * MB,
        "only {written} bytes of WAL written: the test is too weak"
    );

    let lag_sql = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
                     FROM pg_replication_slots WHERE slot_name = 'walshuttle'";
    let waited = Instant::now();
    let mut last_lag = i64::MAX;
    let deadline = waited + Duration::from_secs(60);
    loop {
        last_lag = src
            .query_one(lag_sql, &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(last_lag);
        if last_lag < 16 * MB {
            break;
        }
        run.assert_running("waiting for the slot to advance");
        assert!(
            Instant::now() < deadline,
            "the slot still holds {} MB of WAL 60 s after {} MB of unreplicated writes: \
             walshuttle does not confirm positions while the replicated tables are idle; log tail:\n{}",
            last_lag / MB,
            written / MB,
            support::tail(&run.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "slot lag down to {} kB after {:.1}s",
        last_lag / 1024,
        waited.elapsed().as_secs_f64()
    );

    // noise is outside the pipeline; the replicated table still streams.
    let noise_on_target: bool = tgt
        .query_one("SELECT to_regclass('public.noise') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!noise_on_target, "noise was created on the target");
    src.batch_execute("UPDATE replicated SET v = 'after noise' WHERE id = 3")
        .await
        .unwrap();
    wait_for_convergence_running(
        &mut run,
        &src,
        &tgt,
        &["replicated"],
        Duration::from_secs(60),
    )
    .await;
}

// ---------------------------------------------------------------------------
// 6. A 2,000,000-row transaction with bounded memory.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transaction_streams_with_bounded_memory() {
    const ROWS: i64 = 2_000_000;
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute("CREATE TABLE big (id bigint PRIMARY KEY, payload text)")
        .await
        .unwrap();

    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target, &[]);
    let tgt = target.client().await;
    wait_while_running(
        "the slot to be streamed from",
        Duration::from_secs(90),
        &mut run,
        || async { slot_active(&src, PIPELINE).await },
    )
    .await;
    let rss_before = run.peak_rss_kb();

    let started = Instant::now();
    src.batch_execute(&format!(
        "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .unwrap();
    eprintln!(
        "source transaction committed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    wait_while_running(
        "all rows of the big transaction on the target",
        Duration::from_secs(180),
        &mut run,
        || async {
            tgt.query_one("SELECT count(*) FROM big", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == ROWS)
                .unwrap_or(false)
        },
    )
    .await;
    eprintln!(
        "applied on the target {:.1}s after the source began",
        started.elapsed().as_secs_f64()
    );
    // Peak memory, read while the process still runs.
    run.assert_running("after applying the big transaction");
    let peak_kb = run.peak_rss_kb();
    eprintln!(
        "walshuttle peak RSS: {} MiB (before the transaction: {} MiB)",
        peak_kb / 1024,
        rss_before / 1024
    );
    let streamed = src
        .query_opt(
            "SELECT stream_txns, stream_bytes, spill_bytes FROM pg_stat_replication_slots WHERE slot_name = 'walshuttle'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)));
    eprintln!("slot stats (stream_txns, stream_bytes, spill_bytes): {streamed:?}");

    assert_eq!(
        table_fingerprint(&src, "big").await,
        table_fingerprint(&tgt, "big").await
    );
    assert!(
        peak_kb < 128 * 1024,
        "walshuttle peaked at {} MiB RSS applying one 2,000,000-row transaction (limit 128 MiB)",
        peak_kb / 1024
    );
}
