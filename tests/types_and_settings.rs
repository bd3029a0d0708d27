//! Values keep their meaning whatever the databases' own settings, and types travel
//! by what they mean: pinned session settings (dates, intervals, floats, time zones,
//! timeouts, search_path), reg* types and tsquery by name, user-defined composite,
//! range and domain types created on an empty target, narrower target typmods
//! refused, widened columns holding the same instant and verifying equal.
//!
//! Every comparison reads both sides under the same canonical settings
//! ([`canonical_client`]), so it compares values, not their local spelling.

mod support;

use std::time::Duration;

use support::{
    run, wait_for_convergence_running, walshuttle, Cluster, RunChild, RunLogs, PASSWORD,
};
use tokio_postgres::Client;

/// Settings every test client runs under, so text forms mean the same on both sides.
const CANONICAL: &str = "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
    SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET search_path = public; \
    SET bytea_output = 'hex'; SET statement_timeout = 0; SET lock_timeout = 0; \
    SET idle_in_transaction_session_timeout = 0; SET idle_session_timeout = 0";

/// A client of the cluster's `postgres` database under [`CANONICAL`] settings.
async fn canonical_client(cluster: &Cluster) -> Client {
    let client = cluster.client().await;
    client
        .batch_execute(CANONICAL)
        .await
        .unwrap_or_else(|e| panic!("canonical settings: {e}"));
    client
}

/// Runs `walshuttle bootstrap --jobs 2 <extra>` and asserts it succeeds.
fn bootstrap_ok(source: &Cluster, target: &Cluster, extra: &[&str]) {
    let mut cmd = walshuttle(source, target);
    cmd.args(["bootstrap", "--jobs", "2"]).args(extra);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed:\n{stdout}\n{stderr}");
}

/// Runs `walshuttle verify` and asserts every table is equal (exit 0).
fn verify_equal(source: &Cluster, target: &Cluster) {
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        code, 0,
        "verify did not find the sides equal:\n{stdout}\n{stderr}"
    );
}

fn spawn_run(logs: &mut RunLogs, source: &Cluster, target: &Cluster) -> RunChild {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--jobs", "2"]);
    logs.spawn(cmd)
}

/// Stops `run` with SIGTERM and asserts it exits cleanly.
async fn stop_run(mut run: RunChild) {
    run.sigterm();
    let status = run.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "run did not stop cleanly: {status:?}\n{}",
        support::tail(&run.log(), 40)
    );
}

/// Rows of `sql` as text, one string per row.
async fn texts(client: &Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// Runs bootstrap, expects exit 1 with one error line mentioning every `needle`.
fn expect_refusal(source: &Cluster, target: &Cluster, needles: &[&str]) {
    let mut cmd = walshuttle(source, target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        code, 1,
        "bootstrap should have been refused:\n{stdout}\n{stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: "),
        "last line is not the error: {stderr}"
    );
    for needle in needles {
        assert!(last.contains(needle), "`{needle}` missing from: {last}");
    }
    assert!(!stderr.contains(PASSWORD), "password leaked: {stderr}");
}

// ---------------------------------------------------------------------------
// 1. Pinned session settings.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_and_role_settings_do_not_change_values() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = canonical_client(&source).await;
    let tgt = canonical_client(&target).await;
    src.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         -- An array of an enum is not portable in binary: the whole stream is text.
         CREATE TABLE forcer (id int PRIMARY KEY, moods mood[]);
         CREATE TABLE vals (id int PRIMARY KEY, d date, ts timestamptz, lt timestamp,
                            iv interval, f8 float8, f4 real, tz timetz);
         INSERT INTO forcer VALUES (1, '{sad,happy}');
         INSERT INTO vals VALUES
           (1, '2024-01-13', '2024-06-01 12:00:00+00', '2024-01-13 01:02:03.456789',
            '-1 day -02:03:04', 0.1::float8 + 0.2::float8, 0.1, '10:11:12+05:30'),
           (2, '0044-03-15 BC', '2024-01-13 23:30:00.123456+00', '1999-12-31 23:59:59.999999',
            '1 year -2 mons +3 days -04:05:06.5', 1::float8 / 3, 1::real / 3, '00:00:00-08'),
           (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         -- Settings a source database may well carry; every new session gets them.
         ALTER DATABASE postgres SET DateStyle = 'SQL, DMY';
         ALTER DATABASE postgres SET IntervalStyle = 'sql_standard';
         ALTER DATABASE postgres SET TimeZone = 'Asia/Kolkata';
         ALTER DATABASE postgres SET extra_float_digits = 0;",
    )
    .await
    .unwrap();
    target
        .client()
        .await
        .batch_execute(
            "ALTER DATABASE postgres SET DateStyle = 'SQL, MDY';
             ALTER DATABASE postgres SET IntervalStyle = 'iso_8601';
             ALTER ROLE postgres SET TimeZone = 'America/New_York';
             ALTER ROLE postgres SET extra_float_digits = -3;",
        )
        .await
        .unwrap();

    bootstrap_ok(&source, &target, &[]);
    let tables = ["public.forcer", "public.vals"];
    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target);
    src.batch_execute(
        "INSERT INTO vals VALUES
           (4, '2025-12-31', '2025-03-30 01:30:00+00', '2025-02-28 12:00:00', '-00:00:00.000001',
            1e-300, 3.4e38, '23:59:59.999999+14'),
           (5, '2000-02-29', 'infinity', '-infinity', '-1 year -1 day', 'NaN', '-Infinity', '12:00:00-12');
         UPDATE vals SET d = '2024-12-25', ts = ts + interval '1 hour 30 minutes',
                         iv = '-3 days +00:00:01', f8 = f8 * 3 WHERE id = 1;
         UPDATE vals SET d = d + 1, iv = iv - interval '1 day', f8 = 0.1::float8 * 3 WHERE id IN (2, 3);
         INSERT INTO forcer VALUES (2, '{happy}');",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut run, &src, &tgt, &tables, Duration::from_secs(60)).await;
    // Spot checks of values that each setting used to change.
    assert_eq!(
        texts(
            &tgt,
            "SELECT concat_ws(' | ', d, ts, iv, f8) FROM vals WHERE id = 1"
        )
        .await,
        vec!["2024-12-25 | 2024-06-01 13:30:00+00 | -3 days +00:00:01 | 0.9000000000000001"]
    );
    assert_eq!(
        texts(
            &tgt,
            "SELECT concat_ws(' | ', d, iv, f8, f4) FROM vals WHERE id = 2"
        )
        .await,
        vec!["0044-03-16 BC | 10 mons 2 days -04:05:06.5 | 0.30000000000000004 | 0.33333334"]
    );
    stop_run(run).await;
    verify_equal(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_role_timeouts_do_not_stop_bootstrap() {
    let source = Cluster::start();
    let target = Cluster::start();
    // An index whose build takes about 2 s: 100 rows, 20 ms each.
    let slow = "CREATE FUNCTION public.slow_key(i int) RETURNS int LANGUAGE plpgsql IMMUTABLE \
                AS $$ BEGIN PERFORM pg_sleep(0.02); RETURN i; END $$;";
    let src = canonical_client(&source).await;
    src.batch_execute(&format!(
        "{slow}
         CREATE TABLE big (id int PRIMARY KEY, v int);
         INSERT INTO big SELECT g, g FROM generate_series(1, 100) g;
         CREATE INDEX big_slow ON big (public.slow_key(v));"
    ))
    .await
    .unwrap();
    let tgt = canonical_client(&target).await;
    tgt.batch_execute(&format!(
        "{slow}
         ALTER ROLE postgres SET statement_timeout = '500ms';
         ALTER ROLE postgres SET lock_timeout = '500ms';
         ALTER ROLE postgres SET idle_in_transaction_session_timeout = '500ms';
         ALTER ROLE postgres SET idle_session_timeout = '1s';"
    ))
    .await
    .unwrap();

    bootstrap_ok(&source, &target, &[]);
    let valid: Vec<String> = texts(
        &tgt,
        "SELECT i.indisvalid::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname = 'big_slow'",
    )
    .await;
    assert_eq!(
        valid,
        vec!["true"],
        "the slow index was not built on the target"
    );
    support::assert_tables_equal(&src, &tgt, &["public.big"]).await;
}

// ---------------------------------------------------------------------------
// 2. Types by what they mean: reg* and tsquery go by name (text), not by oid.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reg_types_and_tsquery_travel_by_name() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = canonical_client(&source).await;
    let tgt = canonical_client(&target).await;
    let referenced = "CREATE SCHEMA app;
         CREATE TABLE app.thing (id int);
         CREATE TABLE app.other (id int);
         CREATE TYPE app.color AS ENUM ('red');
         CREATE FUNCTION app.f(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1';";
    // On the target the same objects exist, behind others, so their oids differ
    // (and the source's oids name other objects there).
    tgt.batch_execute(&format!(
        "CREATE TABLE pad1 (id int); CREATE TABLE pad2 (id int); CREATE TYPE pad_t AS ENUM ('x');
         CREATE FUNCTION pad_f() RETURNS int LANGUAGE sql AS 'SELECT 1';
         {referenced}"
    ))
    .await
    .unwrap();
    src.batch_execute(&format!(
        "{referenced}
         CREATE TABLE refs (id int PRIMARY KEY, rc regclass, rt regtype, rp regproc,
                            rps regprocedure, rn regnamespace, q tsquery, rcs regclass[]);
         INSERT INTO refs VALUES
           (1, 'app.thing', 'app.color', 'app.f', 'app.f(integer)', 'app', ''::tsquery,
            '{{app.thing,app.other}}'),
           (2, 'pg_class', 'int4', 'now', 'now()', 'public', 'fat & (rat | cat)', NULL);"
    ))
    .await
    .unwrap();

    bootstrap_ok(&source, &target, &["--tables", "refs"]);
    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target);
    src.batch_execute(
        "INSERT INTO refs VALUES
           (3, 'app.other', 'app.color[]', 'app.f', 'app.f(integer)', 'app', ''::tsquery, '{app.other}'),
           (4, 'app.thing', 'text', 'pg_backend_pid', 'length(text)', 'pg_catalog', 'a <-> b', '{}');
         UPDATE refs SET q = ''::tsquery, rc = 'app.other' WHERE id = 2;
         UPDATE refs SET q = 'x & !y', rt = 'app.color' WHERE id = 1;",
    )
    .await
    .unwrap();
    wait_for_convergence_running(
        &mut run,
        &src,
        &tgt,
        &["public.refs"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        texts(
            &tgt,
            "SELECT concat_ws(' | ', rc, rt, rp, rps, rn, q) FROM refs ORDER BY id"
        )
        .await,
        vec![
            "app.thing | app.color | app.f | app.f(integer) | app | 'x' & !'y'",
            "app.other | integer | now | now() | public | ",
            "app.other | app.color[] | app.f | app.f(integer) | app | ",
            "app.thing | text | pg_backend_pid | length(text) | pg_catalog | 'a' <-> 'b'",
        ]
    );
    stop_run(run).await;
    verify_equal(&source, &target);
}

// ---------------------------------------------------------------------------
// 3. User-defined types of every kind created on an empty target.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_user_types_are_created_on_an_empty_target() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = canonical_client(&source).await;
    let tgt = canonical_client(&target).await;
    src.batch_execute(
        "CREATE SCHEMA app; CREATE SCHEMA lib;
         SET search_path = app, public;
         CREATE TYPE lib.mood AS ENUM ('sad', 'ok', 'happy');
         -- holder is older than the type of the attribute added to it later.
         CREATE TYPE holder AS (label text);
         CREATE TYPE pair AS (a int, m lib.mood, tags text[]);
         ALTER TYPE holder ADD ATTRIBUTE inner_pair pair;
         CREATE DOMAIN pos_pair AS pair CHECK ((VALUE).a > 0);
         CREATE TYPE floatrange AS RANGE (subtype = float8, subtype_diff = float8mi);
         CREATE TYPE lib.moodrange AS RANGE (subtype = lib.mood, multirange_type_name = lib.moods);
         CREATE DOMAIN small_range AS floatrange CHECK (upper(VALUE) < 1000);
         CREATE TABLE things (
           id int PRIMARY KEY,
           h holder,
           p pair,
           pp pos_pair,
           pairs pair[],
           fr floatrange,
           fmr floatmultirange,
           frs floatrange[],
           mr lib.moodrange,
           mmr lib.moods,
           sr small_range,
           ir int4range[],
           m lib.mood DEFAULT 'ok'
         );
         INSERT INTO things VALUES
           (1, ROW('one', ROW(1, 'sad', '{a,b}')), ROW(2, 'ok', '{}'), ROW(3, 'happy', NULL),
            ARRAY[ROW(4, 'sad', '{x}')::pair, NULL], '[1.5,2.5)', '{[1,2), [3,4]}', '{\"[1,2)\",empty}',
            '[sad,happy)', '{[sad,ok)}', '[0,999]', '{\"[1,5)\"}', 'happy'),
           (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         -- No arrays: updates and deletes of these rows are applied set-based.
         CREATE TABLE flat (id int PRIMARY KEY, p pair, r floatrange, d pos_pair, mr lib.moodrange);
         INSERT INTO flat SELECT g, ROW(g, 'ok', NULL)::pair, floatrange(g, g + 1),
                                 ROW(g, 'sad', '{}')::pair, '[sad,ok]' FROM generate_series(1, 20) g;
         RESET search_path;
         ALTER DATABASE postgres SET search_path = app, public;",
    )
    .await
    .unwrap();

    bootstrap_ok(&source, &target, &[]);
    let created = texts(
        &tgt,
        "SELECT string_agg(n.nspname || '.' || t.typname, ' ' ORDER BY n.nspname, t.typname) FROM pg_type t \
         JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname IN ('app', 'lib') \
           AND t.typtype IN ('e', 'c', 'd', 'r', 'm') AND t.typname NOT IN ('things', 'flat')",
    )
    .await;
    assert_eq!(
        created,
        vec!["app.floatmultirange app.floatrange app.holder app.pair app.pos_pair app.small_range lib.mood lib.moodrange lib.moods"]
    );
    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target);
    src.batch_execute(
        "INSERT INTO app.things VALUES
           (3, ROW('three', NULL), ROW(5, 'happy', '{\"with space\"}'), ROW(6, 'sad', '{}'),
            '{}', 'empty', '{}', NULL, '(ok,)', '{}', '(,10]', NULL, 'sad');
         UPDATE app.things SET p = ROW(7, 'sad', '{q}'), fr = '[3,4]', mr = '[ok,ok]',
                               h = ROW('updated', ROW(8, 'ok', NULL)) WHERE id = 1;
         UPDATE app.things SET pp = ROW(9, 'ok', '{}'), pairs = ARRAY[ROW(1, 'ok', '{}')::app.pair]
           WHERE id = 2;
         UPDATE app.flat SET p = ROW((p).a + 100, 'happy', '{z}'), r = app.floatrange(0, id),
                             mr = '(ok,happy)' WHERE id <= 10;
         DELETE FROM app.flat WHERE id > 15;",
    )
    .await
    .unwrap();
    wait_for_convergence_running(
        &mut run,
        &src,
        &tgt,
        &["app.things", "app.flat"],
        Duration::from_secs(60),
    )
    .await;
    stop_run(run).await;
    verify_equal(&source, &target);
}

// ---------------------------------------------------------------------------
// 4. Narrower typmods refused; widened columns keep their values and verify equal.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrower_target_typmods_are_refused_and_wider_ones_accepted() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = canonical_client(&source).await;
    let tgt = canonical_client(&target).await;
    src.batch_execute(
        "CREATE TABLE narrow (id int PRIMARY KEY, n numeric(12,4), v varchar(50), ts timestamp(6));
         INSERT INTO narrow VALUES (1, 12345678.1234, repeat('x', 50), '2024-01-01 00:00:00.654321'),
                                   (2, 1.5, 'short', '2024-01-01 00:00:00');",
    )
    .await
    .unwrap();
    tgt.batch_execute(
        "CREATE TABLE narrow (id int PRIMARY KEY, n numeric(10,2), v varchar(50), ts timestamp(6))",
    )
    .await
    .unwrap();
    expect_refusal(
        &source,
        &target,
        &[
            "public.narrow.n",
            "numeric(12,4) on the source but numeric(10,2) on the target",
            r#"ALTER TABLE "public"."narrow" ALTER COLUMN "n" TYPE numeric(12,4)"#,
        ],
    );
    tgt.batch_execute(
        "ALTER TABLE narrow ALTER COLUMN n TYPE numeric(12,4), ALTER COLUMN v TYPE varchar(10)",
    )
    .await
    .unwrap();
    expect_refusal(
        &source,
        &target,
        &[
            "public.narrow.v",
            r#"ALTER TABLE "public"."narrow" ALTER COLUMN "v" TYPE character varying(50)"#,
        ],
    );
    tgt.batch_execute(
        "ALTER TABLE narrow ALTER COLUMN v TYPE varchar(50), ALTER COLUMN ts TYPE timestamp(0)",
    )
    .await
    .unwrap();
    expect_refusal(
        &source,
        &target,
        &[
            "public.narrow.ts",
            r#"ALTER TABLE "public"."narrow" ALTER COLUMN "ts" TYPE timestamp(6) without time zone"#,
        ],
    );
    let slots: i64 = src
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a refused bootstrap created a slot");

    // Wider typmods are accepted, and the copy verifies equal.
    tgt.batch_execute(
        "ALTER TABLE narrow ALTER COLUMN n TYPE numeric(16,6), ALTER COLUMN v TYPE varchar(80), \
         ALTER COLUMN ts TYPE timestamp",
    )
    .await
    .unwrap();
    bootstrap_ok(&source, &target, &[]);
    assert_eq!(
        texts(
            &tgt,
            "SELECT concat_ws(' | ', n, ts) FROM narrow ORDER BY id"
        )
        .await,
        vec![
            "12345678.123400 | 2024-01-01 00:00:00.654321",
            "1.500000 | 2024-01-01 00:00:00"
        ]
    );
    verify_equal(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widened_columns_hold_the_same_instant_on_every_write_path() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = canonical_client(&source).await;
    let tgt = canonical_client(&target).await;
    src.batch_execute(
        "CREATE TABLE wide (id int PRIMARY KEY, at timestamp, at0 timestamp(0), n numeric(10,2),
                            c char(3), j json, i int, r real, v varchar(20));
         INSERT INTO wide VALUES
           -- A wall-clock time that does not exist in New York, one that exists twice.
           (1, '2024-03-10 02:30:00', '2024-11-03 01:30:00', 1.5, 'ab', '{\"b\": 1,  \"a\": [2]}', 7, 0.1, 'x'),
           (2, '2024-06-01 12:00:00.123456', '-infinity', -0.01, 'abc', '[]', -7, 1e30, ''),
           (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         ALTER DATABASE postgres SET TimeZone = 'America/New_York';",
    )
    .await
    .unwrap();
    tgt.batch_execute(
        "CREATE TABLE wide (id bigint PRIMARY KEY, at timestamptz, at0 timestamptz(3),
                            n numeric(14,4), c char(6), j jsonb, i bigint, r double precision,
                            v text);
         ALTER DATABASE postgres SET TimeZone = 'Asia/Tokyo';",
    )
    .await
    .unwrap();

    bootstrap_ok(&source, &target, &[]);
    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source, &target);
    // Inserts (streamed through COPY), single-row updates and a multi-row update.
    src.batch_execute(
        "INSERT INTO wide VALUES
           (4, '2025-03-30 02:30:00', '2025-10-26 02:30:00', 99.99, 'z', 'null', 0, -0.5, 'y'),
           (5, '1900-01-01 00:00:00', 'infinity', 0, '', '{}', 1, 2, 'z');
         UPDATE wide SET at = '2024-03-31 02:15:00', j = '{\"k\":   true}' WHERE id = 1;
         UPDATE wide SET at = at + interval '1 day', at0 = '2030-01-01 00:00:00' WHERE id IN (2, 3, 4);",
    )
    .await
    .unwrap();
    // The source's wall-clock times read as UTC, its values in the target's types.
    let source_view = "SELECT concat_ws(' | ', id, at AT TIME ZONE 'UTC', at0 AT TIME ZONE 'UTC', \
                       n::numeric(14,4), rtrim(c), j::jsonb, i, r, v) FROM wide ORDER BY id";
    let target_view =
        "SELECT concat_ws(' | ', id, at, at0, n, rtrim(c), j, i, r, v) FROM wide ORDER BY id";
    let want = texts(&src, source_view).await;
    support::wait_until(
        "the widened rows to arrive",
        Duration::from_secs(60),
        || {
            let tgt = &tgt;
            let want = &want;
            async move { texts(tgt, target_view).await == *want }
        },
    )
    .await;
    run.assert_running("after streaming the widened rows");
    stop_run(run).await;
    assert_eq!(texts(&tgt, target_view).await, want);
    verify_equal(&source, &target);
}
