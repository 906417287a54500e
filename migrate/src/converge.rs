//! When to stop copying while the source runs.
//!
//! After each pre-copy round the engine knows how fast pages went out (bytes sent over the
//! round's time) and how many pages the source wrote meanwhile (what is dirty now). Stopping
//! the source now would cost about `dirty bytes / bandwidth` of downtime. Another round helps
//! only while the source writes slower than the link sends; when it does not, or the rounds
//! run out, the engine stops the source anyway (stop-and-copy, reporting the downtime that
//! costs) or, in hybrid mode, switches to post-copy, whose downtime does not grow with the
//! dirty set.

use std::time::Duration;

use crate::pages::PAGE;

/// What one pre-copy round measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// 1 for the first round (which sends everything).
    pub number: u32,
    /// Bytes put on the wire during the round.
    pub sent_bytes: u64,
    /// How long the round took.
    pub elapsed: Duration,
    /// Pages written during the round: what another round, or the stop, must send.
    pub dirty_pages: usize,
    /// What the last pass costs besides sending those pages (with a hash log: hashing all of
    /// RAM on both sides while the guest is paused).
    pub final_cost: Duration,
}

impl Round {
    /// Bytes per second the round achieved; `None` when it measured nothing.
    pub fn bandwidth(&self) -> Option<f64> {
        let s = self.elapsed.as_secs_f64();
        (s > 0.0 && self.sent_bytes > 0).then(|| self.sent_bytes as f64 / s)
    }

    /// Bytes per second the source dirtied during the round.
    pub fn dirty_rate(&self) -> Option<f64> {
        let s = self.elapsed.as_secs_f64();
        (s > 0.0).then(|| (self.dirty_pages * PAGE) as f64 / s)
    }

    /// The downtime sending the dirty pages would take at the round's bandwidth.
    pub fn downtime_now(&self) -> Option<Duration> {
        let bw = self.bandwidth()?;
        Some(Duration::from_secs_f64((self.dirty_pages * PAGE) as f64 / bw) + self.final_cost)
    }
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// The dirty set still shrinks: copy again while the source runs.
    AnotherRound,
    /// Stop the source and send what is dirty; `expected_downtime` at the measured bandwidth
    /// (over the target when forced by the round limit or a source that out-writes the link).
    StopAndCopy { expected_downtime: Duration },
    /// Stop the source, move its device state, run the destination and fetch the rest on
    /// demand.
    PostCopy,
}

/// The operator's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Downtime the stop may cost.
    pub downtime_target: Duration,
    /// Pre-copy rounds at most, the first included.
    pub max_rounds: u32,
    /// Hybrid: switch to post-copy instead of a stop over the target.
    pub post_copy: bool,
}

/// A source that writes at least this share of the link's bandwidth is not converging.
const CONVERGENCE: f64 = 0.9;

impl Policy {
    pub fn decide(&self, r: &Round) -> Decision {
        let downtime = r.downtime_now();
        if r.dirty_pages == 0 || downtime.is_some_and(|d| d <= self.downtime_target) {
            return Decision::StopAndCopy {
                expected_downtime: downtime.unwrap_or_default(),
            };
        }
        let outpaced = match (r.dirty_rate(), r.bandwidth()) {
            (Some(dirty), Some(bw)) => dirty >= CONVERGENCE * bw,
            _ => false,
        };
        if r.number < self.max_rounds && !outpaced {
            return Decision::AnotherRound;
        }
        if self.post_copy {
            Decision::PostCopy
        } else {
            Decision::StopAndCopy {
                // Unknown bandwidth (nothing sent): report the target, the only figure there is.
                expected_downtime: downtime.unwrap_or(self.downtime_target),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn policy(post_copy: bool) -> Policy {
        Policy {
            downtime_target: Duration::from_millis(300),
            max_rounds: 5,
            post_copy,
        }
    }

    /// A round that sent `mib` MiB in one second and found `dirty_mib` MiB written.
    fn round(number: u32, mib: u64, dirty_mib: usize) -> Round {
        Round {
            number,
            sent_bytes: mib * MIB,
            elapsed: Duration::from_secs(1),
            dirty_pages: dirty_mib * (1 << 20) / PAGE,
            final_cost: Duration::ZERO,
        }
    }

    #[test]
    fn a_fixed_cost_of_the_last_pass_counts_against_the_target() {
        // 8 MiB left at 100 MiB/s is 80 ms: under the 300 ms target...
        let r = round(2, 100, 8);
        assert!(matches!(
            policy(false).decide(&r),
            Decision::StopAndCopy { .. }
        ));
        // ...but not with 250 ms of hashing on top.
        let r = Round {
            final_cost: Duration::from_millis(250),
            ..r
        };
        assert_eq!(policy(false).decide(&r), Decision::AnotherRound);
    }

    #[test]
    fn stops_once_the_dirty_set_fits_the_downtime_target() {
        // 100 MiB/s: 20 MiB dirty is 200 ms of downtime.
        match policy(false).decide(&round(2, 100, 20)) {
            Decision::StopAndCopy { expected_downtime } => {
                assert_eq!(expected_downtime, Duration::from_millis(200))
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn copies_again_while_the_dirty_set_shrinks() {
        assert_eq!(
            policy(false).decide(&round(1, 100, 50)),
            Decision::AnotherRound
        );
    }

    #[test]
    fn a_source_that_outwrites_the_link_is_stopped_or_post_copied_at_once() {
        // Writes 95 MiB/s on a 100 MiB/s link: more rounds would not converge.
        let r = round(1, 100, 95);
        assert_eq!(policy(true).decide(&r), Decision::PostCopy);
        match policy(false).decide(&r) {
            Decision::StopAndCopy { expected_downtime } => {
                assert!(expected_downtime > Duration::from_millis(900))
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn the_round_limit_ends_pre_copy() {
        let r = round(5, 100, 50);
        assert_eq!(policy(true).decide(&r), Decision::PostCopy);
        assert!(matches!(
            policy(false).decide(&r),
            Decision::StopAndCopy { .. }
        ));
    }

    #[test]
    fn a_round_that_measured_nothing_divides_by_nothing() {
        let r = Round {
            number: 1,
            sent_bytes: 0,
            elapsed: Duration::ZERO,
            dirty_pages: 10,
            final_cost: Duration::ZERO,
        };
        assert_eq!(policy(false).decide(&r), Decision::AnotherRound);
        let last = Round { number: 5, ..r };
        assert_eq!(
            policy(false).decide(&last),
            Decision::StopAndCopy {
                expected_downtime: Duration::from_millis(300)
            }
        );
        let clean = Round {
            dirty_pages: 0,
            ..r
        };
        assert_eq!(
            policy(false).decide(&clean),
            Decision::StopAndCopy {
                expected_downtime: Duration::ZERO
            }
        );
    }
}
