//! Edges where walshuttle must not be silently wrong (issue 22): `verify` never says
//! equal while a value differs in the source's type (json text, numeric scale);
//! `--capture-ddl` never publishes a table the source would then refuse updates of;
//! inheritance children are carried only when named; a partition attached to a
//! carried parent is never silently missing; a table partitioned only on the
//! target is compared and repaired whole.

mod support;

use std::time::Duration;

use support::{
    assert_tables_equal, exec, run, scalar_i64, wait_for_convergence_running, wait_streaming,
    walshuttle, Cluster, ClusterOptions, RunLogs,
};
use tokio_postgres::Client;

/// Runs `walshuttle verify <extra>`: (exit code, stdout and stderr).
fn verify(source: &Cluster, target: &Cluster, extra: &[&str]) -> (i32, String) {
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify").args(extra);
    let (code, stdout, stderr) = run(cmd);
    (code, format!("{stdout}{stderr}"))
}

/// Runs `walshuttle bootstrap <extra>` and asserts it succeeds.
fn bootstrap_ok(source: &Cluster, target: &Cluster, extra: &[&str]) {
    let mut cmd = walshuttle(source, target);
    cmd.args(["bootstrap", "--jobs", "2"]).args(extra);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed:\n{stdout}\n{stderr}");
}

// ---------------------------------------------------------------------------
// Item 5: verify compares in the source's types, never more loosely.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_compares_json_text_and_numeric_scale_exactly() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        r#"CREATE TABLE docs (id int PRIMARY KEY, j json, n numeric(10,2), "Note" text);
           INSERT INTO docs VALUES (1, '{"a": 1, "b": 2}', 1.23, 'x'),
                                   (2, '{"a":1}', 2.50, 'y'),
                                   (3, '[1, 2]', -0.01, NULL);
           CREATE TABLE "Wide Docs" (id int PRIMARY KEY, j json, n numeric(10,2));
           INSERT INTO "Wide Docs" VALUES (1, '{"b": 1,  "a": [2]}', 1.23),
                                          (2, '{}', 7.00);"#,
    )
    .await;
    // The target's own widened copy: json into jsonb, numeric(10,2) into numeric(14,6).
    exec(
        &tgt,
        r#"CREATE TABLE "Wide Docs" (id int PRIMARY KEY, j jsonb, n numeric(14,6))"#,
    )
    .await;
    bootstrap_ok(&source, &target, &[]);
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "a fresh copy must verify equal:\n{out}");

    // json is compared by its text: key order, spacing and duplicate keys differ.
    for (id, value) in [
        (1, r#"{"b": 2, "a": 1}"#),
        (1, r#"{"a":1,"b":2}"#),
        (2, r#"{"a":1,"a":1}"#),
    ] {
        let original: String = src
            .query_one("SELECT j::text FROM docs WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        tgt.execute(
            "UPDATE docs SET j = $2::text::json WHERE id = $1",
            &[&id, &value],
        )
        .await
        .unwrap();
        let (code, out) = verify(&source, &target, &["--tables", "docs"]);
        assert_eq!(
            code, 1,
            "json {value} on the target against {original} on the source must differ:\n{out}"
        );
        assert!(out.contains("DIFFERENT"), "{out}");
        tgt.execute(
            "UPDATE docs SET j = $2::text::json WHERE id = $1",
            &[&id, &original],
        )
        .await
        .unwrap();
    }

    // A widened numeric: 1.230000 is the source's 1.23; 1.234900 is not.
    let (code, out) = verify(&source, &target, &["--tables", r#""Wide Docs""#]);
    assert_eq!(code, 0, "a widened copy holding the same numbers:\n{out}");
    exec(&tgt, r#"UPDATE "Wide Docs" SET n = 1.2349 WHERE id = 1"#).await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 1, "1.2349 on the target against 1.23:\n{out}");
    assert!(out.contains(r#"public."Wide Docs": DIFFERENT"#), "{out}");
    exec(&tgt, r#"UPDATE "Wide Docs" SET n = 7.001 WHERE id = 2"#).await;
    exec(&tgt, r#"UPDATE "Wide Docs" SET n = 1.23 WHERE id = 1"#).await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 1, "7.001 on the target against 7.00:\n{out}");
    exec(&tgt, r#"UPDATE "Wide Docs" SET n = 7 WHERE id = 2"#).await;
    // json widened into jsonb is compared as jsonb (the target cannot hold the
    // text): the same value is equal, another value is not.
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "the widened copy restored:\n{out}");
    exec(
        &tgt,
        r#"UPDATE "Wide Docs" SET j = '{"a": [2], "b": 2}' WHERE id = 1"#,
    )
    .await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 1, "another jsonb value:\n{out}");

    // numeric of the same type: a value of another scale cannot be stored, but a
    // value rounded differently can: 2.50 against 2.51.
    exec(
        &tgt,
        r#"UPDATE "Wide Docs" SET j = '{"a": [2], "b": 1}' WHERE id = 1"#,
    )
    .await;
    exec(&tgt, "UPDATE docs SET n = 2.51 WHERE id = 2").await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 1, "2.51 against 2.50:\n{out}");
    // --repair makes them equal again, and verify agrees.
    let (code, out) = verify(&source, &target, &["--repair"]);
    assert_eq!(code, 0, "verify --repair:\n{out}");
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "after the repair:\n{out}");
    assert_eq!(
        scalar_i64(&tgt, "SELECT count(*) FROM docs WHERE n = 2.50").await,
        1
    );
}

// ---------------------------------------------------------------------------
// Item 3: `--capture-ddl` never publishes a table the source would then refuse
// updates of.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_ddl_leaves_a_keyless_table_out_and_says_how_to_fix_it() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        "CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric(10,2), region text);
         INSERT INTO orders SELECT g, g * 1.5, 'r' || (g % 3) FROM generate_series(1, 100) g;",
    )
    .await;
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "1", "--capture-ddl"]);
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;

    // A report table made from a query has no key: publishing it would make every
    // UPDATE of it fail on the source.
    exec(
        &src,
        r#"CREATE TABLE "Report" AS SELECT region, sum(amount) AS total FROM orders GROUP BY region;
           INSERT INTO orders VALUES (101, 1, 'r9');"#,
    )
    .await;
    src.execute(r#"UPDATE "Report" SET total = total + 1"#, &[])
        .await
        .unwrap_or_else(|e| panic!("the source refused an UPDATE of the keyless table: {e:?}"));
    src.execute(r#"DELETE FROM "Report" WHERE region = 'r0'"#, &[])
        .await
        .unwrap_or_else(|e| panic!("the source refused a DELETE of the keyless table: {e:?}"));
    let published = scalar_i64(
        &src,
        "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'walshuttle' AND tablename = 'Report'",
    )
    .await;
    assert_eq!(published, 0, "the keyless table was published");
    wait_for_convergence_running(&mut child, &src, &tgt, &["orders"], Duration::from_secs(90))
        .await;
    // The log names it with the statement that fixes it.
    support::wait_while_running(
        "the log to name the keyless table",
        Duration::from_secs(60),
        &mut child,
        || {
            let log = child_log_contains(
                &logs,
                r#"ALTER TABLE "public"."Report" REPLICA IDENTITY FULL"#,
            );
            async move { log }
        },
    )
    .await;
    // status names it too, with the fix.
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "status failed:\n{stdout}{stderr}");
    let status = format!("{stdout}{stderr}");
    assert!(
        status.contains(r#"public."Report" on the source is not carried"#)
            && status.contains(r#"ALTER TABLE "public"."Report" REPLICA IDENTITY FULL"#),
        "status does not name the keyless table with its fix:\n{status}"
    );
    assert!(
        !status.contains("walshuttle_ddl"),
        "status names walshuttle's own trigger table as not carried:\n{status}"
    );

    // Once given a replica identity, it joins by itself, copied as it is.
    exec(&src, r#"ALTER TABLE "Report" REPLICA IDENTITY FULL"#).await;
    exec(&src, r#"UPDATE "Report" SET total = 0 WHERE region = 'r1'"#).await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["orders", r#""Report""#],
        Duration::from_secs(90),
    )
    .await;
    child.assert_running("after the report table joined");
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify after the join:\n{out}");
}

/// Whether any `run` log so far contains `needle`.
fn child_log_contains(logs: &RunLogs, needle: &str) -> bool {
    logs.all().contains(needle)
}

// ---------------------------------------------------------------------------
// Item 2: inheritance children are carried only when named.
// ---------------------------------------------------------------------------

/// Runs `walshuttle tables …` to its end off the async runtime; asserts exit 0.
async fn tables(source: &Cluster, target: &Cluster, args: &[&str]) -> String {
    let mut cmd = walshuttle(source, target);
    cmd.arg("tables").args(args);
    let (code, out, err) = tokio::task::spawn_blocking(move || run(cmd))
        .await
        .expect("tables command");
    assert_eq!(code, 0, "walshuttle tables {args:?} failed:\n{out}\n{err}");
    format!("{out}{err}")
}

async fn published(src: &Client, table: &str) -> i64 {
    src.query_one(
        "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'walshuttle' AND tablename = $1",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inheritance_children_are_carried_only_when_named() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        r#"CREATE TABLE events (id bigint PRIMARY KEY, kind text NOT NULL, UNIQUE (kind, id));
           CREATE TABLE "Old Events" (archived_at date) INHERITS (events);
           ALTER TABLE "Old Events" ADD PRIMARY KEY (id);
           INSERT INTO events SELECT g, 'k' || g % 5 FROM generate_series(1, 50) g;
           INSERT INTO "Old Events" SELECT g, 'old', '2020-01-01' FROM generate_series(1001, 1030) g;"#,
    )
    .await;
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "1", "--tables", "events"]);
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;
    assert_eq!(
        published(&src, "Old Events").await,
        0,
        "a child nobody named is published"
    );
    // Writes to the child: not the pipeline's, and no reason to stop.
    exec(
        &src,
        r#"INSERT INTO "Old Events" VALUES (1031, 'old', '2021-01-01');
           UPDATE "Old Events" SET kind = 'older' WHERE id = 1001;
           INSERT INTO events VALUES (51, 'k1');"#,
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["ONLY events"],
        Duration::from_secs(90),
    )
    .await;
    child.assert_running("after writes to an unnamed child");
    assert_eq!(scalar_i64(&tgt, "SELECT count(*) FROM events").await, 51);
    // verify counts the parent's own rows, not its children's.
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify of the parent alone:\n{out}");
    assert!(out.contains("public.events: equal (51 rows)"), "{out}");

    // Named, the child joins; removed, it really leaves the publication.
    let out = tables(&source, &target, &["add", r#""Old Events""#]).await;
    assert!(out.contains("added"), "tables add said: {out}");
    exec(
        &src,
        r#"INSERT INTO "Old Events" VALUES (1032, 'old', NULL)"#,
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["ONLY events", r#""Old Events""#],
        Duration::from_secs(90),
    )
    .await;
    let out = tables(&source, &target, &["remove", r#""Old Events""#]).await;
    assert!(out.contains("removed"), "tables remove said: {out}");
    assert_eq!(
        published(&src, "Old Events").await,
        0,
        "tables remove left the child published"
    );
    assert_eq!(published(&src, "events").await, 1);
    exec(
        &src,
        r#"INSERT INTO "Old Events" VALUES (1033, 'old', NULL);
           INSERT INTO events VALUES (52, 'k2');"#,
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["ONLY events"],
        Duration::from_secs(90),
    )
    .await;
    child.assert_running("after a write to the removed child");
    assert_eq!(
        scalar_i64(&tgt, r#"SELECT count(*) FROM "Old Events""#).await,
        32,
        "rows of the removed child reached the target"
    );
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify after the removal:\n{out}");
    assert!(out.contains("public.events: equal (52 rows)"), "{out}");
}

// ---------------------------------------------------------------------------
// Item 1: a partition attached to a carried parent joins by itself, and verify
// never says equal while its rows are missing.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_attached_to_a_carried_parent_joins_by_itself() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        r#"CREATE TABLE meas (id bigint, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
           CREATE TABLE meas_1 PARTITION OF meas FOR VALUES FROM (0) TO (100);
           CREATE TABLE plain (id int PRIMARY KEY, v text);
           INSERT INTO meas SELECT g, g % 100, 'a' FROM generate_series(1, 100) g;
           INSERT INTO plain SELECT g, 'p' FROM generate_series(1, 10) g;"#,
    )
    .await;
    let mut logs = RunLogs::new();
    let spawn = |logs: &mut RunLogs| {
        let mut cmd = walshuttle(&source, &target);
        cmd.args(["run", "--jobs", "1", "--tables", "meas,plain"]);
        logs.spawn(cmd)
    };
    let mut child = spawn(&mut logs);
    wait_streaming(&mut child, &src).await;

    // One partition filled, then attached; another created under the parent; rows
    // routed to both through the parent.
    exec(
        &src,
        r#"CREATE TABLE "Meas 2" (id bigint NOT NULL, k int NOT NULL, v text);
           INSERT INTO "Meas 2" SELECT g, 100 + g % 100, 'b' FROM generate_series(1, 30) g;
           ALTER TABLE meas ATTACH PARTITION "Meas 2" FOR VALUES FROM (100) TO (200);
           CREATE TABLE meas_3 PARTITION OF meas FOR VALUES FROM (200) TO (300);
           INSERT INTO meas SELECT g, 100 + g % 200, 'c' FROM generate_series(1000, 1059) g;
           UPDATE meas SET v = 'd' WHERE id = 1;"#,
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["meas_1", r#""Meas 2""#, "meas_3", "plain"],
        Duration::from_secs(120),
    )
    .await;
    // Writes after the join stream as for any table.
    exec(
        &src,
        r#"INSERT INTO meas SELECT g, 150, 'e' FROM generate_series(2000, 2009) g;
           DELETE FROM meas WHERE id = 1001;"#,
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["meas_1", r#""Meas 2""#, "meas_3"],
        Duration::from_secs(90),
    )
    .await;
    child.assert_running("after the partitions joined");
    support::wait_while_running(
        "the new partitions to be ready in the pipeline",
        Duration::from_secs(60),
        &mut child,
        || async {
            scalar_i64(
                &tgt,
                "SELECT count(*) FROM walshuttle.pipeline_tables WHERE table_name IN ('Meas 2', 'meas_3') AND state = 'ready'",
            )
            .await
                == 2
        },
    )
    .await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify after the partitions joined:\n{out}");
    assert!(out.contains(r#"public."Meas 2": equal"#), "{out}");
    // A partition detached stays in the pipeline as a table of its own.
    exec(
        &src,
        "ALTER TABLE meas DETACH PARTITION meas_3; INSERT INTO meas_3 VALUES (5000, 250, 'g');",
    )
    .await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["meas_3"], Duration::from_secs(90))
        .await;

    // With run stopped, a partition attached meanwhile is a difference, not "equal".
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
    exec(
        &src,
        "CREATE TABLE meas_4 PARTITION OF meas FOR VALUES FROM (300) TO (400);
         INSERT INTO meas SELECT g, 350, 'f' FROM generate_series(3000, 3029) g;",
    )
    .await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(
        code, 1,
        "verify must not call the parent equal while a partition's rows are missing:\n{out}"
    );
    assert!(out.contains("public.meas_4: DIFFERENT"), "{out}");
    // run picks it up when it starts again.
    let mut child = spawn(&mut logs);
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["meas_1", r#""Meas 2""#, "meas_3", "meas_4"],
        Duration::from_secs(120),
    )
    .await;
    support::wait_while_running(
        "the partitions to be ready in the pipeline",
        Duration::from_secs(60),
        &mut child,
        || async {
            scalar_i64(
                &tgt,
                "SELECT count(*) FROM walshuttle.pipeline_tables WHERE table_name IN ('Meas 2', 'meas_3', 'meas_4') AND state = 'ready'",
            )
            .await
                == 3
        },
    )
    .await;
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify at the end:\n{out}");
}

// ---------------------------------------------------------------------------
// Item 4: a retype's rewrite is known from the catalog, not from statement text.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retype_with_using_inside_a_function_is_copied_again() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        r#"CREATE TABLE prices (id int PRIMARY KEY, c int, "Label" text);
           INSERT INTO prices SELECT g, g, 'l' || g FROM generate_series(1, 200) g;
           CREATE FUNCTION mig() RETURNS void LANGUAGE plpgsql AS $$
           BEGIN
             ALTER TABLE prices ALTER COLUMN c TYPE bigint USING c * 100;
           END $$;
           CREATE FUNCTION relabel() RETURNS void LANGUAGE plpgsql AS $$
           BEGIN
             EXECUTE 'ALTER TABLE prices ALTER COLUMN "Label" TYPE varchar(40)';
           END $$;"#,
    )
    .await;
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "1", "--capture-ddl"]);
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;
    // The client's statement is `SELECT mig()`: nothing in its text says USING.
    exec(
        &src,
        "SELECT mig(); INSERT INTO prices VALUES (201, 7, 'new');",
    )
    .await;
    exec(&src, "UPDATE prices SET c = c + 1 WHERE id <= 10").await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["prices"], Duration::from_secs(90))
        .await;
    assert_eq!(
        scalar_i64(&tgt, "SELECT c FROM prices WHERE id = 5").await,
        501,
        "the target did not take the source's converted values"
    );
    // A retype that rewrites nothing (varchar from text is binary coercible) keeps
    // streaming without a copy, and the values stay.
    exec(
        &src,
        "SELECT relabel(); UPDATE prices SET \"Label\" = 'x' WHERE id = 1;",
    )
    .await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["prices"], Duration::from_secs(90))
        .await;
    child.assert_running("after the retypes");
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify after the retypes:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_keyless_partition_is_left_out_until_it_has_a_replica_identity() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        "CREATE TABLE logs (at date NOT NULL, msg text) PARTITION BY RANGE (at);
         CREATE TABLE logs_2024 PARTITION OF logs FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         ALTER TABLE logs_2024 REPLICA IDENTITY FULL;
         INSERT INTO logs VALUES ('2024-05-01', 'a'), ('2024-06-01', 'b');",
    )
    .await;
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "1", "--tables", "logs"]);
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;
    // A new partition without a replica identity: publishing it would make the
    // source refuse its UPDATEs and DELETEs.
    exec(
        &src,
        "CREATE TABLE logs_2025 PARTITION OF logs FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO logs VALUES ('2025-02-01', 'c'), ('2025-03-01', 'd');",
    )
    .await;
    support::wait_while_running(
        "the log to name the keyless partition with its fix",
        Duration::from_secs(60),
        &mut child,
        || {
            let named = child_log_contains(
                &logs,
                r#"ALTER TABLE "public"."logs_2025" REPLICA IDENTITY FULL"#,
            );
            async move { named }
        },
    )
    .await;
    // Nothing walshuttle did makes the source refuse a statement.
    exec(
        &src,
        "UPDATE logs SET msg = 'c2' WHERE msg = 'c'; DELETE FROM logs WHERE msg = 'd';",
    )
    .await;
    assert_eq!(published(&src, "logs_2025").await, 0);
    // verify does not call the parent equal meanwhile.
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 1, "verify with a partition left out:\n{out}");
    assert!(out.contains("public.logs_2025: DIFFERENT"), "{out}");
    // Given an identity, it joins, copied as it is.
    exec(&src, "ALTER TABLE logs_2025 REPLICA IDENTITY FULL").await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["logs_2024", "logs_2025"],
        Duration::from_secs(90),
    )
    .await;
    exec(&src, "UPDATE logs SET msg = 'c3' WHERE msg = 'c2'").await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["logs_2024", "logs_2025"],
        Duration::from_secs(90),
    )
    .await;
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify after the partition joined:\n{out}");
}

// ---------------------------------------------------------------------------
// A streamed TRUNCATE empties exactly the relations the source truncated.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_truncate_leaves_target_inheritance_children_alone() {
    // Transactions past 64 kB are streamed while open (applied on a connection of
    // their own): a TRUNCATE inside one takes that path.
    let source = Cluster::start_with(ClusterOptions {
        extra_conf: vec!["logical_decoding_work_mem = '64kB'".into()],
        ..ClusterOptions::default()
    });
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        r#"CREATE TABLE events (id bigint PRIMARY KEY, kind text NOT NULL);
           CREATE TABLE "Old Events" (archived_at date) INHERITS (events);
           INSERT INTO events SELECT g, 'k' || g % 5 FROM generate_series(1, 20) g;
           INSERT INTO "Old Events" SELECT g, 'old', '2020-01-01' FROM generate_series(1001, 1010) g;
           CREATE TABLE readings (id int, at int NOT NULL, v text, PRIMARY KEY (id, at));
           INSERT INTO readings SELECT g, g * 10, 'r' FROM generate_series(1, 30) g;
           CREATE TABLE meas (id bigint, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
           CREATE TABLE meas_1 PARTITION OF meas FOR VALUES FROM (0) TO (100);
           CREATE TABLE meas_2 PARTITION OF meas FOR VALUES FROM (100) TO (200);
           INSERT INTO meas SELECT g, g % 200, 'm' FROM generate_series(1, 60) g;"#,
    )
    .await;
    // The target's own shape for readings: partitioned where the source's is not.
    exec(
        &tgt,
        "CREATE TABLE readings (id int, at int NOT NULL, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE readings_lo PARTITION OF readings FOR VALUES FROM (MINVALUE) TO (150);
         CREATE TABLE readings_hi PARTITION OF readings FOR VALUES FROM (150) TO (MAXVALUE);",
    )
    .await;
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "1", "--tables", "events,readings,meas"]);
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;
    // A child of the replicated table that only the target has, with its own rows.
    exec(
        &tgt,
        r#"CREATE TABLE "Target Archive" (note text) INHERITS (events);
           INSERT INTO "Target Archive" VALUES (5001, 'mine', 'kept'), (5002, 'mine', 'kept');"#,
    )
    .await;

    // TRUNCATE of the parent (which also empties the source's own child), of a
    // table partitioned on the target only, and of a partitioned table.
    exec(
        &src,
        "TRUNCATE events;
         INSERT INTO events VALUES (100, 'after');
         TRUNCATE readings;
         INSERT INTO readings VALUES (1, 10, 'after'), (2, 200, 'after');
         TRUNCATE meas;
         INSERT INTO meas VALUES (7, 150, 'after');",
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["ONLY events", "readings", "meas_1", "meas_2"],
        Duration::from_secs(90),
    )
    .await;
    child.assert_running("after the TRUNCATEs");
    assert_eq!(
        scalar_i64(&tgt, r#"SELECT count(*) FROM "Target Archive""#).await,
        2,
        "a TRUNCATE of the replicated parent emptied the target's own child"
    );
    assert_eq!(
        scalar_i64(&tgt, "SELECT count(*) FROM readings_hi").await,
        1
    );
    // TRUNCATE ONLY on the source, then more rows.
    exec(
        &src,
        "TRUNCATE ONLY events; INSERT INTO events VALUES (101, 'only');",
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["ONLY events"],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        scalar_i64(&tgt, r#"SELECT count(*) FROM "Target Archive""#).await,
        2
    );
    // A TRUNCATE inside a streamed transaction.
    exec(
        &src,
        "BEGIN;
         INSERT INTO events SELECT g, repeat('x', 300) FROM generate_series(200, 1200) g;
         TRUNCATE events;
         INSERT INTO events VALUES (102, 'streamed');
         COMMIT;",
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["ONLY events"],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        scalar_i64(&tgt, r#"SELECT count(*) FROM "Target Archive""#).await,
        2,
        "a streamed TRUNCATE emptied the target's own child"
    );
    // readings, partitioned only on the target, is read whole there; the target's
    // own child of events is not read as events' rows.
    let (code, out) = verify(&source, &target, &["--tables", "events,readings,meas"]);
    assert_eq!(code, 0, "verify:\n{out}");
}

// ---------------------------------------------------------------------------
// A table partitioned only on the target is compared and repaired whole.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reads_a_table_partitioned_only_on_the_target_whole() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        r#"CREATE TABLE readings (id bigint PRIMARY KEY, sensor text NOT NULL UNIQUE, v numeric(10,2));
           INSERT INTO readings SELECT g, 's' || g, g / 4.0 FROM generate_series(1, 300) g;
           CREATE TABLE "Order Items" (id int PRIMARY KEY, note text);
           INSERT INTO "Order Items" SELECT g, 'n' || g FROM generate_series(1, 20) g;"#,
    )
    .await;
    // The serving database's own shape: readings partitioned by its key.
    exec(
        &tgt,
        "CREATE TABLE readings (id bigint PRIMARY KEY, sensor text NOT NULL, v numeric(10,2)) PARTITION BY RANGE (id);
         CREATE TABLE readings_lo PARTITION OF readings FOR VALUES FROM (MINVALUE) TO (150);
         CREATE TABLE readings_hi PARTITION OF readings FOR VALUES FROM (150) TO (MAXVALUE);",
    )
    .await;
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed:\n{stdout}\n{stderr}");
    // The source's UNIQUE (sensor) cannot exist on a table partitioned by id: said.
    assert!(
        stderr.contains("readings_sensor_key is left out on the target"),
        "{stderr}"
    );
    assert_eq!(
        scalar_i64(&tgt, "SELECT count(*) FROM readings_hi").await,
        151,
        "the bootstrap routes rows into the target's partitions"
    );

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "1"]);
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;
    // A child of "Order Items" that only the target has, with rows of its own (one
    // with a key the parent holds too): not the source's rows, never compared.
    exec(
        &tgt,
        r#"CREATE TABLE "Order Items Archive" (archived text) INHERITS ("Order Items");
           INSERT INTO "Order Items Archive" VALUES (3, 'old', 'x'), (9001, 'mine', 'x');"#,
    )
    .await;
    exec(
        &src,
        r#"INSERT INTO readings SELECT g, 's' || g, 1 FROM generate_series(301, 320) g;
           UPDATE readings SET v = v + 1 WHERE id % 7 = 0;
           DELETE FROM readings WHERE id IN (5, 200);
           UPDATE readings SET sensor = 'moved' WHERE id = 10;
           INSERT INTO "Order Items" VALUES (21, 'new');
           UPDATE "Order Items" SET note = 'changed' WHERE id = 2;"#,
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["readings", r#"ONLY "Order Items""#],
        Duration::from_secs(90),
    )
    .await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(
        code, 0,
        "verify of a table partitioned on the target:\n{out}"
    );
    assert!(out.contains("readings: equal (318 rows)"), "{out}");

    // A changed row in a partition and a row missing from the other: different.
    exec(
        &tgt,
        "UPDATE readings SET v = 999 WHERE id = 20; DELETE FROM readings WHERE id = 250;",
    )
    .await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 1, "verify missed a changed partition row:\n{out}");
    assert!(out.contains("(20)") && out.contains("(250)"), "{out}");
    let (code, out) = verify(&source, &target, &["--repair"]);
    assert!(out.contains("repaired"), "{out}");
    assert_eq!(code, 0, "verify --repair:\n{out}");
    assert_tables_equal(&src, &tgt, &["readings", r#"ONLY "Order Items""#]).await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify after the repair:\n{out}");
    // The target's own inheritance child was never read as the parent's rows.
    assert_eq!(
        scalar_i64(&tgt, r#"SELECT count(*) FROM "Order Items Archive""#).await,
        2
    );
    child.assert_running("after verify --repair");

    // A resync replaces the rows in the target's partitions while run streams.
    exec(
        &tgt,
        "UPDATE readings SET v = -5 WHERE id <= 30 OR id > 290",
    )
    .await;
    let out = tables(&source, &target, &["resync", "readings"]).await;
    assert!(out.contains("readings"), "tables resync said: {out}");
    exec(&src, "UPDATE readings SET v = 7 WHERE id IN (1, 299)").await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["readings", r#"ONLY "Order Items""#],
        Duration::from_secs(90),
    )
    .await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify after the resync:\n{out}");
    child.assert_running("after tables resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_and_catch_up_take_a_table_partitioned_only_on_the_target_whole() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    exec(
        &src,
        r#"CREATE TABLE readings (id bigint PRIMARY KEY, sensor text NOT NULL UNIQUE, v numeric(10,2),
                                  updated_at timestamptz NOT NULL DEFAULT now());
           INSERT INTO readings (id, sensor, v) SELECT g, 's' || g, g / 4.0 FROM generate_series(1, 300) g;
           CREATE TABLE "Sensor Log" (sensor text NOT NULL, note text);
           ALTER TABLE "Sensor Log" REPLICA IDENTITY FULL;
           INSERT INTO "Sensor Log" SELECT 's' || (g % 7), 'n' || (g % 5) FROM generate_series(1, 40) g;"#,
    )
    .await;
    exec(
        &tgt,
        r#"CREATE TABLE readings (id bigint PRIMARY KEY, sensor text NOT NULL, v numeric(10,2),
                                  updated_at timestamptz NOT NULL DEFAULT now()) PARTITION BY RANGE (id);
           CREATE TABLE readings_lo PARTITION OF readings FOR VALUES FROM (MINVALUE) TO (150);
           CREATE TABLE readings_hi PARTITION OF readings FOR VALUES FROM (150) TO (MAXVALUE);
           CREATE TABLE "Sensor Log" (sensor text NOT NULL, note text) PARTITION BY HASH (sensor);
           CREATE TABLE "Sensor Log 0" PARTITION OF "Sensor Log" FOR VALUES WITH (MODULUS 2, REMAINDER 0);
           CREATE TABLE "Sensor Log 1" PARTITION OF "Sensor Log" FOR VALUES WITH (MODULUS 2, REMAINDER 1);
           INSERT INTO readings (id, sensor, v) SELECT g, 'stale', 0 FROM generate_series(1, 10) g;
           INSERT INTO "Sensor Log" VALUES ('s1', 'stale');"#,
    )
    .await;
    // Rows already in the target's partitions are rows walshuttle did not copy.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, stdout, stderr) = run(cmd);
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("already holds rows on the target that walshuttle did not copy"),
        "{stderr}"
    );
    // --truncate-target empties them, partitions and all.
    bootstrap_ok(&source, &target, &["--truncate-target"]);
    assert_tables_equal(&src, &tgt, &["readings", r#""Sensor Log""#]).await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify after the bootstrap:\n{out}");

    // The slot is lost; the source changes meanwhile (one update forgets
    // updated_at); catch-up repairs the target's partitions.
    exec(&src, "SELECT pg_drop_replication_slot('walshuttle')").await;
    exec(
        &src,
        r#"INSERT INTO readings (id, sensor, v) SELECT g, 's' || g, 2 FROM generate_series(301, 310) g;
           UPDATE readings SET v = v + 1, updated_at = now() WHERE id % 9 = 0;
           UPDATE readings SET v = -1, updated_at = '2000-01-01' WHERE id = 42;
           DELETE FROM readings WHERE id IN (7, 160);
           INSERT INTO "Sensor Log" VALUES ('s1', 'n1'), ('s9', 'new');
           DELETE FROM "Sensor Log" WHERE sensor = 's3';"#,
    )
    .await;
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("catch-up");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "catch-up:\n{stdout}{stderr}");
    assert_tables_equal(&src, &tgt, &["readings", r#""Sensor Log""#]).await;
    let (code, out) = verify(&source, &target, &[]);
    assert_eq!(code, 0, "verify after catch-up:\n{out}");
}
