//! Across major versions, source older than target (the move people replicate for):
//! 14 → 17, 15 → 17, 16 → 18 and 17 → 18. Each pair runs the core of walshuttle: a
//! bootstrap while a writer runs, streaming (small transactions and large ones
//! streamed while still open), a kill -9 of `run` and a restart, then every table
//! equal row by row and `verify` exit 0.
//!
//! The versions other than the machine's own come from `scripts/fetch-postgres.sh`:
//! without them these tests fail, saying how to fetch them.

mod support;

use std::time::Duration;

use support::workload::Writer;
use support::{
    applied_beyond, applied_lsn, run, wait_for_convergence_running, wait_while_running, walshuttle,
    Cluster, ClusterOptions, RunChild, RunLogs,
};
use tokio_postgres::Client;

const PIPELINE: &str = "walshuttle";

/// Source rows seeded before the bootstrap (enough for it to take a moment).
const SEED_ROWS: i64 = 20_000;

/// Tables compared at the end; `typed` only with [`Types::User`].
const TABLES: &[&str] = &["accounts", r#""Order Items""#, "dups", "bulk", "typed"];

/// The schema, on the source only: the target gets it from the bootstrap. It covers
/// both ways a table is cut into chunks (key ranges for `accounts`, block ranges for
/// the text key of "Order Items"), a keyless table matched on every column, TOASTed
/// values, identity and generated columns.
const SCHEMA: &str = r#"
    CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL,
                           balance numeric(14,2) NOT NULL, doc text,
                           tags text[], meta jsonb,
                           created_at timestamptz NOT NULL DEFAULT now());
    ALTER TABLE accounts ALTER COLUMN doc SET STORAGE EXTERNAL;
    INSERT INTO accounts
        SELECT g, 'owner ' || g, g * 1.25,
               CASE WHEN g % 100 = 0 THEN repeat(md5(g::text), 2000) ELSE 'small ' || g END,
               ARRAY['t' || g % 7, 'u' || g % 3], jsonb_build_object('g', g, 'half', g / 2.0),
               '2026-01-01'::timestamptz + g * interval '1 second'
        FROM generate_series(1, 20000) g;
    CREATE TABLE "Order Items" ("Code" text PRIMARY KEY, "we""ird" text, qty int);
    INSERT INTO "Order Items" SELECT 'c' || g, E'it''s "quoted" ' || g, g FROM generate_series(1, 2000) g;
    CREATE TABLE dups (a int, b text);
    ALTER TABLE dups REPLICA IDENTITY FULL;
    INSERT INTO dups SELECT a, 'same' FROM generate_series(1, 5) a, generate_series(1, 4);
    CREATE TABLE bulk (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, batch int NOT NULL,
                       n int NOT NULL, twice int GENERATED ALWAYS AS (n * 2) STORED);
"#;

/// User types (an enum, a domain, a composite), created on the target from the
/// source's catalog. Their values are not portable in binary, so with this table
/// the stream runs in text mode, without it in binary mode.
const USER_TYPES_SCHEMA: &str = r#"
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE DOMAIN positive AS int CHECK (VALUE > 0);
    CREATE TYPE pair AS (x int, label text);
    CREATE TABLE typed (id int PRIMARY KEY, m mood NOT NULL, p positive, c pair, r int4range);
    INSERT INTO typed SELECT g, (ARRAY['sad','ok','happy']::mood[])[g % 3 + 1], g, ROW(g, 'p' || g)::pair,
                             int4range(g, g + 10)
        FROM generate_series(1, 500) g;
"#;

/// Which column types a pair's schema has, and so which way values are streamed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Types {
    /// Built-in types only: the stream is binary.
    BuiltIn,
    /// Also the user types of [`USER_TYPES_SCHEMA`]: the stream is text.
    User,
}

/// One writer transaction: inserts, updates (TOASTed rows left alone, a key moved),
/// deletes across every table; every 25th also inserts 2,000 rows, past the
/// source's 64 kB `logical_decoding_work_mem`, so it is streamed while still open.
fn writer_sql(i: u64, types: Types) -> String {
    let moved = (i * 37) % SEED_ROWS as u64 + 1;
    let mut sql = format!(
        "BEGIN;
         INSERT INTO accounts (id, owner, balance, doc, tags, meta)
             VALUES ({new}, 'new {i}', {i}.5, 'doc {i}', ARRAY['n{i}'], '{{\"i\": {i}}}');
         UPDATE accounts SET balance = balance + 1, owner = 'upd {i}' WHERE id = {upd};
         UPDATE accounts SET id = id + 1000000 WHERE id = {moved};
         DELETE FROM accounts WHERE id = {del};
         INSERT INTO \"Order Items\" VALUES ('n{i}', E'new \\t {i}', {i});
         UPDATE \"Order Items\" SET qty = qty + 1 WHERE \"Code\" = 'c{oi}';
         INSERT INTO dups VALUES ({a}, 'same');
         DELETE FROM dups WHERE ctid = (SELECT ctid FROM dups WHERE a = {b} LIMIT 1);
         INSERT INTO bulk (batch, n) VALUES ({i}, 0);",
        new = 100_000 + i,
        upd = (i * 7919) % 20_000 + 1,
        del = (i * 104_729) % 20_000 + 1,
        oi = i % 2000 + 1,
        a = i % 5 + 1,
        b = (i + 2) % 5 + 1,
    );
    if types == Types::User {
        sql.push_str(&format!(
            "UPDATE typed SET m = 'happy', c = ROW({i}, 'w{i}'), r = int4range({i}, NULL) WHERE id = {};",
            i % 500 + 1
        ));
    }
    if i % 25 == 0 {
        sql.push_str(&format!(
            "INSERT INTO bulk (batch, n) SELECT {i}, g FROM generate_series(1, 2000) g;"
        ));
    }
    sql.push_str("COMMIT;");
    sql
}

async fn major_of(client: &Client) -> i32 {
    let num: String = client
        .query_one("SHOW server_version_num", &[])
        .await
        .expect("server_version_num")
        .get(0);
    num.parse::<i32>().expect("a number") / 10_000
}

fn spawn_run(logs: &mut RunLogs, source: &Cluster, target: &Cluster) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--jobs", "2"]);
    logs.spawn(cmd)
}

/// Every row of `table`, as text, in order: compared between the two sides.
async fn rows(client: &Client, table: &str) -> Vec<String> {
    client
        .query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[])
        .await
        .unwrap_or_else(|e| panic!("reading {table}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Asserts both sides hold the same rows, naming the first that differ.
async fn assert_rows_equal(src: &Client, tgt: &Client, table: &str) {
    let (s, t) = (rows(src, table).await, rows(tgt, table).await);
    if s != t {
        let first = s
            .iter()
            .zip(t.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(s.len().min(t.len()));
        panic!(
            "{table}: {} rows on the source, {} on the target; first difference at row {first}: source {:?}, target {:?}",
            s.len(),
            t.len(),
            s.get(first),
            t.get(first)
        );
    }
}

async fn scalar(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// `status --json`'s record of the pipeline.
fn pipeline_status(source: &Cluster, target: &Cluster) -> serde_json::Value {
    let mut cmd = walshuttle(source, target);
    cmd.args(["status", "--json"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "status: {stdout}{stderr}");
    let status: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status JSON: {e}: {stdout}"));
    status["pipelines"][0].clone()
}

/// The core, from a source of major `from` to a target of major `to`.
async fn core(from: u32, to: u32, types: Types) {
    // Transactions past 64 kB are streamed while still open (pgoutput streaming).
    let source = Cluster::start_with(ClusterOptions {
        version: Some(from),
        extra_conf: vec!["logical_decoding_work_mem = '64kB'".into()],
        ..ClusterOptions::default()
    });
    let target = Cluster::start_version(to);
    let src = source.client().await;
    let tgt = target.client().await;
    assert_eq!((source.version(), target.version()), (from, to));
    assert_eq!(major_of(&src).await, from as i32, "the source's version");
    assert_eq!(major_of(&tgt).await, to as i32, "the target's version");
    src.batch_execute(SCHEMA).await.expect("source schema");
    let tables = match types {
        Types::User => {
            src.batch_execute(USER_TYPES_SCHEMA)
                .await
                .expect("source user types");
            TABLES
        }
        Types::BuiltIn => &TABLES[..TABLES.len() - 1],
    };

    let writer = Writer::spawn(source.url(), Duration::from_millis(5), move |i| {
        writer_sql(i, types)
    });
    let mut logs = RunLogs::new();
    let mut child = spawn_run(&mut logs, &source, &target);
    // The bootstrap copies under the writer; then streaming applies its changes.
    wait_while_running(
        "the first streamed transaction to be applied",
        Duration::from_secs(90),
        &mut child,
        || async { applied_lsn(&tgt, PIPELINE).await.is_some() },
    )
    .await;
    writer
        .wait_for_more(&mut child, 60, Duration::from_secs(60), "while streaming")
        .await;
    let before = applied_lsn(&tgt, PIPELINE).await;
    wait_while_running(
        "a streamed transaction applied after the writer's 60 more",
        Duration::from_secs(60),
        &mut child,
        || async { applied_beyond(&tgt, PIPELINE, before.as_deref()).await },
    )
    .await;
    let binary = match types {
        Types::BuiltIn => "binary=true",
        Types::User => "binary=false",
    };
    assert!(
        child.log().contains(binary),
        "{from} -> {to}: the stream did not start with {binary}:\n{}",
        child.log()
    );

    child.kill9();
    // The writer goes on while nothing streams; a new `run` picks up from the
    // target's recorded position.
    let mut child = spawn_run(&mut logs, &source, &target);
    writer
        .wait_for_more(&mut child, 60, Duration::from_secs(60), "after the restart")
        .await;
    let before = applied_lsn(&tgt, PIPELINE).await;
    wait_while_running(
        "a transaction applied by the restarted run",
        Duration::from_secs(60),
        &mut child,
        || async { applied_beyond(&tgt, PIPELINE, before.as_deref()).await },
    )
    .await;
    let (committed, errors) = writer.stop().await;
    eprintln!("{from} -> {to}: the writer committed {committed} transactions");
    assert_eq!(errors, 0, "the writer's transactions failed on the source");

    wait_for_convergence_running(&mut child, &src, &tgt, tables, Duration::from_secs(120)).await;
    for table in tables {
        assert_rows_equal(&src, &tgt, table).await;
    }
    // What the writer did reached the target, large streamed transactions included.
    let streamed = scalar(
        &tgt,
        "SELECT count(*) FROM (SELECT batch FROM bulk GROUP BY batch HAVING count(*) = 2001) b",
    )
    .await;
    assert!(
        streamed >= (committed / 25) as i64,
        "{streamed} large transactions on the target for {committed} writer transactions"
    );
    let moved = scalar(&tgt, "SELECT count(*) FROM accounts WHERE id > 1000000").await;
    assert!(moved > 0, "no moved key reached the target");

    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "verify {from} -> {to}: {stdout}{stderr}");
    let status = pipeline_status(&source, &target);
    assert_eq!(
        (
            &status["phase"],
            &status["consistent"],
            &status["slot_active"]
        ),
        (
            &serde_json::json!("streaming"),
            &serde_json::json!(true),
            &serde_json::json!(true)
        ),
        "status {from} -> {to}: {status}"
    );

    // A clean stop, then the pipeline retired on both versions.
    child.sigterm();
    let exit = child.wait_exit(Duration::from_secs(30)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "run did not exit 0 after SIGTERM: {exit:?}\n{}",
        child.log()
    );
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["teardown", "--yes"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "teardown {from} -> {to}: {stdout}{stderr}");
    let left = scalar(
        &src,
        "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)",
    )
    .await;
    assert_eq!(left, 0, "teardown left a slot or publication on the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_14_to_17() {
    core(14, 17, Types::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_15_to_17() {
    core(15, 17, Types::BuiltIn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_16_to_18() {
    core(16, 18, Types::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_17_to_18() {
    core(17, 18, Types::BuiltIn).await;
}
