//! The session loop: messages and ticks, the watchdogs armed while a step
//! waits, and the periodic work.

use super::*;

impl Session<'_> {
    pub(super) async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        let mut tick = tokio::time::interval(self.cfg.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut clocks = Clocks {
            last_expiry: Instant::now(),
            last_switchover: Instant::now(),
        };
        loop {
            if *shutdown.borrow() {
                // A stalled target must not keep a stop from finishing: what was
                // not confirmed is simply streamed again next time.
                match tokio::time::timeout(STOP_TIMEOUT, self.stop()).await {
                    Ok(result) => result?,
                    Err(_) => {
                        tracing::warn!("the target did not answer while stopping; stopping anyway (nothing is lost: unconfirmed changes are sent again)");
                        return Ok(());
                    }
                }
                self.settle_restart_point().await;
                // The replication task sends the final position, asks for a reply
                // and waits for it: the walsender answers after it has taken the
                // position in, so the slot shows it once this process is gone.
                self.publish_flush();
                self.io.stop_gracefully().await;
                tracing::info!(applied = %self.applied, flushed = %self.flush_position(), "stopped cleanly");
                return Ok(());
            }
            let event = tokio::select! {
                message = self.io.recv() => Event::Message(message?),
                _ = tick.tick() => Event::Tick,
                _ = shutdown.changed() => continue,
            };
            // A step may take long (a large keyless update, a table copied again)
            // and is never cut short while it works; it is abandoned when the source
            // goes silent (the replication task notices) or the target stops
            // answering or making progress.
            let fault = self.io.fault_watch();
            let watchdog = watch_target(
                Arc::clone(&self.monitor),
                self.backend_pids(),
                Arc::clone(&self.progress),
                self.receive_timeout,
            );
            let alarm = {
                let mut step = std::pin::pin!(self.on_event(event, &mut clocks));
                // Most messages are handled without waiting for anything (a change is
                // buffered for the next flush): those never arm the watchdogs (a timer
                // and a watch per message were about a quarter of walshuttle's CPU in a
                // backlog of single-row transactions, bench/backlog.sh).
                if let Some(done) = futures_util::FutureExt::now_or_never(step.as_mut()) {
                    done?;
                    continue;
                }
                tokio::select! {
                    done = step => { done?; None }
                    why = source_fault(fault) => Some(why),
                    why = watchdog => Some(why),
                }
            };
            if let Some(why) = alarm {
                return Err(self.on_watchdog(why));
            }
        }
    }

    /// Reads how much WAL the slot holds back on the source (for `/metrics`), and
    /// ends the session with [`wal_budget::OverBudget`] once it reaches the budget.
    pub(super) async fn record_slot_wal(&mut self) -> Result<()> {
        let Some(wal) = wal_budget::measure(&self.source_sql, &self.cfg.slot).await? else {
            return Ok(());
        };
        let limit = wal_budget::limit(self.cfg.max_retained_wal, wal.keep_size);
        crate::observe::slot_wal(wal.retained, wal.keep_size, limit);
        match wal_budget::judge(wal, self.cfg.max_retained_wal) {
            wal_budget::Verdict::Release => Err(wal_budget::OverBudget {
                slot: self.cfg.slot.clone(),
                retained: wal.retained,
                limit: limit.unwrap_or(wal.retained),
            }
            .into()),
            wal_budget::Verdict::Warn => {
                if !self.budget_warned {
                    tracing::warn!(slot = %self.cfg.slot, retained = wal.retained, limit = ?limit, "the slot holds over 80% of its WAL budget: at the budget it is dropped and the gap later repaired by catch-up");
                    self.budget_warned = true;
                }
                Ok(())
            }
            wal_budget::Verdict::Fine => {
                self.budget_warned = false;
                Ok(())
            }
        }
    }

    /// Backend process ids of every apply connection on the target.
    pub(super) fn backend_pids(&self) -> Vec<i32> {
        let mut pids = vec![self.main_pid];
        pids.extend(self.streams.values().map(|s| s.pid));
        pids.extend(self.lanes.pids());
        pids
    }

    /// What a watchdog's alarm means for this session. A wait on itself is resolved
    /// the way a streamed transaction that changes a table's definition is: the
    /// streamed transaction holding the lock is rolled back (when the session ends)
    /// and received again from its start, to be applied whole at its commit, after
    /// every transaction committed before it; the waiter then goes first. A holder
    /// that is not a streamed transaction cannot happen (the main connection commits
    /// before a streamed block is applied): the session ends and reconnects.
    pub(super) fn on_watchdog(&mut self, why: anyhow::Error) -> anyhow::Error {
        let Some(wait) = why.downcast_ref::<SelfWait>() else {
            return why;
        };
        let (waiter, holder) = (wait.waiter, wait.holder);
        let role = |pid: i32| -> String {
            if pid == self.main_pid {
                return "the main apply session".into();
            }
            if self.lanes.has_pid(pid) {
                return "an apply lane (a batch committed earlier on the source)".into();
            }
            match self.streams.iter().find(|(_, s)| s.pid == pid) {
                Some((xid, _)) => format!("streamed source transaction {xid}"),
                None => "an apply session".into(),
            }
        };
        let (waiter_role, holder_role) = (role(waiter), role(holder));
        let held_by = self
            .streams
            .iter()
            .find(|(_, s)| s.pid == holder)
            .map(|(xid, _)| *xid);
        tracing::warn!(waiter, holder, waiter_is = %waiter_role, holder_is = %holder_role, "an apply session waits for walshuttle's own session on the target (a constraint only the target has, such as a unique index, makes two source transactions collide)");
        match held_by {
            Some(xid) => {
                self.cfg.memory.apply_whole(xid);
                anyhow::anyhow!(
                    "{waiter_role} (pid {waiter}) waits for walshuttle's own {holder_role} (pid {holder}) on the target, which commits later on the source: a constraint only the target has (a unique index?) makes them collide; receiving transaction {xid} again, to apply it whole at its commit after the ones before it; reconnecting"
                )
            }
            None if self.lanes.has_pid(holder) || self.lanes.has_pid(waiter) => {
                // The lane rule should make this impossible; should a target's
                // schema still make two batches wait on each other, this process
                // applies on one connection from now on.
                self.cfg.memory.apply_serially();
                why.context(format!(
                    "{waiter_role} waits for walshuttle's own {holder_role}: applying on one connection from now on; reconnecting"
                ))
            }
            None => why.context(format!(
                "{waiter_role} waits for walshuttle's own {holder_role}: reconnecting"
            )),
        }
    }

    pub(super) async fn on_event(&mut self, event: Event, clocks: &mut Clocks) -> Result<()> {
        match event {
            Event::Message(Incoming::Data {
                wal_start, data, ..
            }) => {
                self.received = self.received.max(wal_start);
                let message =
                    decoder::decode_bytes(&data, self.in_stream.is_some()).map_err(|e| {
                        anyhow::anyhow!("malformed replication message at {wal_start}: {e}")
                    })?;
                // A spooled transaction's changes go to disk as they came.
                // Captured DDL is kept like a change of its subtransaction.
                let sub = change_subxid(&message).or_else(|| match &message {
                    LogicalMessage::Message(m) if self.ddl_prefix.as_deref() == Some(&m.prefix) => {
                        m.xid
                    }
                    _ => None,
                });
                let spool = self.in_stream.and_then(|top| self.spooled.get_mut(&top));
                match (spool, sub) {
                    (Some(spool), Some(sub)) => spool.append(sub, &data)?,
                    // Its shape changes are applied at their place when it commits.
                    (Some(spool), None) if matches!(message, LogicalMessage::Relation(_)) => {
                        spool.append_relation(&data)
                    }
                    _ => self.handle(message).await?,
                }
            }
            Event::Message(Incoming::Keepalive { wal_end }) => {
                self.received = self.received.max(wal_end);
                if self.is_idle() {
                    self.idle_wal_end = self.idle_wal_end.max(wal_end);
                    self.publish_flush();
                }
                let applied = self.flush_position().max(self.applied);
                crate::observe::stream_position(wal_end, applied, self.is_idle());
            }
            Event::Tick => self.on_tick(clocks).await?,
        }
        // Coalesce while more is already waiting; commit as soon as the stream
        // goes quiet, whatever message came last.
        if self.batch_txns > 0
            && self.current.is_none()
            && self.in_stream.is_none()
            && !self.io.has_waiting()
        {
            self.commit_all().await?;
        }
        Ok(())
    }

    /// The periodic work: commit a waiting batch, learn what is durable, report to
    /// the source, record the oldest open source transaction.
    pub(super) async fn on_tick(&mut self, clocks: &mut Clocks) -> Result<()> {
        if self.current.is_none() {
            self.commit_all().await?;
        } else {
            self.collect_ready().await?;
        }
        if self.is_idle() && self.tables_changing().await? {
            // A copy by `walshuttle tables` is running or just in: its held changes
            // are applied, and the table joins, without waiting for the next source
            // transaction.
            loop {
                let version = self.main.begin().await?;
                self.refresh_positions(version).await?;
                self.replay_held().await?;
                self.main.commit("SELECT 1").await?;
                if self.replay_tables.is_empty() || self.io.has_waiting() {
                    break;
                }
            }
        }
        self.resync_pending().await?;
        self.durability.check().await?;
        self.publish_flush();
        let applied = self.flush_position().max(self.applied);
        crate::observe::stream_position(self.received, applied, self.is_idle());
        if clocks.last_switchover.elapsed() >= Duration::from_secs(1) {
            // A `walshuttle switchover` records its phase on the target; /metrics
            // shows it while it runs.
            clocks.last_switchover = Instant::now();
            match self
                .cfg
                .state
                .switchover(&*self.monitor, &self.cfg.slot)
                .await
            {
                Ok(s) => crate::observe::switchover_phase(s.as_ref().map(|(p, _, _)| p.as_str())),
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "could not read the switchover phase")
                }
            }
        }
        if clocks.last_expiry.elapsed() >= Duration::from_secs(10) {
            // Copy positions the stream has passed are forgotten on the target too.
            self.cfg
                .state
                .expire_positions(&*self.monitor, &self.cfg.slot, self.durability.durable())
                .await?;
            self.record_slot_wal().await?;
            clocks.last_expiry = Instant::now();
        }
        Ok(())
    }

    /// Whether a `walshuttle tables` command may be waiting on this session: a table
    /// is held or copied, or the pipeline's tables or positions changed since they
    /// were read.
    pub(super) async fn tables_changing(&self) -> Result<bool> {
        if !(self.held_tables.is_empty() && self.replay_tables.is_empty()) {
            return Ok(true);
        }
        let version = self
            .cfg
            .state
            .positions_version(&*self.monitor, &self.cfg.slot)
            .await?;
        Ok(version != self.positions.version())
    }
}
