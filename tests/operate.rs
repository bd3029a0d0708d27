//! Operating walshuttle against real clusters: `status` (text and schema-stable
//! JSON, lag reaching zero), `/metrics` and `/healthz` of `run --metrics-addr`,
//! `teardown`, and the `--config` file with its precedence under env and flags.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    free_port, http_get, run, tail, wait_for_convergence_running, wait_until, wait_while_running,
    walshuttle, Cluster, RunChild, RunLogs, PASSWORD,
};
use tokio_postgres::Client;

async fn get(port: u16, path: &'static str) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || http_get(port, path))
        .await
        .ok()
        .flatten()
}

/// Polls `GET path` until `accept(code, body)` holds, failing at once if `run`
/// exits and on timeout (with its log). Returns the accepted body.
async fn wait_http(
    child: &mut RunChild,
    what: &str,
    port: u16,
    path: &'static str,
    timeout: Duration,
    mut accept: impl FnMut(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((code, body)) = get(port, path).await {
            if accept(code, &body) {
                return body;
            }
        }
        if let Err(e) = child.check_running() {
            panic!("while waiting for {what}: {e}");
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; walshuttle log tail:\n{}",
            tail(&child.log(), 60)
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The value of the Prometheus sample whose name is `name` and whose labels include
/// every one of `labels` (`key="value"`).
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            return None;
        }
        let present: Vec<&str> = label_text.split(',').collect();
        if labels.iter().all(|l| present.contains(l)) {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// `walshuttle status --json` parsed, with the exit code and stderr on failure.
fn status_json(source: &Cluster, target: &Cluster, extra: &[&str]) -> Value {
    let mut cmd = walshuttle(source, target);
    cmd.args(["status", "--json"]).args(extra);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "status --json failed: {err}");
    assert!(
        !out.contains(PASSWORD) && !err.contains(PASSWORD),
        "status shows the password:\n{out}\n{err}"
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

/// Every key path of a JSON document (array elements share the path `[]`).
fn key_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let path = format!("{prefix}.{k}");
                out.insert(path.clone());
                key_paths(v, &path, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                key_paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn keys_of(value: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    key_paths(value, "", &mut out);
    out
}

async fn scalar_bool(client: &Client, sql: &str) -> bool {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

const EVENTS: &str = "CREATE TABLE events (id int PRIMARY KEY, v text, \
     created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
     INSERT INTO events (id, v) SELECT g, 'v' || g FROM generate_series(1, 100) g;";

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_is_schema_stable_and_lag_reaches_zero() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(EVENTS).await.unwrap();

    // Nothing bootstrapped yet: one clear line, exit 1.
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 1, "status without state: {out}{err}");
    assert_eq!(
        err.trim(),
        "error: no walshuttle pipeline on the target: run bootstrap"
    );

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, _, err) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed: {err}");
    src.batch_execute(
        "INSERT INTO events (id, v) SELECT g, 'late' FROM generate_series(101, 150) g",
    )
    .await
    .unwrap();

    // State A: copied, nobody streaming.
    let a = status_json(&source, &target, &["--warn-retained-bytes", "0"]);
    let p = &a["pipelines"][0];
    assert_eq!(p["pipeline"], "walshuttle");
    assert_eq!(p["phase"], "copied", "{a:#}");
    assert_eq!(p["consistent"], true);
    assert_eq!(p["slot_exists"], true);
    assert_eq!(p["slot_active"], false);
    assert_eq!(p["slot_active_pid"], Value::Null);
    assert_eq!(p["rows_copied"], 100);
    assert!(p["chunks_total"].as_i64().unwrap() > 0);
    assert_eq!(p["chunks_done"], p["chunks_total"]);
    assert!(p["lag_applied_bytes"].as_u64().unwrap() > 0, "{p:#}");
    assert!(p["retained_wal_bytes"].as_u64().unwrap() > 0, "{p:#}");
    let t = &p["tables"][0];
    assert_eq!(t["table"], "public.events");
    assert!(
        t["created_max"].is_string() && t["updated_max"].is_string(),
        "{t:#}"
    );
    let warnings = a["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("retains")),
        "no retained-WAL warning at threshold 0: {warnings:?}"
    );
    // The text form prints the warning as a WARNING line.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["status", "--warn-retained-bytes", "0"]);
    let (code, text, err) = run(cmd);
    assert_eq!(code, 0, "{err}");
    eprintln!("status:\n{text}");
    assert!(text.contains("phase            copied"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("WARNING: pipeline walshuttle") && l.contains("retains")),
        "{text}"
    );

    // State B: streaming and caught up.
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "2"]);
    let mut child = logs.spawn(cmd);
    let tgt = target.client().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["events"], Duration::from_secs(90))
        .await;
    let mut last = Value::Null;
    wait_while_running(
        "status to show streaming with zero lag",
        Duration::from_secs(90),
        &mut child,
        || {
            let v = status_json(&source, &target, &[]);
            let p = v["pipelines"][0].clone();
            last = v;
            async move {
                p["phase"] == "streaming"
                    && p["slot_active"] == true
                    && p["lag_seconds"].as_f64() == Some(0.0)
                    && p["lag_confirmed_bytes"].as_u64() == Some(0)
            }
        },
    )
    .await;
    let b = last;
    let p = &b["pipelines"][0];
    assert!(p["slot_active_pid"].as_i64().is_some(), "{p:#}");
    assert!(
        p["applied_lsn"].is_string() && p["last_commit_time"].is_string(),
        "{p:#}"
    );
    assert_eq!(
        keys_of(&a),
        keys_of(&b),
        "status --json key sets differ between two states"
    );
    assert!(b["warnings"].as_array().unwrap().is_empty(), "{b:#}");

    // Writes make lag appear; once applied it returns to zero.
    src.batch_execute("UPDATE events SET v = 'changed', updated_at = now() WHERE id <= 10")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["events"], Duration::from_secs(60))
        .await;
    wait_while_running(
        "lag to return to zero after writes",
        Duration::from_secs(60),
        &mut child,
        || {
            let v = status_json(&source, &target, &[]);
            async move { v["pipelines"][0]["lag_seconds"].as_f64() == Some(0.0) }
        },
    )
    .await;

    // Consumer gone: `stopped`.
    child.kill9();
    wait_until(
        "status to show the pipeline stopped",
        Duration::from_secs(60),
        || {
            let v = status_json(&source, &target, &[]);
            async move { v["pipelines"][0]["phase"] == "stopped" }
        },
    )
    .await;

    // The source unreachable: still exit 0, same keys, source fields null, a warning.
    let mut cmd = walshuttle(&source, &target);
    cmd.env(
        "WALSHUTTLE_SOURCE",
        format!("postgresql://postgres:{PASSWORD}@127.0.0.1:1/postgres"),
    )
    .args(["status", "--json"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(PASSWORD), "{out}");
    let c: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(keys_of(&a), keys_of(&c), "key sets differ without a source");
    assert_eq!(c["pipelines"][0]["source_current_lsn"], Value::Null);
    assert_eq!(c["pipelines"][0]["slot_active"], Value::Null);
    assert!(!c["warnings"].as_array().unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// /metrics and /healthz
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_follow_the_stream() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 200) g;",
    )
    .await
    .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "2", "--metrics-addr", &addr]);
    let mut child = logs.spawn(cmd);

    let body = wait_http(
        &mut child,
        "/healthz to answer 200",
        port,
        "/healthz",
        Duration::from_secs(90),
        |code, _| code == 200,
    )
    .await;
    let health: Value = serde_json::from_str(&body).expect("healthz body is JSON");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["phase"], "streaming", "{health}");
    assert_eq!(health["reason"], Value::Null, "{health}");

    src.batch_execute(
        "INSERT INTO items SELECT g, 'new' FROM generate_series(1001, 1050) g;
         UPDATE items SET v = 'upd' WHERE id <= 10;
         DELETE FROM items WHERE id BETWEEN 11 AND 15;",
    )
    .await
    .unwrap();
    let pipeline = r#"pipeline="walshuttle""#;
    let table = r#"table="public.items""#;
    let metrics = wait_http(
        &mut child,
        "/metrics to count the applied rows",
        port,
        "/metrics",
        Duration::from_secs(60),
        |code, text| {
            let n = |op: &str| {
                sample(
                    text,
                    "walshuttle_applied_rows_total",
                    &[pipeline, table, &format!("op=\"{op}\"")],
                )
                .unwrap_or(0.0)
            };
            code == 200 && n("insert") >= 50.0 && n("update") >= 10.0 && n("delete") >= 5.0
        },
    )
    .await;
    for name in [
        "walshuttle_transactions_applied_total",
        "walshuttle_lag_bytes",
        "walshuttle_lag_seconds",
        "walshuttle_streaming",
        "walshuttle_apply_commit_seconds_count",
        "walshuttle_apply_batch_transactions_count",
        "walshuttle_commit_latency_seconds_count",
    ] {
        let v = sample(&metrics, name, &[pipeline]);
        assert!(v.is_some(), "no {name} series with {pipeline}:\n{metrics}");
    }
    assert!(
        sample(
            &metrics,
            "walshuttle_transactions_applied_total",
            &[pipeline]
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        sample(&metrics, "walshuttle_streaming", &[pipeline]),
        Some(1.0)
    );
    // The bootstrap inside `run` copied the 200 original rows.
    assert_eq!(
        sample(
            &metrics,
            "walshuttle_bootstrap_rows_copied_total",
            &[pipeline, table]
        ),
        Some(200.0),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .all(|l| l.starts_with("walshuttle_")),
        "a series not named walshuttle_*:\n{metrics}"
    );

    // The source goes away: unhealthy, with the reason.
    source.stop("fast");
    let body = wait_http(
        &mut child,
        "/healthz to answer 503 with the source stopped",
        port,
        "/healthz",
        Duration::from_secs(60),
        |code, _| code == 503,
    )
    .await;
    eprintln!("/healthz with the source stopped: {body}");
    let health: Value = serde_json::from_str(&body).expect("healthz body is JSON");
    assert_eq!(health["status"], "unhealthy", "{health}");
    assert_ne!(health["phase"], "streaming", "{health}");
    assert!(health["reason"].is_string(), "{health}");
    assert!(!body.contains(PASSWORD), "{body}");

    // And healthy again once the source is back.
    source.restart_stopped();
    wait_http(
        &mut child,
        "/healthz to answer 200 again after the source restarted",
        port,
        "/healthz",
        Duration::from_secs(90),
        |code, _| code == 200,
    )
    .await;
    let (_, metrics) = get(port, "/metrics").await.expect("metrics answer");
    assert!(
        sample(&metrics, "walshuttle_reconnects_total", &[pipeline]).unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------
// teardown
// ---------------------------------------------------------------------------

async fn slot_exists(src: &Client, slot: &str) -> bool {
    src.query_opt(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .is_some()
}

async fn publication_exists(src: &Client, name: &str) -> bool {
    src.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_removes_slot_publication_and_state_but_keeps_rows() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a SELECT generate_series(1, 300);
         CREATE TABLE b (id int PRIMARY KEY); INSERT INTO b SELECT generate_series(1, 70);",
    )
    .await
    .unwrap();
    for (slot, table) in [("walshuttle", "a"), ("other", "b")] {
        let mut cmd = walshuttle(&source, &target);
        cmd.args([
            "bootstrap",
            "--slot",
            slot,
            "--publication",
            slot,
            "--tables",
            table,
        ]);
        let (code, _, err) = run(cmd);
        assert_eq!(code, 0, "bootstrap {slot}: {err}");
    }
    let tgt = target.client().await;

    // No terminal and no --yes: refuses, changes nothing.
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("teardown");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert!(slot_exists(&src, "walshuttle").await);
    assert!(publication_exists(&src, "walshuttle").await);

    // The first pipeline goes; the other keeps the schema alive.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["teardown", "--yes"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "teardown failed: {err}");
    assert!(out.contains("dropped replication slot walshuttle"), "{out}");
    assert!(!slot_exists(&src, "walshuttle").await);
    assert!(!publication_exists(&src, "walshuttle").await);
    assert!(slot_exists(&src, "other").await);
    assert!(publication_exists(&src, "other").await);
    assert!(
        scalar_bool(
            &tgt,
            "SELECT NOT EXISTS (SELECT 1 FROM walshuttle.pipelines WHERE pipeline = 'walshuttle') \
               AND NOT EXISTS (SELECT 1 FROM walshuttle.chunks WHERE pipeline = 'walshuttle') \
               AND EXISTS (SELECT 1 FROM walshuttle.pipelines WHERE pipeline = 'other')"
        )
        .await
    );

    // The last pipeline takes the schema with it.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["teardown", "--yes", "--slot", "other"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "teardown other failed: {err}");
    assert!(out.contains("dropped the state schema walshuttle"), "{out}");
    assert!(!slot_exists(&src, "other").await);
    assert!(!publication_exists(&src, "other").await);
    assert!(
        scalar_bool(
            &tgt,
            "SELECT NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'walshuttle')"
        )
        .await,
        "the state schema survived"
    );
    // Replicated rows stay.
    let rows: i64 = tgt
        .query_one(
            "SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM b)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 370);

    // Again: nothing left, still success (and no confirmation needed).
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("teardown");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "second teardown: {err}");
    assert!(out.contains("nothing to tear down"), "{out}");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (code, _, err) = run(cmd);
    assert_eq!(code, 1, "{err}");
}

// ---------------------------------------------------------------------------
// config file
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_is_overridden_by_env_and_flags_and_checked() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE c1 (id int PRIMARY KEY); INSERT INTO c1 SELECT generate_series(1, 40);
         CREATE TABLE c2 (id int PRIMARY KEY); INSERT INTO c2 SELECT generate_series(1, 5);",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walshuttle.toml");
    let bad_target = format!("postgresql://postgres:{PASSWORD}@127.0.0.1:1/postgres");
    std::fs::write(
        &path,
        format!(
            "# every key is optional\n\
             source = \"{}\"\n\
             target = \"{bad_target}\"\n\
             slot = \"from_file\"\n\
             publication = \"file_pub\"\n\
             tables = [\"c1\"]\n\
             jobs = 1\n\
             margin = \"10m\"\n\
             metrics_addr = \"127.0.0.1:9187\"\n",
            source.url()
        ),
    )
    .unwrap();
    let config = path.to_str().unwrap();

    // File < env (target) < flag (slot); the file's source, publication and tables
    // are used since nothing overrides them.
    let mut cmd = walshuttle(&source, &target);
    cmd.env_remove("WALSHUTTLE_SOURCE").args([
        "--config",
        config,
        "bootstrap",
        "--slot",
        "from_flag",
    ]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "bootstrap with the config file: {out}{err}");
    assert!(slot_exists(&src, "from_flag").await, "the --slot flag lost");
    assert!(
        !slot_exists(&src, "from_file").await,
        "the file beat the flag"
    );
    assert!(
        publication_exists(&src, "file_pub").await,
        "the file's publication unused"
    );
    let tgt = target.client().await;
    let tables: Vec<String> = tgt
        .query(
            "SELECT table_name FROM walshuttle.pipeline_tables WHERE pipeline = 'from_flag'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, vec!["c1".to_string()], "the file's tables unused");

    // Without the environment variable the file's (unreachable) target is used.
    let mut cmd = walshuttle(&source, &target);
    cmd.env_remove("WALSHUTTLE_TARGET")
        .args(["--config", config, "status"]);
    let (code, _, err) = run(cmd);
    // A server that is down or unreachable: try again later (EX_TEMPFAIL).
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("127.0.0.1:1/postgres"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");

    // config check: valid, resolved, redacted, with origins.
    let mut cmd = walshuttle(&source, &target);
    cmd.env_remove("WALSHUTTLE_SOURCE")
        .args(["config", "check", "--config", config]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "config check: {err}");
    assert!(
        !out.contains(PASSWORD),
        "config check shows a password:\n{out}"
    );
    assert!(out.contains("postgres:***@"), "{out}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
            .to_string()
    };
    assert!(line("source").ends_with("(config file)"), "{out}");
    assert!(line("target").ends_with("(environment)"), "{out}");
    assert!(line("slot").contains("from_file"), "{out}");
    assert!(line("margin").contains("600s"), "{out}");

    // Rejections: one line, exit 1.
    let cases = [
        ("unknown key", "slott = \"x\"\n", "slott"),
        (
            "bad URL",
            "source = \"postgresql://u:pw@host:notaport/db\"\n",
            "source",
        ),
        ("bad duration", "margin = \"5 fortnights\"\n", "margin"),
        (
            "bad address",
            "metrics_addr = \"localhost\"\n",
            "metrics_addr",
        ),
    ];
    for (what, body, mention) in cases {
        std::fs::write(&path, body).unwrap();
        let mut cmd = walshuttle(&source, &target);
        cmd.args(["config", "check", "--config", config]);
        let (code, out, err) = run(cmd);
        assert_eq!(code, 1, "{what}: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
        assert!(err.starts_with("error: config file"), "{what}: {err}");
        assert!(err.contains(mention), "{what}: {err}");
        assert!(!err.contains("pw@"), "{what}: {err}");
    }
    // A broken file stops every command, not only `config check`.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["--config", config, "status"]);
    let (code, _, err) = run(cmd);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("metrics_addr"), "{err}");
}
