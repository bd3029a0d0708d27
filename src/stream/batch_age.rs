//! How old a coalesced batch may get before it is committed while the stream never
//! goes quiet (TPC-B at full speed): the visibility lag of such a stream.
//!
//! A short cap keeps the lag low, but every batch pays a fixed cost: at least the
//! commit's round trip to the target. On a local target that is a millisecond and a
//! 50 ms cap costs nothing measurable; over a link with 100 ms round trips a 100 ms
//! cap spent most of the time committing and `run` fell behind a slow writer
//! (`network_faults::slow_connections_still_converge`). So the cap follows the link:
//! [`PER_COMMIT`] times the commit's round trip, between [`FLOOR`] and [`CEILING`].
//! The fixed cost then stays under a tenth of a batch's time, and the lag under the
//! ceiling. The round trip is the shortest of the last [`WINDOW`] commits (as TCP's
//! BBR estimates a path's delay): a commit slowed by a busy machine or a checkpoint
//! says nothing about the link, and a moving average of them would grow the cap, and
//! so the lag, exactly when the machine is busiest. Until a commit has been measured
//! the cap is the ceiling.
//!
//! While the apply path is behind (hundreds of messages read ahead) the cap is the
//! ceiling too: a batch's fixed cost is more than its commit (a statement per table,
//! a COPY's start and end), and small batches fall further behind. Batches of 50 ms
//! drained 60,000 single-row updates 13% slower than batches of 500 ms
//! (bench/results/issue20-backlog-adaptive.md), and under TPC-B on PostgreSQL 17 the
//! lag grew in a saw-tooth while the apply kept up only in bigger batches. So batches
//! stay small while the apply keeps up, and grow as soon as it does not.

use std::collections::VecDeque;
use std::time::Duration;

/// Shortest cap: below it a batch rarely holds more than a few transactions and
/// coalescing stops paying for itself.
pub const FLOOR: Duration = Duration::from_millis(50);
/// Longest cap: the lag bound over the slowest links (the fixed cap before it adapted).
pub const CEILING: Duration = Duration::from_millis(500);
/// The cap in commit durations: the commit's share of a batch's time stays under
/// a tenth.
const PER_COMMIT: u32 = 10;
/// Commits the round trip is the shortest of: enough that one of them met a quiet
/// machine, few enough that a link that got slower is followed within seconds.
const WINDOW: usize = 32;

/// The batch age cap, learnt from the target's commit durations.
#[derive(Debug, Default)]
pub struct BatchAgeCap {
    /// Durations of the last [`WINDOW`] commits, newest last.
    recent: VecDeque<Duration>,
}

impl BatchAgeCap {
    /// Records how long one commit took (its round trip included).
    pub fn commit_took(&mut self, took: Duration) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(took);
    }

    /// Oldest a batch may get now; `behind` while a backlog drains.
    pub fn cap(&self, behind: bool) -> Duration {
        match self.recent.iter().min() {
            Some(round_trip) if !behind => (*round_trip * PER_COMMIT).clamp(FLOOR, CEILING),
            _ => CEILING,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_follows_the_commit_round_trip_within_its_bounds() {
        let mut cap = BatchAgeCap::default();
        assert_eq!(cap.cap(false), CEILING, "unmeasured: the ceiling");
        cap.commit_took(Duration::from_millis(1));
        assert_eq!(cap.cap(false), FLOOR, "a local target: the floor");
        assert_eq!(cap.cap(true), CEILING, "draining a backlog: the ceiling");
        for _ in 0..10 {
            cap.commit_took(Duration::from_millis(80));
        }
        assert_eq!(
            cap.cap(false),
            FLOOR,
            "slow commits on a fast link: still the floor"
        );
        for _ in 0..WINDOW {
            cap.commit_took(Duration::from_millis(20));
        }
        assert_eq!(cap.cap(false), Duration::from_millis(200), "a 20 ms link");
        cap.commit_took(Duration::from_secs(1));
        assert_eq!(
            cap.cap(false),
            Duration::from_millis(200),
            "one slow commit changes nothing"
        );
        for _ in 0..WINDOW {
            cap.commit_took(Duration::from_millis(150));
        }
        assert_eq!(cap.cap(false), CEILING, "a slow link: the ceiling");
    }
}
