//! Chaos: a writer mixing inserts, updates (some leaving a TOASTed column
//! unchanged), primary-key changes, deletes and an occasional TRUNCATE on several
//! tables keeps committing, reconnecting through source restarts: among them a
//! secondary UNIQUE whose values are swapped through a free value, an identity index
//! beside a primary key (with a TOASTed column), keyless rows that are equal but not
//! identical, and a composite column (which makes the whole stream text). Faults
//! are injected at random moments meanwhile: kill -9 of walshuttle,
//! fast and immediate source restarts, immediate target restarts, and connections
//! cut between walshuttle and either server. Afterwards every table must be equal on
//! both sides, with nothing applied twice or partially.
//!
//! `WALSHUTTLE_CHAOS_SECONDS` (default 45) sets how long faults are injected;
//! `WALSHUTTLE_CHAOS_SEED` replays a run's choices (the printed seed; timing is not
//! replayed, so the interleaving differs).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::proxy::Proxy;
use support::workload::{assert_batches_exactly_once, Writer};
use support::{
    assert_tables_equal, table_fingerprint, tail, try_connect, wait_for_convergence_running,
    wait_while_running, walshuttle_urls, Cluster, RunChild, RunLogs,
};

const TABLES: &[&str] = &[
    "accounts", "kv", "dups", "ev", "ev_log", "uq", "ri", "kl", "tm",
];

const SCHEMA: &str = r#"
    CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance numeric, doc text,
                           created_at timestamptz NOT NULL DEFAULT now(),
                           updated_at timestamptz NOT NULL DEFAULT now());
    -- Out of line and uncompressed: an UPDATE that does not touch doc sends it as
    -- 'unchanged TOAST' in pgoutput.
    ALTER TABLE accounts ALTER COLUMN doc SET STORAGE EXTERNAL;
    INSERT INTO accounts (id, owner, balance, doc)
        SELECT g, 'owner ' || g, g * 1.5,
               CASE WHEN g % 10 = 0 THEN repeat(md5(g::text), 5000) ELSE 'small ' || g END
        FROM generate_series(1, 2000) g;
    CREATE TABLE kv (k int PRIMARY KEY, v text);
    INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 1000) g;
    CREATE TABLE dups (a int, b text);
    ALTER TABLE dups REPLICA IDENTITY FULL;
    INSERT INTO dups SELECT a, 'same' FROM generate_series(1, 5) a, generate_series(1, 6);
    CREATE TABLE ev (id bigserial PRIMARY KEY, batch int NOT NULL, n int NOT NULL);
    CREATE TABLE ev_log (batch int NOT NULL, n int NOT NULL);
    ALTER TABLE ev_log REPLICA IDENTITY FULL;
    -- A secondary UNIQUE whose values are swapped through a free value.
    CREATE TABLE uq (id int PRIMARY KEY, name text NOT NULL UNIQUE, stash text);
    INSERT INTO uq SELECT g, 'u' || g, NULL FROM generate_series(1, 200) g;
    -- The replica identity is a unique index beside the primary key; doc is TOASTed.
    CREATE TABLE ri (id bigint PRIMARY KEY, code text NOT NULL, v int, doc text,
                     CONSTRAINT ri_code_key UNIQUE (code));
    ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_code_key;
    ALTER TABLE ri ALTER COLUMN doc SET STORAGE EXTERNAL;
    INSERT INTO ri SELECT g, 'r' || g, g,
           CASE WHEN g % 5 = 0 THEN repeat(md5(g::text), 3000) ELSE 'd' || g END
      FROM generate_series(1, 500) g;
    -- Keyless rows that are equal but not identical (1.0 and 1.00, 0 and -0).
    CREATE TABLE kl (n numeric, f float8, j jsonb);
    ALTER TABLE kl REPLICA IDENTITY FULL;
    INSERT INTO kl SELECT CASE WHEN g % 2 = 0 THEN 1.0 ELSE 1.00 END,
                          CASE WHEN g % 3 = 0 THEN '0'::float8 ELSE '-0'::float8 END,
                          CASE WHEN g % 5 = 0 THEN '{"a": 1.0}'::jsonb ELSE '{"a": 1.00}'::jsonb END
      FROM generate_series(1, 60) g;
    -- A composite column: values travel as text, for the whole stream.
    CREATE TYPE pair AS (x int, y text);
    CREATE TABLE tm (id int PRIMARY KEY, p pair, note text);
    INSERT INTO tm SELECT g, ROW(g, 'p' || g)::pair, 'n' FROM generate_series(1, 100) g;
"#;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The statements of writer iteration `i`: always ten rows into `ev` and `ev_log`
/// (one transaction: partial or repeated application shows), then a mix over the
/// other tables.
fn iteration(i: u64, rng: &mut StdRng) -> String {
    let mut ev = String::new();
    for n in 1..=10 {
        ev.push_str(&format!(
            "INSERT INTO ev (batch, n) VALUES ({i}, {n}); INSERT INTO ev_log (batch, n) VALUES ({i}, {n});"
        ));
    }
    let mut s: Vec<String> = Vec::new();
    // accounts: inserts (some with a big out-of-line doc), updates that mostly leave
    // a TOASTed doc unchanged, deletes of small rows.
    let doc = if i % 20 == 0 {
        format!("repeat(md5('{i}'), 5000)")
    } else {
        format!("'small new {i}'")
    };
    s.push(format!(
        "INSERT INTO accounts (id, owner, balance, doc) VALUES ({}, 'new {i}', {i}.25, {doc})",
        100_000 + i
    ));
    let upd = if rng.gen_bool(0.6) {
        rng.gen_range(1..=200u64) * 10
    } else {
        rng.gen_range(1..=2000u64)
    };
    s.push(format!(
        "UPDATE accounts SET balance = balance + 1, owner = 'upd {i}', updated_at = now() WHERE id = {upd}"
    ));
    if rng.gen_ratio(1, 12) {
        // Rewrite a big doc now and then (a changed TOAST value).
        s.push(format!(
            "UPDATE accounts SET doc = repeat(md5('{i}x'), 4000) WHERE id = {}",
            rng.gen_range(1..=200u64) * 10
        ));
    }
    if rng.gen_ratio(1, 3) {
        let del = rng.gen_range(1..=2000u64);
        if del % 10 != 0 {
            s.push(format!("DELETE FROM accounts WHERE id = {del}"));
        }
    }
    // kv: inserts, value updates, primary-key changes, deletes, a rare TRUNCATE.
    if rng.gen_ratio(1, 150) {
        s.push(
            "TRUNCATE kv; INSERT INTO kv SELECT g, 're ' || g FROM generate_series(1, 1000) g"
                .into(),
        );
    }
    s.push(format!("INSERT INTO kv VALUES ({}, 'ins {i}')", 50_000 + i));
    s.push(format!(
        "UPDATE kv SET v = 'v {i}' WHERE k = {}",
        rng.gen_range(1..=1000u64)
    ));
    s.push(format!(
        "UPDATE kv SET k = k + 1000000 WHERE k = {}",
        rng.gen_range(1..=1000u64)
    ));
    if rng.gen_ratio(1, 3) {
        s.push(format!(
            "DELETE FROM kv WHERE k = {}",
            rng.gen_range(1..=1000u64)
        ));
    }
    // dups (no key, REPLICA IDENTITY FULL): change exactly one of identical rows.
    if rng.gen_ratio(1, 300) {
        s.push("TRUNCATE dups; INSERT INTO dups SELECT a, 'same' FROM generate_series(1, 5) a, generate_series(1, 6)".into());
    }
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

    // uq: swap two names through a free one: a → free, b → a's, a → b's (legal
    // one statement at a time, not as one set-based statement).
    let a = rng.gen_range(1..=200u64);
    let b = (a + rng.gen_range(1..200u64) - 1) % 200 + 1;
    s.push(format!(
        "UPDATE uq SET stash = name, name = 'free{i}' WHERE id = {a}"
    ));
    s.push(format!(
        "UPDATE uq SET stash = name, name = (SELECT stash FROM uq WHERE id = {a}) WHERE id = {b}"
    ));
    s.push(format!(
        "UPDATE uq SET name = (SELECT stash FROM uq WHERE id = {b}), stash = NULL WHERE id = {a}"
    ));
    // ri: found by code, not by the primary key: primary-key changes (doc left as
    // unchanged TOAST), value updates, identity changes, deletes, inserts.
    let r = rng.gen_range(1..=500u64);
    s.push(format!(
        "UPDATE ri SET id = {} WHERE code = 'r{r}'",
        1_000_000 + i
    ));
    s.push(format!(
        "UPDATE ri SET v = v + 1 WHERE code = 'r{}'",
        rng.gen_range(1..=500u64)
    ));
    if rng.gen_ratio(1, 4) {
        s.push(format!(
            "UPDATE ri SET code = code || 'x{i}' WHERE code = 'r{}'",
            rng.gen_range(1..=500u64)
        ));
    }
    if rng.gen_ratio(1, 4) {
        s.push(format!(
            "DELETE FROM ri WHERE code = 'r{}'",
            rng.gen_range(1..=500u64)
        ));
        s.push(format!(
            "INSERT INTO ri VALUES ({}, 'n{i}', {i}, repeat(md5('{i}'), 3000))",
            2_000_000 + i
        ));
    }
    if rng.gen_ratio(1, 10) {
        s.push(format!(
            "UPDATE ri SET doc = repeat(md5('{i}d'), 2500) WHERE code = 'r{}'",
            rng.gen_range(1..=500u64)
        ));
    }
    // kl: change one of several equal rows, chosen by its exact text.
    let (n, f) = (
        if rng.gen_bool(0.5) { "1.0" } else { "1.00" },
        if rng.gen_bool(0.5) { "0" } else { "-0" },
    );
    s.push(format!(
        "UPDATE kl SET f = CASE WHEN f::text = '-0' THEN '0'::float8 ELSE '-0'::float8 END \
         WHERE ctid = (SELECT ctid FROM kl WHERE n::text = '{n}' LIMIT 1)"
    ));
    s.push(format!(
        "UPDATE kl SET n = CASE WHEN n::text = '1.0' THEN 1.00 ELSE 1.0 END \
         WHERE ctid = (SELECT ctid FROM kl WHERE f::text = '{f}' LIMIT 1)"
    ));
    if rng.gen_ratio(1, 3) {
        let j = if rng.gen_bool(0.5) { "1.0" } else { "1.00" };
        s.push(format!(
            "DELETE FROM kl WHERE ctid = (SELECT ctid FROM kl WHERE j::text = '{{\"a\": {j}}}' LIMIT 1)"
        ));
        s.push(format!(
            "INSERT INTO kl VALUES ({n}, '{f}', '{{\"a\": {j}}}')"
        ));
    }
    // tm: composite values (text mode).
    s.push(format!(
        "UPDATE tm SET p = ROW((p).x + 1, (p).y || '.')::pair, note = 'n{i}' WHERE id = {}",
        rng.gen_range(1..=100u64)
    ));
    if rng.gen_ratio(1, 5) {
        s.push(format!(
            "INSERT INTO tm VALUES ({}, ROW({i}, 'new ''{i}'' (x)')::pair, NULL)",
            1000 + i
        ));
        s.push(format!(
            "DELETE FROM tm WHERE id = {}",
            rng.gen_range(1..=100u64)
        ));
    }

    let mut sql = format!("BEGIN;{ev}");
    if i % 2 == 0 {
        // One transaction for everything.
        for stmt in &s {
            sql.push_str(stmt);
            sql.push(';');
        }
        sql.push_str("COMMIT;");
    } else {
        // The ev batch, then one transaction per statement.
        sql.push_str("COMMIT;");
        for stmt in &s {
            sql.push_str(&format!("BEGIN;{stmt};COMMIT;"));
        }
    }
    sql
}

fn spawn_run(logs: &mut RunLogs, source: &Proxy, target: &Proxy) -> RunChild {
    let mut cmd = walshuttle_urls(&source.url(), &target.url());
    cmd.args(["run", "--jobs", "2"]);
    logs.spawn(cmd)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWalshuttle,
    SourceRestartFast,
    SourceRestartImmediate,
    TargetRestartImmediate,
    CutSource,
    CutTarget,
}

const FAULTS: &[(Fault, u32)] = &[
    (Fault::KillWalshuttle, 3),
    (Fault::SourceRestartFast, 2),
    (Fault::SourceRestartImmediate, 2),
    (Fault::TargetRestartImmediate, 2),
    (Fault::CutSource, 2),
    (Fault::CutTarget, 2),
];

fn pick_fault(rng: &mut StdRng) -> Fault {
    let total: u32 = FAULTS.iter().map(|(_, w)| w).sum();
    let mut x = rng.gen_range(0..total);
    for (f, w) in FAULTS {
        if x < *w {
            return *f;
        }
        x -= w;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_converges_with_nothing_lost_or_repeated() {
    let seed = env_u64("WALSHUTTLE_CHAOS_SEED").unwrap_or_else(rand::random);
    let seconds = env_u64("WALSHUTTLE_CHAOS_SECONDS").unwrap_or(45);
    eprintln!("chaos: seed {seed} (WALSHUTTLE_CHAOS_SEED={seed} replays), {seconds} s of faults");
    let mut rng = StdRng::seed_from_u64(seed);

    let source = Cluster::start();
    let target = Cluster::start();
    source.client().await.batch_execute(SCHEMA).await.unwrap();
    let source_proxy = Proxy::start(source.port);
    let target_proxy = Proxy::start(target.port);

    let mut writer_rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let writer = Writer::spawn(source.url(), Duration::from_millis(2), move |i| {
        iteration(i, &mut writer_rng)
    });

    let mut logs = RunLogs::new();
    let mut run = spawn_run(&mut logs, &source_proxy, &target_proxy);
    let target_url = target.url();
    wait_while_running(
        "the first streamed transaction to be applied",
        Duration::from_secs(120),
        &mut run,
        || {
            let url = target_url.clone();
            async move {
                match try_connect(&url).await {
                    Some(t) => support::applied_lsn(&t, "walshuttle").await.is_some(),
                    None => false,
                }
            }
        },
    )
    .await;

    let mut counts: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut unexpected_exits: Vec<String> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        // A random pause, watching `run`.
        let pause = Duration::from_millis(rng.gen_range(1500..6000));
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if let Some(status) = run.try_exit() {
                let what = format!(
                    "walshuttle exited by itself with {status} at {:.1}s; log tail:\n{}",
                    started.elapsed().as_secs_f64(),
                    tail(&run.log(), 12)
                );
                eprintln!("{what}");
                unexpected_exits.push(what);
                run = spawn_run(&mut logs, &source_proxy, &target_proxy);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !writer.is_finished(),
            "the writer stopped (panicked?) during the chaos"
        );
        let fault = pick_fault(&mut rng);
        eprintln!(
            "at {:.1}s: {fault:?} (writer committed {}, errors {})",
            started.elapsed().as_secs_f64(),
            writer.committed(),
            writer.errors()
        );
        match fault {
            Fault::KillWalshuttle => {
                run.kill9();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
                run = spawn_run(&mut logs, &source_proxy, &target_proxy);
            }
            Fault::SourceRestartFast => source.restart("fast"),
            Fault::SourceRestartImmediate => source.restart("immediate"),
            Fault::TargetRestartImmediate => target.restart("immediate"),
            Fault::CutSource => {
                source_proxy.cut();
            }
            Fault::CutTarget => {
                target_proxy.cut();
            }
        }
        *counts.entry(fault).or_default() += 1;
    }

    let (committed, errors) = writer.stop().await;
    eprintln!("writer stopped: {committed} iterations committed, {errors} failed");
    if let Some(status) = run.try_exit() {
        let what = format!(
            "walshuttle exited by itself with {status} after the chaos; log tail:\n{}",
            tail(&run.log(), 12)
        );
        eprintln!("{what}");
        unexpected_exits.push(what);
        run = spawn_run(&mut logs, &source_proxy, &target_proxy);
    }
    let src = source.client().await;
    let tgt = target.client().await;
    let converge_started = Instant::now();
    wait_for_convergence_running(&mut run, &src, &tgt, TABLES, Duration::from_secs(240)).await;
    let converge_took = converge_started.elapsed();
    assert_tables_equal(&src, &tgt, TABLES).await;
    assert_batches_exactly_once(&tgt).await;

    let mut rows = 0;
    let mut per_table = Vec::new();
    for table in TABLES {
        let (n, _) = table_fingerprint(&src, table).await;
        rows += n;
        per_table.push(format!("{table} {n}"));
    }
    let total: u32 = counts.values().sum();
    eprintln!(
        "chaos summary: seed {seed}; {total} faults injected: {counts:?}; writer {committed} iterations committed, {errors} failed; \
         {} walshuttle processes; converged {:.1}s after the writer stopped; {rows} rows compared equal ({})",
        logs_spawned(&logs),
        converge_took.as_secs_f64(),
        per_table.join(", ")
    );
    assert!(
        unexpected_exits.is_empty(),
        "walshuttle exited by itself {} time(s) during transient faults:\n{}",
        unexpected_exits.len(),
        unexpected_exits.join("\n")
    );
}

/// How many walshuttle processes the test spawned (from the log files).
fn logs_spawned(logs: &RunLogs) -> usize {
    logs.all().matches("----- walshuttle process #").count()
}
