//! The donor's state: sessions, the slab ledger, reclaim. Every change of who holds which slab
//! goes through [`Inner`]'s methods; the control protocol (`control`), the admin endpoint and
//! the pressure monitor act on it, never on each other.
//!
//! Each client gets a session with its own protection domain: its slabs are registered there,
//! and its data queue pair lives there, so no other client's queue pair can reach them even with
//! a copied descriptor. A slab that comes back (freed, lease expired, client gone) is
//! deregistered first (which waits for remote operations in flight) and zeroed before it can be
//! lent again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmem_transport::{Access, Context, Mr, Pd, Qp};
use tokio::sync::{mpsc, Notify};

use crate::config::ServerConfig;
use crate::ledger::Ledger;
use crate::protocol::{
    ClientMsg, DonorStats, ErrorCode, ServerMsg, SlabGrant, MAX_SLABS_PER_REQUEST,
};

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) client: String,
    pub(crate) pd: Pd,
    /// The data queue pairs, by lane.
    pub(crate) qps: Mutex<HashMap<u8, Qp>>,
    pub(crate) slabs: Mutex<HashMap<u32, Mr>>,
    pub(crate) lease_until: Mutex<Instant>,
    /// Fired when the lease expires or the donor shuts down.
    pub(crate) ended: Notify,
    /// Unsolicited messages (reclaim, closing) for the control connection.
    pub(crate) notices: mpsc::UnboundedSender<ServerMsg>,
    pub(crate) notices_rx: Mutex<Option<mpsc::UnboundedReceiver<ServerMsg>>>,
}

impl Session {
    pub(crate) fn notify(&self, m: ServerMsg) {
        // A closed channel means the connection is gone; the session ends anyway.
        let _ = self.notices.send(m);
    }
}

impl crate::data::DataSession for Session {
    fn id(&self) -> u64 {
        self.id
    }
    fn pd(&self) -> &Pd {
        &self.pd
    }
    fn install(&self, lane: u8, qp: Qp) {
        // A replaced queue pair is shut down when it drops here.
        let old = lock(&self.qps).insert(lane, qp);
        drop(old);
    }
}

/// What a shrink did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShrinkReport {
    /// Free slabs retired at once.
    pub retired: u32,
    /// Lent slabs asked back; retired when they come back or at the deadline.
    pub reclaiming: u32,
    /// Slabs that could not be found (nothing left to take above `min_size`).
    pub short: u32,
    pub deadline_ms: u64,
}

/// What the admin endpoint counts.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) auth_failures: AtomicU64,
    pub(crate) bad_requests: AtomicU64,
    pub(crate) slabs_allocated: AtomicU64,
    pub(crate) slabs_freed: AtomicU64,
    pub(crate) leases_expired: AtomicU64,
    pub(crate) slabs_reclaimed: AtomicU64,
    /// Connections closed at once for being over a limit.
    pub(crate) connections_refused: AtomicU64,
}

pub(crate) struct Inner {
    pub(crate) cfg: ServerConfig,
    pub(crate) secret: Vec<u8>,
    pub(crate) ctx: Context,
    /// Where every session's data queue pair connects.
    pub(crate) data: crate::data::DataPlane,
    /// Every slab's state; the only place it changes.
    pub(crate) ledger: Mutex<Ledger>,
    pub(crate) sessions: Mutex<HashMap<u64, Arc<Session>>>,
    pub(crate) next_session: AtomicU64,
    /// Slabs retired because of memory pressure (what growing back may return).
    pub(crate) pressure_retired: AtomicU64,
    pub(crate) counters: Counters,
    /// What the NBD export served and refused.
    pub(crate) nbd_stats: Arc<crate::nbd::NbdStats>,
}

/// Ends sessions whose lease ran out; takes reclaimed slabs whose deadline passed.
pub(crate) async fn reap(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = Instant::now();
        inner.take_overdue(now).await;
        let expired: Vec<_> = lock(&inner.sessions)
            .values()
            .filter(|s| *lock(&s.lease_until) < now)
            .cloned()
            .collect();
        for s in expired {
            tracing::info!(session = s.id, client = %s.client, "lease expired");
            inner
                .counters
                .leases_expired
                .fetch_add(1, Ordering::Relaxed);
            s.notify(ServerMsg::Closing {
                reason: "lease expired".into(),
                deadline_ms: 0,
            });
            s.ended.notify_one();
            inner.end_session(&s).await;
        }
    }
}

pub(crate) fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ServerMsg {
    ServerMsg::Error {
        id,
        code,
        message: message.into(),
    }
}

/// Takes memory back from a running donor (CLI, admin endpoint, pressure monitor).
#[derive(Clone)]
pub struct Control(pub(crate) Arc<Inner>);

impl Control {
    /// Takes back `slabs` slabs: free ones at once, lent ones after a reclaim notice.
    pub fn shrink(&self, slabs: u32) -> ShrinkReport {
        self.0.shrink(slabs)
    }
    /// Takes back at least `bytes` (rounded up to slabs).
    pub fn shrink_bytes(&self, bytes: u64) -> ShrinkReport {
        self.0.shrink(bytes.div_ceil(self.0.cfg.slab_size.0) as u32)
    }
    /// Lends up to `slabs` retired slabs again; returns how many.
    pub fn grow(&self, slabs: u32) -> u32 {
        self.0.grow(slabs)
    }
    pub fn stats(&self) -> DonorStats {
        self.0.stats(None)
    }
    pub(crate) fn config(&self) -> &ServerConfig {
        &self.0.cfg
    }
    pub(crate) fn pressure_retired(&self) -> &AtomicU64 {
        &self.0.pressure_retired
    }
}

impl Inner {
    /// (id, client, slabs held, lease end) of every session.
    pub(crate) fn sessions_snapshot(&self) -> Vec<(u64, String, usize, Instant)> {
        let all: Vec<_> = lock(&self.sessions).values().cloned().collect();
        all.iter()
            .map(|s| {
                (
                    s.id,
                    s.client.clone(),
                    lock(&s.slabs).len(),
                    *lock(&s.lease_until),
                )
            })
            .collect()
    }

    pub(crate) fn stats(&self, session: Option<&Session>) -> DonorStats {
        // One lock at a time: the ledger is never held while a session's lock is taken.
        let (slab_size, slabs_total, slabs_free, slabs_retired, slabs_reclaiming) = {
            let l = lock(&self.ledger);
            (
                l.slab_size() as u64,
                l.total(),
                l.free_count(),
                l.retired_count(),
                l.reclaiming_count(),
            )
        };
        DonorStats {
            slab_size,
            slabs_total,
            slabs_free,
            clients: lock(&self.sessions).len() as u32,
            slabs_held: session.map_or(0, |s| lock(&s.slabs).len() as u32),
            slabs_retired,
            slabs_reclaiming,
        }
    }

    pub(crate) fn open_session(&self, client: &str) -> rmem_transport::Result<Arc<Session>> {
        let (notices, rx) = mpsc::unbounded_channel();
        let s = Arc::new(Session {
            notices,
            notices_rx: Mutex::new(Some(rx)),
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            client: client.to_string(),
            pd: self.ctx.alloc_pd()?,
            qps: Mutex::new(HashMap::new()),
            slabs: Mutex::new(HashMap::new()),
            lease_until: Mutex::new(Instant::now() + self.cfg.lease()),
            ended: Notify::new(),
        });
        lock(&self.sessions).insert(s.id, s.clone());
        Ok(s)
    }

    /// The data listener's address on `ip` (the address the client reached us on) and a fresh
    /// token for the session's next data connection.
    pub(crate) fn open_data(
        &self,
        s: &Arc<Session>,
        ip: std::net::IpAddr,
        lane: u8,
    ) -> rmem_transport::Result<(SocketAddr, String)> {
        let session: Arc<dyn crate::data::DataSession> = s.clone();
        Ok((
            SocketAddr::new(ip, self.data.port()),
            self.data.issue(&session, lane),
        ))
    }

    /// Live data-connection tokens over all sessions.
    pub(crate) fn data_tokens(&self) -> usize {
        self.data.live_tokens()
    }

    pub(crate) fn drop_session(&self, s: &Session) {
        lock(&self.sessions).remove(&s.id);
        self.data.revoke(s.id);
    }

    /// Closes the data queue pair and takes every slab back (deregistered, then zeroed).
    pub(crate) async fn end_session(&self, s: &Arc<Session>) {
        if lock(&self.sessions).remove(&s.id).is_none() {
            return;
        }
        self.data.revoke(s.id);
        for (_, qp) in lock(&s.qps).drain() {
            qp.shutdown();
        }
        let slabs: Vec<(u32, Mr)> = lock(&s.slabs).drain().collect();
        self.release(slabs).await;
        tracing::info!(session = s.id, client = %s.client, "session ended");
    }

    /// Deregisters (waiting for operations in flight) off the async threads, then zeroes.
    pub(crate) async fn release(&self, slabs: Vec<(u32, Mr)>) {
        let ids: Vec<u32> = slabs.iter().map(|(id, _)| *id).collect();
        self.counters
            .slabs_freed
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || drop(slabs)).await;
        let mut ledger = lock(&self.ledger);
        for id in ids {
            if let Err(e) = ledger.give_back(id) {
                tracing::error!(error = %e, "slab not taken back");
            }
        }
    }

    /// Takes back `want` slabs: free ones at once, lent ones after telling their holders.
    pub(crate) fn shrink(&self, want: u32) -> ShrinkReport {
        let grace = Duration::from_secs(self.cfg.reclaim.grace_secs);
        let min_slabs = (self.cfg.reclaim.min_size.0 / self.cfg.slab_size.0) as u32;
        let mut report = ShrinkReport {
            deadline_ms: grace.as_millis() as u64,
            ..Default::default()
        };
        let mut left = {
            let mut ledger = lock(&self.ledger);
            let lendable = ledger.total() - ledger.retired_count() - ledger.reclaiming_count();
            let allowed = want.min(lendable.saturating_sub(min_slabs));
            report.short = want - allowed;
            report.retired = ledger.retire_free(allowed);
            allowed - report.retired
        };
        // Lent slabs come from the biggest holders first.
        let mut sessions: Vec<_> = lock(&self.sessions).values().cloned().collect();
        sessions.sort_by_key(|s| std::cmp::Reverse(lock(&s.slabs).len()));
        let deadline = Instant::now() + grace;
        for s in sessions {
            if left == 0 {
                break;
            }
            let mut held: Vec<u32> = lock(&s.slabs).keys().copied().collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            let mut asked = Vec::new();
            {
                let mut ledger = lock(&self.ledger);
                for slab in held {
                    if asked.len() as u32 == left {
                        break;
                    }
                    // Refused for a slab already being reclaimed: it is not asked twice.
                    if ledger.reclaim(slab, s.id, deadline).is_ok() {
                        asked.push(slab);
                    }
                }
            }
            if asked.is_empty() {
                continue;
            }
            left -= asked.len() as u32;
            report.reclaiming += asked.len() as u32;
            tracing::info!(session = s.id, client = %s.client, slabs = ?asked, "asking slabs back");
            s.notify(ServerMsg::Reclaim {
                slabs: asked,
                deadline_ms: report.deadline_ms,
            });
        }
        report.short += left;
        tracing::info!(?report, "shrink");
        report
    }

    /// Lends up to `n` retired slabs again; returns how many.
    pub(crate) fn grow(&self, n: u32) -> u32 {
        let done = lock(&self.ledger).grow(n);
        tracing::info!(slabs = done, "grow");
        done
    }

    /// Takes reclaimed slabs whose deadline passed from whoever still holds them.
    pub(crate) async fn take_overdue(&self, now: Instant) {
        let due = lock(&self.ledger).overdue(now);
        if due.is_empty() {
            return;
        }
        let mut taken = Vec::new();
        for (slab, holder) in due {
            let s = lock(&self.sessions).get(&holder).cloned();
            if let Some(mr) = s.and_then(|s| lock(&s.slabs).remove(&slab)) {
                tracing::info!(
                    session = holder,
                    slab,
                    "reclaim deadline passed; slab taken"
                );
                taken.push((slab, mr));
            }
        }
        self.counters
            .slabs_reclaimed
            .fetch_add(taken.len() as u64, Ordering::Relaxed);
        self.release(taken).await;
    }

    /// Shutdown: tells every client, gives them the grace period to move their data (or to
    /// leave), then ends every session.
    pub(crate) async fn close_all(&self) {
        let grace = Duration::from_secs(self.cfg.reclaim.shutdown_grace_secs);
        let all: Vec<_> = lock(&self.sessions).values().cloned().collect();
        for s in &all {
            s.notify(ServerMsg::Closing {
                reason: "donor shutting down".into(),
                deadline_ms: grace.as_millis() as u64,
            });
        }
        let end = Instant::now() + grace;
        while Instant::now() < end {
            let busy = lock(&self.sessions)
                .values()
                .any(|s| !lock(&s.slabs).is_empty());
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let all: Vec<_> = lock(&self.sessions).values().cloned().collect();
        for s in all {
            s.ended.notify_one();
            self.end_session(&s).await;
        }
    }

    pub(crate) async fn handle(&self, s: &Arc<Session>, msg: ClientMsg) -> ServerMsg {
        match msg {
            ClientMsg::Alloc { id, count } => self.alloc(s, id, count).await,
            ClientMsg::Free { id, slabs } => self.free(s, id, slabs).await,
            ClientMsg::Renew { id } => {
                *lock(&s.lease_until) = Instant::now() + self.cfg.lease();
                ServerMsg::Renewed {
                    id,
                    lease_ms: self.cfg.lease().as_millis() as u64,
                }
            }
            ClientMsg::Stats { id } => ServerMsg::Stats {
                id,
                stats: self.stats(Some(s)),
            },
            ClientMsg::Hello { .. } | ClientMsg::Auth { .. } | ClientMsg::Reconnect { .. } => {
                error(None, ErrorCode::BadRequest, "already authenticated")
            }
        }
    }

    pub(crate) async fn alloc(&self, s: &Arc<Session>, id: u64, count: u32) -> ServerMsg {
        if count == 0 || count > MAX_SLABS_PER_REQUEST {
            return error(
                Some(id),
                ErrorCode::TooMany,
                format!("count must be 1..={MAX_SLABS_PER_REQUEST}"),
            );
        }
        let (ids, buf, slab_size) = {
            let mut ledger = lock(&self.ledger);
            match ledger.take(s.id, count) {
                Ok(ids) => (ids, ledger.buffer().clone(), ledger.slab_size()),
                Err((code, m)) => return error(Some(id), code, m),
            }
        };
        let pd = s.pd.clone();
        let ids2 = ids.clone();
        let registered = tokio::task::spawn_blocking(move || {
            let access = Access::LOCAL_WRITE
                | Access::REMOTE_READ
                | Access::REMOTE_WRITE
                | Access::REMOTE_ATOMIC;
            ids2.iter()
                .map(|&slab| {
                    pd.register_buffer(&buf, slab as usize * slab_size, slab_size, access)
                        .map(|mr| (slab, mr))
                })
                .collect::<rmem_transport::Result<Vec<_>>>()
        })
        .await;
        match registered {
            Ok(Ok(mrs)) => {
                let grants = mrs
                    .iter()
                    .map(|(slab, mr)| SlabGrant {
                        slab: *slab,
                        remote: mr.remote(),
                    })
                    .collect();
                self.counters
                    .slabs_allocated
                    .fetch_add(u64::from(count), Ordering::Relaxed);
                lock(&s.slabs).extend(mrs);
                *lock(&s.lease_until) = Instant::now() + self.cfg.lease();
                ServerMsg::Allocated {
                    id,
                    slabs: grants,
                    lease_ms: self.cfg.lease().as_millis() as u64,
                }
            }
            other => {
                let mut ledger = lock(&self.ledger);
                for slab in ids {
                    if let Err(e) = ledger.give_back(slab) {
                        tracing::error!(error = %e, "slab not taken back");
                    }
                }
                let m = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "registration task failed".into(),
                };
                error(
                    Some(id),
                    ErrorCode::Internal,
                    format!("registering slabs: {m}"),
                )
            }
        }
    }

    pub(crate) async fn free(&self, s: &Arc<Session>, id: u64, slabs: Vec<u32>) -> ServerMsg {
        if slabs.is_empty() || slabs.len() > MAX_SLABS_PER_REQUEST as usize {
            return error(
                Some(id),
                ErrorCode::TooMany,
                "free 1 to 4096 slabs at a time",
            );
        }
        let taken = {
            let mut held = lock(&s.slabs);
            // All or nothing: check every id before touching any.
            let mut seen = std::collections::HashSet::new();
            for &slab in &slabs {
                if !seen.insert(slab) {
                    return error(
                        Some(id),
                        ErrorCode::BadRequest,
                        format!("slab {slab} named twice"),
                    );
                }
                if !held.contains_key(&slab) {
                    let code = match lock(&self.ledger).holder(slab) {
                        Some(_) => ErrorCode::NotOwner,
                        None => ErrorCode::UnknownSlab,
                    };
                    return error(
                        Some(id),
                        code,
                        format!("slab {slab} is not held by this client"),
                    );
                }
            }
            slabs
                .iter()
                .filter_map(|slab| held.remove(slab).map(|mr| (*slab, mr)))
                .collect()
        };
        self.release(taken).await;
        ServerMsg::Freed { id }
    }
}
