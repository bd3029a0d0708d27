//! A PostgreSQL 17 source fails over to its physical standby under a writer: the
//! slot walshuttle streams from is a failover slot, which the standby keeps in sync
//! (`sync_replication_slots`), and the primary sends no change before the standby has
//! it (`synchronized_standby_slots`). `run`, given both hosts with
//! `target_session_attrs=read-write`, goes on from the promoted standby with no gap,
//! nothing applied twice and no catch-up.

mod support;

use std::time::Duration;

use support::workload::{
    assert_batches_exactly_once, batch_sql, Writer, BATCH_SCHEMA, BATCH_TABLES,
};
use support::{
    run, wait_for_convergence_running, wait_until, wait_while_running, walshuttle_urls, Cluster,
    RunLogs, PASSWORD,
};

const MAJOR: u32 = 17;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_goes_on_from_the_promoted_standby_without_a_gap() {
    let primary = Cluster::start_version(MAJOR);
    let p = primary.client().await;
    p.batch_execute("SELECT pg_create_physical_replication_slot('standby1', true)")
        .await
        .expect("physical slot for the standby");
    let standby = primary.start_standby(&[
        "primary_slot_name = 'standby1'",
        "hot_standby_feedback = on",
        "sync_replication_slots = on",
    ]);
    // The primary's clients were cut by the copy: connect again.
    let p = primary.client().await;
    p.batch_execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
        .await
        .expect("synchronized_standby_slots");
    p.batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    p.batch_execute(BATCH_SCHEMA).await.expect("schema");
    let target = Cluster::start();
    let tgt = target.client().await;

    let source_url = format!(
        "postgresql://postgres:{PASSWORD}@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let writer = Writer::spawn(source_url.clone(), Duration::from_millis(10), batch_sql);
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle_urls(&source_url, &target.url());
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    writer
        .wait_for_more(&mut child, 30, Duration::from_secs(60), "while streaming")
        .await;

    // The slot is a failover slot, and the standby holds a synced copy of it.
    wait_while_running(
        "run to create its slot",
        Duration::from_secs(120),
        &mut child,
        || async {
            p.query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'walshuttle'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .is_some()
        },
    )
    .await;
    let failover: bool = p
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'walshuttle'",
            &[],
        )
        .await
        .expect("the pipeline's slot on the primary")
        .get(0);
    assert!(failover, "the slot was not created as a failover slot");
    let s = standby.client().await;
    wait_while_running(
        "the standby to hold a synced copy of the slot",
        Duration::from_secs(90),
        &mut child,
        || async {
            s.query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'walshuttle' AND synced AND NOT temporary",
                &[],
            )
            .await
            .ok()
            .flatten()
            .is_some()
        },
    )
    .await;
    writer
        .wait_for_more(
            &mut child,
            30,
            Duration::from_secs(60),
            "before the failover",
        )
        .await;

    // The primary dies; the standby is promoted; the writer and `run` find it.
    primary.stop("immediate");
    s.batch_execute("SELECT pg_promote()")
        .await
        .expect("promote");
    wait_until(
        "the standby to be promoted",
        Duration::from_secs(60),
        || async {
            s.query_one("SELECT NOT pg_is_in_recovery()", &[])
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
        },
    )
    .await;
    writer
        .wait_for_more(
            &mut child,
            50,
            Duration::from_secs(90),
            "on the promoted standby",
        )
        .await;
    let (committed, errors) = writer.stop().await;
    eprintln!("writer: {committed} transactions committed, {errors} failed around the failover");

    wait_for_convergence_running(&mut child, &s, &tgt, BATCH_TABLES, Duration::from_secs(120))
        .await;
    assert_batches_exactly_once(&tgt).await;
    let log = child.log();
    assert!(
        !log.contains("catch-up") && !log.contains("catching up"),
        "run needed a catch-up after the failover:\n{}",
        support::tail(&log, 40)
    );
    let mut cmd = walshuttle_urls(&source_url, &target.url());
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "verify after the failover:\n{out}\n{err}");
    child.sigterm();
    assert!(child.wait_exit(Duration::from_secs(30)).await.is_some());
}
