//! The link map: how busy each path between hosts is, smoothed so decisions do not chase noise.
//!
//! Hosts send, with each heartbeat, the bytes they moved to each peer since the last one. Each
//! directed path keeps an exponentially weighted rate whose half-life is set cluster-wide (a step
//! in traffic reaches 90% of its new level after log2(10) = 3.32 half-lives, whatever the
//! heartbeat spacing), and publishes a new figure only when it moved past a threshold, so a burst
//! shorter than the smoothing does not reorder donors (VTTIF's damping). Headroom is what a path
//! can still carry: its capacity less the published use and the bandwidth reserved on it.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bytes moved between the reporting host and one peer since the previous report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficDelta {
    pub peer: String,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// How the map smooths and damps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Smoothing {
    pub half_life: Duration,
    /// A published rate changes only when the smoothed one differs from it by more than this
    /// share of the path's capacity (or of the published rate when the capacity is unknown).
    pub threshold: f64,
}

impl Default for Smoothing {
    fn default() -> Smoothing {
        Smoothing {
            half_life: Duration::from_secs(10),
            threshold: 0.05,
        }
    }
}

/// One path's smoothed rate, in bytes per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rate {
    pub smoothed: f64,
    pub published: f64,
}

impl Rate {
    /// Folds in `bytes` moved over `dt`; true if the published rate changed.
    pub fn observe(&mut self, bytes: u64, dt: Duration, s: &Smoothing, capacity: f64) -> bool {
        let dt = dt.as_secs_f64();
        if dt <= 0.0 {
            return false;
        }
        let h = s.half_life.as_secs_f64().max(1e-3);
        // Exact for any spacing: n samples of dt weigh the same as one of n*dt.
        let alpha = 1.0 - (-dt / h).exp2();
        self.smoothed += alpha * (bytes as f64 / dt - self.smoothed);
        let scale = if capacity > 0.0 {
            capacity
        } else {
            self.published.max(1.0)
        };
        if (self.smoothed - self.published).abs() > s.threshold * scale {
            self.published = self.smoothed;
            return true;
        }
        false
    }
}

/// A directed path: from one host to another.
pub type Path = (String, String);

/// The traffic matrix and each path's capacity.
#[derive(Debug, Default)]
pub struct LinkMap {
    smoothing: Smoothing,
    rates: HashMap<Path, Rate>,
    /// Bytes per second a path can carry (from port rates or a probe).
    capacity: HashMap<Path, f64>,
    /// Each host's port rate in bytes per second.
    ports: HashMap<String, f64>,
    /// Published changes since start (a damped map changes rarely).
    pub changes: u64,
}

/// One path as shown to operators.
#[derive(Debug, Clone, Serialize)]
pub struct LinkView {
    pub from: String,
    pub to: String,
    pub capacity_bps: f64,
    pub used_bps: f64,
    pub headroom_bps: f64,
}

impl LinkMap {
    pub fn new(smoothing: Smoothing) -> LinkMap {
        LinkMap {
            smoothing,
            ..LinkMap::default()
        }
    }

    /// A host's port rate, in bits per second (as donors report it).
    pub fn set_port(&mut self, host: &str, bits_per_sec: u64) {
        if bits_per_sec > 0 {
            self.ports
                .insert(host.to_owned(), bits_per_sec as f64 / 8.0);
        }
    }

    /// A measured capacity for one path, in bytes per second.
    pub fn set_capacity(&mut self, from: &str, to: &str, bytes_per_sec: f64) {
        self.capacity
            .insert((from.to_owned(), to.to_owned()), bytes_per_sec);
    }

    /// A path's capacity: measured if probed, else the slower port, else unknown (0).
    pub fn capacity(&self, from: &str, to: &str) -> f64 {
        if let Some(&c) = self.capacity.get(&(from.to_owned(), to.to_owned())) {
            return c;
        }
        match (self.ports.get(from), self.ports.get(to)) {
            (Some(&a), Some(&b)) => a.min(b),
            (Some(&a), None) | (None, Some(&a)) => a,
            (None, None) => 0.0,
        }
    }

    /// Folds in one host's report: what it sent to and received from each peer over `dt`.
    /// Returns how many published rates changed.
    pub fn report(&mut self, host: &str, deltas: &[TrafficDelta], dt: Duration) -> usize {
        let mut changed = 0;
        for d in deltas {
            for (from, to, bytes) in [
                (host, d.peer.as_str(), d.tx_bytes),
                (d.peer.as_str(), host, d.rx_bytes),
            ] {
                let cap = self.capacity(from, to);
                let r = self
                    .rates
                    .entry((from.to_owned(), to.to_owned()))
                    .or_default();
                if r.observe(bytes, dt, &self.smoothing, cap) {
                    changed += 1;
                }
            }
        }
        self.changes += changed as u64;
        changed
    }

    /// The published rate on a path, bytes per second.
    pub fn used(&self, from: &str, to: &str) -> f64 {
        self.rates
            .get(&(from.to_owned(), to.to_owned()))
            .map_or(0.0, |r| r.published)
    }

    /// Everything a host's port carries out and in, as a share of its rate (0 if unknown).
    pub fn port_load(&self, host: &str) -> f32 {
        let Some(&rate) = self.ports.get(host) else {
            return 0.0;
        };
        let (mut out, mut inn) = (0.0f64, 0.0f64);
        for ((from, to), r) in &self.rates {
            if from == host {
                out += r.published;
            }
            if to == host {
                inn += r.published;
            }
        }
        (out.max(inn) / rate) as f32
    }

    /// What a path can still carry, bytes per second: capacity less published use less
    /// `reserved`. Never negative.
    pub fn headroom(&self, from: &str, to: &str, reserved: f64) -> f64 {
        (self.capacity(from, to) - self.used(from, to) - reserved).max(0.0)
    }

    /// Every path with a capacity or traffic, the most headroom first.
    pub fn view(&self) -> Vec<LinkView> {
        let mut paths: Vec<&Path> = self.rates.keys().chain(self.capacity.keys()).collect();
        paths.sort();
        paths.dedup();
        let mut v: Vec<LinkView> = paths
            .into_iter()
            .map(|(f, t)| LinkView {
                from: f.clone(),
                to: t.clone(),
                capacity_bps: self.capacity(f, t) * 8.0,
                used_bps: self.used(f, t) * 8.0,
                headroom_bps: self.headroom(f, t, 0.0) * 8.0,
            })
            .collect();
        v.sort_by(|a, b| b.headroom_bps.total_cmp(&a.headroom_bps));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(threshold: f64) -> Smoothing {
        Smoothing {
            half_life: Duration::from_secs(10),
            threshold,
        }
    }

    /// Feeds a constant rate in steps of `dt` until the smoothed rate reaches `share` of it;
    /// returns the time taken in half-lives.
    fn half_lives_to(share: f64, dt: Duration) -> f64 {
        let mut r = Rate::default();
        let rate = 1e9;
        let mut t = Duration::ZERO;
        while r.smoothed < share * rate {
            r.observe((rate * dt.as_secs_f64()) as u64, dt, &s(0.0), 0.0);
            t += dt;
            assert!(t < Duration::from_secs(1000), "never got there");
        }
        t.as_secs_f64() / 10.0
    }

    #[test]
    fn a_step_reaches_ninety_percent_in_log2_ten_half_lives_at_any_spacing() {
        for dt in [Duration::from_millis(100), Duration::from_secs(1)] {
            let h = half_lives_to(0.9, dt);
            // log2(10) = 3.32; sampling adds at most one step.
            assert!(
                h >= 3.3 && h <= 3.33 + dt.as_secs_f64() / 10.0,
                "{h} at {dt:?}"
            );
            let half = half_lives_to(0.5, dt);
            assert!(
                (half - 1.0).abs() <= dt.as_secs_f64() / 10.0 + 1e-9,
                "{half}"
            );
        }
    }

    #[test]
    fn a_burst_under_the_threshold_publishes_nothing() {
        let cap = 1e9; // 1 GB/s
        let sm = s(0.05);
        let mut r = Rate {
            smoothed: 2e8,
            published: 2e8,
        };
        // One second at 500 MB/s moves the smoothed rate by ~20 MB/s, under 5% of 1 GB/s.
        assert!(!r.observe(500_000_000, Duration::from_secs(1), &sm, cap));
        assert_eq!(r.published, 2e8);
        assert!(r.smoothed > 2.1e8);
        // Sustained, it is published, and stays within the threshold of the smoothed rate.
        let mut published = 0;
        for _ in 0..40 {
            published += usize::from(r.observe(500_000_000, Duration::from_secs(1), &sm, cap));
            assert!((r.smoothed - r.published).abs() <= 0.05 * cap);
        }
        assert!((1..=6).contains(&published), "{published} changes: damped");
        assert!(r.published > 4.4e8, "{}", r.published);
    }

    #[test]
    fn the_map_counts_both_directions_of_a_report() {
        let mut m = LinkMap::new(s(0.05));
        m.set_port("a", 8_000_000_000);
        m.set_port("b", 8_000_000_000);
        let d = TrafficDelta {
            peer: "b".into(),
            tx_bytes: 300_000_000,
            rx_bytes: 100_000_000,
        };
        for _ in 0..100 {
            m.report("a", std::slice::from_ref(&d), Duration::from_secs(1));
        }
        assert!(
            (m.used("a", "b") - 3e8).abs() <= 5e7,
            "{}",
            m.used("a", "b")
        );
        assert!(
            (m.used("b", "a") - 1e8).abs() <= 5e7,
            "{}",
            m.used("b", "a")
        );
        assert!(m.changes > 0 && m.changes < 40, "{} changes", m.changes);
        assert!((m.port_load("a") - 0.3).abs() <= 0.05);
    }

    #[test]
    fn headroom_is_capacity_less_use_less_reservations() {
        let mut m = LinkMap::new(s(0.0));
        m.set_port("a", 800_000_000); // 100 MB/s
        m.set_port("b", 1_600_000_000);
        assert_eq!(m.capacity("a", "b"), 1e8);
        m.set_capacity("a", "b", 5e7);
        assert_eq!(m.capacity("a", "b"), 5e7);
        for _ in 0..200 {
            m.report(
                "a",
                &[TrafficDelta {
                    peer: "b".into(),
                    tx_bytes: 10_000_000,
                    rx_bytes: 0,
                }],
                Duration::from_secs(1),
            );
        }
        let h = m.headroom("a", "b", 1e7);
        assert!((h - 3e7).abs() < 1e5, "{h}");
        assert_eq!(m.headroom("a", "b", 1e9), 0.0);
        assert!((m.port_load("a") - 0.1).abs() < 0.01);
    }
}
