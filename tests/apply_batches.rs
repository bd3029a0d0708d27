//! Batched apply under a backlog: thousands of small update and delete transactions
//! written while `run` is stopped are drained in coalesced, set-based batches, and the
//! result is exactly what applying them one by one would give (repeated updates of
//! one key, unchanged TOAST values, key changes and deletes mixed in).

mod support;

use std::time::Duration;

use support::{run, wait_for_convergence_running, walshuttle, Cluster, RunLogs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_small_transactions_drains_exactly() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL, note text, doc text);
         ALTER TABLE acct ALTER COLUMN doc SET STORAGE EXTERNAL;
         INSERT INTO acct SELECT g, 0, 'n' || g, CASE WHEN g % 50 = 0 THEN repeat(md5(g::text), 400) END
           FROM generate_series(1, 2000) g;",
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, _, stderr) = run(cmd);
    assert_eq!(code, 0, "{stderr}");

    // The backlog: single-statement transactions, many on the same few keys.
    let mut script = String::new();
    for i in 0..3000 {
        let id = (i * 7) % 200 + 1;
        match i % 10 {
            // Moves a row to a new key (needs the old key).
            9 => script.push_str(&format!(
                "UPDATE acct SET id = id + 100000 WHERE id = {};",
                2000 - i / 10
            )),
            // Deletes.
            8 => script.push_str(&format!("DELETE FROM acct WHERE id = {};", 1000 + i / 10)),
            // Updates leaving the TOASTed doc unchanged.
            _ => script.push_str(&format!(
                "UPDATE acct SET balance = balance + {i}, note = 'u{i}' WHERE id = {id};"
            )),
        }
    }
    src.batch_execute(&script).await.unwrap();

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["public.acct"],
        Duration::from_secs(90),
    )
    .await;
    let docs: i64 = tgt
        .query_one("SELECT count(*) FROM acct WHERE length(doc) = 12800", &[])
        .await
        .unwrap()
        .get(0);
    let src_docs: i64 = src
        .query_one("SELECT count(*) FROM acct WHERE length(doc) = 12800", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(docs, src_docs, "unchanged TOAST values were lost");
    assert!(docs > 0);
}
