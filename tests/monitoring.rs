//! What Prometheus and log collectors see of `run`: every counter at 0 from the
//! start, the retained WAL known as soon as it streams, a second `run` on the same
//! metrics address told who holds it, the final error as a JSON line under
//! `--log-format json`, and a stop on an error scraped before the process exits.

mod support;

use std::time::{Duration, Instant};

use support::{
    free_port, http_get, run, wait_for_convergence_running, walshuttle, Cluster, RunLogs,
};

fn sample(body: &str, series: &str, label: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Two clusters, `schema` on the source, and `run --metrics-addr` on a free port.
async fn run_with_metrics(
    schema: &str,
) -> (
    Cluster,
    Cluster,
    tokio_postgres::Client,
    tokio_postgres::Client,
    u16,
    RunLogs,
    support::RunChild,
) {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(schema).await.unwrap();
    let port = free_port();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")]);
    let child = logs.spawn(cmd);
    (source, target, src, tgt, port, logs, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_start_at_zero_and_a_fatal_stop_is_scraped_before_exit() {
    let (source, target, src, tgt, port, _logs, mut child) = run_with_metrics(
        "CREATE TABLE ck (id int PRIMARY KEY, v int);
         INSERT INTO ck SELECT g, g FROM generate_series(1, 10) g;",
    )
    .await;
    let addr = format!("127.0.0.1:{port}");

    // The first time /healthz says streaming, it already knows the retained WAL.
    let deadline = Instant::now() + Duration::from_secs(120);
    let health = loop {
        child.assert_running("before streaming");
        if let Some((_, body)) = http_get(port, "/healthz") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if v["phase"] == "streaming" {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "run never streamed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(health["retained_wal_bytes"].is_u64(), "{health}");
    let (_, body) = http_get(port, "/metrics").expect("/metrics answers");
    for (series, label) in [
        ("walshuttle_errors_total", "kind=\"fatal\""),
        ("walshuttle_errors_total", "kind=\"stream\""),
        ("walshuttle_reconnects_total", ""),
        ("walshuttle_stopped_on_error", ""),
    ] {
        assert_eq!(
            sample(&body, series, label),
            Some(0.0),
            "{series}{label}:\n{body}"
        );
    }

    // A second run on the same address: told that a walshuttle holds it, and the
    // error as a JSON line.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["--log-format", "json", "run", "--metrics-addr", &addr]);
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    let line: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"));
    assert_eq!(line["level"], "ERROR", "{last}");
    assert_eq!(line["exit_code"], 1, "{last}");
    let message = line["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("error: "), "{last}");
    assert!(
        message.contains("another walshuttle serves it (pipeline walshuttle, phase streaming)"),
        "{last}"
    );
    child.assert_running("after the second run gave up");

    // A row the target refuses: run stops, and /metrics shows it before it exits.
    wait_for_convergence_running(&mut child, &src, &tgt, &["ck"], Duration::from_secs(60)).await;
    tgt.batch_execute("ALTER TABLE ck ADD CONSTRAINT ck_v_nonnegative CHECK (v >= 0)")
        .await
        .unwrap();
    src.batch_execute("INSERT INTO ck VALUES (100, -5)")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = http_get(port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        if sample(&body, "walshuttle_stopped_on_error", "") == Some(1.0) {
            assert_eq!(
                sample(&body, "walshuttle_errors_total", "kind=\"fatal\""),
                Some(1.0),
                "{body}"
            );
            break;
        }
        assert!(
            child.try_exit().is_none(),
            "run exited before /metrics showed the stop; log:\n{}",
            support::tail(&child.log(), 30)
        );
        assert!(
            Instant::now() < deadline,
            "run did not stop on the refused row"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Scraped: it exits soon after, with 1.
    let status = child.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", child.log());
}

/// An apply session held up by another application's lock on the target: `/healthz`
/// names the wait (still healthy: it ends when that session does) and `status` says
/// which apply session waits, how long and on whom; once the holder ends, the wait is
/// gone and the row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_wait_on_the_target_is_named_by_healthz_and_status() {
    let (source, target, src, tgt, port, _logs, mut child) = run_with_metrics(
        "CREATE TABLE \"Held Rows\" (id int PRIMARY KEY, v int);
         INSERT INTO \"Held Rows\" SELECT g, g FROM generate_series(1, 10) g;",
    )
    .await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["\"Held Rows\""],
        Duration::from_secs(120),
    )
    .await;
    // Converged by the bootstrap's copy alone: the lock below must meet the stream,
    // not the bootstrap's last steps on the table.
    support::wait_streaming(&mut child, &src).await;

    // Another application holds row 1 on the target; the source updates it.
    let holder = target.client().await;
    holder
        .batch_execute("BEGIN; UPDATE \"Held Rows\" SET v = v WHERE id = 1")
        .await
        .unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    src.batch_execute("UPDATE \"Held Rows\" SET v = 100 WHERE id = 1")
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(90);
    let health = loop {
        child.assert_running("while an apply session waits");
        if let Some((_, body)) = http_get(port, "/healthz") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if v["waiting"].is_string() {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "/healthz never named the wait");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let waiting = health["waiting"].as_str().unwrap_or_default();
    assert!(
        waiting.contains(&format!("held by pid {holder_pid}"))
            && waiting.contains("not walshuttle's"),
        "{health}"
    );
    assert_eq!(
        health["status"], "ok",
        "a wait on someone else is healthy: {health}"
    );

    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("waiting: walshuttle apply")
            && stdout.contains(&format!("held by pid {holder_pid}")),
        "status does not name the wait:\n{stdout}"
    );

    // The holder ends: the row arrives and the wait is gone.
    holder.batch_execute("COMMIT").await.unwrap();
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["\"Held Rows\""],
        Duration::from_secs(60),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = http_get(port, "/healthz")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if v["waiting"].is_null() && v["phase"] == "streaming" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz still names a wait: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
