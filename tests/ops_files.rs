//! The operational files shipped in `ops/`: the Prometheus alerting rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), the Grafana
//! dashboard is valid JSON whose queries name only series walshuttle exports, the
//! systemd unit passes `systemd-analyze verify` and keeps its hardening, and logs
//! written to a file or pipe carry no colour codes.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use support::{repo_path, walshuttle, Cluster};

/// `promtool`, or `None` (with the reason printed) when it is not installed: the
/// rules test is skipped then, visibly, rather than failed.
fn promtool() -> Option<&'static str> {
    match Command::new("promtool").arg("--version").output() {
        Ok(o) if o.status.success() => Some("promtool"),
        _ => {
            eprintln!(
                "SKIPPED: promtool not found: install it (Debian/Ubuntu: apt-get install -y prometheus) to check ops/prometheus"
            );
            println!("SKIPPED: promtool not installed");
            None
        }
    }
}

#[test]
fn alerting_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = repo_path("ops/prometheus");
    let check = Command::new(promtool)
        .args(["check", "rules", "walshuttle-alerts.yml"])
        .current_dir(&dir)
        .output()
        .expect("run promtool");
    assert!(
        check.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new(promtool)
        .args(["test", "rules", "walshuttle-alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .expect("run promtool");
    assert!(
        test.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

/// Every `walshuttle_*` series name in `text` (histogram suffixes removed).
fn series_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("walshuttle_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

fn exported() -> BTreeSet<String> {
    use walshuttle::observe::names::*;
    [
        LAG_BYTES,
        LAG_SECONDS,
        APPLIED_LSN,
        STREAMING,
        APPLIED_ROWS,
        TRANSACTIONS,
        BATCH_TRANSACTIONS,
        COMMIT_SECONDS,
        COMMIT_LATENCY,
        ROWS_COPIED,
        CHUNKS_COPIED,
        RECONNECTS,
        ERRORS,
        RETAINED_WAL,
        WAL_KEEP_LIMIT,
        WAL_BUDGET,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn dashboard_and_rules_query_only_exported_series() {
    let dashboard = std::fs::read_to_string(repo_path("ops/grafana/walshuttle-dashboard.json"))
        .expect("read the dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut exprs = String::new();
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push_str(t["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    let rules = std::fs::read_to_string(repo_path("ops/prometheus/walshuttle-alerts.yml"))
        .expect("read the rules");
    let known = exported();
    for (what, text) in [("dashboard", &exprs), ("rules", &rules)] {
        let used = series_names(text);
        let unknown: Vec<_> = used.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "the {what} queries series walshuttle does not export: {unknown:?}"
        );
    }
    // The dashboard shows lag, retained WAL, throughput and errors.
    let shown = series_names(&exprs);
    for needed in [
        "walshuttle_lag_seconds",
        "walshuttle_slot_retained_wal_bytes",
        "walshuttle_errors_total",
        "walshuttle_streaming",
    ] {
        assert!(
            shown.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

#[test]
fn systemd_unit_verifies_and_keeps_its_hardening() {
    let unit = std::fs::read_to_string(repo_path("ops/systemd/walshuttle.service"))
        .expect("read the unit");
    for directive in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
        "EnvironmentFile=",
        "UMask=0077",
    ] {
        assert!(unit.contains(directive), "the unit lost `{directive}`");
    }
    assert!(
        !unit.contains("postgresql://"),
        "connection strings belong in the environment file, not the unit"
    );
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: checked the unit's directives only");
        return;
    };
    assert!(out.status.success());
    // Verify a copy whose ExecStart names a binary that exists here.
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("walshuttle.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/walshuttle",
            env!("CARGO_BIN_EXE_walshuttle"),
        ),
    )
    .expect("write the unit copy");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    assert!(
        verify.status.success(),
        "systemd-analyze verify:\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(Path::new(&copy).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_carry_no_colour_codes() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "1"])
        .env_remove("NO_COLOR");
    let out = cmd.output().expect("run bootstrap");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("created replication slot"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escape codes in logs written to a pipe:\n{stderr}"
    );
}
