//! The etcd registry: several placement services share one truth.
//!
//! Each donor is one key, `<prefix>/donors/<id>`, holding its record as JSON and attached to an
//! etcd lease of the donor's lease length: a heartbeat keeps the lease alive and rewrites the
//! record, and a donor that stops heartbeating is deleted by etcd itself. Every service watches
//! the prefix and keeps the [`Table`] decisions read; a watch that breaks (etcd restarted,
//! compacted, unreachable) is re-established from a fresh read, and until then answers come from
//! the old view marked stale, for at most `stale_limit`, then are refused.
//!
//! Changes to a record (heartbeats, grants) are compare-and-swap transactions on its
//! `mod_revision`, so two services granting the last slab of a donor cannot both succeed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize};

use crate::registry::{DonorEntry, DonorReport, Heartbeat, Registry, RegistryError, Table};

/// Attempts of a compare-and-swap before giving up (each one lost means another service wrote
/// the same donor in between).
const CAS_ATTEMPTS: usize = 16;

/// A donor's record as stored in etcd.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    report: DonorReport,
    seq: u64,
    pending: u32,
    lease_ms: u64,
    /// The etcd lease the key is attached to.
    lease_id: i64,
}

/// Where the etcd registry stands.
#[derive(Debug, Default)]
struct Health {
    /// The view matches etcd (a read then an unbroken watch).
    synced: bool,
    /// When etcd was last lost, while it still is.
    lost_at: Option<Instant>,
    last_error: String,
}

struct Shared {
    client: Client,
    prefix: String,
    table: Mutex<Table>,
    /// Each donor key's last seen `mod_revision`.
    revs: Mutex<HashMap<String, i64>>,
    health: Mutex<Health>,
    /// Donors deleted in etcd (lease lapsed) and not yet counted by a sweep.
    departed: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The etcd-backed registry.
#[derive(Debug)]
pub struct Etcd {
    shared: Arc<Shared>,
    slab_bytes: u64,
    stale_limit: Duration,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable(e: etcd_client::Error) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

impl Etcd {
    /// Connects, reads every donor, and starts watching. `prefix` separates clusters sharing
    /// one etcd; `stale_limit` is how long answers may come from a view etcd no longer confirms
    /// (one lease).
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        slab_bytes: u64,
        stale_limit: Duration,
    ) -> Result<Etcd, RegistryError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(unavailable)?;
        let shared = Arc::new(Shared {
            client,
            prefix: format!("{}/donors/", prefix.trim_end_matches('/')),
            table: Mutex::new(Table::default()),
            revs: Mutex::default(),
            health: Mutex::new(Health::default()),
            departed: AtomicU64::new(0),
        });
        // The first read happens here, so a service starts with the cluster's donors.
        let rev = resync(&shared).await.map_err(unavailable)?;
        let s = shared.clone();
        let watcher = tokio::spawn(async move { watch_forever(s, rev).await });
        Ok(Etcd {
            shared,
            slab_bytes,
            stale_limit,
            watcher,
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.shared.prefix)
    }

    fn client(&self) -> Client {
        self.shared.client.clone()
    }

    /// The record of donor `id` and its revision, read from etcd.
    async fn read(&self, id: &str) -> Result<Option<(Record, i64)>, RegistryError> {
        let r = self
            .client()
            .get(self.key(id), None)
            .await
            .map_err(unavailable)?;
        let Some(kv) = r.kvs().first() else {
            return Ok(None);
        };
        let rec: Record = serde_json::from_slice(kv.value())
            .map_err(|e| RegistryError::Unavailable(format!("unreadable record: {e}")))?;
        Ok(Some((rec, kv.mod_revision())))
    }

    /// Writes `rec` if the key is still at `rev`; false if another write came first.
    async fn swap(&self, rec: &Record, rev: i64) -> Result<bool, RegistryError> {
        let key = self.key(&rec.report.id);
        let value = serde_json::to_vec(rec).expect("records serialize");
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(rec.lease_id)),
            )]);
        let r = self.client().txn(txn).await.map_err(unavailable)?;
        if r.succeeded() {
            // Seen at once here; the watch brings it to the other services.
            apply(&self.shared, rec, r.header().map_or(0, |h| h.revision()));
        }
        Ok(r.succeeded())
    }

    /// Reads, changes and swaps donor `id`'s record until the swap wins.
    async fn update(
        &self,
        id: &str,
        change: impl Fn(&mut Record) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut rec, rev)) = self.read(id).await? else {
                return Err(RegistryError::Unknown(id.to_owned()));
            };
            change(&mut rec)?;
            if self.swap(&rec, rev).await? {
                return Ok(());
            }
        }
        Err(RegistryError::Unavailable(format!(
            "donor {id:?}: {CAS_ATTEMPTS} concurrent writers in a row"
        )))
    }
}

/// Puts a record, written at revision `rev`, into the local view.
fn apply(shared: &Shared, rec: &Record, rev: i64) {
    {
        let mut revs = lock(&shared.revs);
        let r = revs.entry(rec.report.id.clone()).or_insert(0);
        if rev < *r {
            // An older write arriving after a newer one (the watch lags a local swap).
            return;
        }
        *r = rev;
    }
    lock(&shared.table).upsert(DonorEntry {
        report: rec.report.clone(),
        seq: rec.seq,
        pending: rec.pending,
        deadline: Instant::now() + Duration::from_millis(rec.lease_ms),
        lease_ms: rec.lease_ms,
    });
}

/// Reads every donor and replaces the view with them; returns etcd's revision.
async fn resync(shared: &Shared) -> Result<i64, etcd_client::Error> {
    let r = shared
        .client
        .clone()
        .get(shared.prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let rev = r.header().map_or(0, |h| h.revision());
    let records: Vec<(Record, i64)> = r
        .kvs()
        .iter()
        .filter_map(|kv| Some((serde_json::from_slice(kv.value()).ok()?, kv.mod_revision())))
        .collect();
    {
        let mut t = lock(&shared.table);
        let present: std::collections::HashSet<&str> =
            records.iter().map(|(r, _)| r.report.id.as_str()).collect();
        let gone: Vec<String> = t
            .donors()
            .map(|e| e.report.id.clone())
            .filter(|id| !present.contains(id.as_str()))
            .collect();
        let mut revs = lock(&shared.revs);
        for id in gone {
            t.remove(&id);
            revs.remove(&id);
            shared.departed.fetch_add(1, Ordering::Relaxed);
        }
        // A resync starts revisions over: what etcd holds now is the truth.
        revs.clear();
    }
    for (rec, rev) in &records {
        apply(shared, rec, *rev);
    }
    let mut h = lock(&shared.health);
    h.synced = true;
    h.lost_at = None;
    Ok(rev)
}

/// Follows the prefix from `rev`; on any break, resyncs and follows again.
async fn watch_forever(shared: Arc<Shared>, mut rev: i64) {
    loop {
        let err = match follow(&shared, rev).await {
            Ok(()) => "the watch ended".to_owned(),
            Err(e) => e.to_string(),
        };
        {
            let mut h = lock(&shared.health);
            h.synced = false;
            h.lost_at.get_or_insert_with(Instant::now);
            h.last_error = err.clone();
        }
        tracing::warn!(error = %err, "etcd watch lost; answering from the cache, marked stale");
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match resync(&shared).await {
                Ok(r) => {
                    rev = r;
                    tracing::info!(revision = r, "etcd view resynced");
                    break;
                }
                Err(e) => lock(&shared.health).last_error = e.to_string(),
            }
        }
    }
}

async fn follow(shared: &Shared, rev: i64) -> Result<(), etcd_client::Error> {
    let mut ws = shared
        .client
        .clone()
        .watch(
            shared.prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await?;
    while let Some(resp) = ws.message().await? {
        if resp.canceled() {
            // Compacted past our revision, or the server cancelled: start over from a read.
            return Ok(());
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    if let Ok(rec) = serde_json::from_slice::<Record>(kv.value()) {
                        apply(shared, &rec, kv.mod_revision());
                    }
                }
                EventType::Delete => {
                    let id = String::from_utf8_lossy(kv.key())
                        .trim_start_matches(&shared.prefix)
                        .to_owned();
                    lock(&shared.revs).remove(&id);
                    if lock(&shared.table).remove(&id) {
                        shared.departed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    Ok(())
}

impl Registry for Etcd {
    async fn register(&self, report: DonorReport, lease: Duration) -> Result<(), RegistryError> {
        report.validate(self.slab_bytes)?;
        crate::registry::check_lease(lease)?;
        let ttl = lease.as_secs().max(1) as i64;
        let grant = self
            .client()
            .lease_grant(ttl, None)
            .await
            .map_err(unavailable)?;
        let rec = Record {
            report,
            seq: 0,
            pending: 0,
            lease_ms: lease.as_millis() as u64,
            lease_id: grant.id(),
        };
        let value = serde_json::to_vec(&rec).expect("records serialize");
        let put = self
            .client()
            .put(
                self.key(&rec.report.id),
                value,
                Some(PutOptions::new().with_lease(grant.id())),
            )
            .await
            .map_err(unavailable)?;
        apply(&self.shared, &rec, put.header().map_or(0, |h| h.revision()));
        Ok(())
    }

    async fn heartbeat(&self, hb: Heartbeat) -> Result<(), RegistryError> {
        hb.validate()?;
        let Some((rec, _)) = self.read(&hb.id).await? else {
            return Err(RegistryError::Unknown(hb.id));
        };
        if hb.seq <= rec.seq {
            return Err(RegistryError::SeqBack {
                id: hb.id,
                got: hb.seq,
                last: rec.seq,
            });
        }
        // Renew the lease first: if it lapsed, the donor must register again.
        let (mut keeper, mut stream) = self
            .client()
            .lease_keep_alive(rec.lease_id)
            .await
            .map_err(unavailable)?;
        keeper.keep_alive().await.map_err(unavailable)?;
        let ttl = stream
            .message()
            .await
            .map_err(unavailable)?
            .map_or(0, |r| r.ttl());
        if ttl <= 0 {
            return Err(RegistryError::Expired(hb.id));
        }
        let id = hb.id.clone();
        self.update(&id, |r| {
            if hb.seq <= r.seq {
                return Err(RegistryError::SeqBack {
                    id: hb.id.clone(),
                    got: hb.seq,
                    last: r.seq,
                });
            }
            r.seq = hb.seq;
            r.report.free_slabs = hb.free_slabs;
            r.report.total_slabs = hb.total_slabs;
            r.pending = 0;
            Ok(())
        })
        .await
    }

    async fn grant(&self, id: &str, slabs: u32) -> Result<(), RegistryError> {
        self.update(id, |r| {
            let free = r.report.free_slabs.saturating_sub(r.pending);
            if free < slabs {
                return Err(RegistryError::Insufficient {
                    id: id.to_owned(),
                    free,
                    wanted: slabs,
                });
            }
            r.pending += slabs;
            Ok(())
        })
        .await
    }

    async fn release(&self, id: &str, slabs: u32) -> Result<(), RegistryError> {
        self.update(id, |r| {
            r.pending = r.pending.saturating_sub(slabs);
            Ok(())
        })
        .await
    }

    fn table(&self) -> Result<MutexGuard<'_, Table>, RegistryError> {
        let h = lock(&self.shared.health);
        if let Some(t) = h.lost_at {
            if t.elapsed() > self.stale_limit {
                return Err(RegistryError::Unavailable(format!(
                    "etcd unreachable for {} s (the cache is trusted for {} s): {}",
                    t.elapsed().as_secs(),
                    self.stale_limit.as_secs(),
                    h.last_error
                )));
            }
        }
        drop(h);
        Ok(lock(&self.shared.table))
    }

    fn stale(&self) -> bool {
        !lock(&self.shared.health).synced
    }

    fn sweep(&self) -> usize {
        let lapsed = lock(&self.shared.table).lapse(Instant::now());
        // This service's clock ended the lease: delete the key, unless a heartbeat renewed it
        // meanwhile (its revision moved), so every service and etcd agree the donor is gone.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for id in &lapsed {
                let Some(rev) = lock(&self.shared.revs).get(id).copied() else {
                    continue;
                };
                let (key, mut c) = (self.key(id), self.client());
                rt.spawn(async move {
                    let txn = Txn::new()
                        .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                        .and_then([TxnOp::delete(key, None)]);
                    if let Err(e) = c.txn(txn).await {
                        tracing::debug!(error = %e, "could not delete a lapsed donor");
                    }
                });
            }
        }
        lapsed.len() + self.shared.departed.swap(0, Ordering::Relaxed) as usize
    }
}
