//! Closing batches and committing them: on the main connection, or handed to a
//! lane and committed in source order (see [`crate::stream::lanes`]); what is
//! durable, and the position reported to the source.

use super::*;

impl Session<'_> {
    /// Closes the batch of complete source transactions in the main session: hands
    /// it to a lane when lanes are on (it commits later, in order), else commits it.
    pub(super) async fn commit_batch(&mut self) -> Result<()> {
        if self.batch_txns == 0 {
            return Ok(());
        }
        let Some((end_lsn, commit_time)) = self.batch_last else {
            return Ok(());
        };
        if !(self.lanes.parallel()
            && self.joins.held_rows.is_empty()
            && self.joins.resync.is_empty())
        {
            return self.commit_batch_here(end_lsn, commit_time).await;
        }
        // Its transaction must be open to carry the progress row, even when every
        // change of the batch was skipped.
        self.main.begin().await?;
        if self.lanes.full() {
            self.commit_lanes(1).await?;
        }
        let (next, next_pid) = match self.lanes.take_idle() {
            Some(idle) => idle,
            None => {
                let client = connect(self.target, "apply lane").await?;
                let pid = backend_pid(&client).await?;
                client
                    .batch_execute("SET idle_in_transaction_session_timeout = '5min'")
                    .await
                    .pg_context(|| "configuring an apply lane on the target".into())?;
                let session = TargetSession::new(
                    client,
                    &self.cfg.target,
                    self.cfg.state.apply_begin_sql(&self.cfg.slot),
                )
                .await?;
                (session, pid)
            }
        };
        let session = std::mem::replace(&mut self.main, next);
        let pid = std::mem::replace(&mut self.main_pid, next_pid);
        let batch = Batch {
            session,
            pid,
            keys: std::mem::take(&mut self.main_keys),
            end_lsn,
            commit_time,
            txns: self.batch_txns,
            commit_sql: self.progress_sql(end_lsn, commit_time),
        };
        self.lanes.hand_off(batch, Arc::clone(&self.relations));
        self.batch_txns = 0;
        self.main_mark = 0;
        self.main_has_partial = false;
        self.batch_last = None;
        self.collect_ready().await
    }

    /// Commits the batch of the main session on it, after every batch in flight.
    pub(super) async fn commit_batch_here(
        &mut self,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<()> {
        self.drain_lanes().await?;
        self.main.flush(&self.relations).await?;
        self.main.begin().await?;
        self.flush_held().await?;
        let sql = self.progress_sql(end_lsn, commit_time);
        let target_lsn = self.main.commit(&sql).await?;
        if let Some(took) = self.main.last_commit_took() {
            self.batch_age.commit_took(took);
        }
        self.main_keys = ConflictKeys::default();
        self.committed(end_lsn, target_lsn);
        crate::observe::transactions_applied(self.batch_txns, commit_time);
        self.batch_txns = 0;
        self.main_mark = 0;
        self.main_has_partial = false;
        self.batch_last = None;
        self.report_after_commit().await?;
        self.resync_pending().await
    }

    /// Closes the batch and commits everything in flight: when the stream is
    /// quiet, and before anything that must see every earlier transaction applied.
    pub(super) async fn commit_all(&mut self) -> Result<()> {
        self.commit_batch().await?;
        self.drain_lanes().await
    }

    /// Commits every batch in flight, in order.
    pub(super) async fn drain_lanes(&mut self) -> Result<()> {
        self.commit_lanes(self.lanes.len()).await
    }

    /// Before work on the main connection that is not a row change named by its
    /// conflict keys (a TRUNCATE, a table's shape, held changes): every batch in
    /// flight commits first, and the main transaction counts as touching every row.
    pub(super) async fn barrier(&mut self) -> Result<()> {
        if !self.lanes.parallel() {
            return Ok(());
        }
        self.drain_lanes().await?;
        self.main_keys = ConflictKeys::all();
        Ok(())
    }

    /// Sends the main session's buffered changes once every batch in flight that
    /// shares a row with them has committed.
    pub(super) async fn send_main(&mut self) -> Result<()> {
        let n = self
            .lanes
            .must_commit_before(&self.main_keys)
            .max(self.lanes.must_commit_before(&self.txn_keys));
        self.commit_lanes(n).await?;
        self.main.flush(&self.relations).await
    }

    /// Commits the oldest `n` batches in flight, in order (waiting for each to have
    /// sent its statements).
    pub(super) async fn commit_lanes(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for _ in 0..n {
            if !self.commit_oldest_lane().await? {
                break;
            }
        }
        self.report_after_commit().await
    }

    /// Commits the oldest batches in flight that have sent everything, without
    /// waiting for any.
    pub(super) async fn collect_ready(&mut self) -> Result<()> {
        if !self.lanes.oldest_ready() {
            return Ok(());
        }
        while self.lanes.oldest_ready() {
            self.commit_oldest_lane().await?;
        }
        self.report_after_commit().await
    }

    /// Commits the oldest batch in flight and records it; false when none is.
    async fn commit_oldest_lane(&mut self) -> Result<bool> {
        let Some(done) = self.lanes.commit_oldest().await? else {
            return Ok(false);
        };
        self.committed(done.end_lsn, done.target_lsn);
        if let Some(took) = done.commit_took {
            self.batch_age.commit_took(took);
        }
        crate::observe::transactions_applied(done.txns, done.commit_time);
        Ok(true)
    }

    /// Most source transactions in one batch: smaller batches when lanes are on, so
    /// that several are in flight at once.
    pub(super) fn max_batch_txns(&self) -> usize {
        if self.lanes.parallel() {
            MAX_LANE_BATCH_TXNS
        } else {
            MAX_BATCH_TXNS
        }
    }

    /// After a commit: learn what has become durable (at most every 100 ms, since the
    /// target flushes asynchronous commits in the background) and tell the source.
    pub(super) async fn report_after_commit(&mut self) -> Result<()> {
        if self.durability.check_due() {
            self.durability.check().await?;
        }
        self.send_status(false).await
    }

    pub(super) fn committed(&mut self, end_lsn: Lsn, target_lsn: Option<Lsn>) {
        self.applied = self.applied.max(end_lsn);
        if !self.positions.is_empty() {
            self.positions.expire(self.applied);
            if self.positions.is_empty() {
                tracing::info!(lsn = %end_lsn, "the stream has passed every range copied outside it");
            }
        }
        self.durability.committed(end_lsn, target_lsn);
    }

    /// SQL run inside each apply transaction before COMMIT: the progress row, and
    /// the tables that must be copied again (so that need survives a crash).
    pub(super) fn progress_sql(&self, end_lsn: Lsn, commit_time: PgTimestamp) -> String {
        let mut sql =
            self.cfg
                .state
                .progress_sql(&self.cfg.slot, end_lsn, commit_time.unix_micros());
        if !self.joins.resync.is_empty() {
            sql.push_str("; ");
            sql.push_str(
                &self
                    .cfg
                    .state
                    .resync_sql(&self.cfg.slot, &self.joins.resync),
            );
        }
        sql
    }

    /// The position the source may free WAL up to.
    pub(super) fn flush_position(&self) -> Lsn {
        if self.durability.all_durable() && self.is_idle() {
            self.durability.durable().max(self.idle_wal_end)
        } else {
            self.durability.durable()
        }
    }

    /// Publishes the flush position to the replication task, which reports it with
    /// every status update.
    pub(super) fn publish_flush(&self) {
        self.io.set_flush(self.flush_position());
    }

    /// Publishes the flush position and sends a status update now.
    pub(super) async fn send_status(&mut self, ask_reply: bool) -> Result<()> {
        self.publish_flush();
        self.io.send_status(ask_reply).await
    }
}
