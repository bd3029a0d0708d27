//! Several pipelines on one source: each has its own publication (named after its
//! slot by default), never alters or drops another's, and refuses to use one that
//! belongs to another pipeline.

mod support;

use std::time::Duration;

use support::{run, wait_for_convergence_running, walshuttle, Cluster, RunLogs};
use tokio_postgres::Client;

async fn publication_tables(src: &Client, name: &str) -> Option<Vec<String>> {
    let exists = src
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .unwrap()
        .is_some();
    if !exists {
        return None;
    }
    Some(
        src.query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelines_on_one_source_keep_their_own_publications() {
    let source = Cluster::start();
    let target1 = Cluster::start();
    let target2 = Cluster::start();
    let src = source.client().await;
    let tgt1 = target1.client().await;
    let tgt2 = target2.client().await;
    src.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 100) g;
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target1);
    cmd.args(["run", "--jobs", "1", "--slot", "p1", "--tables", "a"]);
    let mut p1 = logs.spawn(cmd);
    wait_for_convergence_running(&mut p1, &src, &tgt1, &["a"], Duration::from_secs(90)).await;

    // The second pipeline with default flags.
    let mut cmd = walshuttle(&source, &target2);
    cmd.args(["run", "--jobs", "1", "--slot", "p2", "--tables", "b"]);
    let mut p2 = logs.spawn(cmd);
    wait_for_convergence_running(&mut p2, &src, &tgt2, &["b"], Duration::from_secs(90)).await;

    // Writes to both tables arrive on their targets.
    src.batch_execute(
        "UPDATE a SET v = 'a-streamed' WHERE id <= 10; INSERT INTO a VALUES (1000, 'new a');
         UPDATE b SET v = 'b-streamed' WHERE id <= 10; INSERT INTO b VALUES (1000, 'new b');",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut p2, &src, &tgt2, &["b"], Duration::from_secs(60)).await;
    wait_for_convergence_running(&mut p1, &src, &tgt1, &["a"], Duration::from_secs(60)).await;
    assert_eq!(
        publication_tables(&src, "p1").await,
        Some(vec!["public.a".to_string()]),
        "p1's publication is named after its slot"
    );
    assert_eq!(
        publication_tables(&src, "p2").await,
        Some(vec!["public.b".to_string()])
    );

    // Another pipeline may not take p1's publication: one clear line, nothing written.
    let mut cmd = walshuttle(&source, &target2);
    cmd.args([
        "bootstrap",
        "--slot",
        "p3",
        "--tables",
        "b",
        "--publication",
        "p1",
    ]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 1, "p3 took p1's publication: {out}{err}");
    let last = err.lines().last().unwrap_or_default();
    for needle in ["error: ", "publication p1", "pipeline p1", "--publication"] {
        assert!(last.contains(needle), "`{needle}` missing from: {last}");
    }
    assert_eq!(
        publication_tables(&src, "p1").await,
        Some(vec!["public.a".to_string()]),
        "p1's publication was changed"
    );
    let p3_slot: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'p3'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(p3_slot, 0, "a slot was created for p3");
    src.batch_execute("UPDATE a SET v = 'still streaming' WHERE id = 20")
        .await
        .unwrap();
    wait_for_convergence_running(&mut p1, &src, &tgt1, &["a"], Duration::from_secs(60)).await;

    // p1 is retired; p2 keeps streaming from its own publication.
    p1.sigterm();
    let status = p1.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some(), "p1 did not stop");
    let mut cmd = walshuttle(&source, &target1);
    cmd.args(["teardown", "--slot", "p1", "--yes"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "teardown of p1 failed: {out}{err}");
    assert!(out.contains("dropped publication p1"), "{out}");
    assert_eq!(publication_tables(&src, "p1").await, None);
    assert_eq!(
        publication_tables(&src, "p2").await,
        Some(vec!["public.b".to_string()])
    );
    src.batch_execute(
        "INSERT INTO b VALUES (2000, 'after the teardown'); DELETE FROM b WHERE id = 50",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut p2, &src, &tgt2, &["b"], Duration::from_secs(60)).await;
    p2.assert_running("after p1's teardown");
}
