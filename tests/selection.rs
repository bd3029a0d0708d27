//! Leaving tables out: `--exclude-tables`, `--schemas`, `--exclude-schemas` (and
//! their config-file keys) carried through bootstrap, streaming, verify and status.

mod support;

use std::time::Duration;

use support::{run, wait_for_convergence_running, wait_streaming, walshuttle, Cluster, RunLogs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_table_and_a_schema_are_left_out_of_bootstrap_run_and_verify() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, email text UNIQUE, name text);
         CREATE TABLE \"Order Items\" (id bigint PRIMARY KEY, user_id bigint, qty int);
         CREATE TABLE audit_log (at timestamptz DEFAULT now(), what text);
         CREATE SCHEMA scratch;
         CREATE TABLE scratch.tmp (id int PRIMARY KEY, v text);
         INSERT INTO users SELECT g, 'u' || g || '@x', 'user ' || g FROM generate_series(1, 200) g;
         INSERT INTO \"Order Items\" SELECT g, g % 200 + 1, g % 7 FROM generate_series(1, 500) g;
         INSERT INTO audit_log (what) SELECT 'event ' || g FROM generate_series(1, 50) g;
         INSERT INTO scratch.tmp VALUES (1, 'scratch');",
    )
    .await
    .unwrap();

    // Without the exclusion the keyless table stops the bootstrap.
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("bootstrap");
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("audit_log"), "{stderr}");

    // The schema is left out by the config file, the table by the flag.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walshuttle.toml");
    std::fs::write(&config, "exclude_schemas = [\"scratch\"]\n").unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["--config", config.to_str().unwrap(), "config", "check"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("exclude_schemas") && l.contains("scratch")),
        "{out}"
    );

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args([
        "--config",
        config.to_str().unwrap(),
        "run",
        "--exclude-tables",
        "public.audit_*",
    ]);
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;
    // Writes on the source between steps, to every table.
    src.batch_execute(
        "INSERT INTO users VALUES (201, 'new@x', 'new');
         UPDATE \"Order Items\" SET qty = qty + 1 WHERE id <= 10;
         DELETE FROM users WHERE id = 5;
         INSERT INTO audit_log (what) VALUES ('not carried');
         INSERT INTO scratch.tmp VALUES (2, 'not carried');",
    )
    .await
    .unwrap();
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["users", "\"Order Items\""],
        Duration::from_secs(120),
    )
    .await;
    let left_out: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE (n.nspname = 'public' AND c.relname = 'audit_log') OR n.nspname = 'scratch'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left_out, 0,
        "an excluded table or schema reached the target"
    );
    let carried: Vec<String> = tgt
        .query(
            "SELECT table_name FROM walshuttle.pipeline_tables ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(carried.len(), 2, "{carried:?}");

    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "verify: {out}{err}");
    assert!(!out.contains("audit_log"), "{out}");

    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("selection        --exclude-schemas scratch --exclude-tables public.audit_*"),
        "{out}"
    );
    assert!(!out.contains("untracked"), "{out}");
}

/// `catch-up` on a target without a pipeline (the Python script's sync mode)
/// leaves out what the filter leaves out, so a keyless table does not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_without_a_pipeline_leaves_out_excluded_tables() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text, updated_at timestamptz DEFAULT now());
         CREATE TABLE audit_log (at timestamptz DEFAULT now(), what text);
         INSERT INTO users (id, name) SELECT g, 'user ' || g FROM generate_series(1, 100) g;
         INSERT INTO audit_log (what) VALUES ('event');",
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["catch-up", "--exclude-tables", "audit_log"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "catch-up: {out}{err}");
    support::assert_tables_equal(&src, &tgt, &["users"]).await;
    let audit: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'audit_log'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audit, 0, "the excluded table reached the target");
}
