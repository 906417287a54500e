//! The donated memory carved into slabs, and the state of every slab. Every change of state goes
//! through [`next`], so the life of a slab can be read in one match:
//!
//! ```text
//!            take                  reclaim (deadline)
//!   Free ----------> Lent --------------------------> Reclaiming
//!    ^  \             |  ^                         /      |
//!    |   \ retire     |  '------ cancel (grow) ---'       | given back or taken
//!    |    v           | given back (zeroed)               v
//!    |  Retired <-----+----------------------------- Retired
//!    '---- restore (grow)
//! ```
//!
//! A slab is zeroed whenever it comes back, before it can be lent again, so no tenant ever reads
//! another's data. Retiring a slab gives its pages back to the host (`MADV_DONTNEED`); it is not
//! lent again until the pool grows.

use std::time::Instant;

use rmem_transport::{Buffer, HugePages};

use crate::protocol::ErrorCode;

/// A session of the control protocol (0 is the NBD exports, sessions start at 1).
pub type SessionId = u64;

/// Where a slab is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slab {
    /// Zeroed, ready to lend.
    Free,
    /// Lent to a session; the session's lease (renewed as a whole) bounds how long.
    Lent { session: SessionId },
    /// Lent and asked back: the holder gives it back by `deadline`, or it is taken then.
    Reclaiming {
        session: SessionId,
        deadline: Instant,
    },
    /// Its pages are back with the host; lent again only after the pool grows.
    Retired,
}

impl Slab {
    fn name(&self) -> &'static str {
        match self {
            Slab::Free => "free",
            Slab::Lent { .. } => "lent",
            Slab::Reclaiming { .. } => "being reclaimed",
            Slab::Retired => "retired",
        }
    }

    /// The session holding the slab, if any.
    pub fn holder(&self) -> Option<SessionId> {
        match *self {
            Slab::Lent { session } | Slab::Reclaiming { session, .. } => Some(session),
            Slab::Free | Slab::Retired => None,
        }
    }
}

/// What can happen to a slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Lent to a session.
    Lend(SessionId),
    /// Asked back from its holder.
    Reclaim(Instant),
    /// A reclaim withdrawn because the pool grew.
    Cancel,
    /// Came back (freed, lease over, session gone, or taken at its deadline), already zeroed.
    Return,
    /// Pages given back to the host.
    Retire,
    /// Made lendable again because the pool grew.
    Restore,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Lend(_) => "lend",
            Event::Reclaim(_) => "reclaim",
            Event::Cancel => "cancel the reclaim of",
            Event::Return => "give back",
            Event::Retire => "retire",
            Event::Restore => "restore",
        }
    }
}

/// A transition the ledger refuses: a bug in the caller, reported instead of corrupting state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("slab {slab}: cannot {event} a slab that is {state}")]
pub struct Illegal {
    pub slab: u32,
    pub event: &'static str,
    pub state: &'static str,
}

/// The one table of legal transitions.
pub fn next(from: Slab, event: Event) -> Option<Slab> {
    Some(match (from, event) {
        (Slab::Free, Event::Lend(session)) => Slab::Lent { session },
        (Slab::Free, Event::Retire) => Slab::Retired,
        (Slab::Lent { session }, Event::Reclaim(deadline)) => {
            Slab::Reclaiming { session, deadline }
        }
        (Slab::Lent { .. }, Event::Return) => Slab::Free,
        (Slab::Reclaiming { session, .. }, Event::Cancel) => Slab::Lent { session },
        (Slab::Reclaiming { .. }, Event::Return) => Slab::Retired,
        (Slab::Retired, Event::Restore) => Slab::Free,
        _ => return None,
    })
}

/// The donated memory and every slab's state.
pub struct Ledger {
    buf: Buffer,
    slab_size: usize,
    slabs: Vec<Slab>,
    /// Free slabs, highest id first: popping lends the lowest.
    free: Vec<u32>,
}

impl Ledger {
    pub fn new(size: usize, slab_size: usize, huge: HugePages) -> rmem_transport::Result<Ledger> {
        let count = size / slab_size;
        let buf = Buffer::alloc(count * slab_size, huge)?;
        Ok(Ledger {
            buf,
            slab_size,
            slabs: vec![Slab::Free; count],
            free: (0..count as u32).rev().collect(),
        })
    }

    pub fn buffer(&self) -> &Buffer {
        &self.buf
    }
    pub fn slab_size(&self) -> usize {
        self.slab_size
    }
    pub fn total(&self) -> u32 {
        self.slabs.len() as u32
    }
    pub fn offset(&self, slab: u32) -> usize {
        slab as usize * self.slab_size
    }
    pub fn state(&self, slab: u32) -> Option<Slab> {
        self.slabs.get(slab as usize).copied()
    }
    pub fn holder(&self, slab: u32) -> Option<SessionId> {
        self.state(slab).and_then(|s| s.holder())
    }
    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }
    pub fn retired_count(&self) -> u32 {
        self.count(|s| matches!(s, Slab::Retired))
    }
    pub fn reclaiming_count(&self) -> u32 {
        self.count(|s| matches!(s, Slab::Reclaiming { .. }))
    }

    fn count(&self, f: impl Fn(&Slab) -> bool) -> u32 {
        self.slabs.iter().filter(|s| f(s)).count() as u32
    }

    /// Applies `event` to `slab`, or says why it cannot happen. Keeps the free list in step.
    fn apply(&mut self, slab: u32, event: Event) -> Result<Slab, Illegal> {
        let illegal = |state: &'static str| Illegal {
            slab,
            event: event.name(),
            state,
        };
        let from = self.state(slab).ok_or(illegal("unknown"))?;
        let to = next(from, event).ok_or(illegal(from.name()))?;
        self.slabs[slab as usize] = to;
        if from == Slab::Free {
            // The free list is sorted highest first.
            if let Ok(i) = self.free.binary_search_by(|p| slab.cmp(p)) {
                self.free.remove(i);
            }
        }
        if to == Slab::Free {
            self.free.push(slab);
        }
        Ok(to)
    }

    /// Lends `n` slabs (lowest ids first) to `session`, all or none.
    pub fn take(&mut self, session: SessionId, n: u32) -> Result<Vec<u32>, (ErrorCode, String)> {
        if n as usize > self.free.len() {
            return Err((
                ErrorCode::PoolExhausted,
                format!("{n} slabs asked, {} free", self.free.len()),
            ));
        }
        let ids: Vec<u32> = (0..n).filter_map(|_| self.free.pop()).collect();
        for &id in &ids {
            // Popped from the free list, so the slab is free and lending it is legal.
            match next(self.slabs[id as usize], Event::Lend(session)) {
                Some(to) => self.slabs[id as usize] = to,
                None => debug_assert!(false, "slab {id} on the free list is not free"),
            }
        }
        Ok(ids)
    }

    /// Retires up to `n` free slabs, highest ids first (the lowest stay to be lent first);
    /// returns how many.
    pub fn retire_free(&mut self, n: u32) -> u32 {
        let mut done = 0;
        while done < n {
            // The free list is sorted highest first.
            let Some(&slab) = self.free.first() else {
                break;
            };
            if self.apply(slab, Event::Retire).is_err() {
                break;
            }
            // Free slabs are already zero; dropping the pages is what gives memory back.
            if let Err(e) = self.buf.zero(self.offset(slab), self.slab_size) {
                tracing::warn!(slab, error = %e, "could not release a retired slab's pages");
            }
            done += 1;
        }
        done
    }

    /// Asks a slab back from `session` by `deadline`.
    pub fn reclaim(
        &mut self,
        slab: u32,
        session: SessionId,
        deadline: Instant,
    ) -> Result<(), Illegal> {
        if self.state(slab) != Some(Slab::Lent { session }) {
            return Err(Illegal {
                slab,
                event: "reclaim",
                state: self.state(slab).map_or("unknown", |s| s.name()),
            });
        }
        self.apply(slab, Event::Reclaim(deadline)).map(drop)
    }

    /// Takes a slab back from its holder once its registrations are gone: zeroed, then free (or
    /// retired if it was being reclaimed). A slab that cannot be zeroed stays out of the pool.
    pub fn give_back(&mut self, slab: u32) -> Result<Slab, Illegal> {
        let state = self.state(slab);
        if state.and_then(|s| next(s, Event::Return)).is_none() {
            return self.apply(slab, Event::Return);
        }
        if let Err(e) = self.buf.zero(self.offset(slab), self.slab_size) {
            tracing::error!(slab, error = %e, "could not zero a slab; keeping it out of the pool");
            return Err(Illegal {
                slab,
                event: "give back unzeroed",
                state: "lent",
            });
        }
        let to = self.apply(slab, Event::Return)?;
        if to == Slab::Free {
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
        Ok(to)
    }

    /// Makes up to `n` slabs lendable again: withdraws pending reclaims first, then restores
    /// retired slabs; returns how many.
    pub fn grow(&mut self, n: u32) -> u32 {
        let mut done = 0;
        let reclaiming: Vec<u32> = (0..self.total())
            .filter(|&s| matches!(self.slabs[s as usize], Slab::Reclaiming { .. }))
            .collect();
        let retired: Vec<u32> = (0..self.total())
            .rev()
            .filter(|&s| self.slabs[s as usize] == Slab::Retired)
            .collect();
        for (slab, event) in reclaiming
            .into_iter()
            .map(|s| (s, Event::Cancel))
            .chain(retired.into_iter().map(|s| (s, Event::Restore)))
        {
            if done == n {
                break;
            }
            if self.apply(slab, event).is_ok() {
                done += 1;
            }
        }
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        done
    }

    /// Slabs being reclaimed whose deadline has passed, with their holders.
    pub fn overdue(&self, now: Instant) -> Vec<(u32, SessionId)> {
        self.slabs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match *s {
                Slab::Reclaiming { session, deadline } if deadline <= now => {
                    Some((i as u32, session))
                }
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ledger(slabs: usize) -> Ledger {
        Ledger::new(slabs << 12, 1 << 12, HugePages::Never).unwrap()
    }

    #[test]
    fn the_transition_table_allows_exactly_the_documented_moves() {
        let t = Instant::now();
        let states = [
            Slab::Free,
            Slab::Lent { session: 3 },
            Slab::Reclaiming {
                session: 3,
                deadline: t,
            },
            Slab::Retired,
        ];
        let events = [
            Event::Lend(4),
            Event::Reclaim(t),
            Event::Cancel,
            Event::Return,
            Event::Retire,
            Event::Restore,
        ];
        let mut legal = Vec::new();
        for from in states {
            for ev in events {
                if let Some(to) = next(from, ev) {
                    legal.push((from.name(), ev.name(), to));
                }
            }
        }
        assert_eq!(
            legal,
            vec![
                ("free", "lend", Slab::Lent { session: 4 }),
                ("free", "retire", Slab::Retired),
                (
                    "lent",
                    "reclaim",
                    Slab::Reclaiming {
                        session: 3,
                        deadline: t
                    }
                ),
                ("lent", "give back", Slab::Free),
                (
                    "being reclaimed",
                    "cancel the reclaim of",
                    Slab::Lent { session: 3 }
                ),
                ("being reclaimed", "give back", Slab::Retired),
                ("retired", "restore", Slab::Free),
            ],
            "every other (state, event) pair must be refused"
        );
    }

    #[test]
    fn each_illegal_move_is_refused_and_changes_nothing() {
        let mut l = ledger(4);
        let later = Instant::now() + Duration::from_secs(5);
        // A free slab: cannot be given back, reclaimed or restored.
        assert!(l.give_back(0).is_err());
        assert!(l.reclaim(0, 1, later).is_err());
        assert!(l.apply(0, Event::Restore).is_err());
        assert!(l.apply(0, Event::Cancel).is_err());
        assert_eq!(l.state(0), Some(Slab::Free));
        // A lent slab: not lent twice, not retired, not reclaimed for another session.
        let ids = l.take(1, 1).unwrap();
        assert_eq!(ids, vec![0]);
        assert!(l.apply(0, Event::Lend(2)).is_err());
        assert!(l.apply(0, Event::Retire).is_err());
        assert!(l.apply(0, Event::Restore).is_err());
        let e = l.reclaim(0, 2, later).unwrap_err();
        assert_eq!(e.state, "lent");
        assert_eq!(l.state(0), Some(Slab::Lent { session: 1 }));
        // Being reclaimed: not reclaimed again, not lent, not retired while held.
        l.reclaim(0, 1, later).unwrap();
        assert!(l.reclaim(0, 1, later).is_err());
        assert!(l.apply(0, Event::Lend(2)).is_err());
        assert!(l.apply(0, Event::Retire).is_err());
        // Retired: not lent, given back or reclaimed.
        assert_eq!(l.retire_free(1), 1);
        let retired = 3;
        assert_eq!(l.state(retired), Some(Slab::Retired));
        assert!(l.give_back(retired).is_err());
        assert!(l.reclaim(retired, 1, later).is_err());
        assert!(l.apply(retired, Event::Lend(1)).is_err());
        // Out of range.
        assert_eq!(l.give_back(99).unwrap_err().state, "unknown");
        // The free list never holds a slab that is not free.
        for s in &l.free {
            assert_eq!(l.state(*s), Some(Slab::Free));
        }
    }

    #[test]
    fn retiring_and_growing_keep_every_slab_accounted_for() {
        let mut l = ledger(8);
        let later = Instant::now() + Duration::from_secs(5);
        let lent = l.take(7, 3).unwrap();
        assert_eq!(lent, vec![0, 1, 2], "lowest ids are lent first");
        assert_eq!(l.retire_free(2), 2);
        assert_eq!(l.state(7), Some(Slab::Retired), "highest ids retire first");
        assert_eq!(l.free_count(), 3);
        l.reclaim(lent[0], 7, later).unwrap();
        l.buffer().write_at(0, b"secret").unwrap();
        assert_eq!(l.give_back(lent[0]), Ok(Slab::Retired));
        assert_eq!(
            l.retired_count(),
            3,
            "a reclaimed slab retires when it comes back"
        );
        assert_eq!(l.give_back(lent[1]), Ok(Slab::Free));
        assert_eq!(l.free_count(), 4);
        l.reclaim(lent[2], 7, later).unwrap();
        assert_eq!(
            l.grow(2),
            2,
            "growing withdraws reclaims first, then restores"
        );
        assert_eq!(l.state(lent[2]), Some(Slab::Lent { session: 7 }));
        assert_eq!(l.retired_count(), 2);
        assert_eq!(l.grow(10), 2);
        assert_eq!(l.free_count() + 1, l.total());
        // Whatever was lent and retired comes back zeroed when lent again.
        let again = l.take(9, l.free_count()).unwrap();
        assert!(again.contains(&0));
        let mut b = [1u8; 6];
        l.buffer().read_at(0, &mut b).unwrap();
        assert_eq!(b, [0; 6]);
    }

    #[test]
    fn overdue_lists_only_reclaims_past_their_deadline() {
        let mut l = ledger(4);
        let now = Instant::now();
        l.take(5, 3).unwrap();
        l.reclaim(0, 5, now).unwrap();
        l.reclaim(1, 5, now + Duration::from_secs(60)).unwrap();
        assert_eq!(l.overdue(now), vec![(0, 5)]);
        assert_eq!(l.give_back(0), Ok(Slab::Retired));
        assert!(l.overdue(now).is_empty());
    }

    #[test]
    fn take_is_all_or_nothing() {
        let mut l = ledger(2);
        assert_eq!(l.take(1, 3).unwrap_err().0, ErrorCode::PoolExhausted);
        assert_eq!(l.free_count(), 2);
    }
}
