//! Shrinking on memory pressure: the donor watches its host's PSI (`some avg10` of
//! /proc/pressure/memory) and takes a step of memory back when it stays high, then gives it back
//! to lending once pressure has stayed low for a while.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::donor::Control;

/// `some avg10` from a PSI file's text.
pub fn some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// What one reading asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Shrink,
    Grow,
    Hold,
}

/// The decision, apart from the clock and the file so it can be tested.
pub(crate) struct Policy {
    high: f64,
    low: f64,
    settle: Duration,
    last_step: Option<Instant>,
    low_since: Option<Instant>,
}

impl Policy {
    pub(crate) fn new(high: f64, low: f64, settle: Duration) -> Policy {
        Policy {
            high,
            low,
            settle,
            last_step: None,
            low_since: None,
        }
    }

    /// `can_grow`: pressure took slabs that have not been given back yet.
    pub(crate) fn step(&mut self, avg10: f64, now: Instant, can_grow: bool) -> Step {
        let settled = self
            .last_step
            .is_none_or(|t| now.duration_since(t) >= self.settle);
        if avg10 >= self.high {
            self.low_since = None;
            if settled {
                self.last_step = Some(now);
                return Step::Shrink;
            }
            return Step::Hold;
        }
        if avg10 > self.low {
            self.low_since = None;
            return Step::Hold;
        }
        let since = *self.low_since.get_or_insert(now);
        if can_grow && settled && now.duration_since(since) >= self.settle {
            self.last_step = Some(now);
            self.low_since = Some(now);
            return Step::Grow;
        }
        Step::Hold
    }
}

pub(crate) async fn watch(ctl: Control) {
    let cfg = ctl.config().clone();
    let r = &cfg.reclaim;
    let step = cfg.reclaim_step_slabs();
    let mut policy = Policy::new(
        r.high_avg10,
        r.low_avg10,
        Duration::from_secs(r.settle_secs),
    );
    let mut tick = tokio::time::interval(Duration::from_millis(r.interval_ms));
    let mut unreadable = false;
    loop {
        tick.tick().await;
        // A procfs (or test) file: reading it does not block.
        let avg10 = match std::fs::read_to_string(&r.pressure_file) {
            Ok(t) => match some_avg10(&t) {
                Some(v) => {
                    unreadable = false;
                    v
                }
                None => {
                    // One odd reading (a file being rewritten) is skipped, not the end of reclaim.
                    if !unreadable {
                        tracing::warn!(file = %r.pressure_file.display(), "no `some avg10` in the pressure file; skipping readings until there is");
                    }
                    unreadable = true;
                    continue;
                }
            },
            Err(e) => {
                tracing::info!(file = %r.pressure_file.display(), error = %e, "no memory pressure information; pressure reclaim off");
                return;
            }
        };
        let taken = ctl.pressure_retired().load(Ordering::Relaxed) as u32;
        match policy.step(avg10, Instant::now(), taken > 0) {
            Step::Shrink => {
                let rep = ctl.shrink(step);
                let got = rep.retired + rep.reclaiming;
                tracing::warn!(avg10, slabs = got, "memory pressure: taking memory back");
                ctl.pressure_retired()
                    .fetch_add(u64::from(got), Ordering::Relaxed);
            }
            Step::Grow => {
                let n = ctl.grow(step.min(taken));
                tracing::info!(avg10, slabs = n, "pressure gone: lending memory again");
                ctl.pressure_retired()
                    .fetch_sub(u64::from(n), Ordering::Relaxed);
            }
            Step::Hold => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_text_parses() {
        let t = "some avg10=12.50 avg60=3.00 avg300=0.10 total=12345\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=1\n";
        assert_eq!(some_avg10(t), Some(12.5));
        assert_eq!(some_avg10("full avg10=1.00"), None);
        assert_eq!(some_avg10("some avg10=x"), None);
        assert_eq!(some_avg10(""), None);
    }

    #[test]
    fn shrinks_when_high_settles_then_grows_after_low_for_a_while() {
        let t0 = Instant::now();
        let s = Duration::from_secs(10);
        let mut p = Policy::new(10.0, 1.0, s);
        assert_eq!(p.step(20.0, t0, false), Step::Shrink);
        assert_eq!(p.step(20.0, t0 + s / 2, true), Step::Hold, "settling");
        assert_eq!(p.step(20.0, t0 + s, true), Step::Shrink);
        assert_eq!(
            p.step(5.0, t0 + s * 2, true),
            Step::Hold,
            "between thresholds"
        );
        assert_eq!(
            p.step(0.5, t0 + s * 3, true),
            Step::Hold,
            "low only just now"
        );
        assert_eq!(p.step(0.5, t0 + s * 4, true), Step::Grow);
        assert_eq!(p.step(0.5, t0 + s * 4, true), Step::Hold);
        assert_eq!(
            p.step(0.5, t0 + s * 9, false),
            Step::Hold,
            "nothing to give back"
        );
    }
}
