//! Schema changes on the source followed from pgoutput's Relation messages (no
//! event trigger): dropped, renamed, added and retyped columns while `run` streams
//! under a writer, inside a large streamed transaction, and while `run` is stopped;
//! `verify` with a column not yet on the target; `status` naming tables the pipeline
//! does not carry. Each ends with row-by-row equality and `verify` exit 0, except
//! where the test is about a stop.

mod support;

use std::time::Duration;

use support::workload::RowWriter;
use support::{
    assert_tables_equal, run, scalar_i64, tail, wait_for_convergence_running, wait_streaming,
    wait_while_running, walshuttle, Cluster, ClusterOptions, RunChild, RunLogs,
};
use tokio_postgres::Client;

const PIPELINE: &str = "walshuttle";

fn spawn_run(logs: &mut RunLogs, source: &Cluster, target: &Cluster, extra: &[&str]) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--jobs", "1"]).args(extra);
    logs.spawn(cmd)
}

fn verify_exit(source: &Cluster, target: &Cluster, extra: &[&str]) -> (i32, String) {
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify").args(extra);
    let (code, stdout, stderr) = run(cmd);
    (code, format!("{stdout}{stderr}"))
}

fn assert_verify_ok(source: &Cluster, target: &Cluster) {
    let (code, out) = verify_exit(source, target, &[]);
    assert_eq!(code, 0, "verify did not find both sides equal:\n{out}");
}

/// The target's columns of `public.<table>`, in order, with whether each is NOT NULL.
async fn columns(client: &Client, table: &str) -> Vec<(String, bool)> {
    client
        .query(
            "SELECT attname::text, attnotnull FROM pg_attribute \
             WHERE attrelid = ('public.' || $1)::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn names(cols: &[(String, bool)]) -> Vec<&str> {
    cols.iter().map(|(n, _)| n.as_str()).collect()
}

/// Transactions the source streamed in progress through the pipeline's slot.
async fn streamed_txns(src: &Client) -> i64 {
    src.query_one(
        "SELECT coalesce(max(stream_txns), 0) FROM pg_stat_replication_slots WHERE slot_name = $1",
        &[&PIPELINE],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(0)
}

fn small_decoding_memory() -> ClusterOptions {
    ClusterOptions {
        extra_conf: vec!["logical_decoding_work_mem = '64kB'".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_dropped_and_another_renamed_under_a_stream_of_inserts() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, a int DEFAULT 1, b text DEFAULT 'bee', c bigint NOT NULL, note text);
         INSERT INTO t SELECT g, g, 'b' || g, g, 'n' FROM generate_series(1, 2000) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_streaming(&mut child, &src).await;

    let writer = RowWriter::start(
        source.client().await,
        "INSERT INTO t (id, c) VALUES ($1::bigint, $1::bigint * 10)",
        100_000,
    );
    writer.wait_for(50).await;
    src.batch_execute("ALTER TABLE t DROP COLUMN a")
        .await
        .unwrap();
    writer.wait_for(50).await;
    src.batch_execute("ALTER TABLE t RENAME COLUMN b TO b2")
        .await
        .unwrap();
    writer.wait_for(50).await;
    // The renamed column keeps being written under its new name.
    src.batch_execute("UPDATE t SET b2 = b2 || '!' WHERE id % 100 = 0")
        .await
        .unwrap();
    writer.wait_for(20).await;
    writer.stop().await;

    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(90)).await;
    assert_eq!(
        names(&columns(&tgt, "t").await),
        ["id", "b2", "c", "note"],
        "the target's columns do not follow the source's"
    );
    // Every row that existed before the rename still holds its value.
    assert_eq!(
        scalar_i64(
            &tgt,
            "SELECT count(*) FROM t WHERE id <= 2000 AND b2 IN ('b' || id, 'b' || id || '!')"
        )
        .await,
        2000,
        "the rename lost the values of existing rows"
    );
    child.assert_running("after the drop and the rename");
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_dropped_inside_a_large_streamed_transaction() {
    let source = Cluster::start_with(small_decoding_memory());
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE big (id bigint PRIMARY KEY, gone text NOT NULL, v int NOT NULL);
         INSERT INTO big SELECT g, 'g' || g, g FROM generate_series(1, 100) g;
         CREATE TABLE side (id bigint PRIMARY KEY, v bigint);",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_streaming(&mut child, &src).await;

    let writer = RowWriter::start(source.client().await, "INSERT INTO side VALUES ($1, $1)", 1);
    // Rows written before the drop and after it, in one transaction large enough to
    // be streamed while it runs.
    let big = source.client().await;
    big.batch_execute(
        "BEGIN;
         INSERT INTO big SELECT g, repeat('x', 50) || g, g FROM generate_series(1001, 21000) g;",
    )
    .await
    .unwrap();
    wait_while_running(
        "the open transaction to be streamed",
        Duration::from_secs(60),
        &mut child,
        || async { streamed_txns(&src).await >= 1 },
    )
    .await;
    big.batch_execute(
        "ALTER TABLE big DROP COLUMN gone;
         INSERT INTO big (id, v) SELECT g, g FROM generate_series(21001, 41000) g;
         UPDATE big SET v = v + 1 WHERE id % 100 = 0;
         COMMIT;",
    )
    .await
    .unwrap();
    src.batch_execute("INSERT INTO big (id, v) VALUES (50000, 1)")
        .await
        .unwrap();
    writer.wait_for(20).await;
    writer.stop().await;

    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["big", "side"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(names(&columns(&tgt, "big").await), ["id", "v"]);
    assert_eq!(scalar_i64(&tgt, "SELECT count(*) FROM big").await, 40101);
    child.assert_running("after the transaction that dropped a column");
    assert_verify_ok(&source, &target);
}

/// The advice of earlier releases ("drop it on the target") followed by hand, then
/// the transaction that dropped it arrives (again) with its rows under the old shape
/// first: it is applied, and nothing loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_sent_with_the_old_shape_after_a_drop_by_hand_converges() {
    let source = Cluster::start_with(small_decoding_memory());
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE big (id bigint PRIMARY KEY, gone text NOT NULL, v int NOT NULL);
         INSERT INTO big SELECT g, 'g' || g, g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "1"]);
    let (code, _, err) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed: {err}");
    src.batch_execute(
        "BEGIN;
         INSERT INTO big SELECT g, repeat('x', 50) || g, g FROM generate_series(1001, 11000) g;
         ALTER TABLE big DROP COLUMN gone;
         INSERT INTO big (id, v) SELECT g, g FROM generate_series(11001, 21000) g;
         COMMIT;",
    )
    .await
    .unwrap();
    tgt.batch_execute("ALTER TABLE big DROP COLUMN gone")
        .await
        .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_for_convergence_running(&mut child, &src, &tgt, &["big"], Duration::from_secs(90)).await;
    assert_eq!(names(&columns(&tgt, "big").await), ["id", "v"]);
    child.assert_running("after the transaction arrived");
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_dropped_column_accepts_new_rows() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE k (id int PRIMARY KEY, legacy text NOT NULL, v int);
         INSERT INTO k SELECT g, 'l' || g, g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &["--keep-dropped-columns"]);
    wait_streaming(&mut child, &src).await;
    src.batch_execute("INSERT INTO k VALUES (101, 'l101', 101)")
        .await
        .unwrap();
    src.batch_execute("ALTER TABLE k DROP COLUMN legacy")
        .await
        .unwrap();
    src.batch_execute(
        "INSERT INTO k (id, v) SELECT g, g FROM generate_series(102, 150) g;
         UPDATE k SET v = -v WHERE id % 10 = 0;",
    )
    .await
    .unwrap();
    wait_while_running(
        "the rows written after the drop",
        Duration::from_secs(60),
        &mut child,
        || async {
            tgt.query_one("SELECT count(*) FROM k WHERE v < 0", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 15)
                .unwrap_or(false)
        },
    )
    .await;
    assert_eq!(
        columns(&tgt, "k").await,
        [
            ("id".to_string(), true),
            ("legacy".to_string(), false),
            ("v".to_string(), false)
        ],
        "the dropped column must stay on the target, nullable"
    );
    assert_eq!(
        scalar_i64(
            &tgt,
            "SELECT count(*) FROM k WHERE (id <= 101 AND legacy = 'l' || id) OR (id > 101 AND legacy IS NULL)"
        )
        .await,
        150
    );
    assert!(
        child.log().contains("nullable"),
        "the log does not say the kept column was made nullable:\n{}",
        tail(&child.log(), 30)
    );
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_added_before_a_streamed_transaction_does_not_block_the_others() {
    let source = Cluster::start_with(small_decoding_memory());
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    // A lock held by walshuttle must fail the test's reads, not hang them.
    tgt.batch_execute("SET lock_timeout = '3s'").await.unwrap();
    src.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_streaming(&mut child, &src).await;

    src.batch_execute("ALTER TABLE t ADD COLUMN q int DEFAULT 5")
        .await
        .unwrap();
    // The first change under the new shape is a streamed transaction's.
    let big = source.client().await;
    big.batch_execute(
        "BEGIN; INSERT INTO t (id, v, q) SELECT g, repeat('x', 100), g FROM generate_series(100001, 120000) g;",
    )
    .await
    .unwrap();
    wait_while_running(
        "the open transaction to be streamed",
        Duration::from_secs(60),
        &mut child,
        || async { streamed_txns(&src).await >= 1 },
    )
    .await;
    // Small transactions on the same table commit while it is open.
    src.batch_execute(
        "INSERT INTO t (id, v) VALUES (1000, 'small');
         UPDATE t SET q = 6 WHERE id <= 10;",
    )
    .await
    .unwrap();
    wait_while_running(
        "the small transactions to be applied while the large one is open",
        Duration::from_secs(60),
        &mut child,
        || async {
            tgt.query_one("SELECT count(*) FROM t WHERE q = 6", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 10)
                .unwrap_or(false)
        },
    )
    .await;
    big.batch_execute(
        "INSERT INTO t (id, v) SELECT g, 'tail' FROM generate_series(120001, 121000) g; COMMIT;",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(90)).await;
    assert_eq!(names(&columns(&tgt, "t").await), ["id", "v", "q"]);
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_and_renamed_while_run_is_stopped() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE s (id int PRIMARY KEY, name text, qty int, tail text);
         INSERT INTO s SELECT g, 'name' || g, g, 't' FROM generate_series(1, 500) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_streaming(&mut child, &src).await;
    src.batch_execute("UPDATE s SET qty = 0 WHERE id = 1")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["s"], Duration::from_secs(60)).await;
    child.sigterm();
    let status = child.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "run did not stop cleanly"
    );

    src.batch_execute(
        "ALTER TABLE s RENAME COLUMN name TO title;
         ALTER TABLE s ADD COLUMN extra text DEFAULT 'x';
         INSERT INTO s (id, title, qty, tail, extra) VALUES (501, 'new', 1, 't', 'y');
         UPDATE s SET qty = qty + 1 WHERE id <= 10;",
    )
    .await
    .unwrap();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_for_convergence_running(&mut child, &src, &tgt, &["s"], Duration::from_secs(90)).await;
    assert_eq!(
        names(&columns(&tgt, "s").await),
        ["id", "title", "qty", "tail", "extra"]
    );
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_stable_and_constant_defaults_added_while_streaming() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE d (id bigint PRIMARY KEY, v text);
         INSERT INTO d SELECT g, 'v' || g FROM generate_series(1, 3000) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_streaming(&mut child, &src).await;
    let writer = RowWriter::start(
        source.client().await,
        "INSERT INTO d (id, v) VALUES ($1, 'w')",
        10_000,
    );
    writer.wait_for(30).await;
    src.batch_execute("ALTER TABLE d ADD COLUMN u uuid DEFAULT gen_random_uuid()")
        .await
        .unwrap();
    writer.wait_for(30).await;
    src.batch_execute("ALTER TABLE d ADD COLUMN ts timestamptz DEFAULT now()")
        .await
        .unwrap();
    writer.wait_for(30).await;
    src.batch_execute(
        "ALTER TABLE d ADD COLUMN k int DEFAULT 7; ALTER TABLE d ALTER COLUMN k SET DEFAULT 8",
    )
    .await
    .unwrap();
    writer.wait_for(30).await;
    writer.stop().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["d"], Duration::from_secs(120)).await;
    assert_eq!(
        names(&columns(&tgt, "d").await),
        ["id", "v", "u", "ts", "k"]
    );
    assert_tables_equal(&src, &tgt, &["d"]).await;
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retyped_column_stops_with_the_statement_that_resumes() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE r (id int PRIMARY KEY, n int, v text);
         INSERT INTO r SELECT g, g, 'v' FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_streaming(&mut child, &src).await;
    src.batch_execute(
        "ALTER TABLE r ALTER COLUMN n TYPE bigint;
         INSERT INTO r VALUES (101, 5000000000, 'big');",
    )
    .await
    .unwrap();
    let status = child.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "run did not stop on the retyped column:\n{}",
        tail(&child.log(), 30)
    );
    let log = child.log();
    let statement = r#"ALTER TABLE "public"."r" ALTER COLUMN "n" TYPE bigint USING "n"::bigint"#;
    assert!(
        log.contains(statement),
        "the stop does not give the exact statement {statement}:\n{}",
        tail(&log, 20)
    );
    tgt.batch_execute(statement).await.unwrap();
    let mut child = spawn_run(&mut logs, &source, &target, &[]);
    wait_for_convergence_running(&mut child, &src, &tgt, &["r"], Duration::from_secs(90)).await;
    assert_verify_ok(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_a_column_not_yet_on_the_target() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g;
         CREATE TABLE u (id int PRIMARY KEY, w text);
         INSERT INTO u SELECT g, 'w' FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "1"]);
    let (code, _, err) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed: {err}");
    src.batch_execute("ALTER TABLE t ADD COLUMN quiet int DEFAULT 3")
        .await
        .unwrap();
    tgt.batch_execute("UPDATE t SET v = 'changed' WHERE id = 5")
        .await
        .unwrap();

    let (code, out) = verify_exit(&source, &target, &[]);
    assert_eq!(code, 1, "verify must report the difference:\n{out}");
    assert!(
        out.contains("column quiet missing on the target"),
        "verify does not name the missing column:\n{out}"
    );
    // The other columns are compared all the same: the changed row is found.
    assert!(
        out.contains("(5)"),
        "the changed row is not reported:\n{out}"
    );
    assert!(out.contains("public.u: equal"), "{out}");

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["verify", "--json"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 1, "{out}{err}");
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("verify --json: {e}:\n{out}"));
    let t = report["tables"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["table"]["name"] == "t"))
        .unwrap_or_else(|| panic!("no entry for public.t: {report}"));
    assert_eq!(t["missing_columns"], serde_json::json!(["quiet"]), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_tables_the_pipeline_does_not_carry() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE plain (id int PRIMARY KEY);
         CREATE TABLE m (id int NOT NULL, at date NOT NULL, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         INSERT INTO m VALUES (1, '2024-05-01');",
    )
    .await
    .unwrap();
    tgt.batch_execute("CREATE DATABASE selected").await.unwrap();
    // One pipeline of every table, one of the partitioned table only.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "1"]);
    let (code, _, err) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed: {err}");
    let mut cmd = walshuttle(&source, &target);
    cmd.env("WALSHUTTLE_TARGET", target.url_for("selected"))
        .args([
            "bootstrap",
            "--jobs",
            "1",
            "--slot",
            "only_m",
            "--tables",
            "m",
        ]);
    let (code, _, err) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed: {err}");

    src.batch_execute(
        "CREATE TABLE later (id int PRIMARY KEY);
         CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         CREATE TABLE m_2026 (id int NOT NULL, at date NOT NULL, PRIMARY KEY (id, at));
         ALTER TABLE m ATTACH PARTITION m_2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');",
    )
    .await
    .unwrap();

    let status = |db: Option<&str>, json: bool| {
        let mut cmd = walshuttle(&source, &target);
        if let Some(db) = db {
            cmd.env("WALSHUTTLE_TARGET", target.url_for(db));
        }
        cmd.arg("status");
        if json {
            cmd.arg("--json");
        }
        let (code, out, err) = run(cmd);
        assert_eq!(code, 0, "status failed: {err}");
        out
    };
    let untracked = |out: &str| -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(out).unwrap_or_else(|e| panic!("status --json: {e}:\n{out}"));
        let mut list: Vec<String> = v["pipelines"][0]["untracked_tables"]
            .as_array()
            .unwrap_or_else(|| panic!("no untracked_tables list: {v}"))
            .iter()
            .map(|t| t.as_str().unwrap_or_default().to_string())
            .collect();
        list.sort();
        let warned = v["warnings"].to_string();
        for t in &list {
            assert!(
                warned.contains(t.as_str()),
                "no warning names {t}: {warned}"
            );
        }
        list
    };
    assert_eq!(
        untracked(&status(None, true)),
        ["public.later", "public.m_2025", "public.m_2026"]
    );
    let text = status(None, false);
    assert!(
        text.contains("WARNING:") && text.contains("public.m_2026"),
        "{text}"
    );
    assert_eq!(
        untracked(&status(Some("selected"), true)),
        ["public.m_2025", "public.m_2026"],
        "a pipeline of named tables carries only new partitions of a named parent"
    );
}
