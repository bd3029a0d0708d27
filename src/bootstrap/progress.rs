//! Copy progress: per-table bars (rows, MB/s, ETA) when stderr is a terminal,
//! otherwise one log line per interval for the whole copy (tables done, rows,
//! bytes, percent, ETA): 2,000 tables must not make 2,000 lines a tick.

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
    /// Chunks of this run not copied yet.
    pub chunks_left: AtomicU64,
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

    /// Chunks this run copies, one entry per chunk (a table without any is done).
    pub fn expect_chunks<'a>(&self, tables: impl IntoIterator<Item = &'a QualifiedName>) {
        for t in tables {
            if let Some(c) = self.tables.get(t) {
                c.chunks_left.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a chunk of `table` committed.
    pub fn chunk_done(&self, table: &QualifiedName) {
        if let Some(c) = self.tables.get(table) {
            let _ = c
                .chunks_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// One line's worth: (tables done, tables, rows, expected rows, bytes).
    fn totals(&self) -> (usize, usize, u64, u64, u64) {
        let mut out = (0, self.tables.len(), 0, 0, 0);
        for c in self.tables.values() {
            if c.chunks_left.load(Ordering::Relaxed) == 0 {
                out.0 += 1;
            }
            out.2 += c.rows.load(Ordering::Relaxed);
            out.3 += c.expected_rows;
            out.4 += c.bytes.load(Ordering::Relaxed);
        }
        out
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
            let (done, tables, rows, expected, bytes) = self.totals();
            let line = progress_line(done, tables, rows, expected, bytes, secs);
            tracing::info!(
                tables_done = done,
                tables,
                rows,
                bytes,
                percent = line.percent,
                eta_s = line.eta_s,
                "copy progress: {}",
                line.text
            );
        }
    }
}

/// The numbers and text of one progress line.
struct ProgressLine {
    percent: Option<f64>,
    eta_s: Option<u64>,
    text: String,
}

/// Percent from the planner's row estimates (capped below 100 until every table
/// is done, as estimates run short) and an ETA from the rate so far.
fn progress_line(
    done: usize,
    tables: usize,
    rows: u64,
    expected: u64,
    bytes: u64,
    secs: f64,
) -> ProgressLine {
    let percent = (expected > 0).then(|| {
        if done == tables {
            100.0
        } else {
            ((rows as f64 * 1000.0 / expected as f64).round() / 10.0).min(99.9)
        }
    });
    let eta_s = (rows > 0 && expected > rows && done < tables)
        .then(|| ((expected - rows) as f64 * secs / rows as f64).round() as u64);
    let text = format!(
        "{done} of {tables} tables done, {rows} rows, {:.1} MB ({:.1} MB/s){}{}",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs,
        percent.map(|p| format!(", {p:.1}%")).unwrap_or_default(),
        eta_s.map(|e| format!(", ETA {e} s")).unwrap_or_default()
    );
    ProgressLine {
        percent,
        eta_s,
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_for_the_whole_copy() {
        let l = progress_line(3, 10, 500, 1000, 2_000_000, 10.0);
        assert_eq!(l.percent, Some(50.0));
        assert_eq!(l.eta_s, Some(10));
        assert_eq!(
            l.text,
            "3 of 10 tables done, 500 rows, 2.0 MB (0.2 MB/s), 50.0%, ETA 10 s"
        );
        // Estimates that run short never show 100% before the end.
        assert_eq!(progress_line(9, 10, 2000, 1000, 0, 1.0).percent, Some(99.9));
        assert_eq!(
            progress_line(10, 10, 2000, 1000, 0, 1.0).percent,
            Some(100.0)
        );
        assert_eq!(progress_line(0, 1, 0, 0, 0, 1.0).percent, None);
    }
}
