//! Parallel apply (`--apply-lanes`, issue 20): batches of committed transactions
//! finish on several target connections, yet the target only ever shows a prefix
//! of the source's commit order, each transaction whole, and every dependency
//! between transactions (one row across transactions, key swaps, a unique value
//! passing between rows, a foreign key's parent and child, TRUNCATE and DDL,
//! keyless tables) comes out exactly as applying them one by one would.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{
    assert_tables_equal, run, wait_for_convergence_running, walshuttle, Cluster, RunLogs,
};
use tokio_postgres::Client;

/// Accounts moved between by transfers; the sum of balances never changes.
const ACCOUNTS: i64 = 100_000;
const BALANCE: i64 = 100;

/// The source's schema for the ordering tests: accounts and a log whose ids are the
/// source's commit order (one per transaction, written in order by one session).
async fn ledger_schema(src: &Client) {
    src.batch_execute(&format!(
        "CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL);
         CREATE TABLE log (id bigint PRIMARY KEY, a int, b int);
         INSERT INTO acct SELECT g, {BALANCE} FROM generate_series(1, {ACCOUNTS}) g;"
    ))
    .await
    .unwrap();
}

/// Writes `n` transactions from log id `from` on: every tenth moves one unit between
/// two accounts, all add their log row.
async fn ledger_transactions(src: &Client, from: i64, n: i64) {
    src.batch_execute(&format!(
        "DO $$
         DECLARE a int; b int;
         BEGIN
           FOR i IN {from}..{last} LOOP
             IF i % 10 = 0 THEN
               a := 1 + (i::bigint * 7919) % {ACCOUNTS};
               b := 1 + (i::bigint * 104729 + 17) % {ACCOUNTS};
               UPDATE acct SET balance = balance - 1 WHERE id = a;
               UPDATE acct SET balance = balance + 1 WHERE id = b;
             END IF;
             INSERT INTO log VALUES (i, a, b);
             COMMIT;
           END LOOP;
         END $$",
        last = from + n - 1
    ))
    .await
    .unwrap();
}

/// Sets its flag when dropped, so a watcher ends when its test does, even by panic.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Polls the target until `stop`, each time in one snapshot: the log must be ids
/// 1..=n (a prefix of the source's commit order) and the balances must add up (no
/// transaction half applied). Returns how many snapshots it read.
fn watch_ledger(target: &Cluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    let url = target.url();
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut seen = 0;
        while !stop.load(Ordering::Relaxed) {
            let rows = client
                .simple_query(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ;
                     SELECT count(*), coalesce(max(id), 0) FROM log;
                     SELECT coalesce(sum(balance), 0), count(*) FROM acct;
                     COMMIT",
                )
                .await;
            let Ok(rows) = rows else {
                continue;
            };
            let values: Vec<Vec<String>> = rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                        (0..r.len())
                            .map(|i| r.get(i).unwrap_or("").to_string())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect();
            assert_eq!(
                values[0][0], values[0][1],
                "the target shows log ids that are not a prefix of the source's commit order (count, max): {:?}",
                values[0]
            );
            if values[1][1] == ACCOUNTS.to_string() {
                assert_eq!(
                    values[1][0],
                    (ACCOUNTS * BALANCE).to_string(),
                    "the target shows a transfer half applied"
                );
            }
            seen += 1;
        }
        seen
    })
}

/// Two clusters, the ledger bootstrapped, and 20,000 transactions written since.
async fn bootstrapped_ledger_with_backlog() -> (Cluster, Cluster, Client, Client) {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    ledger_schema(&src).await;
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("bootstrap");
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");
    ledger_transactions(&src, 1, 20_000).await;
    (source, target, src, tgt)
}

/// `walshuttle run` on four lanes.
fn run_on_lanes(source: &Cluster, target: &Cluster) -> std::process::Command {
    let mut cmd = walshuttle(source, target);
    cmd.args(["run", "--apply-lanes", "4"]);
    cmd
}

/// `walshuttle verify` must say equal (exit 0).
fn assert_verify_equal(source: &Cluster, target: &Cluster) {
    let mut cmd = walshuttle(source, target);
    cmd.arg("verify");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

async fn lane_connections(tgt: &Client) -> i64 {
    tgt.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walshuttle apply lane'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_applied_on_lanes_shows_only_whole_transactions_in_commit_order() {
    let (source, target, src, tgt) = bootstrapped_ledger_with_backlog().await;

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_watcher = StopOnDrop(Arc::clone(&stop));
    let watcher = watch_ledger(&target, Arc::clone(&stop));
    let mut logs = RunLogs::new();
    let mut child = logs.spawn(run_on_lanes(&source, &target));
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["acct", "log"],
        Duration::from_secs(180),
    )
    .await;
    assert!(
        lane_connections(&tgt).await > 0,
        "no batch was applied on a lane of its own"
    );
    stop.store(true, Ordering::Relaxed);
    let snapshots = watcher.await.unwrap();
    assert!(snapshots > 0, "the watcher read no snapshot");
    child.sigterm();
    assert_verify_equal(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_parallel_apply_under_a_writer_ends_exact() {
    let (source, target, src, tgt) = bootstrapped_ledger_with_backlog().await;

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_watcher = StopOnDrop(Arc::clone(&stop));
    let watcher = watch_ledger(&target, Arc::clone(&stop));
    let mut logs = RunLogs::new();
    let mut child = logs.spawn(run_on_lanes(&source, &target));
    // The writer goes on while run applies the backlog; run dies half-way.
    let writer = {
        let w = source.client().await;
        tokio::spawn(async move { ledger_transactions(&w, 20_001, 10_000).await })
    };
    support::wait_until(
        "part of the backlog to be applied",
        Duration::from_secs(120),
        || async {
            tgt.query_one("SELECT count(*) FROM log", &[])
                .await
                .map(|r| r.get::<_, i64>(0) >= 3_000)
                .unwrap_or(false)
        },
    )
    .await;
    child.kill9();
    writer.await.unwrap();
    // Written while nothing applies.
    ledger_transactions(&src, 30_001, 2_000).await;

    let mut child = logs.spawn(run_on_lanes(&source, &target));
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["acct", "log"],
        Duration::from_secs(240),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    assert_tables_equal(&src, &tgt, &["acct", "log"]).await;
    child.sigterm();
    assert_verify_equal(&source, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_between_transactions_on_lanes_come_out_exact() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    let schema = "CREATE TABLE filler (id bigint PRIMARY KEY, v int);
         CREATE TABLE hot (id int PRIMARY KEY, n bigint NOT NULL);
         CREATE TABLE swap (id int PRIMARY KEY, tag text NOT NULL);
         CREATE TABLE \"Codes\" (id int PRIMARY KEY, code text UNIQUE);
         CREATE TABLE parent (id int PRIMARY KEY, name text);
         CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
         CREATE TABLE keyless (a int, b text);
         ALTER TABLE keyless REPLICA IDENTITY FULL;
         CREATE TABLE trunc (id int PRIMARY KEY, v int);";
    src.batch_execute(schema).await.unwrap();
    // The target has the foreign key too (its triggers make those tables serial).
    tgt.batch_execute(schema).await.unwrap();
    src.batch_execute(
        "INSERT INTO hot VALUES (1, 0);
         INSERT INTO swap SELECT g, 't' || g FROM generate_series(1, 10) g;
         INSERT INTO \"Codes\" SELECT g, 'c' || g FROM generate_series(1, 10) g;
         INSERT INTO keyless SELECT g % 5, 'k' FROM generate_series(1, 50) g;",
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("bootstrap");
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");

    // Thousands of one-row transactions on their own table keep lanes busy; between
    // them, every kind of dependency, each in transactions of its own.
    src.batch_execute(
        "DO $$
         BEGIN
           FOR i IN 1..6000 LOOP
             INSERT INTO filler VALUES (i, i); COMMIT;
             IF i % 50 = 0 THEN
               -- one key across consecutive transactions
               UPDATE hot SET n = n + i WHERE id = 1; COMMIT;
               UPDATE hot SET n = n * 2 % 1000003 WHERE id = 1; COMMIT;
               -- a key swap through a free key, one step per transaction
               UPDATE swap SET id = -1 WHERE id = 1 + (i / 50) % 10; COMMIT;
               UPDATE swap SET id = 1 + (i / 50) % 10 WHERE id = 1 + (i / 50 + 1) % 10; COMMIT;
               UPDATE swap SET id = 1 + (i / 50 + 1) % 10 WHERE id = -1; COMMIT;
               -- a unique value passed from one row to another
               UPDATE \"Codes\" SET code = NULL WHERE code = 'moving'; COMMIT;
               UPDATE \"Codes\" SET code = 'moving' WHERE id = 1 + (i / 50) % 10; COMMIT;
               -- a parent and its child in consecutive transactions, then both gone
               INSERT INTO parent VALUES (i, 'p'); COMMIT;
               INSERT INTO child VALUES (i, i); COMMIT;
               IF i % 100 = 0 THEN
                 DELETE FROM child WHERE id = i - 50; COMMIT;
                 DELETE FROM parent WHERE id = i - 50; COMMIT;
               END IF;
               -- keyless rows, identical ones included
               INSERT INTO keyless VALUES (i % 5, 'k'); COMMIT;
               UPDATE keyless SET b = 'u' || i WHERE ctid = (SELECT ctid FROM keyless WHERE a = i % 5 LIMIT 1); COMMIT;
               DELETE FROM keyless WHERE ctid = (SELECT ctid FROM keyless WHERE a = (i + 1) % 5 LIMIT 1); COMMIT;
               -- TRUNCATE as a barrier between writes of the same rows
               INSERT INTO trunc VALUES (i, 1); COMMIT;
               IF i % 1000 = 0 THEN
                 TRUNCATE trunc; COMMIT;
                 INSERT INTO trunc VALUES (i, 2); COMMIT;
               END IF;
             END IF;
             IF i = 3000 THEN
               -- DDL as a barrier
               ALTER TABLE filler ADD COLUMN extra text; COMMIT;
             END IF;
           END LOOP;
         END $$",
    )
    .await
    .unwrap();
    src.batch_execute("UPDATE filler SET extra = 'x' WHERE id % 7 = 0")
        .await
        .unwrap();

    let mut logs = RunLogs::new();
    let mut child = logs.spawn(run_on_lanes(&source, &target));
    let tables = [
        "filler",
        "hot",
        "swap",
        "\"Codes\"",
        "parent",
        "child",
        "keyless",
        "trunc",
    ];
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(240)).await;
    assert!(
        lane_connections(&tgt).await > 0,
        "no batch was applied on a lane of its own"
    );
    child.sigterm();
    assert_verify_equal(&source, &target);
}
