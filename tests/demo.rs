//! `walshuttle demo`, the README's first command, runs to a successful verify.

use std::process::{Command, Stdio};

#[test]
fn demo_runs_to_a_successful_verify() {
    let out = Command::new(env!("CARGO_BIN_EXE_walshuttle"))
        // As the README runs it: no --seconds, so it must end by itself.
        .args(["demo", "--jobs", "2"])
        .env_remove("WALSHUTTLE_SOURCE")
        .env_remove("WALSHUTTLE_TARGET")
        .stdin(Stdio::null())
        .output()
        .expect("run walshuttle demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("3 of 3 tables equal"), "{stdout}");
    assert!(stdout.contains("demo succeeded"), "{stdout}");
    assert!(stdout.contains("for 30 s"), "{stdout}");
    // It showed throughput and lag while streaming.
    let progress_lines = stdout
        .lines()
        .filter(|l| l.contains("txns") && l.contains("lag"))
        .count();
    assert!(progress_lines >= 10, "too few progress lines:\n{stdout}");
    assert!(
        !stdout.contains("walshuttle-local"),
        "the demo password was printed"
    );
}
