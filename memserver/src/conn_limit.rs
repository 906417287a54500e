//! Bounds on the TCP connections a listener serves at once: in total and per source address.
//! A connection over either bound is closed as soon as it is accepted, so one address (or a
//! flood from many) cannot exhaust the donor's descriptors or tasks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
    /// Kept equal to `total` for whoever reports it (metrics).
    gauge: Option<Arc<AtomicUsize>>,
}

/// Counts the connections of one listener.
#[derive(Clone)]
pub(crate) struct ConnLimit {
    max_total: usize,
    max_per_source: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted connection; dropping it frees its place.
pub(crate) struct Permit {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Total(usize),
    Source(usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Total(n) => write!(f, "{n} connections open, the limit"),
            Full::Source(n) => write!(f, "{n} connections from this address, the limit"),
        }
    }
}

impl ConnLimit {
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> ConnLimit {
        ConnLimit {
            max_total,
            max_per_source,
            counts: Arc::default(),
        }
    }

    /// Like [`ConnLimit::new`], keeping `gauge` equal to the connections open.
    pub(crate) fn with_gauge(
        max_total: usize,
        max_per_source: usize,
        gauge: Arc<AtomicUsize>,
    ) -> ConnLimit {
        let l = ConnLimit::new(max_total, max_per_source);
        l.counts.lock().unwrap_or_else(|e| e.into_inner()).gauge = Some(gauge);
        l
    }

    pub(crate) fn admit(&self, ip: IpAddr) -> Result<Permit, Full> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.max_total {
            return Err(Full::Total(c.total));
        }
        let n = c.by_source.entry(ip).or_default();
        if *n >= self.max_per_source {
            return Err(Full::Source(*n));
        }
        *n += 1;
        c.total += 1;
        if let Some(g) = &c.gauge {
            g.store(c.total, Ordering::Relaxed);
        }
        Ok(Permit {
            ip,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(g) = &c.gauge {
            g.store(c.total, Ordering::Relaxed);
        }
        if let Some(n) = c.by_source.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_total_and_per_source_and_frees_on_drop() {
        let l = ConnLimit::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.admit(a).unwrap();
        let _p2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Full::Source(2)));
        let _p3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(Full::Total(3)));
        drop(p1);
        assert!(l.admit(a).is_ok(), "a freed place is usable again");
    }
}
