//! walshuttle never harms the source, and checks existing target tables: a table
//! whose replica identity cannot carry updates and deletes is refused before it is
//! published (the source would refuse its UPDATEs and DELETEs), and foreign keys and
//! user triggers on existing target tables either run in replica mode, are allowed
//! explicitly, or are refused.

mod support;

use std::time::Duration;

use support::{
    run, wait_for_convergence_running, wait_while_running, walshuttle, Cluster, RunLogs, PASSWORD,
};
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

async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// No slot, no publication, no state schema, the same target tables.
async fn assert_nothing_written(src: &Client, tgt: &Client, tables_before: &[String]) {
    assert_eq!(
        count(src, "SELECT count(*) FROM pg_replication_slots").await,
        0,
        "a slot was created"
    );
    assert_eq!(
        count(src, "SELECT count(*) FROM pg_publication").await,
        0,
        "a publication was created"
    );
    assert_eq!(
        count(
            tgt,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'walshuttle'"
        )
        .await,
        0,
        "the state schema was created"
    );
    assert_eq!(
        target_tables(tgt).await,
        tables_before,
        "target tables changed"
    );
}

/// Runs the command, expects failure with a last line mentioning every `needle`.
fn expect_failure(cmd: std::process::Command, needles: &[&str]) -> String {
    let (code, stdout, stderr) = run(cmd);
    assert_ne!(
        code, 0,
        "the command should have failed; stdout: {stdout}; stderr: {stderr}"
    );
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

// ---------------------------------------------------------------------------
// Replica identity on the source.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferrable_primary_key_is_refused_and_the_source_keeps_working() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE d1 (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, v text);
         INSERT INTO d1 VALUES (1, 'a'), (2, 'b');
         CREATE TABLE fine (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let before = target_tables(&tgt).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("bootstrap");
    expect_failure(
        cmd,
        &[
            "public.d1",
            "DEFERRABLE",
            "ALTER TABLE \"public\".\"d1\" REPLICA IDENTITY FULL",
        ],
    );
    assert_nothing_written(&src, &tgt, &before).await;
    // The application's writes still work.
    src.batch_execute("UPDATE d1 SET v = 'changed' WHERE id = 1; DELETE FROM d1 WHERE id = 2")
        .await
        .expect("the source refused a write after walshuttle ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_replica_identities_are_refused() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE nothing (id int PRIMARY KEY, v text);
         ALTER TABLE nothing REPLICA IDENTITY NOTHING;
         CREATE TABLE gone (id int NOT NULL, v text);
         CREATE UNIQUE INDEX gone_id ON gone (id);
         ALTER TABLE gone REPLICA IDENTITY USING INDEX gone_id;
         DROP INDEX gone_id;",
    )
    .await
    .unwrap();
    let before = target_tables(&tgt).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "nothing"]);
    expect_failure(
        cmd,
        &[
            "public.nothing",
            "REPLICA IDENTITY NOTHING",
            "ALTER TABLE \"public\".\"nothing\" REPLICA IDENTITY FULL",
        ],
    );
    assert_nothing_written(&src, &tgt, &before).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "gone"]);
    expect_failure(
        cmd,
        &[
            "public.gone",
            "no longer exists",
            "ALTER TABLE \"public\".\"gone\" REPLICA IDENTITY FULL",
        ],
    );
    assert_nothing_written(&src, &tgt, &before).await;
    src.batch_execute("UPDATE nothing SET v = 'x'; UPDATE gone SET v = 'x'")
        .await
        .expect("the source refused a write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_index_that_is_the_primary_key_is_accepted() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         ALTER TABLE t REPLICA IDENTITY USING INDEX t_pkey;
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "1"]);
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(90)).await;
    src.batch_execute("UPDATE t SET v = 'streamed' WHERE id <= 5; DELETE FROM t WHERE id > 45")
        .await
        .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["t"], Duration::from_secs(90)).await;
    assert_eq!(
        count(&tgt, "SELECT count(*) FROM t WHERE v = 'streamed'").await,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_target_table_needs_a_unique_index_on_the_source_identity() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE k (id int PRIMARY KEY, v text);
         INSERT INTO k SELECT g, 'v' || g FROM generate_series(1, 20) g;
         CREATE TABLE f (id int, v text);
         ALTER TABLE f REPLICA IDENTITY FULL;
         INSERT INTO f VALUES (1, 'a'), (1, 'a'), (2, NULL);",
    )
    .await
    .unwrap();
    tgt.batch_execute(
        "CREATE TABLE k (id int, v text); CREATE UNIQUE INDEX k_id ON k (id);
         CREATE TABLE f (id int, v text);",
    )
    .await
    .unwrap();
    let before = target_tables(&tgt).await;
    // A unique index on nullable columns does not identify rows.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "k,f"]);
    expect_failure(
        cmd,
        &[
            "public.k",
            "no unique index",
            "ALTER TABLE \"public\".\"k\" ADD PRIMARY KEY (\"id\")",
        ],
    );
    assert_nothing_written(&src, &tgt, &before).await;
    // With NOT NULL it does; the FULL table without any key is taken as keyless.
    tgt.batch_execute("ALTER TABLE k ALTER COLUMN id SET NOT NULL")
        .await
        .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "k,f"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "bootstrap failed: {out}{err}");
    support::assert_tables_equal(&src, &tgt, &["k", "f"]).await;
}

// ---------------------------------------------------------------------------
// Foreign keys and triggers on existing target tables.
// ---------------------------------------------------------------------------

const SCHEMA: &str = "CREATE TABLE customers (id int PRIMARY KEY, name text);
     CREATE TABLE orders (id int PRIMARY KEY, customer_id int, amount int);
     CREATE TABLE notes (id int PRIMARY KEY, body text, updated_at timestamptz);";

/// On the target: the source's tables, plus a foreign key from orders to customers
/// and a trigger on notes that rewrites `updated_at` and `body` on every write.
const TARGET_EXTRAS: &str = "ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id);
     CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
       $$ BEGIN NEW.updated_at := '1999-01-01 00:00:00+00'; NEW.body := NEW.body || ' (touched)'; RETURN NEW; END $$;
     CREATE TRIGGER notes_touch BEFORE INSERT OR UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION touch();";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_foreign_keys_and_triggers_need_replica_mode_or_the_flag() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(SCHEMA).await.unwrap();
    src.batch_execute(
        "INSERT INTO customers VALUES (1, 'ann'), (2, 'bob');
         INSERT INTO notes VALUES (1, 'hello', '2024-05-05 10:00:00+00');",
    )
    .await
    .unwrap();
    tgt.batch_execute(SCHEMA).await.unwrap();
    tgt.batch_execute(TARGET_EXTRAS).await.unwrap();
    tgt.batch_execute(
        "CREATE ROLE writer LOGIN PASSWORD 'writer-pw';
         GRANT CREATE ON DATABASE postgres TO writer;
         GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES ON ALL TABLES IN SCHEMA public TO writer;",
    )
    .await
    .unwrap();
    let writer_url = format!(
        "postgresql://writer:writer-pw@127.0.0.1:{}/postgres",
        target.port
    );
    let before = target_tables(&tgt).await;

    // A target role that cannot use replica mode: refused, nothing written.
    let mut cmd = walshuttle(&source, &target);
    cmd.env("WALSHUTTLE_TARGET", &writer_url);
    cmd.arg("bootstrap");
    let line = expect_failure(
        cmd,
        &[
            "public.orders",
            "orders_customer_fk",
            "public.notes",
            "notes_touch",
            "session_replication_role",
            "--allow-target-triggers",
        ],
    );
    assert!(!line.contains("writer-pw"), "{line}");
    assert_nothing_written(&src, &tgt, &before).await;
    assert_eq!(count(&tgt, "SELECT count(*) FROM notes").await, 0);

    // The same with run.
    let mut cmd = walshuttle(&source, &target);
    cmd.env("WALSHUTTLE_TARGET", &writer_url);
    cmd.arg("run");
    expect_failure(cmd, &["public.notes", "--allow-target-triggers"]);
    assert_nothing_written(&src, &tgt, &before).await;

    // Allowed explicitly: it proceeds, the triggers fire as for any writer, and the
    // tables are named in a warning.
    let mut cmd = walshuttle(&source, &target);
    cmd.env("WALSHUTTLE_TARGET", &writer_url);
    cmd.args(["bootstrap", "--allow-target-triggers"]);
    let (code, out, err) = run(cmd);
    assert_eq!(
        code, 0,
        "bootstrap --allow-target-triggers failed: {out}{err}"
    );
    assert!(
        err.contains("public.notes") && err.contains("public.orders"),
        "no warning naming the tables: {err}"
    );
    assert_eq!(count(&tgt, "SELECT count(*) FROM customers").await, 2);
    assert_eq!(
        count(
            &tgt,
            "SELECT count(*) FROM notes WHERE body = 'hello (touched)'"
        )
        .await,
        1,
        "the trigger was to fire as for any writer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superuser_target_applies_in_replica_mode() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(SCHEMA).await.unwrap();
    src.batch_execute(
        "INSERT INTO customers VALUES (1, 'ann'), (2, 'bob');
         INSERT INTO orders VALUES (1, 1, 10);
         INSERT INTO notes SELECT g, 'note ' || g, '2024-05-05 10:00:00+00' FROM generate_series(1, 20) g;",
    )
    .await
    .unwrap();
    tgt.batch_execute(SCHEMA).await.unwrap();
    tgt.batch_execute(TARGET_EXTRAS).await.unwrap();

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--jobs", "2"]);
    let mut child = logs.spawn(cmd);
    // The copy does not fire the trigger.
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["customers", "orders", "notes"],
        Duration::from_secs(90),
    )
    .await;
    // Nor does the stream: the target keeps the source's values. An order whose
    // customer arrives later in the same transaction is applied per table without a
    // foreign-key error.
    src.batch_execute(
        "UPDATE notes SET updated_at = '2024-06-06 12:00:00+00', body = 'edited' WHERE id <= 5;
         INSERT INTO notes VALUES (100, 'new', '2024-06-06 12:00:00+00');
         BEGIN; INSERT INTO orders VALUES (2, 3, 30); INSERT INTO customers VALUES (3, 'cy'); COMMIT;",
    )
    .await
    .unwrap();
    wait_while_running(
        "the streamed changes",
        Duration::from_secs(90),
        &mut child,
        || async {
            count(
                &tgt,
                "SELECT count(*) FROM notes WHERE body = 'edited' OR id = 100",
            )
            .await
                == 6
                && count(&tgt, "SELECT count(*) FROM orders").await == 2
        },
    )
    .await;
    assert_eq!(
        count(
            &tgt,
            "SELECT count(*) FROM notes WHERE updated_at = '1999-01-01 00:00:00+00' OR body LIKE '%(touched)'"
        )
        .await,
        0,
        "the target trigger rewrote replicated rows"
    );
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["customers", "orders", "notes"],
        Duration::from_secs(90),
    )
    .await;
}

/// A clean stop soon after a large transaction leaves the slot's restart point past
/// it: otherwise the next start makes the source read and decode the whole
/// transaction again (spilling it to disk) before it sends anything new. The source
/// logs the running transactions that move a restart point only every 15 s, so a
/// `run` stopped a moment after applying a bulk load kept the point before the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_after_a_large_transaction_moves_the_restart_point_past_it() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE bulk (id bigint PRIMARY KEY, payload text NOT NULL,
                            code int UNIQUE);
         INSERT INTO bulk SELECT g, 'seed', g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut child = logs.spawn({
        let mut cmd = walshuttle(&source, &target);
        cmd.arg("run");
        cmd
    });
    let tgt = target.client().await;
    wait_for_convergence_running(&mut child, &src, &tgt, &["bulk"], Duration::from_secs(120)).await;

    // About 100 MB of WAL in one transaction.
    src.batch_execute(
        "INSERT INTO bulk SELECT g, repeat(md5(g::text), 16), g FROM generate_series(101, 150000) g",
    )
    .await
    .unwrap();
    let after_bulk: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_while_running(
        "the bulk transaction on the target",
        Duration::from_secs(120),
        &mut child,
        || async {
            tgt.query_one("SELECT count(*) FROM bulk", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 150_000)
                .unwrap_or(false)
        },
    )
    .await;
    child.sigterm();
    let status = child.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "run did not stop cleanly: {status:?}\n{}",
        support::tail(&child.log(), 40)
    );
    let behind: i64 = src
        .query_one(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, restart_lsn)::bigint
               FROM pg_replication_slots WHERE slot_name = 'walshuttle'",
            &[&after_bulk],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        behind <= 0,
        "the slot's restart point is {behind} bytes before the end of the bulk transaction: \
         the next start decodes it again\n{}",
        support::tail(&child.log(), 20)
    );

    // Writes while stopped, then a start that carries them.
    src.batch_execute("UPDATE bulk SET payload = 'after the stop' WHERE id % 1000 = 0; DELETE FROM bulk WHERE id BETWEEN 500 AND 520;")
        .await
        .unwrap();
    let mut child = logs.spawn({
        let mut cmd = walshuttle(&source, &target);
        cmd.arg("run");
        cmd
    });
    wait_for_convergence_running(&mut child, &src, &tgt, &["bulk"], Duration::from_secs(120)).await;
    child.sigterm();
    assert!(child
        .wait_exit(Duration::from_secs(60))
        .await
        .is_some_and(|s| s.success()));
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "verify: {out}\n{err}");
}
