//! `walshuttle bootstrap` against real clusters: byte-identical copies, snapshot
//! consistency, parallel chunks, resume after kill -9, types and quoting.

mod support;

use std::time::Duration;

use support::{
    assert_tables_equal, repo_path, run, table_fingerprint, wait_until, walshuttle, Cluster,
};

const DEMO_TABLES: &[&str] = &["public.users", "public.products", "public.recommendations"];

fn load_demo(source: &Cluster, scale: &str) {
    let out = source.psql_file(&repo_path("migrations/schema.sql"), &[]);
    assert!(
        out.status.success(),
        "schema: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = source.psql_file(&repo_path("migrations/generate.sql"), &[("scale", scale)]);
    assert!(
        out.status.success(),
        "generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_schema_copies_byte_identical_with_parallel_chunks() {
    let source = Cluster::start();
    let target = Cluster::start();
    load_demo(&source, "10");
    let src = source.client().await;
    let n: i64 = src
        .query_one("SELECT count(*) FROM recommendations", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 1_000_000, "generator made {n} rows");

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed: {stderr}");
    assert!(stdout.contains("bootstrap finished"), "{stdout}");
    assert!(stdout.contains("MB/s"), "{stdout}");

    let tgt = target.client().await;
    assert_tables_equal(&src, &tgt, DEMO_TABLES).await;

    // The big table was copied by both workers at once: two chunks by different
    // workers whose copy intervals overlap.
    let overlapping: i64 = tgt
        .query_one(
            "SELECT count(*) FROM walshuttle.chunks a JOIN walshuttle.chunks b \
               ON a.table_name = b.table_name AND a.worker < b.worker \
              AND a.started_at < b.done_at AND b.started_at < a.done_at \
             WHERE a.table_name = 'recommendations'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        overlapping > 0,
        "no two workers copied recommendations at the same time"
    );

    // Keys and indexes were built on the target.
    let indexes: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'recommendations'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let source_indexes: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'recommendations'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, source_indexes);

    // A finished bootstrap run again says so and copies nothing.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("already finished"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_sees_exactly_the_snapshot_while_a_writer_runs() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE events (id bigserial PRIMARY KEY, batch int NOT NULL, payload text NOT NULL);
         INSERT INTO events (batch, payload) SELECT 0, repeat('x', 200) FROM generate_series(1, 200000);",
    )
    .await
    .unwrap();

    // A writer committing 10-row transactions, numbered, for as long as the copy runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer_stop = stop.clone();
    let writer_client = source.client().await;
    let writer = tokio::spawn(async move {
        let mut batch = 1;
        while !writer_stop.load(std::sync::atomic::Ordering::Relaxed) {
            writer_client
                .execute(
                    "INSERT INTO events (batch, payload) SELECT $1, 'w' FROM generate_series(1, 10)",
                    &[&batch],
                )
                .await
                .unwrap();
            batch += 1;
        }
        batch
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, _, stderr) = tokio::task::spawn_blocking(move || run(cmd)).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches_written = writer.await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(batches_written > 1, "writer never ran");

    let tgt = target.client().await;
    let rows = tgt
        .query(
            "SELECT batch, count(*) FROM events WHERE batch > 0 GROUP BY batch ORDER BY batch",
            &[],
        )
        .await
        .unwrap();
    // Whole transactions only, and a prefix of them: exactly what was committed
    // before the snapshot.
    for (i, row) in rows.iter().enumerate() {
        let batch: i32 = row.get(0);
        let count: i64 = row.get(1);
        assert_eq!(count, 10, "batch {batch} copied partially");
        assert_eq!(batch as usize, i + 1, "batches copied are not a prefix");
    }
    let base: i64 = tgt
        .query_one("SELECT count(*) FROM events WHERE batch = 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(base, 200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_bootstrap_resumes_without_recopying_done_chunks() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
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
    let mut child = cmd.spawn().unwrap();
    let tgt = target.client().await;
    wait_until("a few chunks done", Duration::from_secs(120), || async {
        tgt.query_one(
            "SELECT count(*) FROM walshuttle.chunks WHERE done_at IS NOT NULL",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) >= 2)
        .unwrap_or(false)
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let done_before: Vec<(i32, String)> = tgt
        .query(
            "SELECT chunk_no, done_at::text FROM walshuttle.chunks WHERE table_name = 'big' AND done_at IS NOT NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let total_chunks: i64 = tgt
        .query_one("SELECT count(*) FROM walshuttle.chunks", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        (done_before.len() as i64) < total_chunks,
        "the bootstrap finished before it could be killed"
    );

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("resumed"), "{stdout}");

    for (chunk, done_at) in &done_before {
        let now: String = tgt
            .query_one(
                "SELECT done_at::text FROM walshuttle.chunks WHERE table_name = 'big' AND chunk_no = $1",
                &[chunk],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(&now, done_at, "chunk {chunk} was copied again");
    }
    assert_tables_equal(&src, &tgt, &["big", "small"]).await;
    let dupes: i64 = tgt
        .query_one("SELECT count(*) - count(DISTINCT id) FROM big", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dupes, 0);
    // The resumed chunks were read under a newer snapshot, recorded as their copy
    // position; the chunks of the first run need none (the slot streams after them).
    let row = tgt
        .query_one(
            "SELECT count(*) FILTER (WHERE snapshot_id IS NOT NULL), count(*) FILTER (WHERE snapshot_id IS NULL) \
             FROM walshuttle.chunks WHERE table_name = 'big'",
            &[],
        )
        .await
        .unwrap();
    let (resumed, first): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(first as usize, done_before.len());
    assert!(resumed > 0);
    let positions: i64 = tgt
        .query_one("SELECT count(*) FROM walshuttle.copy_positions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        positions,
        resumed + 1,
        "one per resumed chunk of big, one for small"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_quoted_identifier_survives_and_empty_target_gets_schema() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        r#"
        CREATE SCHEMA "Sales Dept";
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'it''s "fine"');
        CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
        CREATE TABLE "Sales Dept"."Order Items" (
            "Id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            "we""ird" text,
            amount numeric(20,6),
            doc jsonb,
            tags text[],
            nums int[],
            blob bytea,
            uid uuid,
            feeling mood,
            feelings mood[],
            qty positive_int,
            at timestamptz,
            at_local timestamp,
            span interval,
            big_text text,
            doubled numeric GENERATED ALWAYS AS (amount * 2) STORED,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX "Order Items by uid" ON "Sales Dept"."Order Items" (uid);
        INSERT INTO "Sales Dept"."Order Items"
            ("we""ird", amount, doc, tags, nums, blob, uid, feeling, feelings, qty, at, at_local, span, big_text)
        VALUES
            ('a "quoted" value, with comma', 12345.678901, '{"a": [1, 2, {"b": null}], "c": "x\"y"}',
             ARRAY['plain', 'with,comma', 'with "quote"', NULL, ''], ARRAY[1, NULL, 3],
             '\x00ff10'::bytea, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'it''s "fine"', ARRAY['sad', 'happy']::mood[],
             7, '2024-02-29 12:34:56.789+02', '1999-12-31 23:59:59.999999', '1 year 2 mons 3 days 04:05:06.7',
             repeat(md5('toast'), 20000)),
            (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
            ('', -0.000001, '[]', '{}', '{}', '', '00000000-0000-0000-0000-000000000000', 'sad', '{}', 1,
             'infinity', '-infinity', '-1 day', '');
        "#,
    )
    .await
    .unwrap();

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("3 rows") || stdout.contains(" 3 rows"),
        "{stdout}"
    );

    let tgt = target.client().await;
    assert_tables_equal(&src, &tgt, &[r#""Sales Dept"."Order Items""#]).await;
    // The TOASTed value arrived whole.
    let len: i32 = tgt
        .query_one(
            r#"SELECT length(big_text) FROM "Sales Dept"."Order Items" WHERE big_text <> '' "#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(len, 640_000);
    // The generated column is computed on the target.
    let doubled: String = tgt
        .query_one(
            r#"SELECT doubled::text FROM "Sales Dept"."Order Items" WHERE amount > 1"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(doubled, "24691.357802");
    // Key and secondary index exist.
    let indexes: Vec<String> = tgt
        .query(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'Sales Dept' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        indexes.contains(&"Order Items by uid".to_string()),
        "{indexes:?}"
    );
    assert_eq!(indexes.len(), 2, "{indexes:?}");
    let fp = table_fingerprint(&tgt, r#""Sales Dept"."Order Items""#).await;
    assert_eq!(fp.0, 3);
}

/// A bootstrap killed after it created its slot but before its plan was recorded
/// (here: held at the plan by a lock on the state) is started afresh by the next
/// one. The tables it was creating must not stay behind keyless: the rerun would
/// take them for the user's own and refuse them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_killed_before_its_plan_is_recorded_starts_afresh() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE first (id int PRIMARY KEY);
         CREATE TABLE t (id bigint PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .unwrap();
    // Another pipeline's bootstrap leaves the state schema there, to be locked.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--slot", "other", "--tables", "first"]);
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");

    let mut locker = target.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK walshuttle.chunks IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "t"]);
    let mut child = cmd.spawn().unwrap();
    let tgt = target.client().await;
    wait_until(
        "the bootstrap to wait for the lock on its plan",
        Duration::from_secs(60),
        || async {
            tgt.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%chunks%'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
        },
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    lock.rollback().await.unwrap();
    src.batch_execute("INSERT INTO t SELECT g, 'late' FROM generate_series(1001, 1100) g")
        .await
        .unwrap();

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "t"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "the rerun failed:\n{stdout}{stderr}");
    assert_tables_equal(&src, &tgt, &["t"]).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["verify"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "verify:\n{stdout}{stderr}");
}
