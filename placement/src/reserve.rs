//! Bandwidth reservations with deadlines (DRAC's idea: a transfer states how much it must move
//! and by when, and the network plans for it).
//!
//! Each path has a capacity and a schedule of grants; a grant is a constant rate over an
//! interval. A request {bytes, earliest start, deadline} is admitted at the earliest finish the
//! schedule allows: it may start later than asked (within its laxity, deadline - earliest -
//! bytes/capacity) and at a lower rate than the link's, wherever the capacity left over fits. A
//! request that cannot finish in time is refused with the earliest deadline that would fit, so a
//! caller can decide rather than guess. The transport's token bucket holds a transfer to its
//! grant's rate.

use serde::{Deserialize, Serialize};

/// A request, times in milliseconds of the service's clock.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Want {
    pub bytes: u64,
    pub earliest_ms: u64,
    pub deadline_ms: u64,
}

/// An admitted reservation: `rate` bytes per second from `start_ms` to `end_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: u64,
    pub rate: f64,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Why a request was not admitted. Nothing was reserved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReserveError {
    #[error("the deadline ({deadline_ms} ms) has already passed (now {now_ms} ms)")]
    PastDeadline { deadline_ms: u64, now_ms: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("cannot finish by the deadline; the earliest that fits is {earliest_deadline_ms} ms")]
    NoFit { earliest_deadline_ms: u64 },
}

impl ReserveError {
    pub fn code(&self) -> &'static str {
        match self {
            ReserveError::PastDeadline { .. } => "deadline_past",
            ReserveError::Invalid(_) => "invalid",
            ReserveError::NoFit { .. } => "no_fit",
        }
    }
}

/// One path's capacity and admitted grants.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    /// Bytes per second.
    pub capacity: f64,
    grants: Vec<Grant>,
    next_id: u64,
}

impl Schedule {
    pub fn new(capacity: f64) -> Schedule {
        Schedule {
            capacity,
            grants: Vec::new(),
            next_id: 1,
        }
    }

    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Rate reserved at instant `t` (ms).
    pub fn reserved_at(&self, t: u64) -> f64 {
        self.grants
            .iter()
            .filter(|g| g.start_ms <= t && t < g.end_ms)
            .map(|g| g.rate)
            .sum()
    }

    /// Drops grants that ended by `now`.
    pub fn prune(&mut self, now_ms: u64) {
        self.grants.retain(|g| g.end_ms > now_ms);
    }

    /// Admits `w` at its earliest possible finish, or says why not.
    pub fn admit(&mut self, w: Want, now_ms: u64) -> Result<Grant, ReserveError> {
        if w.deadline_ms <= now_ms {
            return Err(ReserveError::PastDeadline {
                deadline_ms: w.deadline_ms,
                now_ms,
            });
        }
        if w.bytes == 0 {
            return Err(ReserveError::Invalid("bytes must be more than 0".into()));
        }
        if w.deadline_ms <= w.earliest_ms {
            return Err(ReserveError::Invalid(
                "the deadline must come after the earliest start".into(),
            ));
        }
        if !(self.capacity.is_finite() && self.capacity > 0.0) {
            return Err(ReserveError::Invalid(
                "the path has no known capacity".into(),
            ));
        }
        self.prune(now_ms);
        let (start, rate, end) = self.earliest_finish(w.bytes, w.earliest_ms.max(now_ms));
        if end > w.deadline_ms {
            return Err(ReserveError::NoFit {
                earliest_deadline_ms: end,
            });
        }
        let g = Grant {
            id: self.next_id,
            rate,
            start_ms: start,
            end_ms: end,
        };
        self.next_id += 1;
        self.grants.push(g);
        Ok(g)
    }

    /// The (start, rate, end) that finishes `bytes` soonest, starting no earlier than `from`:
    /// each candidate start (`from`, or when a grant ends) takes the least capacity left over
    /// the interval it needs.
    fn earliest_finish(&self, bytes: u64, from: u64) -> (u64, f64, u64) {
        let mut points: Vec<u64> = self
            .grants
            .iter()
            .flat_map(|g| [g.start_ms, g.end_ms])
            .filter(|&p| p > from)
            .collect();
        points.sort_unstable();
        points.dedup();
        let starts =
            std::iter::once(from).chain(self.grants.iter().map(|g| g.end_ms).filter(|&e| e > from));
        let mut best: Option<(u64, f64, u64)> = None;
        for t in starts {
            let mut min_free = f64::INFINITY;
            let mut seg_start = t;
            let later = points.iter().copied().filter(|&p| p > t);
            for seg_end in later.map(Some).chain(std::iter::once(None)) {
                let free = self.capacity - self.reserved_at(seg_start);
                min_free = min_free.min(free);
                if min_free <= 0.0 {
                    break;
                }
                // Whole milliseconds, at the rate that fills them exactly (at most min_free).
                let end = t + ((bytes as f64 / min_free) * 1000.0).ceil().max(1.0) as u64;
                if seg_end.is_none_or(|e| end <= e) {
                    if best.is_none_or(|(_, _, b)| end < b) {
                        best = Some((t, bytes as f64 * 1000.0 / (end - t) as f64, end));
                    }
                    break;
                }
                seg_start = seg_end.unwrap_or(seg_start);
            }
        }
        // The last candidate start follows every grant, where the whole capacity is free.
        best.expect("after the last grant the path is idle")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB: f64 = 1e6;

    #[test]
    fn an_idle_path_grants_its_capacity_from_the_earliest_start() {
        let mut s = Schedule::new(100.0 * MB);
        let g = s
            .admit(
                Want {
                    bytes: 200_000_000,
                    earliest_ms: 1000,
                    deadline_ms: 5000,
                },
                0,
            )
            .unwrap();
        assert_eq!((g.start_ms, g.end_ms), (1000, 3000));
        assert!((g.rate - 100.0 * MB).abs() < 1.0);
    }

    #[test]
    fn a_request_that_does_not_fit_is_refused_with_the_earliest_deadline_that_would() {
        let mut s = Schedule::new(100.0 * MB);
        let w = Want {
            bytes: 100_000_000,
            earliest_ms: 0,
            deadline_ms: 1000,
        };
        s.admit(w, 0).unwrap();
        // The path is full for the first second: a second request moves after it.
        let e = s.admit(w, 0).unwrap_err();
        assert_eq!(
            e,
            ReserveError::NoFit {
                earliest_deadline_ms: 2000
            }
        );
        assert_eq!(s.grants().len(), 1, "a refusal reserves nothing");
        let later = s
            .admit(
                Want {
                    deadline_ms: 2000,
                    ..w
                },
                0,
            )
            .unwrap();
        assert_eq!(later.start_ms, 1000, "moved within its laxity");
    }

    #[test]
    fn a_past_deadline_and_nonsense_are_refused() {
        let mut s = Schedule::new(MB);
        let w = Want {
            bytes: 1,
            earliest_ms: 0,
            deadline_ms: 10,
        };
        assert!(matches!(
            s.admit(w, 10),
            Err(ReserveError::PastDeadline { .. })
        ));
        assert!(matches!(
            s.admit(Want { bytes: 0, ..w }, 0),
            Err(ReserveError::Invalid(_))
        ));
        assert!(matches!(
            s.admit(
                Want {
                    earliest_ms: 20,
                    ..w
                },
                0
            ),
            Err(ReserveError::Invalid(_))
        ));
        assert!(Schedule::new(0.0).admit(w, 0).is_err());
    }

    proptest! {
        #[test]
        fn admitted_grants_never_exceed_capacity_and_finish_in_time(
            reqs in prop::collection::vec((1u64..50_000_000, 0u64..5_000, 1u64..10_000), 1..40),
        ) {
            let cap = 50.0 * MB;
            let mut s = Schedule::new(cap);
            let mut admitted = Vec::new();
            for (bytes, earliest, span) in reqs {
                let w = Want { bytes, earliest_ms: earliest, deadline_ms: earliest + span };
                match s.admit(w, 0) {
                    Ok(g) => admitted.push((w, g)),
                    Err(ReserveError::NoFit { earliest_deadline_ms }) => {
                        prop_assert!(earliest_deadline_ms > w.deadline_ms);
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }
            for (w, g) in &admitted {
                prop_assert!(g.start_ms >= w.earliest_ms);
                prop_assert!(g.end_ms <= w.deadline_ms, "finishes by its deadline");
                let carried = g.rate * (g.end_ms - g.start_ms) as f64 / 1000.0;
                prop_assert!(carried >= w.bytes as f64 * (1.0 - 1e-9), "{carried} < {}", w.bytes);
            }
            let mut instants: Vec<u64> = admitted.iter().flat_map(|(_, g)| [g.start_ms, g.end_ms]).collect();
            instants.sort_unstable();
            for t in instants {
                prop_assert!(s.reserved_at(t) <= cap * (1.0 + 1e-12), "{} > {cap} at {t}", s.reserved_at(t));
            }
        }
    }
}
