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

use super::{lock, Replica, Store, GEN_BLOCK, REPLICA_SLOTS};

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
            self.written.mark(c, part.clone());
            self.bump_generations(c, part);
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

    /// Marks `part` of chunk `c` as changing (a write starting or ending there): read-ahead
    /// windows over it are stale.
    fn bump_generations(&self, c: usize, part: Range<u64>) {
        let start = c as u64 * self.chunk + part.start;
        let end = c as u64 * self.chunk + part.end;
        for b in start / GEN_BLOCK..end.div_ceil(GEN_BLOCK) {
            if let Some(g) = self.generations.get(b as usize) {
                g.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// The sum of the write generations over `[off, off + len)`: unchanged between two looks
    /// only if no write to the range started or ended in between (generations only grow).
    pub(super) fn generation_sum(&self, off: u64, len: usize) -> u64 {
        let end = off + len as u64;
        (off / GEN_BLOCK..end.div_ceil(GEN_BLOCK))
            .filter_map(|b| self.generations.get(b as usize))
            .map(|g| u64::from(g.load(Ordering::SeqCst)))
            .sum()
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
    pub(super) fn settle_write(
        &self,
        c: usize,
        part: Range<u64>,
        targets: &Targets,
        ok: usize,
        missed: u64,
    ) -> bool {
        self.bump_generations(c, part);
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
