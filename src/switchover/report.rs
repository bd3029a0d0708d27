//! What a switchover did, for a person (`render`) and for scripts (`--json`): the
//! outcome, the downtime broken down by step, rows verified, sequences set.

use super::fence::{Proof, Raised};
use super::preflight::Plan;
use super::reverse::ReverseInfo;
use super::{FenceMethod, SwitchoverOptions};
use crate::pg::Lsn;
use crate::sequences::SyncedSequence;

/// How it ended.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Everything equal at the fence: the target may take writes.
    Done,
    /// `--dry-run`: the plan only.
    DryRun,
    /// Stopped on purpose; the source takes writes again when `fence_lifted`.
    Aborted {
        /// Why, and what to do.
        reason: String,
        /// Whether the fence was lifted (false also when never raised).
        fence_lifted: bool,
    },
}

/// Seconds each step took; `downtime` runs from the fence to done (or abort).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepTimes {
    /// Fence raised (sessions ended, fence LSN taken).
    pub fence: f64,
    /// Stream drained to the fence LSN.
    pub drain: f64,
    /// Sequences set on the target.
    pub sequences: f64,
    /// Every table verified.
    pub verify: f64,
    /// The proof read (no change past the fence LSN).
    pub proof: f64,
    /// Reverse pipeline started (`--reverse`).
    pub reverse: f64,
    /// Fence to done.
    pub downtime: f64,
}

/// The whole report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwitchoverReport {
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The pipeline.
    pub pipeline: String,
    /// The fence method asked for.
    pub fence_method: FenceMethod,
    /// What the preflight found, with the estimates.
    pub plan: Plan,
    /// The fence, once raised.
    pub fence: Option<Raised>,
    /// The position the stream had reached when the drain ended.
    pub drained_to: Option<Lsn>,
    /// What the proof found after the verify.
    pub proof: Option<Proof>,
    /// Set when a done switchover could not reopen the old source read-only.
    pub settle_error: Option<String>,
    /// When the switchover took the way back: how its target was made writable.
    pub target_unfenced: Option<String>,
    /// Seconds per step.
    pub times: StepTimes,
    /// Tables verified.
    pub tables_verified: usize,
    /// Rows verified (per side).
    pub rows_verified: i64,
    /// Sequences set on the target.
    pub sequences: Vec<SyncedSequence>,
    /// The reverse pipeline, with `--reverse`.
    pub reverse: Option<ReverseInfo>,
    /// Verify's own report when it found differences.
    pub verify_detail: Option<String>,
    /// The step running (for an abort's reason).
    #[serde(skip)]
    pub current_step: &'static str,
}

/// `0.42 s`, `12.3 s`.
pub fn seconds(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

impl SwitchoverReport {
    /// An empty report for a plan.
    pub fn new(opts: &SwitchoverOptions, plan: Plan) -> Self {
        SwitchoverReport {
            outcome: Outcome::DryRun,
            pipeline: opts.slot.clone(),
            fence_method: opts.fence,
            plan,
            fence: None,
            drained_to: None,
            proof: None,
            settle_error: None,
            target_unfenced: None,
            times: StepTimes::default(),
            tables_verified: 0,
            rows_verified: 0,
            sequences: Vec::new(),
            reverse: None,
            verify_detail: None,
            current_step: "the preflight",
        }
    }

    /// Whether the command succeeded (exit 0): done, or a dry run that found no
    /// problem.
    pub fn succeeded(&self) -> bool {
        matches!(self.outcome, Outcome::Done | Outcome::DryRun)
    }

    /// One line: downtime and its parts (recorded for `status`).
    pub fn summary_line(&self) -> String {
        let t = &self.times;
        format!(
            "downtime {} (fence {}, drain {}, sequences {}, verify {}, proof {}{}); {} rows in {} tables verified equal; {} sequences set",
            seconds(t.downtime),
            seconds(t.fence),
            seconds(t.drain),
            seconds(t.sequences),
            seconds(t.verify),
            seconds(t.proof),
            if self.reverse.is_some() {
                format!(", reverse {}", seconds(t.reverse))
            } else {
                String::new()
            },
            self.rows_verified,
            self.tables_verified,
            self.sequences.len()
        )
    }

    /// The report for a person.
    pub fn render(&self) -> String {
        let p = &self.plan;
        let mut out = String::new();
        let head = match &self.outcome {
            Outcome::Done => format!(
                "switchover of pipeline {}: DONE, downtime {}",
                self.pipeline,
                seconds(self.times.downtime)
            ),
            Outcome::DryRun => format!("switchover of pipeline {}: plan (dry run)", self.pipeline),
            Outcome::Aborted { .. } => format!("switchover of pipeline {}: ABORTED", self.pipeline),
        };
        out.push_str(&head);
        out.push('\n');
        out.push_str(&format!(
            "  preflight  {} tables, {} sequences, lag {}, slot {}\n",
            p.tables.len(),
            p.sequences.len(),
            p.lag_seconds
                .map(seconds)
                .unwrap_or_else(|| "unknown".into()),
            if p.slot_active {
                "streaming"
            } else {
                "not streaming"
            }
        ));
        for problem in &p.problems {
            out.push_str(&format!(
                "    problem ({}): {}\n",
                problem.check, problem.message
            ));
        }
        if matches!(self.outcome, Outcome::DryRun) {
            let e = &p.estimate;
            out.push_str(&format!(
                "  plan       fence {} ({}), drain {}, sequences {}, verify {} (~{} rows): downtime about {}\n",
                seconds(e.fence),
                match self.fence_method {
                    FenceMethod::ReadOnly => "database closed to connections, other sessions ended",
                    FenceMethod::None => "none: the application is stopped",
                },
                seconds(e.drain),
                seconds(e.sequences),
                seconds(e.verify),
                p.estimated_rows,
                seconds(e.total)
            ));
            for s in &p.sequences {
                out.push_str(&format!(
                    "    sequence {}{}{}\n",
                    s.source_sequence,
                    if s.columns.is_empty() {
                        String::new()
                    } else {
                        format!(" of {}", s.columns.join(", "))
                    },
                    if s.on_target {
                        ""
                    } else {
                        " (created on the target)"
                    }
                ));
            }
            for t in &p.identity_fixes {
                out.push_str(&format!(
                    "    REPLICA IDENTITY FULL set on {t} on the target, as on the source\n"
                ));
            }
            if let Some(r) = &p.reverse_pipeline {
                out.push_str(&format!(
                    "    reverse pipeline {r}: slot and publication on the target, state on the source\n"
                ));
            }
        }
        if let Some(f) = &self.fence {
            out.push_str(&format!(
                "  fence      {}  {}; fence LSN {}{}\n",
                seconds(self.times.fence),
                match f.method {
                    FenceMethod::ReadOnly => "source database closed",
                    FenceMethod::None => "none (--fence none)",
                },
                f.lsn,
                if f.sessions_ended > 0 {
                    format!(
                        "; {} earlier sessions ended ({} mid-write after --fence-timeout)",
                        f.sessions_ended, f.writes_cancelled
                    )
                } else {
                    String::new()
                }
            ));
        }
        if let Some(d) = self.drained_to {
            out.push_str(&format!(
                "  drain      {}  the stream reached {d}\n",
                seconds(self.times.drain)
            ));
        }
        if self.drained_to.is_some() && self.times.sequences > 0.0 {
            out.push_str(&format!(
                "  sequences  {}  {} set on the target{}\n",
                seconds(self.times.sequences),
                self.sequences.len(),
                if self.sequences.iter().any(|s| s.created) {
                    format!(
                        " ({} created)",
                        self.sequences.iter().filter(|s| s.created).count()
                    )
                } else {
                    String::new()
                }
            ));
            for s in &self.sequences {
                out.push_str(&format!(
                    "    {} next {} (source next {})\n",
                    s.target_sequence, s.target_next, s.source_next
                ));
            }
        }
        if self.tables_verified > 0 {
            out.push_str(&format!(
                "  verify     {}  {} tables, {} rows per side{}\n",
                seconds(self.times.verify),
                self.tables_verified,
                self.rows_verified,
                if self.verify_detail.is_some() {
                    ": DIFFERENT"
                } else {
                    ": equal"
                }
            ));
        }
        if let Some(detail) = &self.verify_detail {
            for line in detail.lines() {
                out.push_str(&format!("    {line}\n"));
            }
        }
        if let Some(p) = &self.proof {
            out.push_str(&format!(
                "  proof      {}  {} changes to replicated tables committed after the fence LSN (WAL read to {})\n",
                seconds(self.times.proof),
                p.changes_after_fence,
                p.checked_to
            ));
        }
        if let Some(r) = &self.reverse {
            out.push_str(&format!(
                "  reverse    {}  pipeline {} starts at {} on the target; role {} may write into the fenced {}\n",
                seconds(self.times.reverse),
                r.pipeline,
                r.start_lsn,
                r.writer_role,
                r.database
            ));
        }
        match &self.outcome {
            Outcome::Done => {
                out.push_str(&format!("  {}\n", self.summary_line()));
                if let Some(line) = &self.target_unfenced {
                    out.push_str(&format!("  {line}\n"));
                }
                if let Some(e) = &self.settle_error {
                    out.push_str(&format!("  WARNING: {e}\n"));
                }
                out.push_str(&format!(
                    "next: point the application at the target; the source stays read-only{} (to undo, from another database: {})",
                    if self.reverse.is_some() {
                        ""
                    } else {
                        " and takes connections from superusers only"
                    },
                    super::fence::undo_sql(&p.source_database)
                ));
                if let Some(r) = &self.reverse {
                    out.push_str(&format!(
                        "; stop this `run` and carry the target's writes back with `walshuttle run --source TARGET --target SOURCE --slot {}`",
                        r.pipeline
                    ));
                }
            }
            Outcome::DryRun => {
                out.push_str(if p.problems.is_empty() {
                    "ready: run again without --dry-run to switch over"
                } else {
                    "not ready: fix the problems above first"
                });
            }
            Outcome::Aborted {
                reason,
                fence_lifted,
            } => {
                out.push_str(&format!("aborted: {reason}\n"));
                if self.fence.is_some() || *fence_lifted {
                    out.push_str(&format!(
                        "after {} of downtime; {}",
                        seconds(self.times.downtime),
                        if *fence_lifted {
                            "the fence is lifted: the source takes writes again and streaming continues"
                        } else {
                            "THE FENCE IS STILL UP: the source takes no connection until ALTER DATABASE … ALLOW_CONNECTIONS true (from another database)"
                        }
                    ));
                } else {
                    out.push_str("nothing was changed: the source takes writes as before");
                }
            }
        }
        out
    }
}
