//! The donor's data listener: one per donor, for every session's one-sided queue pair.
//!
//! An authenticated session gets a random single-use token on its control connection (at
//! `welcome`, and again at each `reconnect`). The client connects its data queue pair to this
//! listener with the token as the connection's private data. The transport reads each request
//! in full before showing it (bounded per source and in total, with a deadline for the hello:
//! [`rmem_transport::ListenLimits`]), and creates nothing for it until it is accepted here: a
//! request whose token is unknown, used or expired is refused, so no queue pair exists in any
//! session's protection domain for it and nothing it pipelined behind its hello runs.
//!
//! One thread accepts for every session, so a flood of `reconnect`s costs a map entry each
//! (a session holds at most [`DataConfig::tokens_per_session`] live tokens; a new one retires
//! the oldest), never a listener, a thread or a descriptor.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;
use rmem_transport::{Context, ListenLimits, Listener, Pd, Qp, QpConfig};
use serde::{Deserialize, Serialize};

/// Bounds on the data listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// TCP port of the data listener's connection exchange, on the control address's IP
    /// (0: any free port; clients learn it at `welcome`).
    pub port: u16,
    /// Connection requests held before they are accepted or refused, over all peers.
    pub max_pending: usize,
    /// The same, from one IP address.
    pub max_per_source: usize,
    /// Time a connecting peer has to send its whole hello.
    pub hello_timeout_ms: u64,
    /// Live data tokens per session (`reconnect`s not yet used); a new one retires the oldest.
    pub tokens_per_session: usize,
    /// How long a token stays usable.
    pub token_secs: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        let l = ListenLimits::default();
        DataConfig {
            port: 0,
            max_pending: l.max_pending,
            max_per_source: l.max_per_source,
            hello_timeout_ms: l.hello_timeout.as_millis() as u64,
            tokens_per_session: 4,
            token_secs: 30,
        }
    }
}

impl DataConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_pending == 0 || self.max_per_source == 0 || self.tokens_per_session == 0 {
            return Err(
                "[data] max_pending, max_per_source and tokens_per_session must be at least 1"
                    .into(),
            );
        }
        if self.hello_timeout_ms == 0 || self.token_secs == 0 {
            return Err("[data] hello_timeout_ms and token_secs must be above 0".into());
        }
        Ok(())
    }

    fn limits(&self) -> ListenLimits {
        ListenLimits {
            max_pending: self.max_pending,
            max_per_source: self.max_per_source,
            hello_timeout: Duration::from_millis(self.hello_timeout_ms),
        }
    }
}

/// What the listener needs of a session: where its queue pair lives, and where it goes.
pub(crate) trait DataSession: Send + Sync {
    fn id(&self) -> u64;
    fn pd(&self) -> &Pd;
    /// Takes the session's new data queue pair for `lane` (replacing and shutting down an older
    /// one there).
    fn install(&self, lane: u8, qp: Qp);
}

struct Grant {
    session: Weak<dyn DataSession>,
    session_id: u64,
    lane: u8,
    issued: Instant,
}

#[derive(Default)]
struct Tokens {
    live: HashMap<String, Grant>,
}

impl Tokens {
    fn expire(&mut self, ttl: Duration) {
        let now = Instant::now();
        self.live
            .retain(|_, g| now.duration_since(g.issued) < ttl && g.session.strong_count() > 0);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running data listener; stopped (and its thread joined) on drop.
pub(crate) struct DataPlane {
    port: u16,
    cfg: DataConfig,
    tokens: Arc<Mutex<Tokens>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the accept loop looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(250);

impl DataPlane {
    pub(crate) fn start(
        ctx: &Context,
        ip: std::net::IpAddr,
        cfg: &DataConfig,
    ) -> rmem_transport::Result<DataPlane> {
        let listener = ctx.listen_with(SocketAddr::new(ip, cfg.port), cfg.limits())?;
        let port = listener.local_addr().port();
        let tokens = Arc::new(Mutex::new(Tokens::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s, ttl) = (
            tokens.clone(),
            stop.clone(),
            Duration::from_secs(cfg.token_secs),
        );
        let thread = std::thread::Builder::new()
            .name("rmem-data-accept".into())
            .spawn(move || accept_loop(listener, t, s, ttl))
            .map_err(|e| rmem_transport::Error::InvalidArgument(format!("spawn: {e}")))?;
        Ok(DataPlane {
            port,
            cfg: cfg.clone(),
            tokens,
            stop,
            thread: Some(thread),
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// A fresh single-use token for `session`'s next data connection on `lane`.
    pub(crate) fn issue(&self, session: &Arc<dyn DataSession>, lane: u8) -> String {
        let token = hex::encode(rand::rng().random::<[u8; 16]>());
        let id = session.id();
        let mut t = lock(&self.tokens);
        t.expire(Duration::from_secs(self.cfg.token_secs));
        let mut mine: Vec<(Instant, String)> = t
            .live
            .iter()
            .filter(|(_, g)| g.session_id == id)
            .map(|(k, g)| (g.issued, k.clone()))
            .collect();
        if mine.len() >= self.cfg.tokens_per_session {
            mine.sort();
            for (_, old) in &mine[..=mine.len() - self.cfg.tokens_per_session] {
                t.live.remove(old);
            }
        }
        t.live.insert(
            token.clone(),
            Grant {
                session: Arc::downgrade(session),
                session_id: id,
                lane,
                issued: Instant::now(),
            },
        );
        token
    }

    /// Forgets every token of a session that ended.
    pub(crate) fn revoke(&self, session_id: u64) {
        lock(&self.tokens)
            .live
            .retain(|_, g| g.session_id != session_id);
    }

    /// Live tokens (for tests and status).
    pub(crate) fn live_tokens(&self) -> usize {
        lock(&self.tokens).live.len()
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: Listener,
    tokens: Arc<Mutex<Tokens>>,
    stop: Arc<AtomicBool>,
    ttl: Duration,
) {
    // Refusals are summed up in one warning at most every 10 s: a flood must not flood the log.
    let (mut refused, mut last_warn) = (0u64, None);
    while !stop.load(Ordering::Relaxed) {
        let req = match listener.incoming(Some(STOP_POLL)) {
            Ok(r) => r,
            Err(e) if e.is_transient() => continue,
            Err(e) => {
                tracing::error!(error = %e, "data listener failed");
                std::thread::sleep(STOP_POLL);
                continue;
            }
        };
        let peer = req.peer_addr();
        // Single use: a token leaves the table whether or not the accept then works.
        let grant = std::str::from_utf8(req.private()).ok().and_then(|k| {
            let mut t = lock(&tokens);
            t.expire(ttl);
            t.live.remove(k)
        });
        let Some((session, lane)) = grant.and_then(|g| Some((g.session.upgrade()?, g.lane))) else {
            refused += 1;
            tracing::debug!(%peer, "data connection with an unknown or used token refused");
            if last_warn.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(count = refused, last_peer = %peer, "data connections with an unknown or used token refused");
                refused = 0;
                last_warn = Some(Instant::now());
            }
            req.reject();
            continue;
        };
        let cq = match session.pd().context().create_cq(64) {
            Ok(cq) => cq,
            Err(e) => {
                tracing::warn!(session = session.id(), error = %e, "no completion queue for a data connection");
                req.reject();
                continue;
            }
        };
        match req.accept(&QpConfig::new(session.pd(), &cq), b"") {
            Ok(qp) => {
                tracing::debug!(session = session.id(), %peer, "data queue pair accepted");
                session.install(lane, qp);
            }
            Err(e) => {
                tracing::info!(session = session.id(), %peer, error = %e, "data connection failed")
            }
        }
    }
}
