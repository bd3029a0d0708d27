//! Writers for fault tests: a writer that rides through server restarts and lost
//! connections by reconnecting, a small batch workload whose tables show
//! duplicates and partially applied transactions, and a steady row writer for DDL
//! tests.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{try_connect, wait_until, RunChild};

/// A writer task committing one SQL text (usually `BEGIN; …; COMMIT;`) per
/// iteration until stopped. On any error it drops the connection and reconnects, so
/// it rides through restarts; a transaction whose outcome is unknown is not counted
/// (the source itself is the truth the target is compared to).
pub struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    tries: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Starts writing to `url`: iteration `i` (1, 2, 3, …; never reused, even after
    /// an error) runs `make_sql(i)`, then sleeps `pause`.
    pub fn spawn<F>(url: String, pause: Duration, mut make_sql: F) -> Writer
    where
        F: FnMut(u64) -> String + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let tries = Arc::new(AtomicU64::new(0));
        let (s, c, e, t) = (
            stop.clone(),
            committed.clone(),
            errors.clone(),
            tries.clone(),
        );
        let handle = tokio::spawn(async move {
            let mut client: Option<Client> = None;
            let mut i: u64 = 0;
            let mut last_error_print = Instant::now() - Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) {
                t.fetch_add(1, Ordering::Relaxed);
                let Some(conn) = client.as_ref() else {
                    client = try_connect(&url).await;
                    if client.is_none() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                };
                i += 1;
                let sql = make_sql(i);
                match conn.batch_execute(&sql).await {
                    Ok(()) => {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        e.fetch_add(1, Ordering::Relaxed);
                        // A lost connection, or a failed statement whose transaction
                        // is aborted: start over on a fresh connection either way.
                        if !conn.is_closed()
                            && err.as_db_error().is_some()
                            && last_error_print.elapsed() > Duration::from_secs(5)
                        {
                            let what = err
                                .as_db_error()
                                .map(|d| format!("{}: {}", d.code().code(), d.message()))
                                .unwrap_or_else(|| err.to_string());
                            eprintln!("writer iteration {i}: {what}");
                            last_error_print = Instant::now();
                        }
                        client = None;
                    }
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        });
        Writer {
            stop,
            committed,
            errors,
            tries,
            handle,
        }
    }

    /// Iterations so far, failed connection attempts included: a writer that cannot
    /// connect still counts up.
    pub fn tries(&self) -> u64 {
        self.tries.load(Ordering::Relaxed)
    }

    /// Transactions committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Failed iterations so far (lost connections, aborted transactions).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Whether the task has ended (it only does when stopped, or by panicking).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops the writer and waits for its last transaction to end. Returns
    /// (committed, errors).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let (committed, errors) = (self.committed.clone(), self.errors.clone());
        self.handle.await.expect("writer panicked");
        (
            committed.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
        )
    }

    /// Waits until `more` transactions beyond now are committed, failing at once if
    /// `run` exits, and after `timeout`.
    pub async fn wait_for_more(
        &self,
        run: &mut RunChild,
        more: u64,
        timeout: Duration,
        what: &str,
    ) {
        let from = self.committed();
        super::wait_while_running(
            &format!("{more} more writer commits {what}"),
            timeout,
            run,
            || async { self.committed() >= from + more },
        )
        .await;
    }
}

/// Tables of the batch workload: `ev` (keyed, with watermark columns), `ev_log`
/// (no key, REPLICA IDENTITY FULL: a transaction applied twice shows as extra rows)
/// and `acc` (100 keyed rows, updated in place).
pub const BATCH_SCHEMA: &str = "
    CREATE TABLE ev (id bigserial PRIMARY KEY, batch int NOT NULL, n int NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now(),
                     updated_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE ev_log (batch int NOT NULL, n int NOT NULL);
    ALTER TABLE ev_log REPLICA IDENTITY FULL;
    CREATE TABLE acc (id int PRIMARY KEY, v bigint NOT NULL,
                      created_at timestamptz NOT NULL DEFAULT now(),
                      updated_at timestamptz NOT NULL DEFAULT now());
    INSERT INTO acc (id, v) SELECT g, 0 FROM generate_series(0, 99) g;";

/// The batch workload's tables.
pub const BATCH_TABLES: &[&str] = &["ev", "ev_log", "acc"];

/// One transaction of the batch workload: ten rows into `ev` and `ev_log`, one
/// `acc` row incremented.
pub fn batch_sql(batch: u64) -> String {
    let mut sql = String::from("BEGIN;");
    for n in 1..=10 {
        sql.push_str(&format!(
            "INSERT INTO ev (batch, n) VALUES ({batch}, {n}); INSERT INTO ev_log (batch, n) VALUES ({batch}, {n});"
        ));
    }
    sql.push_str(&format!(
        "UPDATE acc SET v = v + 1, updated_at = now() WHERE id = {};COMMIT;",
        batch % 100
    ));
    sql
}

/// Asserts the target holds no duplicate `ev` ids and no `ev_log` batch with other
/// than ten rows (applied partially or twice).
pub async fn assert_batches_exactly_once(tgt: &Client) {
    let dupes: i64 = tgt
        .query_one("SELECT count(*) - count(DISTINCT id) FROM ev", &[])
        .await
        .expect("count ev duplicates")
        .get(0);
    assert_eq!(dupes, 0, "duplicate ids in ev on the target");
    let partial: Vec<(i32, i64)> = tgt
        .query(
            "SELECT batch, count(*) FROM ev_log GROUP BY batch HAVING count(*) <> 10 ORDER BY batch LIMIT 20",
            &[],
        )
        .await
        .expect("check ev_log batches")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        partial.is_empty(),
        "ev_log batches applied partially or twice on the target: {partial:?}"
    );
}

/// Inserts one row per transaction (`sql` takes the row number as `$1`, a bigint)
/// until stopped: a steady writer whose statements stay valid across the DDL.
pub struct RowWriter {
    stop: Arc<AtomicBool>,
    next: Arc<AtomicI64>,
    handle: tokio::task::JoinHandle<()>,
}

impl RowWriter {
    /// Starts writing, the first row numbered `first`.
    pub fn start(client: Client, sql: &'static str, first: i64) -> RowWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicI64::new(first));
        let (s, n) = (Arc::clone(&stop), Arc::clone(&next));
        let handle = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let id = n.load(Ordering::Relaxed);
                client
                    .execute(sql, &[&id])
                    .await
                    .unwrap_or_else(|e| panic!("writer: {sql}: {e:?}"));
                n.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        RowWriter { stop, next, handle }
    }

    /// Waits until `rows` more rows are written.
    pub async fn wait_for(&self, rows: i64) {
        let goal = self.next.load(Ordering::Relaxed) + rows;
        wait_until("the writer to go on", Duration::from_secs(60), || async {
            self.next.load(Ordering::Relaxed) >= goal
        })
        .await;
    }

    /// Stops it; panics if a write failed.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("the writer failed");
    }
}
