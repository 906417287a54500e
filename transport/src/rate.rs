//! Per-peer traffic counters and a token-bucket rate limit, both kept at the queue-pair API so
//! the two providers count and pace alike.
//!
//! Counting is the initiator's: a WRITE or SEND moves its bytes to the peer, a READ brings them
//! from it (with one-sided operations the target's CPU never sees the traffic, and a verbs
//! target cannot count it at all). Each queue pair holds its peer's counter, so posting costs two
//! relaxed atomic adds and no lookup. The placement service folds these counts into its traffic
//! matrix; a bandwidth grant it admits is enforced with [`TokenBucket`] on the queue pairs that
//! carry the transfer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Op, SendWr};

/// Bytes moved to and from one peer host.
#[derive(Debug, Default)]
pub struct PeerCounter {
    tx: AtomicU64,
    rx: AtomicU64,
}

impl PeerCounter {
    /// Counts a chain of work requests as posted.
    pub(crate) fn count(&self, wrs: &[SendWr<'_>]) {
        let (mut tx, mut rx) = (0u64, 0u64);
        for wr in wrs {
            let n: u64 = wr.sgl.iter().map(|s| u64::from(s.len())).sum();
            match wr.op {
                Op::Write(_) | Op::WriteImm(..) | Op::Send | Op::SendImm(_) => tx += n,
                Op::Read(_) => rx += n,
                // An atomic moves 8 bytes each way.
                Op::CompareSwap { .. } | Op::FetchAdd { .. } => {
                    tx += 8;
                    rx += 8;
                }
            }
        }
        if tx > 0 {
            self.tx.fetch_add(tx, Ordering::Relaxed);
        }
        if rx > 0 {
            self.rx.fetch_add(rx, Ordering::Relaxed);
        }
    }
}

/// One peer's totals since the context opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerBytes {
    pub peer: IpAddr,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// Every peer's counter in one context.
#[derive(Debug, Default)]
pub(crate) struct PeerTraffic {
    peers: Mutex<HashMap<IpAddr, Arc<PeerCounter>>>,
}

impl PeerTraffic {
    /// The counter of `peer`, made on first use (at connect or accept, never per operation).
    pub(crate) fn counter(&self, peer: IpAddr) -> Arc<PeerCounter> {
        let mut m = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(peer).or_default().clone()
    }

    pub(crate) fn snapshot(&self) -> Vec<PeerBytes> {
        let m = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<PeerBytes> = m
            .iter()
            .map(|(p, c)| PeerBytes {
                peer: *p,
                tx_bytes: c.tx.load(Ordering::Relaxed),
                rx_bytes: c.rx.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by_key(|p| p.peer);
        v
    }
}

/// A token bucket: `rate` bytes per second on average, bursts of at most `burst` bytes. Shared
/// (in an `Arc`) by every queue pair of one transfer, so the grant holds for all of them.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens available (negative: debt a poster waits out) and when they were counted.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate` bytes per second (more than 0), `burst` bytes at most ahead of it.
    pub fn new(rate: f64, burst: u64) -> TokenBucket {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            f64::MAX
        };
        TokenBucket {
            rate,
            burst: burst as f64,
            state: Mutex::new((burst as f64, Instant::now())),
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes `bytes` now and returns how long the caller must wait before sending them, so the
    /// average stays at the rate however large each piece is.
    pub fn take(&self, bytes: u64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.burst) - bytes as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }

    /// Takes `bytes`, sleeping until they are within the rate.
    pub fn acquire(&self, bytes: u64) {
        let wait = self.take(bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_a_long_transfer_to_its_rate() {
        // 4 MB at 40 MB/s in 256 KiB pieces: 100 ms, whatever the piece size.
        let b = TokenBucket::new(40e6, 256 << 10);
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < 4_000_000 {
            b.acquire(256 << 10);
            sent += 256 << 10;
        }
        let took = t.elapsed().as_secs_f64();
        let expect = (sent - (256 << 10)) as f64 / 40e6;
        assert!(
            took >= expect * 0.98,
            "{took} s < {expect} s: faster than the rate"
        );
        assert!(took < expect * 1.5 + 0.05, "{took} s for {expect} s");
    }

    #[test]
    fn an_idle_bucket_allows_one_burst_and_no_more() {
        let b = TokenBucket::new(1e6, 1000);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(b.take(1000), Duration::ZERO, "a full bucket");
        let w = b.take(1000);
        assert!(
            w > Duration::from_micros(900),
            "{w:?}: the burst does not grow while idle"
        );
    }
}
