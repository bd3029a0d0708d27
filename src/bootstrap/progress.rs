//! Copy progress: per-table bars (rows, MB/s, ETA) when stderr is a terminal,
//! periodic log lines otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::pg::QualifiedName;

/// Counters for one table.
#[derive(Default)]
pub struct TableCounters {
    /// Rows committed on the target.
    pub rows: AtomicU64,
    /// COPY bytes streamed.
    pub bytes: AtomicU64,
    /// Rows expected (planner estimate), for the ETA.
    pub expected_rows: u64,
}

/// Shared counters for a copy run.
pub struct Progress {
    tables: HashMap<QualifiedName, TableCounters>,
    order: Vec<QualifiedName>,
    started: Instant,
}

impl Progress {
    /// Counters for `tables`, with their expected row counts.
    pub fn new(tables: &[(QualifiedName, u64)]) -> Arc<Self> {
        Arc::new(Progress {
            tables: tables
                .iter()
                .map(|(t, n)| {
                    (
                        t.clone(),
                        TableCounters {
                            expected_rows: *n,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            order: tables.iter().map(|(t, _)| t.clone()).collect(),
            started: Instant::now(),
        })
    }

    /// Counts committed rows.
    pub fn add_rows(&self, table: &QualifiedName, rows: u64) {
        if let Some(c) = self.tables.get(table) {
            c.rows.fetch_add(rows, Ordering::Relaxed);
        }
    }

    /// Counts streamed bytes.
    pub fn add_bytes(&self, table: &QualifiedName, bytes: u64) {
        if let Some(c) = self.tables.get(table) {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Rows and bytes copied so far for one table.
    pub fn table_totals(&self, table: &QualifiedName) -> (u64, u64) {
        self.tables
            .get(table)
            .map(|c| {
                (
                    c.rows.load(Ordering::Relaxed),
                    c.bytes.load(Ordering::Relaxed),
                )
            })
            .unwrap_or_default()
    }

    /// Seconds since the copy started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Starts the display task; it ends when the returned handle is dropped or aborted.
    pub fn display(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        if std::io::stderr().is_terminal() {
            tokio::spawn(async move { me.draw_bars().await })
        } else {
            tokio::spawn(async move { me.log_periodically().await })
        }
    }

    async fn draw_bars(&self) {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix:>24} [{bar:30}] {pos:>10}/{len:10} rows {msg} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars: Vec<(QualifiedName, ProgressBar)> = self
            .order
            .iter()
            .map(|t| {
                let expected = self.tables.get(t).map(|c| c.expected_rows).unwrap_or(0);
                let bar = multi.add(ProgressBar::new(expected.max(1)));
                bar.set_style(style.clone());
                bar.set_prefix(t.to_string());
                (t.clone(), bar)
            })
            .collect();
        loop {
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            for (t, bar) in &bars {
                let (rows, bytes) = self.table_totals(t);
                if rows > bar.length().unwrap_or(0) {
                    bar.set_length(rows);
                }
                bar.set_position(rows);
                bar.set_message(format!("{:.1} MB/s", bytes as f64 / 1e6 / secs));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn log_periodically(&self) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            tick.tick().await;
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            for t in &self.order {
                let (rows, bytes) = self.table_totals(t);
                let expected = self.tables.get(t).map(|c| c.expected_rows).unwrap_or(0);
                tracing::info!(
                    table = %t,
                    rows,
                    expected_rows = expected,
                    mb_per_s = format!("{:.1}", bytes as f64 / 1e6 / secs),
                    "copy progress"
                );
            }
        }
    }
}
