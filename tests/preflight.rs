//! Bad input ends with one clear line, a non-zero exit, and nothing written on
//! either side.

mod support;

use support::{run, walshuttle, Cluster, ClusterOptions, PASSWORD};
use tokio_postgres::Client;

async fn target_tables(tgt: &Client) -> Vec<String> {
    tgt.query(
        "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn assert_nothing_written(src: &Client, tgt: &Client, tables_before: &[String]) {
    let slots: i64 = src
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a slot was created");
    let pubs: i64 = src
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubs, 0, "a publication was created");
    let state: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'walshuttle'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, 0, "the state schema was created");
    assert_eq!(
        target_tables(tgt).await,
        tables_before,
        "target tables changed"
    );
}

/// Runs bootstrap, expects failure with one line mentioning every `needle`.
fn expect_failure(cmd: std::process::Command, needles: &[&str]) -> String {
    let (code, stdout, stderr) = run(cmd);
    assert_ne!(code, 0, "bootstrap should have failed; stdout: {stdout}");
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("error: "),
        "last line is not the error: {stderr}"
    );
    for needle in needles {
        assert!(last.contains(needle), "`{needle}` missing from: {last}");
    }
    assert!(!stderr.contains(PASSWORD), "password leaked: {stderr}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_without_logical_decoding_is_refused() {
    let source = Cluster::start_with(ClusterOptions {
        wal_level: "replica",
        ..Default::default()
    });
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let tgt = target.client().await;
    let before = target_tables(&tgt).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("bootstrap");
    expect_failure(cmd, &["wal_level", "logical", "ALTER SYSTEM"]);
    assert_nothing_written(&src, &tgt, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tables_and_targets_are_refused_before_anything_is_written() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE nokey (a int, b text);
         CREATE TABLE items (id int PRIMARY KEY, name text, price numeric);
         INSERT INTO items VALUES (1, 'a', 1.5);
         CREATE ROLE plain LOGIN PASSWORD 'plain-pw';
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO plain;",
    )
    .await
    .unwrap();

    // A table with neither key nor replica identity.
    let before = target_tables(&tgt).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "nokey,items"]);
    expect_failure(cmd, &["public.nokey", "REPLICA IDENTITY FULL"]);
    assert_nothing_written(&src, &tgt, &before).await;

    // A table that does not exist.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "missing"]);
    expect_failure(cmd, &["public.missing", "does not exist"]);
    assert_nothing_written(&src, &tgt, &before).await;

    // A target column missing.
    tgt.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let before = target_tables(&tgt).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "items"]);
    expect_failure(cmd, &["items.price", "missing on the target", "ADD COLUMN"]);
    assert_nothing_written(&src, &tgt, &before).await;

    // A target column of another type.
    tgt.batch_execute("ALTER TABLE items ADD COLUMN price integer")
        .await
        .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "items"]);
    expect_failure(cmd, &["items.price", "numeric", "integer"]);
    assert_nothing_written(&src, &tgt, &before).await;

    // A target table already holding rows walshuttle did not copy.
    tgt.batch_execute(
        "ALTER TABLE items ALTER COLUMN price TYPE numeric; INSERT INTO items VALUES (99, 'stray', 0)",
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "items"]);
    expect_failure(
        cmd,
        &["public.items", "already holds rows", "--truncate-target"],
    );
    assert_nothing_written(&src, &tgt, &before).await;

    // A source user without the REPLICATION privilege.
    let mut cmd = walshuttle(&source, &target);
    cmd.env(
        "WALSHUTTLE_SOURCE",
        format!(
            "postgresql://plain:plain-pw@127.0.0.1:{}/postgres",
            source.port
        ),
    );
    cmd.args(["bootstrap", "--tables", "items"]);
    expect_failure(cmd, &["REPLICATION", "ALTER ROLE"]);
    assert_nothing_written(&src, &tgt, &before).await;

    // With --truncate-target the stray row is replaced by the source's rows.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "items", "--truncate-target"]);
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    let ids: Vec<i32> = tgt
        .query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_connections_fail_with_one_clear_line() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let before = target_tables(&tgt).await;

    // Wrong password: the message says so, and never shows the password tried.
    let mut cmd = walshuttle(&source, &target);
    cmd.env(
        "WALSHUTTLE_SOURCE",
        format!(
            "postgresql://postgres:wrong-secret@127.0.0.1:{}/postgres",
            source.port
        ),
    );
    cmd.arg("bootstrap");
    let line = expect_failure(cmd, &["source", "password"]);
    assert!(!line.contains("wrong-secret"), "{line}");

    // Unreachable host.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut cmd = walshuttle(&source, &target);
    cmd.env(
        "WALSHUTTLE_TARGET",
        format!("postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"),
    );
    cmd.arg("bootstrap");
    expect_failure(cmd, &["cannot connect to the target", "--target"]);

    // Missing database.
    let mut cmd = walshuttle(&source, &target);
    cmd.env("WALSHUTTLE_SOURCE", source.url_for("nosuchdb"));
    cmd.arg("bootstrap");
    expect_failure(cmd, &["nosuchdb", "does not exist"]);

    // A URL that does not parse.
    let mut cmd = walshuttle(&source, &target);
    cmd.env(
        "WALSHUTTLE_SOURCE",
        format!("postgresql://postgres:{PASSWORD}@host:notaport/db"),
    );
    cmd.arg("bootstrap");
    expect_failure(cmd, &["does not parse"]);

    // No URL at all.
    let mut cmd = walshuttle(&source, &target);
    cmd.env_remove("WALSHUTTLE_SOURCE");
    cmd.arg("bootstrap");
    expect_failure(cmd, &["--source", "WALSHUTTLE_SOURCE"]);

    assert_nothing_written(&src, &tgt, &before).await;
}

/// `--target` pointing at the source's own database is refused, even with
/// `--truncate-target` (which would empty the source's tables), before anything is
/// written: no slot, no publication, no state schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_database_as_target_is_refused_before_anything_is_written() {
    let source = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items VALUES (1, 'a'), (2, 'b');",
    )
    .await
    .unwrap();
    let before = target_tables(&src).await;
    for command in [
        &["bootstrap", "--truncate-target"][..],
        &["bootstrap"],
        &["run", "--truncate-target"],
        &["catch-up"],
    ] {
        let mut cmd = walshuttle(&source, &source);
        cmd.args(command);
        let (code, _, stderr) = run(cmd);
        assert_eq!(code, 1, "{command:?}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.contains("same database"), "{command:?}: {last}");
        assert!(last.contains("--target"), "{command:?}: {last}");
        assert!(!stderr.contains(PASSWORD), "password leaked: {stderr}");
        assert_nothing_written(&src, &src, &before).await;
    }
    let rows: i64 = src
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2, "the source's rows were touched");
}

/// A target role without CREATE on the target database is refused before anything
/// is written, with a hint naming the privilege it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_role_without_create_is_refused_naming_the_privilege() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    tgt.batch_execute(
        "CREATE ROLE writer LOGIN PASSWORD 'writer-pw';
         REVOKE CREATE ON DATABASE postgres FROM PUBLIC;
         GRANT CREATE, USAGE ON SCHEMA public TO writer;",
    )
    .await
    .unwrap();
    let before = target_tables(&tgt).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.env(
        "WALSHUTTLE_TARGET",
        format!(
            "postgresql://writer:writer-pw@127.0.0.1:{}/postgres",
            target.port
        ),
    );
    cmd.arg("bootstrap");
    expect_failure(
        cmd,
        &[
            "writer",
            "CREATE",
            "GRANT CREATE ON DATABASE \"postgres\" TO \"writer\"",
        ],
    );
    assert_nothing_written(&src, &tgt, &before).await;
}

/// A pipeline whose bootstrap stopped half-way keeps its slot's WAL: `status`
/// warns about it (and does not call it consistent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_warns_about_a_half_made_pipeline_holding_wal() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items VALUES (1, 'a');",
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("bootstrap");
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    // A fresh target: one line about the state schema, not one per version.
    assert_eq!(stderr.matches("state schema").count(), 1, "{stderr}");
    assert!(stderr.contains("created the state schema"), "{stderr}");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (_, out, _) = run(cmd);
    assert!(!out.contains("half-made"), "{out}");
    // As a bootstrap killed right after it created its slot leaves it.
    tgt.batch_execute("UPDATE walshuttle.pipelines SET phase = 'creating_slot'")
        .await
        .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (code, out, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("half-made (phase creating_slot)"), "{out}");
    assert!(out.contains("of WAL on the source"), "{out}");
    assert!(out.contains("walshuttle teardown"), "{out}");
    assert!(out.contains("consistent       no"), "{out}");
}

/// A source role that may replicate but does not own a table is refused before
/// anything is written, naming the table and the statement that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_role_not_owning_a_table_is_refused_before_anything_is_written() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(&format!(
        "CREATE TABLE mine (id int PRIMARY KEY);
         CREATE TABLE \"Not Mine\" (id int PRIMARY KEY);
         CREATE ROLE repl LOGIN REPLICATION PASSWORD '{PASSWORD}';
         ALTER TABLE mine OWNER TO repl;
         GRANT SELECT ON \"Not Mine\" TO repl;
         GRANT CREATE ON DATABASE postgres TO repl;"
    ))
    .await
    .unwrap();
    let before = target_tables(&tgt).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.env(
        "WALSHUTTLE_SOURCE",
        source.url().replacen("postgres:", "repl:", 1),
    )
    .arg("bootstrap");
    expect_failure(cmd, &["repl", "public.\"Not Mine\"", "OWNER TO \"repl\""]);
    assert_nothing_written(&src, &tgt, &before).await;
}
