//! A block store whose blocks live in slabs borrowed from donors, each chunk (one slab) kept on
//! `replicas` donors in distinct failure domains.
//!
//! Reads go to the first healthy replica; writes go to every healthy replica and succeed when at
//! least one took them. A donor whose one-sided operation fails (error completion, timeout) is
//! marked failed at once and its replicas dropped; the rebuilder ([`Store::repair`]) copies each
//! chunk left short of replicas to another donor. A chunk with no replica left fails its I/O
//! with an error: never stale or zeroed data.
//!
//! No chunk lock is held across a remote operation (`piece.rs`): requests to one chunk overlap.
//! Swap never has two writes to one block in flight at once (a slot is written once per
//! page-out) and `Region` writes a page back from one thread, so replicas cannot take two
//! writes of one block in different orders.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::client::{Client, ClientConfig, ClientError, Notice};
use rmem_transport::Provider;
use rmem_wire::protocol::SlabGrant;
use serde::Serialize;

use arrayvec::ArrayVec;

use crate::written::WrittenMap;

mod channel;
mod piece;
mod readahead;
mod repair;

pub use channel::{IoOp, IoReq, StoreChannel};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("donor {addr}")]
    Donor {
        addr: SocketAddr,
        #[source]
        source: ClientError,
    },
    #[error("{0}")]
    Config(String),
    #[error("not enough donor memory: {0}")]
    Full(String),
    #[error("no healthy replica holds bytes {off}..{end}")]
    Lost { off: u64, end: u64 },
    #[error("access beyond the device ({off}+{len} of {size})")]
    OutOfRange { off: u64, len: u64, size: u64 },
}

/// A donor named on the command line: `HOST:PORT[@DOMAIN]`; the failure domain defaults to the
/// host's address, so two donors on one host are one domain unless labelled apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DonorSpec {
    pub addr: SocketAddr,
    pub domain: String,
}

impl std::str::FromStr for DonorSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, domain) = match s.rsplit_once('@') {
            Some((a, d)) if !d.is_empty() => (a, Some(d.to_string())),
            Some(_) => return Err(format!("{s:?}: empty failure domain after '@'")),
            None => (s, None),
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(a)
            .map_err(|e| format!("{a:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{a:?} resolves to nothing"))?;
        Ok(DonorSpec {
            domain: domain.unwrap_or_else(|| addr.ip().to_string()),
            addr,
        })
    }
}

/// More copies than any failure model needs; it bounds a chunk's replica list.
pub const MAX_REPLICAS: usize = 16;
/// The most replicas a chunk lists at once: each copy plus a new one filling for each.
const REPLICA_SLOTS: usize = 2 * MAX_REPLICAS + 1;
/// The most a rebuild copies under a chunk's lock at a time (I/O to the chunk waits that long).
pub const COPY_PIECE: usize = 1 << 20;
/// Bytes of the device per write generation (see `Store::generations`).
const GEN_BLOCK: u64 = 64 << 10;
/// One write's result per replica, by index.
type Outcomes = ArrayVec<Result<(), ClientError>, REPLICA_SLOTS>;

/// How to build a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub size: u64,
    pub replicas: usize,
    pub donors: Vec<DonorSpec>,
    pub secret: Vec<u8>,
    pub provider: Provider,
    pub device: Option<String>,
    pub name: String,
    /// A one-sided operation taking longer marks its donor failed.
    pub op_timeout: Duration,
    /// Bounds connecting to each donor (handshake and data path).
    pub connect_timeout: Duration,
    /// Data queue pairs to each donor: that many operations on one donor at once.
    pub lanes: usize,
    /// Each lane's buffer: the largest piece one operation carries, and the largest write
    /// whose replicas are posted together.
    pub bounce: usize,
    /// Donors for each chunk (indices into `donors`, one per replica) chosen by a placement
    /// service; without it the store chooses (the donor with the most free slabs first).
    pub plan: Option<Vec<Vec<usize>>>,
    /// Channels read ahead of a stream of reads (see `readahead.rs`).
    pub readahead: bool,
}

struct Donor {
    spec: DonorSpec,
    client: Arc<Client>,
    healthy: AtomicBool,
    /// Counts the times the donor came back (see `revive`): a channel opened before the last
    /// one has a queue pair that failed with the donor and needs a new one.
    revived: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Replica {
    donor: usize,
    grant: SlabGrant,
    state: ReplicaState,
}

/// Where a replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplicaState {
    /// Being rebuilt: writes go to it (so no write is missed), reads not yet.
    Filling,
    /// A complete copy.
    Complete,
    /// Complete, but its donor asked the slab back: copied elsewhere, then freed.
    Leaving,
}

impl ReplicaState {
    /// Holds every write acknowledged so far: may serve reads and be copied from.
    fn readable(self) -> bool {
        self != ReplicaState::Filling
    }
}

/// What `rmem swap status` shows of one donor.
#[derive(Debug, Clone, Serialize)]
pub struct DonorStatus {
    pub addr: String,
    pub domain: String,
    pub healthy: bool,
    pub slabs: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

/// What `rmem swap status` shows of the store.
#[derive(Debug, Clone, Serialize)]
pub struct StoreStatus {
    pub size: u64,
    pub chunk_size: u64,
    pub replicas: usize,
    pub chunks: usize,
    /// Chunks with fewer live replicas than asked for.
    pub degraded: usize,
    /// Chunks with none (their blocks give I/O errors).
    pub lost: usize,
    pub rebuilt: u64,
    pub moved: u64,
    /// Bytes rebuilds and moves copied: only parts ever written cross (see [`WrittenMap`]).
    pub copied_bytes: u64,
    /// Bytes read ahead of a stream of reads, and bytes of reads served from them.
    pub readahead_fetched_bytes: u64,
    pub readahead_served_bytes: u64,
    pub donors: Vec<DonorStatus>,
}

/// The replicated block store.
pub struct Store {
    size: u64,
    chunk: u64,
    replicas: usize,
    donors: Vec<Donor>,
    chunks: Vec<Mutex<Vec<Replica>>>,
    /// Per chunk: pieces of requests in flight (see `piece.rs`); a rebuild copies a
    /// piece of the chunk only when none is.
    inflight: Vec<AtomicU32>,
    /// Per chunk: a rebuild is copying a piece of it; requests wait to start.
    copying: Vec<AtomicBool>,
    /// What was ever written: a rebuild copies only that.
    written: WrittenMap,
    /// The repair copy buffer, allocated (and locked with the daemon's memory) up front: a
    /// rebuild runs when memory may be short, and the I/O path waits on each piece it copies.
    copy_buf: Mutex<Vec<u8>>,
    /// Set when the device goes down: a repair pass stops at the next chunk.
    stopping: AtomicBool,
    readahead: bool,
    /// Per [`GEN_BLOCK`] of the device: bumped when a write to it starts and when it ends, so
    /// a read-ahead window knows whether what it holds is still current (`readahead.rs`).
    generations: Vec<AtomicU32>,
    /// Bytes channels read ahead, and bytes of requests served from what they read ahead.
    ra_fetched: AtomicU64,
    ra_served: AtomicU64,
    rebuilt: AtomicU64,
    moved: AtomicU64,
    copied: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Connects to every donor and borrows `replicas` slabs per chunk, spread over donors in
    /// distinct failure domains, the emptiest donors first.
    pub async fn create(cfg: &StoreConfig) -> Result<Arc<Store>, StoreError> {
        let domains: std::collections::HashSet<_> =
            cfg.donors.iter().map(|d| d.domain.as_str()).collect();
        if cfg.replicas > MAX_REPLICAS {
            return Err(StoreError::Config(format!(
                "{} replicas: at most {MAX_REPLICAS}",
                cfg.replicas
            )));
        }
        if cfg.replicas == 0 || cfg.replicas > domains.len() {
            return Err(StoreError::Config(format!(
                "{} replicas need as many donors in distinct failure domains; {} given",
                cfg.replicas,
                domains.len()
            )));
        }
        let mut donors = Vec::new();
        for spec in &cfg.donors {
            let mut cc = ClientConfig::new(spec.addr, cfg.secret.clone());
            cc.name = cfg.name.clone();
            cc.provider = cfg.provider;
            cc.device = cfg.device.clone();
            cc.op_timeout = cfg.op_timeout;
            cc.connect_timeout = cfg.connect_timeout;
            cc.lanes = cfg.lanes;
            cc.bounce = cfg.bounce;
            let client = Client::connect(cc)
                .await
                .map_err(|source| StoreError::Donor {
                    addr: spec.addr,
                    source,
                })?;
            donors.push(Donor {
                spec: spec.clone(),
                client: Arc::new(client),
                healthy: AtomicBool::new(true),
                revived: AtomicU64::new(0),
                bytes_read: AtomicU64::new(0),
                bytes_written: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            });
        }
        let chunk = donors[0].client.slab_size();
        if let Some(d) = donors.iter().find(|d| d.client.slab_size() != chunk) {
            return Err(StoreError::Config(format!(
                "donor {} lends {}-byte slabs, {} lends {chunk}: use one slab size",
                d.spec.addr,
                d.client.slab_size(),
                donors[0].spec.addr
            )));
        }
        if cfg.size == 0 || !cfg.size.is_multiple_of(4096) {
            return Err(StoreError::Config(
                "size must be a positive multiple of 4096".into(),
            ));
        }
        let n = cfg.size.div_ceil(chunk) as usize;
        let mut free = Vec::new();
        for d in &donors {
            let st = d.client.stats().await.map_err(|source| StoreError::Donor {
                addr: d.spec.addr,
                source,
            })?;
            free.push(st.slabs_free as usize);
        }
        let plan = match &cfg.plan {
            Some(p) => {
                check_plan(p, n, cfg.replicas, &donors, &free)?;
                p.clone()
            }
            None => place(n, cfg.replicas, &donors, &mut free)?,
        };
        // One allocation per donor, then hand the slabs out in plan order.
        let mut granted: Vec<Vec<SlabGrant>> = vec![Vec::new(); donors.len()];
        for (i, d) in donors.iter().enumerate() {
            let want = plan.iter().flatten().filter(|&&x| x == i).count();
            let mut left = want;
            while left > 0 {
                let k = left.min(rmem_wire::protocol::MAX_SLABS_PER_REQUEST as usize);
                let got = d
                    .client
                    .alloc(k as u32)
                    .await
                    .map_err(|source| StoreError::Donor {
                        addr: d.spec.addr,
                        source,
                    })?;
                granted[i].extend(got);
                left -= k;
            }
            granted[i].reverse();
        }
        let chunks: Vec<_> = plan
            .iter()
            .map(|ds| {
                // Room for a new copy of each leaving one while it fills: repair never reallocates.
                let mut reps = Vec::with_capacity(2 * cfg.replicas + 1);
                reps.extend(ds.iter().map(|&d| Replica {
                    donor: d,
                    grant: granted[d].pop().expect("allocated per plan"),
                    state: ReplicaState::Complete,
                }));
                Mutex::new(reps)
            })
            .collect();
        for d in &donors {
            d.client.spawn_renewal();
        }
        Ok(Arc::new(Store {
            size: cfg.size,
            chunk,
            replicas: cfg.replicas,
            donors,
            written: WrittenMap::new(chunks.len(), chunk),
            inflight: (0..chunks.len()).map(|_| AtomicU32::new(0)).collect(),
            copying: (0..chunks.len()).map(|_| AtomicBool::new(false)).collect(),
            chunks,
            copy_buf: Mutex::new(vec![0u8; COPY_PIECE.min(chunk as usize)]),
            stopping: AtomicBool::new(false),
            readahead: cfg.readahead,
            generations: (0..cfg.size.div_ceil(GEN_BLOCK))
                .map(|_| AtomicU32::new(0))
                .collect(),
            ra_fetched: AtomicU64::new(0),
            ra_served: AtomicU64::new(0),
            rebuilt: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            copied: AtomicU64::new(0),
        }))
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Splits `[off, off+len)` at chunk boundaries: (chunk, offset in chunk, range in request).
    fn pieces(
        &self,
        off: u64,
        len: u64,
    ) -> Result<impl Iterator<Item = (usize, u64, std::ops::Range<usize>)> + '_, StoreError> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(StoreError::OutOfRange {
                off,
                len,
                size: self.size,
            });
        }
        let chunk = self.chunk;
        let mut done = 0u64;
        Ok(std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let pos = off + done;
            let within = pos % chunk;
            let n = (chunk - within).min(len - done);
            let r = (done as usize)..((done + n) as usize);
            done += n;
            Some(((pos / chunk) as usize, within, r))
        }))
    }

    fn fail(&self, d: usize, e: &ClientError) {
        let donor = &self.donors[d];
        donor.errors.fetch_add(1, Ordering::Relaxed);
        if donor.healthy.swap(false, Ordering::AcqRel) {
            tracing::error!(donor = %donor.spec.addr, error = %e, "donor failed; serving from replicas");
        }
    }

    /// Reads into `out` from the first healthy replica of each chunk.
    pub fn read(&self, off: u64, out: &mut [u8]) -> Result<(), StoreError> {
        for (c, within, r) in self.pieces(off, out.len() as u64)? {
            let len = r.len() as u64;
            let targets = self.start_piece(c, false, within..within + len);
            // The first complete replica on a healthy donor. A failed read leaves the copy in
            // place (a read changes nothing): repair drops it once another copy is safe, and
            // while it is the last one its donor may come back.
            let done = targets.iter().any(|t| {
                let d = &self.donors[t.donor];
                if !d.healthy.load(Ordering::Acquire) {
                    return false;
                }
                match d.client.read_remote(t.remote, within, &mut out[r.clone()]) {
                    Ok(()) => {
                        d.bytes_read.fetch_add(len, Ordering::Relaxed);
                        true
                    }
                    Err(e) => {
                        self.fail(t.donor, &e);
                        false
                    }
                }
            });
            if !done {
                self.read_lost(c);
            }
            self.end_piece(c);
            if !done {
                return Err(StoreError::Lost {
                    off: off + r.start as u64,
                    end: off + r.end as u64,
                });
            }
        }
        Ok(())
    }

    /// Writes `data` to every healthy replica of each chunk.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<(), StoreError> {
        for (c, within, r) in self.pieces(off, data.len() as u64)? {
            let len = r.len() as u64;
            let targets = self.start_piece(c, true, within..within + len);
            let mut ok = 0;
            // Targets that missed this write, by index.
            let mut missed = 0u64;
            let results = self.write_replicas(&targets, within, &data[r.clone()]);
            for (k, (t, res)) in targets.iter().zip(results).enumerate() {
                let d = &self.donors[t.donor];
                match res {
                    Ok(()) => {
                        d.bytes_written.fetch_add(len, Ordering::Relaxed);
                        if t.complete {
                            ok += 1;
                        }
                    }
                    Err(e) => {
                        if d.healthy.load(Ordering::Acquire) {
                            self.fail(t.donor, &e);
                        }
                        missed |= 1 << k;
                    }
                }
            }
            let lost = self.settle_write(c, within..within + len, &targets, ok, missed);
            self.end_piece(c);
            if lost {
                return Err(StoreError::Lost {
                    off: off + r.start as u64,
                    end: off + r.end as u64,
                });
            }
        }
        Ok(())
    }

    /// Every replica's WRITE of `piece` at `within`, by replica index: posted together (one
    /// donor after another in donor order, so two writers never wait on each other's donors)
    /// and then reaped, so a write costs the slowest replica's round trip, not their sum.
    /// One at a time when a piece exceeds what one request carries or two replicas share a
    /// donor. A donor marked failed takes nothing. Nothing here touches the heap: the I/O path
    /// runs when memory is short.
    fn write_replicas(&self, reps: &piece::Targets, within: u64, piece: &[u8]) -> Outcomes {
        let mut out: ArrayVec<Option<Result<(), ClientError>>, REPLICA_SLOTS> = ArrayVec::new();
        let mut order: ArrayVec<usize, REPLICA_SLOTS> = ArrayVec::new();
        for (k, rep) in reps.iter().enumerate().take(REPLICA_SLOTS) {
            if self.donors[rep.donor].healthy.load(Ordering::Acquire) {
                out.push(None);
                order.push(k);
            } else {
                out.push(Some(Err(ClientError::Closed)));
            }
        }
        order.sort_unstable_by_key(|&k| reps[k].donor);
        let distinct = order
            .windows(2)
            .all(|w| reps[w[0]].donor != reps[w[1]].donor);
        let postable = order
            .iter()
            .all(|&k| piece.len() <= self.donors[reps[k].donor].client.max_posted());
        if !postable || !distinct {
            for k in order {
                let rep = &reps[k];
                out[k] = Some(
                    self.donors[rep.donor]
                        .client
                        .write_remote(rep.remote, within, piece),
                );
            }
        } else {
            let mut posted: ArrayVec<_, REPLICA_SLOTS> = ArrayVec::new();
            for k in order {
                let rep = &reps[k];
                match self.donors[rep.donor]
                    .client
                    .post_write(rep.remote, within, piece)
                {
                    Ok(p) => posted.push((k, p)),
                    Err(e) => out[k] = Some(Err(e)),
                }
            }
            for (k, p) in posted {
                out[k] = Some(p.finish());
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or(Err(ClientError::Closed)))
            .collect()
    }

    /// Zeroes a range (TRIM / WRITE_ZEROES), in pieces of at most `scratch.len()` bytes.
    pub fn zero(&self, off: u64, len: u64, scratch: &mut [u8]) -> Result<(), StoreError> {
        scratch.fill(0);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(scratch.len() as u64);
            self.write(off + done, &scratch[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Records the donor's reclaim notice: those replicas are copied elsewhere by `repair`.
    /// A copy still filling there is given up at once (its rebuild frees the slab and tries
    /// another donor).
    pub fn mark_leaving(&self, donor: usize, slabs: &[SlabGrant]) {
        let asked = |r: &Replica| r.donor == donor && slabs.iter().any(|s| s.slab == r.grant.slab);
        for c in &self.chunks {
            let mut reps = lock(c);
            reps.retain(|r| !(asked(r) && r.state == ReplicaState::Filling));
            for r in reps.iter_mut().filter(|r| asked(r)) {
                r.state = ReplicaState::Leaving;
            }
        }
    }

    /// Marks a donor failed (its session is closing or its lease could not be renewed).
    pub fn mark_failed(&self, donor: usize, why: &str) {
        if self.donors[donor].healthy.swap(false, Ordering::AcqRel) {
            tracing::error!(donor = %self.donors[donor].spec.addr, why, "donor failed");
        }
    }

    /// Index and notice queue of each donor, for the daemon to watch.
    pub fn notices(&self) -> Vec<(usize, tokio::sync::mpsc::UnboundedReceiver<Notice>)> {
        self.donors
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.client.notices().map(|rx| (i, rx)))
            .collect()
    }

    pub fn status(&self) -> StoreStatus {
        let mut degraded = 0;
        let mut lost = 0;
        for c in &self.chunks {
            let live = lock(c)
                .iter()
                .filter(|r| {
                    r.state == ReplicaState::Complete
                        && self.donors[r.donor].healthy.load(Ordering::Acquire)
                })
                .count();
            if live == 0 {
                lost += 1;
            } else if live < self.replicas {
                degraded += 1;
            }
        }
        StoreStatus {
            size: self.size,
            chunk_size: self.chunk,
            replicas: self.replicas,
            chunks: self.chunks.len(),
            degraded,
            lost,
            rebuilt: self.rebuilt.load(Ordering::Relaxed),
            moved: self.moved.load(Ordering::Relaxed),
            copied_bytes: self.copied.load(Ordering::Relaxed),
            readahead_fetched_bytes: self.ra_fetched.load(Ordering::Relaxed),
            readahead_served_bytes: self.ra_served.load(Ordering::Relaxed),
            donors: self
                .donors
                .iter()
                .enumerate()
                .map(|(i, d)| DonorStatus {
                    addr: d.spec.addr.to_string(),
                    domain: d.spec.domain.clone(),
                    healthy: d.healthy.load(Ordering::Acquire),
                    slabs: self.slabs_on(i),
                    bytes_read: d.bytes_read.load(Ordering::Relaxed),
                    bytes_written: d.bytes_written.load(Ordering::Relaxed),
                    errors: d.errors.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Gives every slab back (the device is gone).
    pub async fn release(&self) {
        for (i, d) in self.donors.iter().enumerate() {
            let mine: Vec<u32> = self
                .chunks
                .iter()
                .flat_map(|c| {
                    lock(c)
                        .iter()
                        .filter(|r| r.donor == i)
                        .map(|r| r.grant.slab)
                        .collect::<Vec<_>>()
                })
                .collect();
            for part in mine.chunks(rmem_wire::protocol::MAX_SLABS_PER_REQUEST as usize) {
                if let Err(e) = d.client.free(part).await {
                    tracing::warn!(donor = %d.spec.addr, error = %e, "could not give slabs back");
                }
            }
        }
    }
}

/// Checks a plan made elsewhere: `n` chunks of `replicas` known donors in distinct domains, no
/// donor asked for more than it has free.
fn check_plan(
    plan: &[Vec<usize>],
    n: usize,
    replicas: usize,
    donors: &[Donor],
    free: &[usize],
) -> Result<(), StoreError> {
    let bad = |why: String| Err(StoreError::Config(format!("the placement's plan: {why}")));
    if plan.len() != n {
        return bad(format!("{} chunks where the device needs {n}", plan.len()));
    }
    let mut want = vec![0usize; donors.len()];
    for (c, chunk) in plan.iter().enumerate() {
        if chunk.len() != replicas {
            return bad(format!(
                "chunk {c} has {} replicas, not {replicas}",
                chunk.len()
            ));
        }
        for (k, &i) in chunk.iter().enumerate() {
            let Some(d) = donors.get(i) else {
                return bad(format!("chunk {c} names donor {i} of {}", donors.len()));
            };
            if chunk[..k]
                .iter()
                .any(|&j| donors[j].spec.domain == d.spec.domain)
            {
                return bad(format!(
                    "chunk {c} has two replicas in domain {}",
                    d.spec.domain
                ));
            }
            want[i] += 1;
        }
    }
    for (i, (&w, &f)) in want.iter().zip(free).enumerate() {
        if w > f {
            return Err(StoreError::Full(format!(
                "the placement asked donor {} for {w} slabs; it has {f} free",
                donors[i].spec.addr
            )));
        }
    }
    Ok(())
}

/// Chooses `replicas` donors in distinct domains for each of `n` chunks, taking from the donor
/// with the most free slabs each time.
fn place(
    n: usize,
    replicas: usize,
    donors: &[Donor],
    free: &mut [usize],
) -> Result<Vec<Vec<usize>>, StoreError> {
    let mut plan = Vec::with_capacity(n);
    for c in 0..n {
        let mut chosen: Vec<usize> = Vec::with_capacity(replicas);
        for _ in 0..replicas {
            let best = (0..donors.len())
                .filter(|&i| free[i] > 0)
                .filter(|&i| {
                    chosen
                        .iter()
                        .all(|&j| donors[j].spec.domain != donors[i].spec.domain)
                })
                .max_by_key(|&i| (free[i], std::cmp::Reverse((i + c) % donors.len())));
            let Some(i) = best else {
                return Err(StoreError::Full(format!(
                    "chunk {c} of {n} finds no donor with a free slab in another failure domain"
                )));
            };
            free[i] -= 1;
            chosen.push(i);
        }
        plan.push(chosen);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn donor_specs_parse_with_optional_domains() {
        let d: DonorSpec = "127.0.0.1:7470".parse().unwrap();
        assert_eq!(d.domain, "127.0.0.1");
        let d: DonorSpec = "127.0.0.1:7471@rack2".parse().unwrap();
        assert_eq!((d.addr.port(), d.domain.as_str()), (7471, "rack2"));
        assert!("127.0.0.1:7471@".parse::<DonorSpec>().is_err());
        assert!("nohost".parse::<DonorSpec>().is_err());
    }
}
