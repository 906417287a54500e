//! The donor daemon: authenticates clients, lends slabs under leases, takes them back.
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

use rmem_transport::{open, Access, Context, Mr, OpenOptions, Pd, Qp};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

use crate::auth;
use crate::config::ServerConfig;
use crate::conn_limit::ConnLimit;
use crate::pool::Pool;
use crate::protocol::{
    decode, read_frame, write_msg, ClientMsg, DonorStats, ErrorCode, FrameError, ServerMsg,
    SlabGrant, MAX_SLABS_PER_REQUEST, VERSION,
};

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("transport")]
    Transport(#[from] rmem_transport::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Session {
    id: u64,
    client: String,
    pd: Pd,
    qp: Mutex<Option<Qp>>,
    slabs: Mutex<HashMap<u32, Mr>>,
    lease_until: Mutex<Instant>,
    /// Fired when the lease expires or the donor shuts down.
    ended: Notify,
    /// Unsolicited messages (reclaim, closing) for the control connection.
    notices: mpsc::UnboundedSender<ServerMsg>,
    notices_rx: Mutex<Option<mpsc::UnboundedReceiver<ServerMsg>>>,
}

impl Session {
    fn notify(&self, m: ServerMsg) {
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
    fn install(&self, qp: Qp) {
        // A replaced queue pair is shut down when it drops here.
        let old = lock(&self.qp).replace(qp);
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
    data: crate::data::DataPlane,
    pool: Mutex<Pool>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    next_session: AtomicU64,
    /// Lent slabs asked back, with their deadlines.
    reclaims: Mutex<HashMap<u32, Instant>>,
    /// Slabs retired because of memory pressure (what growing back may return).
    pressure_retired: AtomicU64,
    pub(crate) counters: Counters,
}

/// A bound donor; [`Server::run`] serves it.
pub struct Server {
    inner: Arc<Inner>,
    listener: TcpListener,
    nbd: Option<(TcpListener, crate::nbd::Exports)>,
    admin: Option<TcpListener>,
}

/// Pool owner id of the NBD exports' slabs (sessions start at 1).
const EXPORTS_OWNER: u64 = 0;

impl Server {
    /// Allocates the pool, opens the transport and binds the control port.
    pub async fn bind(cfg: ServerConfig, secret: Vec<u8>) -> Result<Server, ServerError> {
        cfg.validate()?;
        let mut o = OpenOptions::new(cfg.provider);
        o.device = cfg.device.clone();
        let ctx = open(&o)?;
        let mut pool = Pool::new(cfg.size.0 as usize, cfg.slab_size.0 as usize, cfg.hugepages)?;
        let mut exports = HashMap::new();
        for e in &cfg.exports {
            let n = e.size.0.div_ceil(cfg.slab_size.0) as u32;
            let ids = pool.take(EXPORTS_OWNER, n).map_err(|(_, m)| {
                crate::config::ConfigError::Invalid(format!("export {:?}: {m}", e.name))
            })?;
            let export = crate::nbd::Export {
                name: e.name.clone(),
                size: e.size.0,
                buf: pool.buffer().clone(),
                slab_size: cfg.slab_size.0,
                slabs: ids.iter().map(|&id| pool.offset(id) as u64).collect(),
            };
            exports.insert(e.name.clone(), Arc::new(export));
        }
        let nbd = if exports.is_empty() {
            None
        } else {
            let l =
                crate::nbd::bind(cfg.nbd_listen)
                    .await
                    .map_err(|source| ServerError::Listen {
                        addr: cfg.nbd_listen,
                        source,
                    })?;
            Some((l, Arc::new(exports)))
        };
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        tracing::info!(
            slabs = pool.total(),
            slab_size = pool.slab_size(),
            huge = pool.buffer().is_huge(),
            provider = %ctx.provider(),
            "donor ready"
        );
        let data = crate::data::DataPlane::start(&ctx, cfg.listen.ip(), &cfg.data)?;
        let admin = match cfg.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Listen { addr, source })?,
            ),
            None => None,
        };
        Ok(Server {
            admin,
            inner: Arc::new(Inner {
                cfg,
                secret,
                ctx,
                data,
                pool: Mutex::new(pool),
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                reclaims: Mutex::new(HashMap::new()),
                pressure_retired: AtomicU64::new(0),
                counters: Counters::default(),
            }),
            listener,
            nbd,
        })
    }

    /// Where the admin endpoint listens, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the NBD export listens, when there are exports.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.nbd.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Current figures.
    pub fn stats(&self) -> DonorStats {
        self.inner.stats(None)
    }

    /// A handle for taking memory back while the server runs.
    pub fn control(&self) -> Control {
        Control(self.inner.clone())
    }

    /// Serves until `shutdown` resolves, then ends every session (their slabs are zeroed).
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let reaper = tokio::spawn(reap(self.inner.clone()));
        let pressure = self
            .inner
            .cfg
            .reclaim
            .pressure
            .then(|| tokio::spawn(crate::pressure::watch(Control(self.inner.clone()))));
        let nbd = self
            .nbd
            .take()
            .map(|(l, e)| tokio::spawn(crate::nbd::serve(l, e)));
        let admin = self
            .admin
            .take()
            .map(|l| tokio::spawn(crate::admin::serve(l, self.inner.clone())));
        tokio::pin!(shutdown);
        let ctl = &self.inner.cfg.control;
        let limit = ConnLimit::new(ctl.max_connections, ctl.max_per_source);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok((s, peer)) => {
                        let permit = match limit.admit(peer.ip()) {
                            Ok(p) => p,
                            Err(full) => {
                                self.inner.counters.connections_refused.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(%peer, "control connection refused: {full}");
                                continue;
                            }
                        };
                        let inner = self.inner.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            if let Err(e) = serve(inner, s, peer).await {
                                tracing::info!(%peer, error = %e, "client connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        for task in [nbd, admin, pressure].into_iter().flatten() {
            task.abort();
        }
        self.inner.close_all().await;
        reaper.abort();
    }
}

/// Ends sessions whose lease ran out; takes reclaimed slabs whose deadline passed.
async fn reap(inner: Arc<Inner>) {
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

fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ServerMsg {
    ServerMsg::Error {
        id,
        code,
        message: message.into(),
    }
}

async fn serve(inner: Arc<Inner>, mut s: TcpStream, peer: SocketAddr) -> Result<(), FrameError> {
    s.set_nodelay(true)?;
    let limit = Duration::from_millis(inner.cfg.control.handshake_timeout_ms);
    let session = match tokio::time::timeout(limit, handshake(&inner, &mut s)).await {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            tracing::info!(%peer, "handshake timed out");
            return Ok(());
        }
    };
    tracing::info!(%peer, session = session.id, client = %session.client, "client authenticated");
    let result = requests(&inner, &session, &mut s).await;
    inner.end_session(&session).await;
    result
}

/// Authenticates and opens a session; `None` after a refusal was sent.
async fn handshake(
    inner: &Arc<Inner>,
    s: &mut TcpStream,
) -> Result<Option<Arc<Session>>, FrameError> {
    let (client, nonce_c) = match decode::<ClientMsg>(&read_frame(s).await?) {
        Ok(ClientMsg::Hello {
            version,
            client,
            nonce,
        }) if version == VERSION => (client, nonce),
        Ok(ClientMsg::Hello { version, .. }) => {
            let msg = format!(
                "protocol version {version} is not supported (this donor speaks {VERSION})"
            );
            write_msg(s, &error(None, ErrorCode::Version, msg)).await?;
            return Ok(None);
        }
        _ => {
            write_msg(s, &error(None, ErrorCode::BadRequest, "expected hello")).await?;
            return Ok(None);
        }
    };
    if client.len() > 256 || nonce_c.len() != 64 {
        write_msg(
            s,
            &error(
                None,
                ErrorCode::BadRequest,
                "client name or nonce malformed",
            ),
        )
        .await?;
        return Ok(None);
    }
    let nonce_s = auth::nonce();
    write_msg(
        s,
        &ServerMsg::Challenge {
            version: VERSION,
            nonce: nonce_s.clone(),
        },
    )
    .await?;
    let ok = match decode::<ClientMsg>(&read_frame(s).await?) {
        Ok(ClientMsg::Auth { mac }) => {
            auth::verify_client(&inner.secret, &nonce_s, &nonce_c, &client, &mac)
        }
        _ => false,
    };
    if !ok {
        tracing::warn!(%client, "authentication failed");
        inner.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        write_msg(
            s,
            &error(None, ErrorCode::AuthFailed, "authentication failed"),
        )
        .await?;
        return Ok(None);
    }
    let session = match inner.open_session(&client) {
        Ok(x) => x,
        Err(e) => {
            write_msg(s, &error(None, ErrorCode::Internal, e.to_string())).await?;
            return Ok(None);
        }
    };
    let ip = s.local_addr()?.ip();
    let (data_addr, token) = match inner.open_data(&session, ip) {
        Ok(x) => x,
        Err(e) => {
            inner.drop_session(&session);
            write_msg(
                s,
                &error(None, ErrorCode::Internal, format!("data listener: {e}")),
            )
            .await?;
            return Ok(None);
        }
    };
    write_msg(
        s,
        &ServerMsg::Welcome {
            mac: auth::server_proof(&inner.secret, &nonce_c, &nonce_s),
            session: format!("{:016x}", session.id),
            slab_size: inner.cfg.slab_size.0,
            lease_ms: inner.cfg.lease().as_millis() as u64,
            data_addr: data_addr.to_string(),
            data_token: token,
        },
    )
    .await?;
    Ok(Some(session))
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

async fn requests(
    inner: &Arc<Inner>,
    session: &Arc<Session>,
    s: &mut TcpStream,
) -> Result<(), FrameError> {
    let ip = s.local_addr()?.ip();
    let Some(mut notices) = lock(&session.notices_rx).take() else {
        return Ok(());
    };
    let (r, mut w) = s.split();
    // Frames are read by their own future so a notice never interrupts one half-read.
    let (frames_tx, mut frames) = mpsc::channel::<Result<Vec<u8>, FrameError>>(4);
    let reader = async move {
        let mut r = r;
        loop {
            let f = read_frame(&mut r).await;
            let stop = f.is_err();
            if frames_tx.send(f).await.is_err() || stop {
                return;
            }
        }
    };
    tokio::pin!(reader);
    let mut reader_done = false;
    let s = &mut w;
    loop {
        let body = tokio::select! {
            // Once the reader stops, its channel closes and `recv` reports why.
            _ = &mut reader, if !reader_done => {
                reader_done = true;
                continue;
            }
            b = frames.recv() => match b {
                Some(b) => b?,
                None => return Ok(()),
            },
            Some(n) = notices.recv() => {
                write_msg(s, &n).await?;
                continue;
            }
            _ = session.ended.notified() => {
                while let Ok(n) = notices.try_recv() {
                    write_msg(s, &n).await?;
                }
                return Ok(());
            }
        };
        let reply = match decode::<ClientMsg>(&body) {
            Err(e) => error(
                None,
                ErrorCode::BadRequest,
                format!("{e}: {}", e.source_text()),
            ),
            Ok(ClientMsg::Reconnect { id }) => match inner.open_data(session, ip) {
                Ok((addr, token)) => ServerMsg::Reconnect {
                    id,
                    data_addr: addr.to_string(),
                    data_token: token,
                },
                Err(e) => error(Some(id), ErrorCode::Internal, format!("data listener: {e}")),
            },
            Ok(msg) => inner.handle(session, msg).await,
        };
        if matches!(reply, ServerMsg::Error { .. }) {
            inner.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        }
        write_msg(s, &reply).await?;
    }
}

trait SourceText {
    fn source_text(&self) -> String;
}

impl SourceText for FrameError {
    fn source_text(&self) -> String {
        std::error::Error::source(self)
            .map(|e| e.to_string())
            .unwrap_or_default()
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
        // One lock at a time: the pool is never held while a session's lock is taken.
        let (slab_size, slabs_total, slabs_free, slabs_retired, slabs_reclaiming) = {
            let pool = lock(&self.pool);
            (
                pool.slab_size() as u64,
                pool.total(),
                pool.free_count(),
                pool.retired_count(),
                pool.doomed_count(),
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

    fn open_session(&self, client: &str) -> rmem_transport::Result<Arc<Session>> {
        let (notices, rx) = mpsc::unbounded_channel();
        let s = Arc::new(Session {
            notices,
            notices_rx: Mutex::new(Some(rx)),
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            client: client.to_string(),
            pd: self.ctx.alloc_pd()?,
            qp: Mutex::new(None),
            slabs: Mutex::new(HashMap::new()),
            lease_until: Mutex::new(Instant::now() + self.cfg.lease()),
            ended: Notify::new(),
        });
        lock(&self.sessions).insert(s.id, s.clone());
        Ok(s)
    }

    /// The data listener's address on `ip` (the address the client reached us on) and a fresh
    /// token for the session's next data connection.
    fn open_data(
        &self,
        s: &Arc<Session>,
        ip: std::net::IpAddr,
    ) -> rmem_transport::Result<(SocketAddr, String)> {
        let session: Arc<dyn crate::data::DataSession> = s.clone();
        Ok((
            SocketAddr::new(ip, self.data.port()),
            self.data.issue(&session),
        ))
    }

    /// Live data-connection tokens over all sessions.
    pub(crate) fn data_tokens(&self) -> usize {
        self.data.live_tokens()
    }

    fn drop_session(&self, s: &Session) {
        lock(&self.sessions).remove(&s.id);
        self.data.revoke(s.id);
    }

    /// Closes the data queue pair and takes every slab back (deregistered, then zeroed).
    async fn end_session(&self, s: &Arc<Session>) {
        if lock(&self.sessions).remove(&s.id).is_none() {
            return;
        }
        self.data.revoke(s.id);
        if let Some(qp) = lock(&s.qp).take() {
            qp.shutdown();
        }
        let slabs: Vec<(u32, Mr)> = lock(&s.slabs).drain().collect();
        self.release(slabs).await;
        tracing::info!(session = s.id, client = %s.client, "session ended");
    }

    /// Deregisters (waiting for operations in flight) off the async threads, then zeroes.
    async fn release(&self, slabs: Vec<(u32, Mr)>) {
        let ids: Vec<u32> = slabs.iter().map(|(id, _)| *id).collect();
        self.counters
            .slabs_freed
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || drop(slabs)).await;
        let mut pool = lock(&self.pool);
        for id in ids {
            pool.give_back(id);
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
            let mut pool = lock(&self.pool);
            let lendable = pool.total() - pool.retired_count() - pool.doomed_count();
            let allowed = want.min(lendable.saturating_sub(min_slabs));
            report.short = want - allowed;
            report.retired = pool.retire_free(allowed);
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
                let mut pool = lock(&self.pool);
                for slab in held {
                    if asked.len() as u32 == left {
                        break;
                    }
                    if !pool.is_doomed(slab) && pool.owner(slab) == Some(s.id) && pool.doom(slab) {
                        asked.push(slab);
                    }
                }
            }
            if asked.is_empty() {
                continue;
            }
            left -= asked.len() as u32;
            report.reclaiming += asked.len() as u32;
            {
                let mut r = lock(&self.reclaims);
                for &slab in &asked {
                    r.insert(slab, deadline);
                }
            }
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
        let done = lock(&self.pool).grow(n);
        tracing::info!(slabs = done, "grow");
        done
    }

    /// Takes reclaimed slabs whose deadline passed from whoever still holds them.
    async fn take_overdue(&self, now: Instant) {
        let due: Vec<u32> = {
            let pool = lock(&self.pool);
            let mut r = lock(&self.reclaims);
            // Forget slabs that came back or were un-doomed by a grow.
            r.retain(|slab, _| pool.is_doomed(*slab));
            r.iter()
                .filter(|(_, d)| **d <= now)
                .map(|(s, _)| *s)
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let sessions: Vec<_> = lock(&self.sessions).values().cloned().collect();
        let mut taken = Vec::new();
        for s in sessions {
            let mut held = lock(&s.slabs);
            for slab in &due {
                if let Some(mr) = held.remove(slab) {
                    tracing::info!(session = s.id, slab, "reclaim deadline passed; slab taken");
                    taken.push((*slab, mr));
                }
            }
        }
        lock(&self.reclaims).retain(|slab, _| !due.contains(slab));
        self.counters
            .slabs_reclaimed
            .fetch_add(taken.len() as u64, Ordering::Relaxed);
        self.release(taken).await;
    }

    /// Shutdown: tells every client, gives them the grace period to move their data (or to
    /// leave), then ends every session.
    async fn close_all(&self) {
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

    async fn handle(&self, s: &Arc<Session>, msg: ClientMsg) -> ServerMsg {
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

    async fn alloc(&self, s: &Arc<Session>, id: u64, count: u32) -> ServerMsg {
        if count == 0 || count > MAX_SLABS_PER_REQUEST {
            return error(
                Some(id),
                ErrorCode::TooMany,
                format!("count must be 1..={MAX_SLABS_PER_REQUEST}"),
            );
        }
        let (ids, buf, slab_size) = {
            let mut pool = lock(&self.pool);
            match pool.take(s.id, count) {
                Ok(ids) => (ids, pool.buffer().clone(), pool.slab_size()),
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
                let mut pool = lock(&self.pool);
                for slab in ids {
                    pool.give_back(slab);
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

    async fn free(&self, s: &Arc<Session>, id: u64, slabs: Vec<u32>) -> ServerMsg {
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
                    let code = match lock(&self.pool).owner(slab) {
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
