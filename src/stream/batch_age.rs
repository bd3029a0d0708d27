//! How old a coalesced batch may get before it is committed while the stream never
//! goes quiet (TPC-B at full speed): the visibility lag of such a stream.
//!
//! A short cap keeps the lag low, but every batch pays a fixed cost: at least the
//! commit's round trip to the target. On a local target that is a millisecond and a
//! 50 ms cap costs nothing measurable; over a link with 100 ms round trips a 100 ms
//! cap spent most of the time committing and `run` fell behind a slow writer
//! (`network_faults::slow_connections_still_converge`). So the cap follows the link:
//! [`PER_COMMIT`] times the measured commit duration (a moving average, so one slow
//! commit does not double it), between [`FLOOR`] and [`CEILING`]. The fixed cost
//! then stays under a tenth of a batch's time, and the lag under the ceiling.
//! Until a commit has been measured the cap is the ceiling.

use std::time::Duration;

/// Shortest cap: below it a batch rarely holds more than a few transactions and
/// coalescing stops paying for itself.
pub const FLOOR: Duration = Duration::from_millis(50);
/// Longest cap: the lag bound over the slowest links (the fixed cap before it adapted).
pub const CEILING: Duration = Duration::from_millis(500);
/// The cap in commit durations: the commit's share of a batch's time stays under
/// a tenth.
const PER_COMMIT: u32 = 10;
/// Weight of the newest commit in the moving average.
const WEIGHT_NEWEST: f64 = 0.2;

/// The batch age cap, learnt from the target's commit durations.
#[derive(Debug, Default)]
pub struct BatchAgeCap {
    /// Moving average of commit durations, in seconds; `None` before the first.
    commit_secs: Option<f64>,
}

impl BatchAgeCap {
    /// Records how long one commit took (its round trip included).
    pub fn commit_took(&mut self, took: Duration) {
        let took = took.as_secs_f64();
        self.commit_secs = Some(match self.commit_secs {
            None => took,
            Some(avg) => avg + WEIGHT_NEWEST * (took - avg),
        });
    }

    /// Oldest a batch may get now.
    pub fn cap(&self) -> Duration {
        match self.commit_secs {
            None => CEILING,
            Some(secs) => {
                Duration::from_secs_f64(secs * f64::from(PER_COMMIT)).clamp(FLOOR, CEILING)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_follows_the_commit_round_trip_within_its_bounds() {
        let mut cap = BatchAgeCap::default();
        assert_eq!(cap.cap(), CEILING, "unmeasured: the ceiling");
        cap.commit_took(Duration::from_millis(1));
        assert_eq!(cap.cap(), FLOOR, "a local target: the floor");
        for _ in 0..50 {
            cap.commit_took(Duration::from_millis(20));
        }
        let adapted = cap.cap();
        assert!(
            adapted > Duration::from_millis(190) && adapted <= Duration::from_millis(200),
            "20 ms commits: about 200 ms, got {adapted:?}"
        );
        cap.commit_took(Duration::from_secs(1));
        assert!(cap.cap() <= CEILING, "never above the ceiling");
        for _ in 0..50 {
            cap.commit_took(Duration::from_millis(150));
        }
        assert_eq!(cap.cap(), CEILING, "a slow link: the ceiling");
    }
}
