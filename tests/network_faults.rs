//! `walshuttle run` behind TCP proxies (tests/support/proxy.rs): every connection it
//! makes (replication and SQL, to the source and to the target) goes through a proxy
//! the test controls, while the writer talks to the source directly. Connections are
//! cut, stalled (a black hole) and slowed mid-stream; each test ends with both sides
//! equal, no duplicates and no partially applied transaction.

mod support;

use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::workload::{
    assert_batches_exactly_once, batch_sql, Writer, BATCH_SCHEMA, BATCH_TABLES,
};
use support::{
    applied_lsn, assert_tables_equal, tail, try_connect, wait_for_convergence_running,
    wait_while_running, walshuttle_urls, Cluster, RunChild, RunLogs,
};

const PIPELINE: &str = "walshuttle";

/// Two clusters with the batch workload's tables on the source, and a proxy in
/// front of each.
struct Setup {
    source: Cluster,
    target: Cluster,
    source_proxy: Proxy,
    target_proxy: Proxy,
}

async fn setup(seed_rows: i64) -> Setup {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    src.batch_execute(BATCH_SCHEMA).await.unwrap();
    if seed_rows > 0 {
        src.batch_execute(&format!(
            "INSERT INTO ev (batch, n) SELECT 0, g FROM generate_series(1, {seed_rows}) g"
        ))
        .await
        .unwrap();
    }
    let source_proxy = Proxy::start(source.port);
    let target_proxy = Proxy::start(target.port);
    Setup {
        source,
        target,
        source_proxy,
        target_proxy,
    }
}

impl Setup {
    /// `walshuttle run --jobs 2` connected to both sides through the proxies.
    fn spawn_run(&self, logs: &mut RunLogs) -> RunChild {
        let mut cmd = walshuttle_urls(&self.source_proxy.url(), &self.target_proxy.url());
        cmd.args(["run", "--jobs", "2"]);
        logs.spawn(cmd)
    }

    /// The writer, connected to the source directly.
    fn spawn_writer(&self, pause: Duration) -> Writer {
        Writer::spawn(self.source.url(), pause, batch_sql)
    }

    /// The source's current WAL position (direct connection).
    async fn source_lsn(&self) -> String {
        let src = self.source.client().await;
        src.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// Whether the target's applied LSN (read directly, not through the proxy) is at
/// or past `lsn`; `None`: any applied position.
async fn applied_at_least(target: &Cluster, lsn: Option<&str>) -> bool {
    let Some(tgt) = try_connect(&target.url()).await else {
        return false;
    };
    let lsn = lsn.unwrap_or("0/1");
    tgt.query_opt(
        "SELECT applied_lsn >= $2::text::pg_lsn FROM walshuttle.progress WHERE pipeline = $1",
        &[&PIPELINE, &lsn],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get::<_, bool>(0))
    .unwrap_or(false)
}

/// Waits until the target has applied everything the source had written at the
/// moment of the call; returns how long that took. The writer must still be
/// running: applied_lsn is the end of the last applied commit, which passes the
/// position read here once a later commit is applied.
async fn wait_applied_source_now(
    s: &Setup,
    run: &mut RunChild,
    timeout: Duration,
    what: &str,
) -> Duration {
    let lsn = s.source_lsn().await;
    let started = Instant::now();
    wait_while_running(what, timeout, run, || {
        applied_at_least(&s.target, Some(&lsn))
    })
    .await;
    started.elapsed()
}

/// Stops the writer, waits for both sides to be equal, checks exactly-once
/// delivery and that `run` is still running.
async fn finish(s: &Setup, run: &mut RunChild, writer: Writer, timeout: Duration) {
    let (committed, errors) = writer.stop().await;
    eprintln!("writer: {committed} transactions committed, {errors} errors");
    let src = s.source.client().await;
    let tgt = s.target.client().await;
    wait_for_convergence_running(run, &src, &tgt, BATCH_TABLES, timeout).await;
    assert_tables_equal(&src, &tgt, BATCH_TABLES).await;
    assert_batches_exactly_once(&tgt).await;
    run.assert_running("walshuttle must keep running after network faults");
    let log = run.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    eprintln!(
        "walshuttle warnings ({}), last ones:\n{}",
        warnings.len(),
        warnings[warnings.len().saturating_sub(8)..].join("\n")
    );
    eprintln!(
        "proxy connections accepted: source {}, target {}",
        s.source_proxy.accepted(),
        s.target_proxy.accepted()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_on_either_side_mid_stream_converge() {
    let s = setup(10_000).await;
    let writer = s.spawn_writer(Duration::from_millis(5));
    let mut logs = RunLogs::new();
    let mut run = s.spawn_run(&mut logs);
    wait_while_running(
        "the first applied transaction",
        Duration::from_secs(90),
        &mut run,
        || applied_at_least(&s.target, None),
    )
    .await;

    let mut recoveries = Vec::new();
    for round in 1..=3 {
        for (side, proxy) in [("source", &s.source_proxy), ("target", &s.target_proxy)] {
            writer
                .wait_for_more(
                    &mut run,
                    30,
                    Duration::from_secs(60),
                    &format!("before cut {round} of the {side}"),
                )
                .await;
            let cut = proxy.cut();
            let started = Instant::now();
            eprintln!("cut {round} of the {side}: {cut} connections reset");
            // Writes committed after the cut must arrive.
            writer
                .wait_for_more(&mut run, 10, Duration::from_secs(60), "after the cut")
                .await;
            wait_applied_source_now(
                &s,
                &mut run,
                Duration::from_secs(90),
                &format!("walshuttle to apply what was written after cut {round} of the {side}"),
            )
            .await;
            recoveries.push((format!("{side} #{round}"), started.elapsed()));
        }
    }
    eprintln!("recovery after each cut: {recoveries:?}");
    finish(&s, &mut run, writer, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_stalled_past_wal_sender_timeout_recovers_quickly() {
    let s = setup(0).await;
    let writer = s.spawn_writer(Duration::from_millis(5));
    let mut logs = RunLogs::new();
    let mut run = s.spawn_run(&mut logs);
    wait_while_running(
        "the first applied transaction",
        Duration::from_secs(90),
        &mut run,
        || applied_at_least(&s.target, None),
    )
    .await;
    writer
        .wait_for_more(&mut run, 50, Duration::from_secs(60), "before the stall")
        .await;

    // Longer than the server's wal_sender_timeout (10 s) and walshuttle's own
    // receive timeout (30 s): the server drops the walsender, and walshuttle must
    // notice its stream is dead.
    let stall = Duration::from_secs(40);
    let stall_start = Instant::now();
    s.source_proxy.set_stalled(true);
    eprintln!("source proxy stalled for {stall:?}");
    let before = applied_lsn(&s.target.client().await, PIPELINE).await;
    tokio::time::sleep(stall).await;
    run.assert_running("during the source stall");
    let during = applied_lsn(&s.target.client().await, PIPELINE).await;
    eprintln!("applied_lsn before the stall {before:?}, at its end {during:?}");
    s.source_proxy.set_stalled(false);

    // Everything written (directly) meanwhile arrives within 90 s of the stall start.
    let deadline = Duration::from_secs(90);
    let left = deadline.saturating_sub(stall_start.elapsed());
    wait_applied_source_now(
        &s,
        &mut run,
        left,
        "walshuttle to apply what was written during the source stall (90 s after it began)",
    )
    .await;
    let recovered = stall_start.elapsed();
    let log = run.log();
    eprintln!(
        "recovered {:.1}s after the stall began ({:.1}s after it ended); own receive timeout fired: {}",
        recovered.as_secs_f64(),
        (recovered - stall).as_secs_f64(),
        log.contains("sent nothing for")
    );
    finish(&s, &mut run, writer, Duration::from_secs(90)).await;
}

/// A stream silenced for good (a NAT or firewall forgetting the flow: nothing
/// arrives, nothing is refused, and no FIN or RST ever comes), while new
/// connections go through: only walshuttle's own receive timeout (30 s) can notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_source_connections_are_abandoned_by_the_receive_timeout() {
    let s = setup(0).await;
    let writer = s.spawn_writer(Duration::from_millis(5));
    let mut logs = RunLogs::new();
    let mut run = s.spawn_run(&mut logs);
    // Streaming, not just bootstrapped (the bootstrap records a position too): a
    // transaction written now has been applied.
    // (Twice: the first position may predate the slot, which the bootstrap's
    // recorded position then passes without any streaming.)
    for _ in 0..2 {
        wait_applied_source_now(&s, &mut run, Duration::from_secs(90), "the stream to apply").await;
    }
    writer
        .wait_for_more(
            &mut run,
            50,
            Duration::from_secs(60),
            "before the black hole",
        )
        .await;
    let started = Instant::now();
    let silenced = s.source_proxy.stall_current();
    eprintln!("source connections silenced for good: {silenced}");
    writer
        .wait_for_more(
            &mut run,
            50,
            Duration::from_secs(60),
            "after the black hole",
        )
        .await;
    // 30 s receive timeout, a reconnect, and applying the backlog.
    let lsn = s.source_lsn().await;
    // The stream's own receive timeout is at most 60 s; 75 s leaves time for the
    // reconnect and the backlog. WALSHUTTLE_BLACKHOLE_DEADLINE_SECS overrides it, to
    // measure how long recovery takes when it takes longer.
    let deadline_secs: u64 = std::env::var("WALSHUTTLE_BLACKHOLE_DEADLINE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(75);
    let deadline = started + Duration::from_secs(deadline_secs);
    let tgt = s.target.client().await;
    while !applied_at_least(&s.target, Some(&lsn)).await {
        run.assert_running("while the source connections are black-holed");
        if Instant::now() > deadline {
            // When did the stream last commit on the target?
            let row = tgt
                .query_one(
                    "SELECT (now() - updated_at)::text FROM walshuttle.progress",
                    &[],
                )
                .await
                .unwrap();
            let updated_age: Option<String> = row.get(0);
            panic!(
                "walshuttle did not abandon the black-holed source stream within {deadline_secs} s \
                 (its receive timeout is at most 60 s); progress.updated_at {updated_age:?} old; \
                 source proxy connections open {} (accepted {}); log tail:\n{}",
                s.source_proxy.open_connections(),
                s.source_proxy.accepted(),
                tail(&run.log(), 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "recovered {:.1}s after the black hole began",
        started.elapsed().as_secs_f64()
    );
    let log = run.log();
    assert!(
        log.contains("sent nothing for")
            || log.contains("did not answer")
            || log.contains("starting the stream took longer"),
        "recovered without walshuttle's own timeouts firing?\n{}",
        tail(&log, 40)
    );
    finish(&s, &mut run, writer, Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_stalled_for_15s_then_released_converges() {
    let s = setup(0).await;
    let writer = s.spawn_writer(Duration::from_millis(5));
    let mut logs = RunLogs::new();
    let mut run = s.spawn_run(&mut logs);
    wait_while_running(
        "the first applied transaction",
        Duration::from_secs(90),
        &mut run,
        || applied_at_least(&s.target, None),
    )
    .await;
    writer
        .wait_for_more(&mut run, 50, Duration::from_secs(60), "before the stall")
        .await;

    let stall_start = Instant::now();
    s.target_proxy.set_stalled(true);
    tokio::time::sleep(Duration::from_secs(15)).await;
    run.assert_running("during the target stall");
    s.target_proxy.set_stalled(false);
    eprintln!("target proxy released after 15 s");
    // No client-side timeout on target statements: once the target answers again
    // everything resumes. A deadline makes a hang a failure rather than a hung test.
    let waited = wait_applied_source_now(
        &s,
        &mut run,
        Duration::from_secs(90),
        "walshuttle to apply what was written during the target stall",
    )
    .await;
    eprintln!(
        "caught up {:.1}s after the release ({:.1}s after the stall began)",
        waited.as_secs_f64(),
        stall_start.elapsed().as_secs_f64()
    );
    finish(&s, &mut run, writer, Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_still_converge() {
    let s = setup(20_000).await;
    // 50 ms per chunk each way, from the bootstrap on.
    s.source_proxy.set_delay(Duration::from_millis(50));
    s.target_proxy.set_delay(Duration::from_millis(50));
    let writer = s.spawn_writer(Duration::from_millis(20));
    let mut logs = RunLogs::new();
    let started = Instant::now();
    let mut run = s.spawn_run(&mut logs);
    wait_while_running(
        "the first applied transaction over slow links",
        Duration::from_secs(120),
        &mut run,
        || applied_at_least(&s.target, None),
    )
    .await;
    eprintln!(
        "bootstrap and first apply over slow links took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    writer
        .wait_for_more(&mut run, 200, Duration::from_secs(60), "while streaming")
        .await;
    let waited = wait_applied_source_now(
        &s,
        &mut run,
        Duration::from_secs(120),
        "walshuttle to keep up over slow links",
    )
    .await;
    eprintln!("caught up over slow links in {:.1}s", waited.as_secs_f64());
    finish(&s, &mut run, writer, Duration::from_secs(120)).await;
}

/// SIGTERM while a side is stalled: `run` must still stop promptly (nothing is
/// lost: what was not confirmed is streamed again by the next run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_side_is_stalled_stops_promptly() {
    let s = setup(0).await;
    let writer = s.spawn_writer(Duration::from_millis(5));
    let mut logs = RunLogs::new();
    let mut run = s.spawn_run(&mut logs);
    wait_while_running(
        "the first applied transaction",
        Duration::from_secs(90),
        &mut run,
        || applied_at_least(&s.target, None),
    )
    .await;
    let mut stops = Vec::new();
    for (side, proxy, settle) in [
        // The stream loop talks to the source every 10 s (oldest open transaction):
        // let it get stuck there.
        ("source", &s.source_proxy, Duration::from_secs(12)),
        // Applying gets stuck at once.
        ("target", &s.target_proxy, Duration::from_secs(3)),
    ] {
        writer
            .wait_for_more(&mut run, 50, Duration::from_secs(60), "before the stall")
            .await;
        proxy.set_stalled(true);
        tokio::time::sleep(settle).await;
        run.assert_running(&format!("with the {side} stalled"));
        let asked = Instant::now();
        run.sigterm();
        let status = run.wait_exit(Duration::from_secs(30)).await;
        let took = asked.elapsed();
        proxy.set_stalled(false);
        eprintln!("SIGTERM with the {side} stalled: {status:?} after {took:.1?}");
        stops.push((side, status, took));
        // The next run picks up where this one stopped.
        run = s.spawn_run(&mut logs);
    }
    wait_applied_source_now(
        &s,
        &mut run,
        Duration::from_secs(90),
        "the restarted run to catch up",
    )
    .await;
    finish(&s, &mut run, writer, Duration::from_secs(90)).await;
    for (side, status, took) in stops {
        assert!(
            status.is_some() && took < Duration::from_secs(20),
            "SIGTERM with the {side} stalled: exit {status:?} after {took:?}; expected a stop within 20 s"
        );
        assert!(
            status.is_some_and(|s| s.success()),
            "SIGTERM with the {side} stalled: exit {status:?}, expected 0"
        );
    }
}
