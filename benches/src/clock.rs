//! The clock latency runs read twice per operation. `Instant::now()` can cost more than the
//! operation where the kernel's clocksource is an emulated HPET (a VM without a usable TSC), so on
//! x86_64 we read the time-stamp counter directly, as perftest does, calibrated against the OS
//! clock at start.

use std::time::{Duration, Instant};

/// Which clock times operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockKind {
    /// The CPU's time-stamp counter (x86_64), calibrated against the OS clock.
    Tsc,
    /// `std::time::Instant` (clock_gettime).
    Os,
}

impl std::str::FromStr for ClockKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tsc" => Ok(ClockKind::Tsc),
            "os" => Ok(ClockKind::Os),
            _ => Err(format!("unknown clock {s:?} (tsc or os)")),
        }
    }
}

impl Default for ClockKind {
    fn default() -> Self {
        if cfg!(target_arch = "x86_64") {
            ClockKind::Tsc
        } else {
            ClockKind::Os
        }
    }
}

/// A calibrated clock: `now()` is a raw reading, `nanos()` converts a difference.
pub struct Clock {
    kind: ClockKind,
    ns_per_tick: f64,
    origin: Instant,
}

impl Clock {
    pub fn new(kind: ClockKind) -> Clock {
        let kind = if tsc().is_some() { kind } else { ClockKind::Os };
        let mut c = Clock {
            kind,
            ns_per_tick: 1.0,
            origin: Instant::now(),
        };
        if kind == ClockKind::Tsc {
            let (t0, c0) = (Instant::now(), c.now());
            std::thread::sleep(Duration::from_millis(50));
            let (t1, c1) = (Instant::now(), c.now());
            let ticks = c1.saturating_sub(c0).max(1) as f64;
            c.ns_per_tick = (t1 - t0).as_nanos() as f64 / ticks;
        }
        c
    }

    pub fn kind(&self) -> ClockKind {
        self.kind
    }

    /// The calibrated counter rate in MHz (TSC clock only).
    pub fn tsc_mhz(&self) -> Option<f64> {
        (self.kind == ClockKind::Tsc).then(|| 1000.0 / self.ns_per_tick)
    }

    #[inline]
    pub fn now(&self) -> u64 {
        match self.kind {
            ClockKind::Tsc => tsc().unwrap_or(0),
            ClockKind::Os => self.origin.elapsed().as_nanos() as u64,
        }
    }

    /// Nanoseconds between two readings.
    #[inline]
    pub fn nanos(&self, start: u64, end: u64) -> u64 {
        (end.saturating_sub(start) as f64 * self.ns_per_tick) as u64
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn tsc() -> Option<u64> {
    // SAFETY: RDTSC exists on every x86_64 CPU and only reads a counter.
    Some(unsafe { core::arch::x86_64::_rdtsc() })
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn tsc() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_measure_a_sleep() {
        for kind in [ClockKind::Tsc, ClockKind::Os] {
            let c = Clock::new(kind);
            let a = c.now();
            std::thread::sleep(Duration::from_millis(20));
            let ns = c.nanos(a, c.now());
            assert!((15_000_000..200_000_000).contains(&ns), "{kind:?}: {ns} ns");
        }
    }
}
