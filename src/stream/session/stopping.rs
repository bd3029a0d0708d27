//! A clean stop: commit complete work, drop partial work, make every commit
//! durable, and leave the slot's restart point past what was applied.

use super::*;

impl Session<'_> {
    /// Clean stop: commit complete work, drop partial work (the source re-sends it),
    /// make every commit durable, report the final position.
    pub(super) async fn stop(&mut self) -> Result<()> {
        if self.current.is_some() {
            if self.main_has_partial {
                self.held_rows.clear();
                self.main.rollback().await?;
                self.batch_txns = 0;
            } else {
                let _partial = self.main.split_off(self.main_mark);
            }
            self.current = None;
        }
        self.commit_all().await?;
        for (_, mut st) in self.streams.drain() {
            st.session.rollback().await?;
        }
        // A synchronous commit that writes WAL flushes the target's WAL up to and
        // past every asynchronous commit before it (a transaction that writes no WAL
        // commits asynchronously whatever the setting); then wait for it to show.
        let touch = format!(
            "BEGIN; SET LOCAL synchronous_commit = on; {}; COMMIT",
            self.cfg.state.progress_touch_sql(&self.cfg.slot)
        );
        self.main
            .client
            .batch_execute(&touch)
            .await
            .pg_context(|| "flushing the target's WAL before stopping".into())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            self.durability.check().await?;
            if self.durability.all_durable() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// After a clean stop's last commit: when the slot's restart point lags what is
    /// confirmed by more than [`restart_point::WORTH_WAITING`] (a large transaction
    /// committed moments ago), keeps confirming the source's keepalives until the
    /// walsender decodes a record of running transactions and moves the point, at
    /// most [`restart_point::WAIT`]. Best effort: a new transaction arriving, or a
    /// source that does not answer, ends the wait.
    pub(super) async fn settle_restart_point(&mut self) {
        if !(self.is_idle() && self.durability.all_durable()) {
            return;
        }
        let confirmed = self.flush_position();
        let Some(first) = restart_point::read(&self.source_sql, &self.cfg.slot).await else {
            return;
        };
        if !restart_point::worth_waiting(first, confirmed) {
            return;
        }
        // The source answered: `run`'s stop deadline now covers the request, the
        // wait and the final status update.
        self.cfg.stop_extension.extend_until(
            tokio::time::Instant::now() + restart_point::WAIT + Duration::from_secs(10),
        );
        let behind_mib = (confirmed.0 - first.0) >> 20;
        let requested = restart_point::request_running_xacts(&self.source_sql).await;
        tracing::info!(
            restart = %first,
            behind_mib,
            requested,
            "waiting (at most {} s) for the source to move the slot's restart point past what was applied, so that the next start does not decode it again",
            restart_point::WAIT.as_secs()
        );
        let deadline = tokio::time::Instant::now() + restart_point::WAIT;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = self.io.recv() => match message {
                    Ok(Incoming::Keepalive { wal_end }) => {
                        // Idle: everything up to the walsender's position is applied.
                        self.idle_wal_end = self.idle_wal_end.max(wal_end);
                        if self.send_status(false).await.is_err() {
                            return;
                        }
                    }
                    // A new transaction: it is not applied while stopping, so
                    // nothing past it can be confirmed.
                    Ok(Incoming::Data { .. }) | Err(_) => {
                        tracing::info!("the source sent a new transaction; stopping without waiting for the restart point");
                        return;
                    }
                },
                _ = poll.tick() => match restart_point::read(&self.source_sql, &self.cfg.slot).await {
                    Some(now) if now > first => {
                        tracing::info!(restart = %now, "the slot's restart point moved");
                        return;
                    }
                    Some(_) => {}
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!(restart = %first, "the slot's restart point did not move in time; the next start decodes from it");
                    return;
                }
            }
        }
    }
}
