//! `walshuttle switchover`: the move itself. While `run` streams, it proves the
//! pipeline ready, stops writes on the source, lets the stream drain to the point
//! where they stopped, brings the target's sequences to the source's, proves every
//! table equal at that point, and (with `--reverse`) leaves a pipeline ready to
//! carry the new primary's writes back to the old one.
//!
//! ```text
//!  preflight ──(--dry-run: plan, exit 0)
//!      │ nothing changed so far; a failed check ends here (exit 1)
//!      ▼
//!  fencing ──▶ draining ──▶ sequences ──▶ verifying (+ proof) ──▶ [reversing] ──▶ done
//!      │           │            │             │                         │
//!      └───────────┴────────────┴──── any error, a difference, a write past the
//!                                     fence, or past --max-downtime ──▶ aborted:
//!                                     fence lifted
//! ```
//!
//! The proof (see [`fence`]) reads a slot of the fence's own from the fence LSN
//! after the verify, and during the drain (a write past the fence may keep the
//! stream from ever reaching it). At done the old source is left closed to the application,
//! the pipeline is finished (`run` stops), and taking a way back
//! ([`reverse::lift_old_fence`]) makes its target writable again.
//!
//! The phases are recorded on the target's pipeline row for `status`. Stages here do
//! not call `run`: the stream keeps going in its own process, and the switchover
//! only watches where it stands (`progress.applied_lsn` on the target, the slot's
//! confirmed position on the source).

pub mod fence;
pub mod preflight;
pub mod report;
pub mod reverse;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_postgres::Client;

use crate::config::Endpoint;
use crate::pg::{connect, Lsn, PgResultExt, QualifiedName};
use crate::state::StateStore;
pub use report::{Outcome, StepTimes, SwitchoverReport};

/// How the source is kept from taking writes during the switchover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceMethod {
    /// `ALTER DATABASE … ALLOW_CONNECTIONS false`, then every backend of the
    /// database but walshuttle's own ends (open write transactions get
    /// `--fence-timeout` to finish); after done, the database stays read-only.
    ReadOnly,
    /// Nothing: the application is already stopped. Only the fence LSN is taken.
    None,
}

/// Settings of `switchover`.
#[derive(Clone, Debug)]
pub struct SwitchoverOptions {
    /// The pipeline (slot) to switch over.
    pub slot: String,
    /// State schema on the target (and, with `reverse`, on the source).
    pub state_schema: String,
    /// Lag above which the preflight refuses.
    pub max_lag: Duration,
    /// Stop after the preflight and print the plan.
    pub dry_run: bool,
    /// How writes are stopped on the source.
    pub fence: FenceMethod,
    /// How long open write transactions get to finish before they are cancelled.
    pub fence_timeout: Duration,
    /// Added to every target sequence beyond the source's next value.
    pub sequence_gap: i64,
    /// Fence to done; past it the switchover aborts and lifts the fence.
    pub max_downtime: Duration,
    /// Start a pipeline from the target back to the source.
    pub reverse: bool,
    /// Parallel verify workers.
    pub jobs: usize,
}

/// How a done switchover's recorded detail starts: `run` reads the fence LSN from it.
const DONE_AT: &str = "switched over at fence LSN";

/// The fence LSN of a done switchover, from its recorded detail.
pub fn fence_lsn_of(detail: &str) -> Option<Lsn> {
    detail
        .strip_prefix(DONE_AT)?
        .trim_start()
        .split(';')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The reverse step's name in reports.
const REVERSE_STEP: &str = "the reverse pipeline";

/// The name of the reverse pipeline (slot and publication) of `slot`.
pub fn reverse_name(slot: &str) -> String {
    format!("{slot}_reverse")
}

/// Runs a switchover. `Ok` with an aborted report when it stopped on purpose (a
/// failed check, a difference, the downtime budget, `shutdown` turning true) after
/// lifting the fence; `Err` only when nothing could be checked.
pub async fn switchover(
    source: &Endpoint,
    target: &Endpoint,
    opts: &SwitchoverOptions,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<SwitchoverReport> {
    let src = connect(source, "switchover").await?;
    let tgt = connect(target, "switchover").await?;
    let state = StateStore::open(&tgt, &opts.state_schema).await?;
    state.check_current(&tgt).await?;
    let plan = preflight::check(&src, &tgt, &state, opts).await?;
    let mut report = SwitchoverReport::new(opts, plan);
    if !report.plan.problems.is_empty() {
        let reason = format!(
            "preflight: {}",
            report
                .plan
                .problems
                .iter()
                .map(|p| p.message.clone())
                .collect::<Vec<_>>()
                .join("; ")
        );
        report.outcome = Outcome::Aborted {
            reason,
            fence_lifted: false,
        };
        return Ok(report);
    }
    if opts.dry_run {
        report.outcome = Outcome::DryRun;
        return Ok(report);
    }
    if *shutdown.borrow() {
        report.outcome = Outcome::Aborted {
            reason: "interrupted before the fence".into(),
            fence_lifted: false,
        };
        return Ok(report);
    }

    state
        .set_switchover(&tgt, &opts.slot, "fencing", None)
        .await?;
    let mut fence =
        fence::Fence::open(source, opts.fence, &opts.slot, &report.plan.publication).await?;
    fence.keep(&src).await?;
    // The verify's source sessions, opened now: the fenced source takes no new one.
    let mut verify_sessions = Vec::new();
    for _ in 0..=opts.jobs.max(1) {
        let session = crate::verify::hashing_session(source, "verify").await?;
        fence.keep(&session).await?;
        verify_sessions.push(session);
    }
    // The source takes writes until the fence is raised: downtime starts here.
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + opts.max_downtime;
    let result = {
        let steps = tokio::time::timeout_at(
            deadline,
            after_fence(
                source,
                target,
                &src,
                &tgt,
                &state,
                opts,
                &mut fence,
                verify_sessions,
                &mut report,
            ),
        );
        tokio::select! {
            r = steps => Some(r),
            _ = shutdown.wait_for(|stop| *stop) => None,
        }
    };
    let mut failure = match result {
        Some(Ok(Ok(None))) => None,
        Some(Ok(Ok(Some(reason)))) => Some(reason),
        Some(Ok(Err(e))) => Some(format!("{e:#}")),
        Some(Err(_)) => Some(format!(
            "{} did not finish within --max-downtime {}",
            report.current_step,
            report::seconds(opts.max_downtime.as_secs_f64())
        )),
        None => Some(format!("interrupted during {}", report.current_step)),
    };
    if let Some(reason) = failure
        .as_mut()
        .filter(|_| report.current_step == REVERSE_STEP)
    {
        reason.push_str(&format!(
            "; the reverse pipeline may be half made: retire it with `walshuttle teardown --source TARGET --target SOURCE --slot {}` (and drop slot {} on the target if it is there)",
            reverse_name(&opts.slot),
            reverse_name(&opts.slot)
        ));
    }
    report.times.downtime = started.elapsed().as_secs_f64();
    match failure {
        None => {
            report.outcome = Outcome::Done;
            if let Err(e) = fence.settle(opts.reverse).await {
                // The database stays closed to every new connection: safe, and said.
                tracing::warn!(error = %format!("{e:#}"), "could not reopen the old source read-only; it takes no connection until opened by hand");
                report.settle_error = Some(format!(
                    "{e:#}; the old source takes no connection until you run, from another database: {}",
                    fence::undo_sql(&report.plan.source_database)
                ));
            }
            // Taking the way back: the target, the old source of the switchover this
            // pipeline reverses, takes the application's writes again.
            match reverse::lift_old_fence(&src, &tgt, &opts.state_schema, &opts.slot).await {
                Ok(line) => report.target_unfenced = line,
                Err(e) => {
                    report.settle_error = Some(format!(
                        "{e:#}; the target stays read-only until its read-only default is reset"
                    ))
                }
            }
            let detail = match &report.fence {
                Some(f) => format!("{DONE_AT} {}; {}", f.lsn, report.summary_line()),
                None => report.summary_line(),
            };
            record(&tgt, &state, opts, "done", Some(&detail)).await;
        }
        Some(reason) => {
            let lifted = fence.lift().await;
            let fence_lifted = lifted.is_ok();
            let reason = match lifted {
                Ok(()) => reason,
                Err(e) => format!("{reason}; LIFTING THE FENCE FAILED: {e:#}"),
            };
            record(&tgt, &state, opts, "aborted", Some(&reason)).await;
            report.outcome = Outcome::Aborted {
                reason,
                fence_lifted,
            };
        }
    }
    Ok(report)
}

/// Records a phase for `status`; a failure to record is logged, not fatal (the
/// report says what happened either way).
async fn record(
    tgt: &Client,
    state: &StateStore,
    opts: &SwitchoverOptions,
    phase: &str,
    detail: Option<&str>,
) {
    if let Err(e) = state.set_switchover(tgt, &opts.slot, phase, detail).await {
        tracing::warn!(error = %format!("{e:#}"), phase, "could not record the switchover phase");
    }
}

/// Everything from the fence to done. `Ok(Some(reason))` asks to abort.
#[allow(clippy::too_many_arguments)]
async fn after_fence(
    source: &Endpoint,
    target: &Endpoint,
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    opts: &SwitchoverOptions,
    fence: &mut fence::Fence,
    verify_sessions: Vec<Client>,
    report: &mut SwitchoverReport,
) -> Result<Option<String>> {
    report.current_step = "the fence";
    let step = Instant::now();
    let raised = fence.raise(opts.fence_timeout).await?;
    report.times.fence = step.elapsed().as_secs_f64();
    let fence_lsn = raised.lsn;
    tracing::info!(fence_lsn = %fence_lsn, ended = raised.sessions_ended, "source fenced");
    report.fence = Some(raised);

    report.current_step = "the drain";
    record(
        tgt,
        state,
        opts,
        "draining",
        Some(&format!("to {fence_lsn}")),
    )
    .await;
    let step = Instant::now();
    let drained = drain(src, tgt, state, &opts.slot, fence, fence_lsn).await?;
    report.times.drain = step.elapsed().as_secs_f64();
    match drained {
        Drained::To(lsn) => report.drained_to = Some(lsn),
        Drained::PastTheFence(proof) => {
            let reason = passed_the_fence(&proof, fence_lsn);
            report.proof = Some(proof);
            return Ok(Some(reason));
        }
    }

    report.current_step = "the sequences";
    record(tgt, state, opts, "sequences", None).await;
    let step = Instant::now();
    for table in &report.plan.identity_fixes {
        tgt.batch_execute(&format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL",
            table.quoted()
        ))
        .await
        .pg_context(|| format!("setting REPLICA IDENTITY FULL on {table} on the target"))?;
    }
    report.sequences =
        crate::sequences::sync(src, tgt, &report.plan.tables, opts.sequence_gap).await?;
    report.times.sequences = step.elapsed().as_secs_f64();

    report.current_step = "the verify";
    record(tgt, state, opts, "verifying", None).await;
    let step = Instant::now();
    let verified = crate::verify::verify_with(
        source,
        verify_sessions,
        target,
        &crate::verify::VerifyOptions {
            tables: Some(report.plan.tables.clone()),
            slot: opts.slot.clone(),
            state_schema: opts.state_schema.clone(),
            jobs: opts.jobs,
            repair: false,
            allow_target_triggers: false,
        },
    )
    .await
    .context("verifying the tables at the fence")?;
    report.times.verify = step.elapsed().as_secs_f64();
    report.rows_verified = verified.rows_read;
    report.tables_verified = verified.tables.len();
    let different: Vec<String> = verified
        .tables
        .iter()
        .filter(|t| {
            !(t.differences.is_empty() && !t.missing_on_target && t.missing_columns.is_empty())
        })
        .map(|t| t.table.to_string())
        .collect();
    if !different.is_empty() {
        report.verify_detail = Some(verified.render());
        return Ok(Some(format!(
            "verify found differences at the fence in {}: the target is not handed writes (run `walshuttle verify` to see them)",
            different.join(", ")
        )));
    }

    // The proof: nothing committed on the source after the fence LSN.
    report.current_step = "the proof";
    let step = Instant::now();
    let proof = fence.prove().await?;
    report.times.proof = step.elapsed().as_secs_f64();
    report.proof = proof.clone();
    if let Some(p) = proof.filter(|p| p.changes_after_fence > 0) {
        return Ok(Some(passed_the_fence(&p, fence_lsn)));
    }

    if opts.reverse {
        report.current_step = REVERSE_STEP;
        record(tgt, state, opts, "reversing", None).await;
        let step = Instant::now();
        report.reverse = Some(reverse::start(src, tgt, &report.plan, opts).await?);
        report.times.reverse = step.elapsed().as_secs_f64();
    }
    Ok(None)
}

/// The abort reason when the proof found changes committed after the fence.
fn passed_the_fence(proof: &fence::Proof, fence_lsn: Lsn) -> String {
    format!(
        "{} changes in {} transactions to replicated tables committed on the source after the fence LSN {fence_lsn} (read up to {}): a session passed the fence, so the target is not handed writes",
        proof.changes_after_fence, proof.transactions_after_fence, proof.checked_to
    )
}

/// How the drain ended.
enum Drained {
    /// The stream applied everything up to the fence; covered up to this position.
    To(Lsn),
    /// A change to a replicated table committed after the fence: the switchover
    /// aborts now, not at `--max-downtime` (the stream may never reach the fence:
    /// the fence ended `run`'s lookup session, which a change arriving now may need).
    PastTheFence(fence::Proof),
}

/// How often the drain reads the fence's own slot for a write past the fence.
const DRAIN_PROOF_EVERY: Duration = Duration::from_millis(500);

/// Waits until the stream has applied everything committed on the source up to
/// `fence_lsn`: the target's applied position, or the slot's confirmed position
/// (which `run` moves past quiet WAL only once everything before it is durable on
/// the target), at or past it. Meanwhile it reads the fence's proof slot, so that
/// a write past the fence ends the wait at once.
async fn drain(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    slot: &str,
    fence: &fence::Fence,
    fence_lsn: Lsn,
) -> Result<Drained> {
    let mut proved_at = Instant::now();
    loop {
        let confirmed: Option<Lsn> = src
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .pg_context(|| format!("reading replication slot {slot} on the source"))?
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|t| t.parse().ok());
        let applied = state.progress(tgt, slot).await?;
        let reached = confirmed.max(applied).unwrap_or_default();
        if reached >= fence_lsn {
            return Ok(Drained::To(reached));
        }
        if proved_at.elapsed() >= DRAIN_PROOF_EVERY {
            proved_at = Instant::now();
            if let Some(proof) = fence.prove().await?.filter(|p| p.changes_after_fence > 0) {
                return Ok(Drained::PastTheFence(proof));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tables a pipeline carries, for messages.
pub fn table_list(tables: &[QualifiedName]) -> String {
    tables
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_lsn_is_read_back_from_the_done_detail() {
        let lsn: Lsn = "0/1548188".parse().unwrap();
        let detail = format!("{DONE_AT} {lsn}; downtime 1.00 s");
        assert_eq!(fence_lsn_of(&detail), Some(lsn));
        assert_eq!(fence_lsn_of("downtime 1.00 s"), None);
    }
}
