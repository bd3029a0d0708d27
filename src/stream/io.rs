//! The replication connection's own task: it reads the walsender's messages ahead of
//! the apply path (a bounded amount), answers its keepalives and sends standby
//! status updates on time, and notices a silent source, all while the apply path may
//! be busy with a long but valid step on the target (a large keyless update, a table
//! copied again). The flush position it reports is the one the apply path last
//! published: only what the target has durably committed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::pg::replication::{ReplicationMessage, ReplicationStream};
use crate::pg::Lsn;

/// Bytes of messages read ahead of the apply path.
const READ_AHEAD_BYTES: usize = 16 * 1024 * 1024;
/// Messages read ahead of the apply path.
const READ_AHEAD_MESSAGES: usize = 4096;

/// Messages waiting that mean the apply path is behind: under TPC-B at 2,000
/// transactions/s (7 messages each) about 35 ms of input.
const BEHIND_MESSAGES: u64 = 512;

/// One message for the apply path.
pub enum Incoming {
    /// A pgoutput message.
    Data {
        /// WAL position of its record.
        wal_start: Lsn,
        /// The pgoutput payload.
        data: Bytes,
        /// Holds its share of the read-ahead budget until it is handled.
        _budget: OwnedSemaphorePermit,
    },
    /// A keepalive: the server's end of WAL.
    Keepalive {
        /// The server's end of WAL.
        wal_end: Lsn,
    },
}

enum Command {
    Status { ask_reply: bool },
    Stop { done: oneshot::Sender<()> },
}

/// Positions shared between the apply path (writer) and the I/O task (reader).
#[derive(Default)]
struct Shared {
    received: AtomicU64,
    flush: AtomicU64,
    /// Messages handed over and not yet taken (the apply path coalesces while more
    /// are waiting).
    waiting: AtomicU64,
    /// Whether the socket held another whole message when the last one was read.
    more_buffered: AtomicU64,
}

/// The apply path's handle on the replication connection; dropping it ends the
/// connection.
pub struct StreamIo {
    rx: mpsc::Receiver<Incoming>,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    fault: watch::Receiver<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StreamIo {
    /// Takes over `stream`, which starts at `start` and whose confirmed (durable)
    /// position is `flushed`; status every `interval` (asking for a reply, so a live
    /// source always answers), and a source silent for `receive_timeout` is a fault.
    pub fn start(
        stream: ReplicationStream,
        start: Lsn,
        flushed: Lsn,
        interval: Duration,
        receive_timeout: Duration,
    ) -> StreamIo {
        let (tx, rx) = mpsc::channel(READ_AHEAD_MESSAGES);
        let (commands, cmd_rx) = mpsc::channel(16);
        let (fault_tx, fault) = watch::channel(None);
        let shared = Arc::new(Shared::default());
        shared.received.store(start.0, Ordering::Relaxed);
        shared.flush.store(flushed.0, Ordering::Relaxed);
        let task = tokio::spawn(io_task(
            stream,
            tx,
            cmd_rx,
            Arc::clone(&shared),
            fault_tx,
            interval,
            receive_timeout,
        ));
        StreamIo {
            rx,
            commands,
            shared,
            fault,
            task,
        }
    }

    /// The next message; an error when the connection failed.
    pub async fn recv(&mut self) -> Result<Incoming> {
        match self.rx.recv().await {
            Some(m) => {
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                Ok(m)
            }
            None => Err(self.failure()),
        }
    }

    /// Whether another message is already waiting (read or buffered): the apply
    /// path keeps coalescing transactions while this is true.
    pub fn has_waiting(&self) -> bool {
        self.shared.waiting.load(Ordering::Relaxed) > 0
            || self.shared.more_buffered.load(Ordering::Relaxed) > 0
    }

    /// Whether more messages wait than a few dozen small transactions have: the
    /// source sends faster than the apply path takes (a backlog, or a load the
    /// apply only keeps up with in bigger batches).
    pub fn is_behind(&self) -> bool {
        self.shared.waiting.load(Ordering::Relaxed) >= BEHIND_MESSAGES
    }

    fn failure(&self) -> anyhow::Error {
        match self.fault.borrow().clone() {
            Some(why) => anyhow::anyhow!("{why}"),
            None => anyhow::anyhow!("the replication connection ended"),
        }
    }

    /// The highest WAL position the source has sent.
    pub fn received(&self) -> Lsn {
        Lsn(self.shared.received.load(Ordering::Relaxed))
    }

    /// Publishes the position the source may free WAL up to.
    pub fn set_flush(&self, flush: Lsn) {
        self.shared.flush.fetch_max(flush.0, Ordering::Relaxed);
    }

    /// Sends a status update now.
    pub async fn send_status(&self, ask_reply: bool) -> Result<()> {
        self.commands
            .send(Command::Status { ask_reply })
            .await
            .map_err(|_| self.failure())
    }

    /// Sends the final status, waits (briefly) for the source to take it in, and
    /// closes the connection.
    pub async fn stop_gracefully(&mut self) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Stop { done }).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(4), wait).await;
        }
    }

    /// A receiver of the connection's fault (set once, when it fails).
    pub fn fault_watch(&self) -> watch::Receiver<Option<String>> {
        self.fault.clone()
    }
}

async fn send_status(
    stream: &mut ReplicationStream,
    shared: &Shared,
    ask_reply: bool,
    limit: Duration,
) -> Result<(), String> {
    let flush = Lsn(shared.flush.load(Ordering::Relaxed));
    let received = Lsn(shared.received.load(Ordering::Relaxed)).max(flush);
    match tokio::time::timeout(limit, stream.send_status(received, flush, flush, ask_reply)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("sending a status update to the source: {e}")),
        Err(_) => Err(format!(
            "the source took no status update for {} s (stalled connection?): reconnecting",
            limit.as_secs()
        )),
    }
}

async fn io_task(
    mut stream: ReplicationStream,
    tx: mpsc::Sender<Incoming>,
    mut commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    fault: watch::Sender<Option<String>>,
    interval: Duration,
    receive_timeout: Duration,
) {
    let budget = Arc::new(Semaphore::new(READ_AHEAD_BYTES));
    let mut tick = tokio::time::interval(interval.min(receive_timeout / 2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_received = Instant::now();
    // A message read and not yet handed over, and its share of the read-ahead
    // budget once granted (waiting for either never stops the status updates).
    let mut pending: Option<ReplicationMessage> = None;
    let mut granted: Option<OwnedSemaphorePermit> = None;
    let outcome: Result<(), String> = loop {
        let needs_budget =
            matches!(pending, Some(ReplicationMessage::XLogData { .. })) && granted.is_none();
        let deliverable = pending.is_some() && !needs_budget;
        let want = match &pending {
            Some(ReplicationMessage::XLogData { data, .. }) => {
                u32::try_from(data.len().clamp(1, READ_AHEAD_BYTES)).unwrap_or(u32::MAX)
            }
            _ => 1,
        };
        tokio::select! {
            message = stream.next_message(), if pending.is_none() => {
                let message = match message {
                    Ok(m) => m,
                    Err(e) => break Err(format!("{e}")),
                };
                last_received = Instant::now();
                match &message {
                    ReplicationMessage::XLogData { wal_start, .. } => {
                        shared.received.fetch_max(wal_start.0, Ordering::Relaxed);
                    }
                    ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                        shared.received.fetch_max(wal_end.0, Ordering::Relaxed);
                        if *reply_requested {
                            if let Err(e) = send_status(&mut stream, &shared, false, receive_timeout).await {
                                break Err(e);
                            }
                        }
                    }
                }
                shared.more_buffered.store(u64::from(stream.has_buffered_message()), Ordering::Relaxed);
                pending = Some(message);
            }
            permit = Arc::clone(&budget).acquire_many_owned(want), if needs_budget => {
                let Ok(permit) = permit else { break Ok(()) };
                granted = Some(permit);
            }
            slot = tx.reserve(), if deliverable => {
                let Ok(slot) = slot else { break Ok(()) };
                let incoming = match pending.take() {
                    Some(ReplicationMessage::XLogData { wal_start, data, .. }) => match granted.take() {
                        Some(permit) => Incoming::Data { wal_start, data, _budget: permit },
                        None => continue,
                    },
                    Some(ReplicationMessage::Keepalive { wal_end, .. }) => Incoming::Keepalive { wal_end },
                    None => continue,
                };
                shared.waiting.fetch_add(1, Ordering::Relaxed);
                slot.send(incoming);
            }
            command = commands.recv() => match command {
                Some(Command::Status { ask_reply }) => {
                    if let Err(e) = send_status(&mut stream, &shared, ask_reply, receive_timeout).await {
                        break Err(e);
                    }
                }
                Some(Command::Stop { done }) => {
                    // Ask for a reply, and wait for it: the walsender answers after
                    // it has taken in the final position.
                    if send_status(&mut stream, &shared, true, receive_timeout).await.is_ok() {
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                        while let Ok(Ok(m)) = tokio::time::timeout_at(deadline, stream.next_message()).await {
                            if matches!(m, ReplicationMessage::Keepalive { .. }) {
                                break;
                            }
                        }
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.close()).await;
                    let _ = done.send(());
                    return;
                }
                None => break Ok(()),
            },
            _ = tick.tick() => {
                if last_received.elapsed() > receive_timeout {
                    break Err(format!(
                        "the source sent nothing for {} s (stalled or dead connection): reconnecting",
                        receive_timeout.as_secs()
                    ));
                }
                if let Err(e) = send_status(&mut stream, &shared, true, receive_timeout).await {
                    break Err(e);
                }
            }
        }
    };
    let why = match outcome {
        Ok(()) => "the replication session ended".to_string(),
        Err(e) => e,
    };
    let _ = fault.send(Some(why));
    // Bounded: a stalled server must not keep this task alive.
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.close()).await;
}
