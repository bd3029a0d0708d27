//! The password never shows: every byte walshuttle prints (stdout and stderr, at
//! debug level, text and JSON logs) over a full life cycle — config check,
//! bootstrap, run with a writer, `/metrics` and `/healthz`, status, status --json,
//! verify, catch-up after the slot was dropped, teardown — and its failures with
//! URL and key/value connection strings, is searched for the harness password.

mod support;

use std::process::Command;
use std::time::Duration;

use support::workload::Writer;
use support::{
    free_port, run, wait_for_convergence_running, wait_while_running, walshuttle, Cluster, RunLogs,
    PASSWORD,
};

/// `GET path` on 127.0.0.1:port: the body, `None` when nothing answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    support::http_get(port, path).map(|(_, body)| body)
}

/// Every output collected, labelled.
#[derive(Default)]
struct Outputs(Vec<(String, String)>);

impl Outputs {
    fn add(&mut self, what: &str, text: String) {
        self.0.push((what.to_string(), text));
    }

    /// Runs `cmd` to completion, keeps stdout and stderr, returns (code, both).
    fn run(&mut self, what: &str, cmd: Command) -> (i32, String) {
        let (code, stdout, stderr) = run(cmd);
        let both = format!("{stdout}{stderr}");
        if code != 0 {
            eprintln!(
                "{what}: exit {code}: {}",
                stderr.lines().last().unwrap_or_default()
            );
        }
        self.add(what, both.clone());
        (code, both)
    }
}

fn debug(mut cmd: Command) -> Command {
    cmd.env("WALSHUTTLE_LOG", "debug");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_appears_in_any_output() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text,
                             created_at timestamptz NOT NULL DEFAULT now(),
                             updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO items (id, v) SELECT g, 'v' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .unwrap();
    let mut out = Outputs::default();

    // A config file holding both URLs.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walshuttle.toml");
    std::fs::write(
        &config,
        format!(
            "source = \"{}\"\ntarget = \"{}\"\nlog_format = \"json\"\n",
            source.url(),
            target.url()
        ),
    )
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.env_remove("WALSHUTTLE_SOURCE")
        .env_remove("WALSHUTTLE_TARGET")
        .arg("config")
        .arg("check")
        .arg("--config")
        .arg(&config);
    let (code, text) = out.run("config check", cmd);
    assert_eq!(code, 0, "{text}");

    let mut cmd = debug(walshuttle(&source, &target));
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, text) = out.run("bootstrap", cmd);
    assert_eq!(code, 0, "{text}");

    // run, at debug level with JSON logs, serving metrics; a writer meanwhile.
    let port = free_port();
    let mut logs = RunLogs::new();
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.args([
        "--log-format",
        "json",
        "run",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let mut child = logs.spawn(cmd);
    let writer = Writer::spawn(source.url(), Duration::from_millis(10), |i| {
        format!(
            "BEGIN; INSERT INTO items (id, v) VALUES ({}, 'w'); UPDATE items SET v = 'u{i}', updated_at = now() WHERE id = {}; COMMIT;",
            10_000 + i,
            i % 1000 + 1
        )
    });
    writer
        .wait_for_more(&mut child, 100, Duration::from_secs(90), "while running")
        .await;
    let mut scraped = String::new();
    wait_while_running(
        "/metrics to answer",
        Duration::from_secs(30),
        &mut child,
        || {
            let got = http_get(port, "/metrics");
            let ok = got.as_deref().is_some_and(|m| m.contains("walshuttle_"));
            if let Some(m) = got {
                scraped = m;
            }
            async move { ok }
        },
    )
    .await;
    out.add("GET /metrics", scraped);
    out.add(
        "GET /healthz",
        http_get(port, "/healthz").expect("/healthz answers"),
    );
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.arg("status");
    let (code, text) = out.run("status", cmd);
    assert_eq!(code, 0, "{text}");
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.args(["status", "--json"]);
    let (code, text) = out.run("status --json", cmd);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("postgres:***@"),
        "status --json shows no redacted URL:\n{text}"
    );
    let (committed, _) = writer.stop().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.arg("verify");
    let (code, text) = out.run("verify", cmd);
    assert_eq!(code, 0, "{text}");
    child.sigterm();
    assert!(
        child.wait_exit(Duration::from_secs(30)).await.is_some(),
        "run did not stop"
    );
    out.add("run (debug, json)", child.log());
    eprintln!("run applied {committed} writer transactions");

    // The slot is lost; catch-up repairs.
    src.batch_execute(
        "SELECT pg_drop_replication_slot('walshuttle');
         INSERT INTO items (id, v) VALUES (999999, 'while down');",
    )
    .await
    .unwrap();
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.arg("catch-up");
    let (code, text) = out.run("catch-up", cmd);
    assert_eq!(code, 0, "{text}");

    // Failures: a missing database (URL and key/value forms), a wrong password for
    // the target, an unparsable URL.
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.env("WALSHUTTLE_SOURCE", source.url_for("nosuchdb"))
        .arg("status");
    let (code, text) = out.run("status with a missing source database", cmd);
    assert_eq!(
        code, 0,
        "status reports an unreachable source as a warning: {text}"
    );
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.env(
        "WALSHUTTLE_SOURCE",
        format!(
            "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=nosuchdb",
            source.port
        ),
    )
    .arg("verify");
    let (code, text) = out.run(
        "verify with a key/value source naming a missing database",
        cmd,
    );
    assert_ne!(code, 0, "{text}");
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.env(
        "WALSHUTTLE_SOURCE",
        format!(
            "host=127.0.0.1 port={} user=postgres password='{PASSWORD}' dbname=nosuchdb sslmode=bogus",
            source.port
        ),
    )
    .arg("verify");
    let (code, text) = out.run("verify with a key/value source and a bad sslmode", cmd);
    assert_ne!(code, 0, "{text}");
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.env(
        "WALSHUTTLE_TARGET",
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?password={PASSWORD}x&sslmode=disable",
            target.port
        ),
    )
    .arg("status");
    let (code, text) = out.run("status with a wrong target password in the query", cmd);
    assert_ne!(code, 0, "{text}");
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.env(
        "WALSHUTTLE_TARGET",
        format!("postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/postgres"),
    )
    .arg("status");
    let (code, text) = out.run("status with a target URL that does not parse", cmd);
    assert_ne!(code, 0, "{text}");

    // libpq and tokio-postgres percent-decode URL query keys: `pass%77ord` is the
    // password parameter too.
    let mut cmd = debug(walshuttle(&source, &target));
    cmd.env(
        "WALSHUTTLE_TARGET",
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?pass%77ord={PASSWORD}",
            target.port
        ),
    )
    .args(["status", "--json"]);
    let (code, text) = out.run(
        "status --json with the target password under a percent-encoded key",
        cmd,
    );
    assert_eq!(
        code, 0,
        "the percent-encoded password key should work: {text}"
    );

    let mut cmd = debug(walshuttle(&source, &target));
    cmd.args(["teardown", "--yes"]);
    let (code, text) = out.run("teardown --yes", cmd);
    assert_eq!(code, 0, "{text}");

    let mut leaks = Vec::new();
    let mut bytes = 0;
    for (what, text) in &out.0 {
        bytes += text.len();
        if text.contains(PASSWORD) {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains(PASSWORD))
                .take(3)
                .collect();
            leaks.push(format!("{what}:\n{}", lines.join("\n")));
        }
    }
    eprintln!(
        "searched {} outputs ({bytes} bytes) for the password",
        out.0.len()
    );
    assert!(
        leaks.is_empty(),
        "the password appears in:\n{}",
        leaks.join("\n\n")
    );
}
