//! `walshuttle demo`: the whole story on one machine in a minute. Two throwaway
//! clusters, the demo schema with generated data, a bootstrap, `run` streaming while a
//! live writer inserts, updates and deletes, throughput and lag as it goes, then
//! `verify`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use crate::bootstrap::{self, BootstrapOptions};
use crate::config::{Endpoint, Side};
use crate::localpg::{LocalCluster, LocalClusterOptions};
use crate::pg::{connect, Lsn, PgResultExt};
use crate::verify::{self, VerifyOptions};

/// The demo schema and generator, built into the binary so the demo runs anywhere.
const MIGRATIONS: &[(&str, &str)] = &[
    ("schema.sql", include_str!("../migrations/schema.sql")),
    ("users.sql", include_str!("../migrations/users.sql")),
    ("products.sql", include_str!("../migrations/products.sql")),
    (
        "recommendations.sql",
        include_str!("../migrations/recommendations.sql"),
    ),
    ("generate.sql", include_str!("../migrations/generate.sql")),
];

/// Settings of `demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Stop after this long (else at Ctrl-C).
    pub seconds: Option<u64>,
    /// Generator scale: 100,000 recommendation rows per unit.
    pub scale: u32,
    /// Parallel copy workers.
    pub jobs: usize,
}

/// Runs the demo; returns whether the final verify found both sides equal.
pub async fn demo(opts: &DemoOptions, mut stop: watch::Receiver<bool>) -> Result<bool> {
    println!("walshuttle demo: starting two throwaway PostgreSQL clusters");
    let source_pg = LocalCluster::start(&LocalClusterOptions::default())?;
    let target_pg = LocalCluster::start(&LocalClusterOptions::default())?;
    println!(
        "  source on 127.0.0.1:{}, target on 127.0.0.1:{}",
        source_pg.port, target_pg.port
    );
    let source = Endpoint::parse(Side::Source, &source_pg.url_for("postgres"))?;
    let target = Endpoint::parse(Side::Target, &target_pg.url_for("postgres"))?;

    println!(
        "loading the demo schema and {} recommendation rows into the source",
        opts.scale as u64 * 100_000
    );
    for (name, text) in MIGRATIONS {
        std::fs::write(source_pg.dir().join(name), text)
            .with_context(|| format!("writing {name}"))?;
    }
    for (file, vars) in [
        ("schema.sql", vec![]),
        ("generate.sql", vec![("scale", opts.scale.to_string())]),
    ] {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = source_pg.psql_file("postgres", &source_pg.dir().join(file), &vars)?;
        if !out.status.success() {
            bail!(
                "loading {file} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }

    let boot = BootstrapOptions {
        jobs: opts.jobs,
        tables: None,
        slot: "walshuttle".into(),
        publication: None,
        state_schema: "walshuttle".into(),
        truncate_target: false,
        allow_target_triggers: false,
        capture_ddl: false,
        online: false,
        filter: Default::default(),
        rows: Default::default(),
    };
    println!("bootstrapping the target");
    let summary = bootstrap::bootstrap(&source, &target, &boot).await?;
    println!("{}", summary.render());

    // The sidecar, in this process.
    let (run_stop_tx, run_stop_rx) = watch::channel(false);
    let run_opts = crate::run::RunOptions::for_pipeline(boot.clone());
    let (src_run, tgt_run) = (source.clone(), target.clone());
    let runner =
        tokio::spawn(
            async move { crate::run::run(&src_run, &tgt_run, &run_opts, run_stop_rx).await },
        );

    // A live writer: new recommendation batches, score updates, deletes.
    let writes = Arc::new(AtomicU64::new(0));
    let (writer_stop_tx, writer_stop_rx) = watch::channel(false);
    let writer = tokio::spawn(live_writer(
        source.clone(),
        Arc::clone(&writes),
        writer_stop_rx,
    ));

    println!(
        "streaming while a writer runs{}",
        opts.seconds
            .map(|s| format!(" for {s} s (Ctrl-C stops it sooner; --seconds 0 runs until Ctrl-C)"))
            .unwrap_or_else(|| " until Ctrl-C".into())
    );
    let monitor_src = connect(&source, "demo monitor").await?;
    let monitor_tgt = connect(&target, "demo monitor").await?;
    let started = Instant::now();
    let mut last_writes = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        if runner.is_finished() {
            break;
        }
        let total = writes.load(Ordering::Relaxed);
        let (lag_bytes, lag_secs) = lag(&monitor_src, &monitor_tgt).await.unwrap_or((0, 0.0));
        println!(
            "  {:>4.0} s  writer {:>6} txns ({:>4}/s)  lag {:>9} bytes, {:>5.2} s",
            started.elapsed().as_secs_f64(),
            total,
            total - last_writes,
            lag_bytes,
            lag_secs
        );
        last_writes = total;
        if opts
            .seconds
            .is_some_and(|s| started.elapsed() >= Duration::from_secs(s))
            || *stop.borrow()
        {
            break;
        }
    }
    let _ = writer_stop_tx.send(true);
    writer
        .await
        .context("the demo writer stopped unexpectedly")??;

    // Let the stream catch up, then stop `run` and compare.
    let caught_up = wait_caught_up(&monitor_src, Duration::from_secs(60)).await?;
    let _ = run_stop_tx.send(true);
    match runner.await {
        Ok(result) => result?,
        Err(e) => bail!("run stopped unexpectedly: {e}"),
    }
    if !caught_up {
        println!("warning: the stream did not catch up within 60 s");
    }
    let report = verify::verify(
        &source,
        &target,
        &VerifyOptions {
            tables: None,
            slot: "walshuttle".into(),
            state_schema: "walshuttle".into(),
            jobs: opts.jobs,
            repair: false,
            allow_target_triggers: false,
        },
    )
    .await?;
    println!("{}", report.render());
    println!(
        "demo {}: {} writer transactions replicated; clusters removed",
        if report.equal() {
            "succeeded"
        } else {
            "FAILED"
        },
        writes.load(Ordering::Relaxed)
    );
    Ok(report.equal())
}

async fn live_writer(
    source: Endpoint,
    writes: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    // Every walshuttle session runs with search_path = pg_catalog: names are qualified.
    let client = connect(&source, "demo writer").await?;
    let mut n: i64 = 0;
    while !*stop.borrow() {
        n += 1;
        let sql = match n % 10 {
            0 => "DELETE FROM public.recommendations WHERE id = (SELECT min(id) FROM public.recommendations)".to_string(),
            1..=3 => format!(
                "UPDATE public.recommendations SET score = random(), updated_at = now() WHERE id = (SELECT max(id) - {} FROM public.recommendations)",
                n % 1000
            ),
            _ => "INSERT INTO public.recommendations (user_id, product_id, score, rank, model_version, features, created_at, updated_at) \
                  SELECT (SELECT min(id) FROM public.users), (SELECT min(id) FROM public.products), random(), g, 'live', '{\"source\": \"demo\"}', now(), now() \
                  FROM generate_series(1, 10) g"
                .to_string(),
        };
        client
            .batch_execute(&sql)
            .await
            .pg_context(|| "writing to the demo source".into())?;
        writes.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Bytes the slot is behind the source, and seconds since the last applied commit
/// when behind.
async fn lag(src: &tokio_postgres::Client, tgt: &tokio_postgres::Client) -> Result<(i64, f64)> {
    let bytes: i64 = src
        .query_one(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint \
             FROM pg_replication_slots WHERE slot_name = 'walshuttle'",
            &[],
        )
        .await
        .pg_context(|| "reading the lag".into())?
        .get(0);
    let secs: f64 = tgt
        .query_one(
            "SELECT coalesce(extract(epoch FROM now() - commit_time), 0)::float8 FROM walshuttle.progress LIMIT 1",
            &[],
        )
        .await
        .pg_context(|| "reading the lag".into())?
        .get(0);
    Ok((bytes, if bytes > 0 { secs.max(0.0) } else { 0.0 }))
}

async fn wait_caught_up(src: &tokio_postgres::Client, timeout: Duration) -> Result<bool> {
    let target: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .pg_context(|| "reading the source position".into())?
        .get(0);
    let target: Lsn = target.parse().unwrap_or_default();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let confirmed: Option<String> = src
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'walshuttle'",
                &[],
            )
            .await
            .pg_context(|| "reading the slot position".into())?
            .get(0);
        if confirmed
            .and_then(|c| c.parse::<Lsn>().ok())
            .is_some_and(|c| c >= target)
        {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(false)
}
