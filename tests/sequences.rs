//! `run --sync-sequences`: the target's sequences of the replicated tables (identity
//! and serial columns) stay at or past the source's, so a target promoted at any
//! moment hands out no id the source already used.

mod support;

use std::time::Duration;

use support::{wait_for_convergence_running, wait_while_running, walshuttle, Cluster, RunLogs};
use tokio_postgres::Client;

async fn scalar(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_sequences_are_kept_ahead_of_the_source() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(
        "CREATE TABLE ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
         CREATE TABLE ser (id serial PRIMARY KEY, v text);
         INSERT INTO ident (v) SELECT 'a' FROM generate_series(1, 100);
         INSERT INTO ser (v) SELECT 'b' FROM generate_series(1, 50);",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--sync-sequences", "1s"]);
    let mut child = logs.spawn(cmd);
    let tgt = target.client().await;
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["ident", "ser"],
        Duration::from_secs(60),
    )
    .await;
    // More ids handed out on the source, one of them burnt by a rolled-back insert.
    src.batch_execute(
        "INSERT INTO ident (v) SELECT 'c' FROM generate_series(1, 25);
         INSERT INTO ser (v) SELECT 'd' FROM generate_series(1, 10);",
    )
    .await
    .unwrap();
    src.batch_execute("BEGIN; INSERT INTO ser (v) VALUES ('burnt'); ROLLBACK")
        .await
        .unwrap();
    let source_next_ser = 62i64; // 60 used, 61 burnt
    wait_while_running(
        "the target's sequences to reach the source's",
        Duration::from_secs(60),
        &mut child,
        || async {
            // The next value each target sequence hands out.
            let next = |seq: &'static str| {
                let tgt = &tgt;
                async move {
                    tgt.query_one(
                        &format!(
                            "SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM {seq}"
                        ),
                        &[],
                    )
                    .await
                    .ok()
                    .map(|r| r.get::<_, i64>(0))
                }
            };
            next("public.ident_id_seq").await.is_some_and(|v| v >= 126)
                && next("public.ser_id_seq").await.is_some_and(|v| v >= source_next_ser)
        },
    )
    .await;
    // As a promoted primary, the target hands out new ids without a conflict.
    let new_ser = scalar(
        &tgt,
        "INSERT INTO ser (v) VALUES ('on the target') RETURNING id::bigint",
    )
    .await;
    assert!(
        new_ser >= source_next_ser,
        "the target's serial handed out {new_ser}, which the source may have used"
    );
    let new_ident = scalar(
        &tgt,
        "INSERT INTO ident (v) VALUES ('on the target') RETURNING id",
    )
    .await;
    assert!(
        new_ident > 125,
        "the target's identity handed out {new_ident}"
    );
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
}
