//! Rebuilding: chunks left short of replicas (a donor failed) or on a reclaiming donor get a
//! new copy elsewhere, and failed donors are tried again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::MutexGuard;
use std::time::Duration;

use rmem_wire::protocol::SlabGrant;

use super::{lock, Replica, ReplicaState, Store};

impl Store {
    /// One repair pass: every chunk short of live replicas (or holding a leaving one) gets a
    /// copy on another donor. Returns how many chunks are still short (no donor could take
    /// them). Writes reach a copy while it fills, so none is missed (see `copy_chunk`).
    ///
    /// The copies block the calling thread (no thread is started for them: the pass runs when
    /// memory may be short): drive it from a thread of its own, as the daemon does, or from a
    /// runtime with a worker to spare.
    pub async fn repair(&self) -> usize {
        let mut short = 0;
        for c in 0..self.chunks.len() {
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            let (live, leaving, used): (usize, Vec<Replica>, Vec<String>) = {
                let mut reps = lock(&self.chunks[c]);
                let healthy = |r: &Replica| self.donors[r.donor].healthy.load(Ordering::Acquire);
                // The last copies stay, though unreachable: their donors may come back.
                if reps.iter().any(|r| r.state.readable() && healthy(r)) {
                    reps.retain(healthy);
                }
                let live = reps
                    .iter()
                    .filter(|r| r.state == ReplicaState::Complete && healthy(r))
                    .count();
                let leaving = reps
                    .iter()
                    .filter(|r| r.state == ReplicaState::Leaving && healthy(r))
                    .copied()
                    .collect();
                let used = reps
                    .iter()
                    .filter(|r| r.state != ReplicaState::Leaving && healthy(r))
                    .map(|r| self.donors[r.donor].spec.domain.clone())
                    .collect();
                (live, leaving, used)
            };
            if live >= self.replicas && leaving.is_empty() {
                continue;
            }
            if live + leaving.len() == 0 {
                short += 1; // lost until a donor holding it comes back: nothing to copy from
                continue;
            }
            let mut need = self.replicas.saturating_sub(live);
            let mut used = used;
            while need > 0 {
                match self.add_replica(c, &used).await {
                    Some(domain) => {
                        used.push(domain);
                        need -= 1;
                    }
                    None => break,
                }
            }
            if need > 0 {
                short += 1;
                continue;
            }
            // Enough live copies: let the leaving slabs go.
            for rep in leaving {
                lock(&self.chunks[c])
                    .retain(|r| !(r.donor == rep.donor && r.grant.slab == rep.grant.slab));
                let d = &self.donors[rep.donor];
                if let Err(e) = d.client.free(&[rep.grant.slab]).await {
                    tracing::debug!(donor = %d.spec.addr, error = %e, "reclaimed slab already gone");
                }
                self.moved.fetch_add(1, Ordering::Relaxed);
            }
        }
        short
    }

    /// Copies chunk `c` to a new slab on a healthy donor outside `used` domains.
    async fn add_replica(&self, c: usize, used: &[String]) -> Option<String> {
        let mut candidates: Vec<usize> = (0..self.donors.len())
            .filter(|&i| {
                let d = &self.donors[i];
                d.healthy.load(Ordering::Acquire) && !used.contains(&d.spec.domain)
            })
            .collect();
        // The donor holding the fewest of our slabs first.
        candidates.sort_by_key(|&i| self.slabs_on(i));
        for i in candidates {
            let d = &self.donors[i];
            let grant = match d.client.alloc(1).await {
                Ok(mut g) => g.pop()?,
                Err(e) => {
                    tracing::debug!(donor = %d.spec.addr, error = %e, "no slab for a replica");
                    continue;
                }
            };
            if self.copy_chunk(c, i, grant) {
                self.rebuilt.fetch_add(1, Ordering::Relaxed);
                tracing::info!(chunk = c, donor = %d.spec.addr, "replica rebuilt");
                return Some(d.spec.domain.clone());
            }
            let _ = d.client.free(&[grant.slab]).await;
        }
        None
    }

    /// Copies chunk `c` into `grant` on donor `to`, a piece (up to 1 MiB) at a time, each under
    /// the chunk's lock: the new replica is in the chunk's list from the start, marked filling,
    /// so writes reach it while the copy goes on, and I/O to the chunk waits for one piece at
    /// most, never for the whole chunk. Reads use it once every piece is there.
    fn copy_chunk(&self, c: usize, to: usize, grant: SlabGrant) -> bool {
        // Buffer first, chunk second: the only order either lock is taken in together.
        let mut buf = lock(&self.copy_buf);
        let ours = |r: &Replica| r.donor == to && r.grant.slab == grant.slab;
        lock(&self.chunks[c]).push(Replica {
            donor: to,
            grant,
            state: ReplicaState::Filling,
        });
        let dst = &self.donors[to];
        // Only the parts ever written: the rest is zeros on both copies. A write marks its part
        // before it goes out, and from here on every write reaches the new copy too.
        let mut next = 0;
        while let Some(run) = self.written.next_run(c, next, self.chunk, buf.len() as u64) {
            let (off, n) = (run.start, (run.end - run.start) as usize);
            next = run.end;
            let Some(mut held) = self.quiesce(c) else {
                // Requests on the chunk did not finish: leave it to the next pass.
                lock(&self.chunks[c]).retain(|r| !ours(r));
                return false;
            };
            let reps = &mut held.reps;
            // A write to it failed (and dropped it), or the chunk lost its last copy.
            if !reps.iter().any(ours) {
                return false;
            }
            let mut copied = false;
            while let Some(k) = reps.iter().position(|r| {
                r.state.readable() && self.donors[r.donor].healthy.load(Ordering::Acquire)
            }) {
                let from = reps[k];
                let src = &self.donors[from.donor];
                if let Err(e) = src
                    .client
                    .read_remote(from.grant.remote, off, &mut buf[..n])
                {
                    self.fail(from.donor, &e);
                    reps.remove(k);
                    continue;
                }
                if let Err(e) = dst.client.write_remote(grant.remote, off, &buf[..n]) {
                    self.fail(to, &e);
                    reps.retain(|r| !ours(r));
                    return false;
                }
                self.copied.fetch_add(n as u64, Ordering::Relaxed);
                copied = true;
                break;
            }
            if !copied {
                reps.retain(|r| !ours(r));
                return false;
            }
        }
        let mut reps = lock(&self.chunks[c]);
        reps.retain(|r| self.donors[r.donor].healthy.load(Ordering::Acquire));
        match reps.iter_mut().find(|r| ours(r)) {
            Some(r) => {
                r.state = ReplicaState::Complete;
                true
            }
            None => false,
        }
    }

    pub(super) fn slabs_on(&self, d: usize) -> usize {
        self.chunks
            .iter()
            .map(|c| lock(c).iter().filter(|r| r.donor == d).count())
            .sum()
    }

    /// Makes repair passes stop at the next chunk, for good (the device is going down).
    pub fn stop_repairs(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Tries to bring failed donors back (a new data queue pair); true when one came back.
    pub async fn revive(&self) -> bool {
        let mut any = false;
        for d in &self.donors {
            if d.healthy.load(Ordering::Acquire) {
                continue;
            }
            if d.client.reconnect().await.is_ok() {
                tracing::info!(donor = %d.spec.addr, "donor reachable again");
                // Before `healthy`: a channel that sees the donor healthy must see it revived.
                d.revived.fetch_add(1, Ordering::AcqRel);
                d.healthy.store(true, Ordering::Release);
                any = true;
            }
        }
        any
    }
}

/// A chunk held for a rebuild's piece: its lock, with no request in flight on it and
/// none starting until this is dropped.
pub(super) struct Quiet<'a> {
    pub(super) reps: MutexGuard<'a, Vec<Replica>>,
    flag: &'a AtomicBool,
}

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        self.flag.store(false, Ordering::Release);
    }
}

/// How long a rebuild waits for requests on a chunk to finish.
const QUIESCE_WAIT: Duration = Duration::from_secs(30);

impl Store {
    /// Stops new requests on chunk `c`, waits for those in flight, and takes the
    /// chunk's lock; `None` when they did not finish within [`QUIESCE_WAIT`].
    pub(super) fn quiesce(&self, c: usize) -> Option<Quiet<'_>> {
        let flag = &self.copying[c];
        flag.store(true, Ordering::Release);
        let until = std::time::Instant::now() + QUIESCE_WAIT;
        loop {
            if self.inflight[c].load(Ordering::Acquire) == 0 {
                let reps = lock(&self.chunks[c]);
                // Checked again under the lock, which every request takes to start.
                if self.inflight[c].load(Ordering::Acquire) == 0 {
                    return Some(Quiet { reps, flag });
                }
            }
            if std::time::Instant::now() > until {
                flag.store(false, Ordering::Release);
                return None;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
