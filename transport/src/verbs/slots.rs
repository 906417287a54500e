//! What a queue pair remembers about posted work until the hardware reports it complete.
//!
//! Every posted work request takes a slot in a per-queue ring, in post order. The slot keeps the
//! caller's `wr_id`, the completion opcode to report if the request fails (an error completion's
//! opcode field is not valid), and an `Arc` of every memory region its SGEs use, so memory
//! cannot be deregistered or freed while the device may still touch it.
//!
//! The device sees a sequence number instead of the caller's `wr_id` (top bit: receive queue).
//! A send queue completes in order, so a completion for sequence `s` also retires the
//! unsignaled slots before `s`; a receive queue produces a completion for every request.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use rdma_sys as sys;
use smallvec::SmallVec;

use crate::mr::MrInner;
use crate::WcOpcode;

/// Set in the device-visible `wr_id` of receive requests.
pub(crate) const RECV_BIT: u64 = 1 << 63;

/// One outstanding work request.
pub(crate) struct Slot {
    pub(crate) wr_id: u64,
    pub(crate) opcode: WcOpcode,
    /// Regions the request reads or writes, held until it completes.
    pub(crate) _held: SmallVec<[Arc<MrInner>; 4]>,
}

/// Slots in post order; slot `i` has sequence number `front_seq + i`.
pub(crate) struct Ring {
    slots: VecDeque<Option<Slot>>,
    front_seq: u64,
    cap: usize,
}

impl Ring {
    /// A ring of `cap` slots whose first sequence number is `start` (random per queue pair, so
    /// a stale completion of a destroyed queue pair that reused the number matches nothing).
    pub(crate) fn new(cap: usize, start: u64) -> Ring {
        Ring {
            slots: VecDeque::with_capacity(cap),
            front_seq: start & (u64::MAX >> 2),
            cap,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_full(&self) -> bool {
        self.slots.len() >= self.cap
    }

    /// Takes a slot; returns its sequence number.
    pub(crate) fn push(&mut self, slot: Slot) -> u64 {
        let seq = self.front_seq + self.slots.len() as u64;
        self.slots.push_back(Some(slot));
        seq
    }

    /// Gives back the last `n` slots (requests the device refused).
    pub(crate) fn pop_back(&mut self, n: usize) {
        for _ in 0..n {
            self.slots.pop_back();
        }
    }

    /// Takes the slot of a completion. With `in_order` (send queues) every earlier slot is
    /// retired too: those requests were unsignaled and completed before this one.
    /// `None` for a sequence number this ring does not hold.
    pub(crate) fn complete(&mut self, seq: u64, in_order: bool) -> Option<Slot> {
        let idx = usize::try_from(seq.checked_sub(self.front_seq)?).ok()?;
        let slot = self.slots.get_mut(idx)?.take()?;
        if in_order {
            for s in self.slots.iter_mut().take(idx) {
                *s = None;
            }
        }
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.front_seq += 1;
        }
        Some(slot)
    }
}

/// A ring plus the buffers a post builds its work-request chain in (reused, so a post does not
/// allocate once they have grown to the largest chain).
pub(crate) struct WorkQueue<W> {
    pub(crate) ring: Ring,
    pub(crate) wrs: Vec<W>,
    pub(crate) sges: Vec<sys::ibv_sge>,
}

impl<W> WorkQueue<W> {
    pub(crate) fn new(cap: usize, start: u64) -> WorkQueue<W> {
        WorkQueue {
            ring: Ring::new(cap, start),
            wrs: Vec::new(),
            sges: Vec::new(),
        }
    }
}

// SAFETY: the raw pointers inside the work requests only point into `sges` and `wrs` of the
// same queue; they are rebuilt under the queue's lock for every post and never read outside it.
unsafe impl Send for WorkQueue<sys::ibv_send_wr> {}
// SAFETY: as above, for receive requests.
unsafe impl Send for WorkQueue<sys::ibv_recv_wr> {}

/// The part of a queue pair its completion queues need, found by queue-pair number.
pub(crate) struct QpState {
    pub(crate) send: Mutex<WorkQueue<sys::ibv_send_wr>>,
    pub(crate) recv: Mutex<WorkQueue<sys::ibv_recv_wr>>,
    /// Set by the first error completion or by `shutdown`.
    pub(crate) failed: AtomicBool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(wr_id: u64) -> Slot {
        Slot {
            wr_id,
            opcode: WcOpcode::Write,
            _held: SmallVec::new(),
        }
    }

    #[test]
    fn signaled_completion_retires_earlier_slots() {
        let mut r = Ring::new(4, 100);
        let seqs: Vec<u64> = (0..4).map(|i| r.push(slot(i))).collect();
        assert_eq!(seqs, [100, 101, 102, 103]);
        assert!(r.is_full());
        assert_eq!(r.complete(102, true).map(|s| s.wr_id), Some(2));
        assert_eq!(r.len(), 1);
        assert!(r.complete(101, true).is_none(), "retired slots are gone");
        assert_eq!(r.push(slot(9)), 104);
        assert_eq!(r.complete(103, true).map(|s| s.wr_id), Some(3));
        assert_eq!(r.complete(104, true).map(|s| s.wr_id), Some(9));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn receive_completions_leave_other_slots() {
        let mut r = Ring::new(8, 0);
        for i in 0..3 {
            r.push(slot(i));
        }
        assert_eq!(r.complete(1, false).map(|s| s.wr_id), Some(1));
        assert_eq!(
            r.len(),
            3,
            "a hole in the middle keeps the ring's numbering"
        );
        assert_eq!(r.complete(0, false).map(|s| s.wr_id), Some(0));
        assert_eq!(r.len(), 1);
        assert_eq!(r.complete(2, false).map(|s| s.wr_id), Some(2));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn unknown_and_refused_sequences() {
        let mut r = Ring::new(8, 50);
        r.push(slot(1));
        r.push(slot(2));
        r.push(slot(3));
        r.pop_back(2);
        assert!(r.complete(51, true).is_none());
        assert!(r.complete(49, true).is_none());
        assert!(r.complete(u64::MAX, true).is_none());
        assert_eq!(r.push(slot(4)), 51);
        assert_eq!(r.complete(51, true).map(|s| s.wr_id), Some(4));
    }

    #[test]
    fn start_leaves_room_and_the_receive_bit() {
        let mut r = Ring::new(1, u64::MAX);
        let s = r.push(slot(0));
        assert_eq!(s & RECV_BIT, 0);
        assert!(s <= u64::MAX >> 2, "2^62 posts fit before the receive bit");
    }
}
