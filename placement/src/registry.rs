//! The donor registry: who lends memory, how much is free, and whether they are still alive.
//!
//! A donor registers under a lease and renews it with each heartbeat; when the lease lapses the
//! donor leaves the candidate set (at once for decisions, which check the deadline, and from the
//! table at the next sweep). Heartbeats carry a sequence number that must go forward, so an old
//! or replayed one is refused rather than rolling figures back.
//!
//! One [`Registry`] trait, two backends: [`InProcess`] (the default: one placement service holds
//! the truth) and etcd (several services share it). Both keep a local [`Table`] that decisions
//! read without a round trip; the backend only decides what is committed. `grant` is where they
//! differ: the in-process table charges itself, etcd compares and swaps so two services never
//! hand out the same slab.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::choice::{Pool, Slot};

/// The shortest lease a donor may ask for: shorter ones would expire between heartbeats on a
/// loaded host.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// The longest: a dead donor stays a candidate at most this long.
pub const MAX_LEASE: Duration = Duration::from_secs(300);
/// Longest donor id, domain or label.
pub const MAX_NAME: usize = 128;
pub const MAX_LABELS: usize = 16;

/// What a donor says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DonorReport {
    /// Unique name; by convention the donor's control address.
    pub id: String,
    /// The control address borrowers connect to.
    pub addr: String,
    /// Failure domain (a rack): replicas of one chunk never share one.
    pub domain: String,
    pub slab_bytes: u64,
    pub total_slabs: u32,
    pub free_slabs: u32,
    /// The donor's link rate in bits per second, 0 if unknown.
    #[serde(default)]
    pub link_bps: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A donor's renewal: its sequence number and current figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub id: String,
    /// Strictly increasing per donor; the registration is 0.
    pub seq: u64,
    pub free_slabs: u32,
    pub total_slabs: u32,
    /// Bytes the donor sent to and received from each peer host since its last heartbeat.
    #[serde(default)]
    pub traffic: Vec<crate::links::TrafficDelta>,
}

impl Heartbeat {
    /// Refuses figures no donor could report.
    pub fn validate(&self) -> Result<(), RegistryError> {
        if self.free_slabs > self.total_slabs {
            return Err(RegistryError::Invalid(format!(
                "{} free of {} slabs",
                self.free_slabs, self.total_slabs
            )));
        }
        Ok(())
    }
}

/// A donor as the registry holds it.
#[derive(Debug, Clone, Serialize)]
pub struct DonorEntry {
    pub report: DonorReport,
    pub seq: u64,
    /// Slabs granted by placement and not yet reflected in a heartbeat.
    pub pending: u32,
    #[serde(skip)]
    pub deadline: Instant,
    /// The lease's length: each heartbeat renews it for this long.
    pub lease_ms: u64,
}

/// Why the registry refused a request. Each changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("unknown donor {0:?}: register it first")]
    Unknown(String),
    #[error("donor {id:?}: heartbeat {got} does not follow {last}")]
    SeqBack { id: String, got: u64, last: u64 },
    #[error("donor {0:?}: its lease lapsed; register again")]
    Expired(String),
    #[error("donor {id:?} has {free} slabs free, {wanted} wanted")]
    Insufficient { id: String, free: u32, wanted: u32 },
    #[error("invalid report: {0}")]
    Invalid(String),
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

impl RegistryError {
    /// A short stable name for the JSON `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::Unknown(_) => "unknown_donor",
            RegistryError::SeqBack { .. } => "sequence_back",
            RegistryError::Expired(_) => "lease_expired",
            RegistryError::Insufficient { .. } => "insufficient",
            RegistryError::Invalid(_) => "invalid",
            RegistryError::Unavailable(_) => "unavailable",
        }
    }
}

fn check_name(what: &str, s: &str) -> Result<(), RegistryError> {
    if s.is_empty() || s.len() > MAX_NAME || s.chars().any(|c| c.is_control()) {
        return Err(RegistryError::Invalid(format!(
            "{what} must be 1 to {MAX_NAME} printable characters"
        )));
    }
    Ok(())
}

impl DonorReport {
    /// Refuses what no donor could truthfully say.
    pub fn validate(&self, slab_bytes: u64) -> Result<(), RegistryError> {
        check_name("id", &self.id)?;
        check_name("addr", &self.addr)?;
        check_name("domain", &self.domain)?;
        if self.labels.len() > MAX_LABELS {
            return Err(RegistryError::Invalid(format!(
                "at most {MAX_LABELS} labels"
            )));
        }
        for (k, v) in &self.labels {
            check_name("label", k)?;
            check_name("label value", v)?;
        }
        if self.slab_bytes != slab_bytes {
            return Err(RegistryError::Invalid(format!(
                "slab size {} differs from the cluster's {slab_bytes}",
                self.slab_bytes
            )));
        }
        if self.free_slabs > self.total_slabs {
            return Err(RegistryError::Invalid(format!(
                "{} free of {} slabs",
                self.free_slabs, self.total_slabs
            )));
        }
        Ok(())
    }
}

/// The registry's local view: every live donor, and the decision core's [`Pool`] over them
/// (pool index = table position, stable while the donor stays).
#[derive(Debug)]
pub struct Table {
    ids: HashMap<String, usize>,
    entries: Vec<Option<DonorEntry>>,
    domains: HashMap<String, u32>,
    pool: Pool,
    /// Bumped on every change, so readers can tell a view moved on.
    pub generation: u64,
}

impl Default for Table {
    fn default() -> Table {
        Table {
            ids: HashMap::new(),
            entries: Vec::new(),
            domains: HashMap::new(),
            pool: Pool::new(Vec::new()),
            generation: 0,
        }
    }
}

impl Table {
    fn domain(&mut self, name: &str) -> u32 {
        let n = self.domains.len() as u32;
        *self.domains.entry(name.to_owned()).or_insert(n)
    }

    fn slot(&mut self, e: &DonorEntry, load: f32) -> Slot {
        Slot {
            free: e.report.free_slabs.saturating_sub(e.pending),
            total: e.report.total_slabs,
            domain: self.domain(&e.report.domain),
            load,
        }
    }

    /// Adds or replaces a donor.
    pub fn upsert(&mut self, e: DonorEntry) {
        self.generation += 1;
        let load = self
            .ids
            .get(&e.report.id)
            .map_or(0.0, |&i| self.pool.slots()[i].load);
        let slot = self.slot(&e, load);
        match self.ids.get(&e.report.id) {
            Some(&i) => {
                self.pool.set(i, slot);
                self.entries[i] = Some(e);
            }
            None => {
                // Reuse a departed donor's position so the pool does not grow without bound.
                if let Some(i) = self.entries.iter().position(Option::is_none) {
                    self.ids.insert(e.report.id.clone(), i);
                    self.pool.set(i, slot);
                    self.entries[i] = Some(e);
                } else {
                    let i = self.pool.push(slot);
                    self.ids.insert(e.report.id.clone(), i);
                    self.entries.push(Some(e));
                }
            }
        }
    }

    /// Removes a donor; true if it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(i) = self.ids.remove(id) else {
            return false;
        };
        self.generation += 1;
        self.entries[i] = None;
        let mut gone = self.pool.slots()[i];
        gone.free = 0;
        gone.total = 0;
        self.pool.set(i, gone);
        true
    }

    pub fn get(&self, id: &str) -> Option<&DonorEntry> {
        self.ids.get(id).and_then(|&i| self.entries[i].as_ref())
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.ids.get(id).copied()
    }

    /// Donor `i` as the decision core sees it.
    pub fn pool_slot(&self, i: usize) -> Option<Slot> {
        self.pool.slots().get(i).copied()
    }

    pub fn entry_at(&self, i: usize) -> Option<&DonorEntry> {
        self.entries.get(i).and_then(Option::as_ref)
    }

    /// Live donors, in table order.
    pub fn donors(&self) -> impl Iterator<Item = &DonorEntry> {
        self.entries.iter().flatten()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The pool decisions are made on. Lapsed donors leave it at the next [`Table::lapse`],
    /// which the service runs four times a second, so a decision costs no scan of the table.
    pub fn pool(&mut self) -> &mut Pool {
        &mut self.pool
    }

    /// Removes the donors whose lease ended by `now`; returns their ids.
    pub fn lapse(&mut self, now: Instant) -> Vec<String> {
        let lapsed: Vec<String> = self
            .donors()
            .filter(|e| e.deadline <= now)
            .map(|e| e.report.id.clone())
            .collect();
        for id in &lapsed {
            self.remove(id);
        }
        lapsed
    }

    /// Sets the link load the pool scores donor `id` with.
    pub fn set_load(&mut self, id: &str, load: f32) {
        if let Some(&i) = self.ids.get(id) {
            let mut s = self.pool.slots()[i];
            s.load = load;
            self.pool.set(i, s);
        }
    }

    /// Gives back slabs granted from donor `i` (to its entry and the pool).
    pub fn release_pending(&mut self, i: usize, slabs: u32) {
        let Some(e) = self.entries.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let back = slabs.min(e.pending);
        e.pending -= back;
        let mut s = self.pool.slots()[i];
        s.free = (s.free + back).min(s.total);
        self.pool.set(i, s);
    }

    /// Records slabs handed out from donor `i` by a decision already charged to the pool.
    pub fn note_pending(&mut self, i: usize, slabs: u32) {
        if let Some(e) = self.entries.get_mut(i).and_then(Option::as_mut) {
            e.pending = e.pending.saturating_add(slabs);
        }
    }
}

/// The backends' common interface. `table()` is the local view decisions read; the async calls
/// commit to the backend and update that view.
pub trait Registry: Send + Sync + 'static {
    fn register(
        &self,
        report: DonorReport,
        lease: Duration,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    fn heartbeat(&self, hb: Heartbeat) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Takes `slabs` from donor `id`'s free count, or refuses if fewer are free: two grants of
    /// the last slab never both succeed.
    fn grant(&self, id: &str, slabs: u32)
        -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Gives back slabs granted by a placement that could not be completed.
    fn release(
        &self,
        id: &str,
        slabs: u32,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// The local view. `Err(Unavailable)` when it can no longer be trusted (the backend has been
    /// unreachable for longer than a lease).
    fn table(&self) -> Result<MutexGuard<'_, Table>, RegistryError>;

    /// Whether the view is older than the backend (answers from it are marked stale).
    fn stale(&self) -> bool;

    /// Drops donors whose lease lapsed; returns how many.
    fn sweep(&self) -> usize;
}

/// The default registry: the placement service's own memory is the truth.
#[derive(Debug)]
pub struct InProcess {
    table: Mutex<Table>,
    slab_bytes: u64,
    expired: std::sync::atomic::AtomicU64,
}

impl InProcess {
    /// A registry for a cluster whose donors all cut memory into `slab_bytes` slabs.
    pub fn new(slab_bytes: u64) -> InProcess {
        InProcess {
            table: Mutex::new(Table::default()),
            slab_bytes,
            expired: Default::default(),
        }
    }

    /// Donors dropped because their lease lapsed, since start.
    pub fn expired(&self) -> u64 {
        self.expired.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) fn check_lease(lease: Duration) -> Result<(), RegistryError> {
    if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
        return Err(RegistryError::Invalid(format!(
            "lease must be {} to {} s",
            MIN_LEASE.as_secs(),
            MAX_LEASE.as_secs()
        )));
    }
    Ok(())
}

impl Registry for InProcess {
    async fn register(&self, report: DonorReport, lease: Duration) -> Result<(), RegistryError> {
        report.validate(self.slab_bytes)?;
        check_lease(lease)?;
        let now = Instant::now();
        self.lock().upsert(DonorEntry {
            report,
            seq: 0,
            pending: 0,
            deadline: now + lease,
            lease_ms: lease.as_millis() as u64,
        });
        Ok(())
    }

    async fn heartbeat(&self, hb: Heartbeat) -> Result<(), RegistryError> {
        let now = Instant::now();
        let mut t = self.lock();
        let Some(e) = t.get(&hb.id) else {
            return Err(RegistryError::Unknown(hb.id));
        };
        if e.deadline <= now {
            return Err(RegistryError::Expired(hb.id));
        }
        if hb.seq <= e.seq {
            return Err(RegistryError::SeqBack {
                id: hb.id,
                got: hb.seq,
                last: e.seq,
            });
        }
        hb.validate()?;
        let lease = Duration::from_millis(e.lease_ms);
        let mut e = e.clone();
        e.seq = hb.seq;
        e.report.free_slabs = hb.free_slabs;
        e.report.total_slabs = hb.total_slabs;
        // The donor's own count now includes what was granted before this heartbeat.
        e.pending = 0;
        e.deadline = now + lease;
        t.upsert(e);
        Ok(())
    }

    async fn grant(&self, id: &str, slabs: u32) -> Result<(), RegistryError> {
        let mut t = self.lock();
        let i = t
            .index_of(id)
            .ok_or_else(|| RegistryError::Unknown(id.to_owned()))?;
        let e = t.entry_at(i).expect("indexed entries exist");
        let free = e.report.free_slabs.saturating_sub(e.pending);
        if free < slabs {
            return Err(RegistryError::Insufficient {
                id: id.to_owned(),
                free,
                wanted: slabs,
            });
        }
        t.note_pending(i, slabs);
        Ok(())
    }

    async fn release(&self, id: &str, slabs: u32) -> Result<(), RegistryError> {
        let mut t = self.lock();
        let i = t
            .index_of(id)
            .ok_or_else(|| RegistryError::Unknown(id.to_owned()))?;
        t.release_pending(i, slabs);
        Ok(())
    }

    fn table(&self) -> Result<MutexGuard<'_, Table>, RegistryError> {
        Ok(self.lock())
    }

    fn stale(&self) -> bool {
        false
    }

    fn sweep(&self) -> usize {
        let gone = self.lock().lapse(Instant::now()).len();
        self.expired
            .fetch_add(gone as u64, std::sync::atomic::Ordering::Relaxed);
        gone
    }
}
