//! How one request's piece of a chunk starts and ends, the same for [`Store::read`] and
//! [`Store::write`] (one thread, one request) and for a [`StoreChannel`](super::StoreChannel)
//! (many in flight).
//!
//! A piece takes the chunk's lock twice: to take a snapshot of the replicas it goes to (and be
//! counted in flight on the chunk), and, for a write, to apply the outcome. The remote
//! operations in between run without it, so requests to one chunk overlap; a rebuild copying a
//! piece of the chunk waits until those in flight are done and holds new ones back until its
//! piece is copied (`Store::quiesce`).

use std::ops::Range;
use std::sync::atomic::Ordering;

use arrayvec::ArrayVec;
use rmem_transport::RemoteBuf;

use super::{lock, Replica, Store, REPLICA_SLOTS};

/// A replica as a piece saw it when it started.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target {
    pub(super) donor: usize,
    pub(super) slab: u32,
    pub(super) remote: RemoteBuf,
    /// A complete copy (not one still filling): a write it took counts.
    pub(super) complete: bool,
}

impl Target {
    fn is(&self, r: &Replica) -> bool {
        self.donor == r.donor && self.slab == r.grant.slab
    }
}

pub(super) type Targets = ArrayVec<Target, REPLICA_SLOTS>;

impl Store {
    /// Starts a piece on chunk `c`: a read's targets are the complete replicas, a write's every
    /// replica (one filling included, so a rebuild misses no write), and a write's `part` is
    /// marked written first. `None`, starting nothing, while a rebuild copies a piece of the
    /// chunk. A piece started is counted in flight until [`Store::end_piece`].
    pub(super) fn try_start_piece(
        &self,
        c: usize,
        write: bool,
        part: Range<u64>,
    ) -> Option<Targets> {
        let reps = lock(&self.chunks[c]);
        if self.copying[c].load(Ordering::Acquire) {
            return None;
        }
        if write {
            // Before any copy takes it: a rebuild must copy this part, whichever copies fail.
            self.written.mark(c, part);
        }
        let targets = reps
            .iter()
            .filter(|r| write || r.state.readable())
            .take(REPLICA_SLOTS)
            .map(|r| Target {
                donor: r.donor,
                slab: r.grant.slab,
                remote: r.grant.remote,
                complete: r.state.readable(),
            })
            .collect();
        self.inflight[c].fetch_add(1, Ordering::AcqRel);
        Some(targets)
    }

    /// [`Store::try_start_piece`] for a thread with nothing else to do while a rebuild copies
    /// a piece of the chunk (one piece: a millisecond or so).
    pub(super) fn start_piece(&self, c: usize, write: bool, part: Range<u64>) -> Targets {
        loop {
            if let Some(t) = self.try_start_piece(c, write, part.clone()) {
                return t;
            }
            std::thread::yield_now();
        }
    }

    /// A piece is over: its chunk is free for a rebuild again.
    pub(super) fn end_piece(&self, c: usize) {
        self.inflight[c].fetch_sub(1, Ordering::AcqRel);
    }

    /// A read found no replica to serve it. One still filling cannot: the chunk has no copy
    /// left to rebuild from, so it goes.
    pub(super) fn read_lost(&self, c: usize) {
        lock(&self.chunks[c]).retain(|r| r.state.readable());
    }

    /// Applies a write's outcome to chunk `c`: `ok` complete copies took it, and the targets
    /// in `missed` (by index) did not. True when the write is lost (no complete copy took it):
    /// it fails as a whole and the copies keep what they had for their donors' return.
    /// Otherwise a replica that missed it is stale, never read again, and goes.
    pub(super) fn settle_write(&self, c: usize, targets: &Targets, ok: usize, missed: u64) -> bool {
        let mut reps = lock(&self.chunks[c]);
        if ok == 0 {
            reps.retain(|r| r.state.readable());
            return true;
        }
        reps.retain(|r| {
            !targets
                .iter()
                .enumerate()
                .any(|(k, t)| missed & (1 << k) != 0 && t.is(r))
        });
        false
    }
}
