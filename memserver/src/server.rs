//! The donor daemon: binds its ports, starts the tasks that serve them (control connections,
//! the data listener, NBD, admin, lease reaper, pressure monitor) and stops them. The state they
//! act on is in `donor`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmem_transport::{open, OpenOptions};
use tokio::net::TcpListener;

use crate::config::ServerConfig;
use crate::conn_limit::ConnLimit;
use crate::control::serve;
use crate::donor::{reap, Control, Counters, Inner};
use crate::ledger::Ledger;
use crate::protocol::DonorStats;

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

/// A bound donor; [`Server::run`] serves it.
pub struct Server {
    inner: Arc<Inner>,
    listener: TcpListener,
    nbd: Option<(TcpListener, crate::nbd::Exports)>,
    admin: Option<TcpListener>,
}

/// Ledger holder of the NBD exports' slabs (sessions start at 1).
const EXPORTS_OWNER: u64 = 0;

impl Server {
    /// Allocates the pool, opens the transport and binds the control port.
    pub async fn bind(cfg: ServerConfig, secret: Vec<u8>) -> Result<Server, ServerError> {
        cfg.validate()?;
        let mut o = OpenOptions::new(cfg.provider);
        o.device = cfg.device.clone();
        let ctx = open(&o)?;
        let mut pool = Ledger::new(cfg.size.0 as usize, cfg.slab_size.0 as usize, cfg.hugepages)?;
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
                ledger: Mutex::new(pool),
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                pressure_retired: AtomicU64::new(0),
                counters: Counters::default(),
                nbd_stats: Arc::default(),
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
        let nbd = self.nbd.take().map(|(l, e)| {
            let (limits, stats) = (self.inner.cfg.nbd.clone(), self.inner.nbd_stats.clone());
            tokio::spawn(crate::nbd::serve_with(l, e, limits, stats))
        });
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
