//! The software provider: verbs semantics over TCP, for hosts without an RDMA NIC.
//!
//! Each queue pair is two TCP connections (see [`wire`]). A thread per queue pair serves the
//! peer's requests straight from and into registered memory (`target.rs`); responses to our own
//! requests are read by whoever polls the send CQ (`qp.rs`). Payloads move between the socket and
//! registered memory with `sendmsg`/`recv` directly, with no intermediate buffer.

mod cq;
mod handshake;
mod initiator;
mod link_state;
mod qp;
mod responder;
mod sock;
mod state;
mod target;
pub mod wire;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use rand::Rng;

use crate::backend::{ContextOps, CqOps, IncomingOps, ListenerOps, PdOps, QpOps, QpSpec};
use crate::gate::{Gate, ListenLimits};
use crate::memory::Region;
use crate::mr::Registration;
use crate::types::{DeviceInfo, Provider, TargetStats};
use crate::{Access, Error, Result};

pub(crate) use cq::TcpCq;
use qp::{QpShared, TcpQp};

/// The target thread's stack: its loop is shallow. A process that locks its memory (the swap
/// daemon: mlockall with MCL_FUTURE) pays for every stack page up front, 2 MiB by default.
const TARGET_STACK: usize = 256 << 10;

/// Counters shared by every target thread of a context.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) atomics: AtomicU64,
    pub(crate) access_errors: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) rnr_naks: AtomicU64,
}

/// The tcp provider's probe: it runs wherever TCP does.
pub(crate) const PROBE: crate::backend::Probe = crate::backend::Probe {
    provider: Provider::Tcp,
    available: || Ok(()),
    open: |_| Ok(Arc::new(TcpContext::new())),
};

pub(crate) struct TcpContext {
    stats: Arc<Counters>,
    next_id: AtomicU64,
    next_qpn: AtomicU32,
}

impl TcpContext {
    pub(crate) fn new() -> TcpContext {
        TcpContext {
            stats: Arc::default(),
            next_id: AtomicU64::new(1),
            next_qpn: AtomicU32::new(rand::rng().random_range(1..0x00ff_0000)),
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Builds a queue pair over two established connections and starts its target thread.
    fn make_qp(&self, spec: &QpSpec, out: TcpStream, inn: TcpStream) -> Result<Arc<dyn QpOps>> {
        let pd = downcast_pd(spec)?;
        let send_cq = downcast_cq(&spec.send_cq)?;
        let recv_cq = downcast_cq(&spec.recv_cq)?;
        for s in [&out, &inn] {
            handshake::tune(s, target::stall_limit(spec.caps.op_timeout))?;
        }
        let num = self.next_qpn.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        let shared = Arc::new(QpShared::new(
            num,
            spec.caps,
            pd,
            send_cq.clone(),
            recv_cq,
            self.stats.clone(),
            out,
            inn,
        ));
        send_cq.attach(&shared)?;
        let t = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("rmem-tgt-{num}"))
            .stack_size(TARGET_STACK)
            .spawn(move || target::serve(t))
            .map_err(|e| Error::os("spawn target thread", e))?;
        Ok(Arc::new(TcpQp {
            shared,
            target: Mutex::new(Some(handle)),
        }))
    }
}

fn downcast_pd(spec: &QpSpec) -> Result<Arc<TcpPd>> {
    crate::backend::downcast(spec.pd.clone().into_any(), "protection domain")
}

fn downcast_cq(cq: &Arc<dyn CqOps>) -> Result<Arc<TcpCq>> {
    crate::backend::downcast(cq.clone().into_any(), "completion queue")
}

impl ContextOps for TcpContext {
    fn provider(&self) -> Provider {
        Provider::Tcp
    }

    fn device(&self) -> DeviceInfo {
        DeviceInfo {
            provider: Provider::Tcp,
            name: "tcp".into(),
            port: 1,
            gid_index: None,
            gid: None,
            mtu: None,
            max_qp_wr: 1 << 16,
            max_sge: 32,
            max_msg: wire::MAX_MSG,
        }
    }

    fn alloc_pd(&self) -> Result<Arc<dyn PdOps>> {
        Ok(Arc::new(TcpPd {
            id: self.id(),
            table: RwLock::new(HashMap::new()),
        }))
    }

    fn create_cq(&self, depth: usize) -> Result<Arc<dyn CqOps>> {
        Ok(Arc::new(TcpCq::new(depth)?))
    }

    fn listen(&self, addr: SocketAddr, limits: ListenLimits) -> Result<Box<dyn ListenerOps>> {
        let pairing = handshake::Pairing::new(Gate::bind(addr, limits)?);
        let local = pairing.local_addr()?;
        Ok(Box::new(TcpListenerOps {
            ctx: Arc::new(TcpContext {
                stats: self.stats.clone(),
                next_id: AtomicU64::new(0),
                next_qpn: AtomicU32::new(self.next_qpn.fetch_add(1 << 16, Ordering::Relaxed)),
            }),
            pending: Mutex::new(pairing),
            local,
        }))
    }

    fn connect(
        &self,
        addr: SocketAddr,
        spec: &QpSpec,
        private: &[u8],
        timeout: Duration,
    ) -> Result<(Arc<dyn QpOps>, Vec<u8>)> {
        let (out, inn, reply) = handshake::connect(addr, private, timeout)?;
        Ok((self.make_qp(spec, out, inn)?, reply))
    }

    fn stats(&self) -> TargetStats {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TargetStats {
            requests: g(&s.requests),
            bytes_read: g(&s.bytes_read),
            bytes_written: g(&s.bytes_written),
            atomics: g(&s.atomics),
            access_errors: g(&s.access_errors),
            protocol_errors: g(&s.protocol_errors),
            rnr_naks: g(&s.rnr_naks),
        }
    }
}

struct TcpListenerOps {
    ctx: Arc<TcpContext>,
    pending: Mutex<handshake::Pairing>,
    local: SocketAddr,
}

impl ListenerOps for TcpListenerOps {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn next(&self, timeout: Option<Duration>) -> Result<Box<dyn IncomingOps>> {
        let mut pairing = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let pair = pairing.next_pair(timeout, &self.ctx.stats)?;
        Ok(Box::new(TcpIncoming {
            ctx: self.ctx.clone(),
            pair,
        }))
    }
}

/// Both halves of a connection request; no queue pair and no target thread exist for it yet.
struct TcpIncoming {
    ctx: Arc<TcpContext>,
    pair: handshake::Pair,
}

impl IncomingOps for TcpIncoming {
    fn private(&self) -> &[u8] {
        &self.pair.private
    }

    fn peer(&self) -> SocketAddr {
        self.pair.peer
    }

    fn accept(self: Box<Self>, spec: &QpSpec, private: &[u8]) -> Result<Arc<dyn QpOps>> {
        // Refuse before answering if the objects are unusable, so the peer hears why.
        if let Err(e) = downcast_pd(spec).and(downcast_cq(&spec.send_cq)) {
            self.reject();
            return Err(e);
        }
        let TcpIncoming { ctx, pair } = *self;
        // The answer goes out before the target thread starts: whatever the peer pipelined
        // behind its hello runs only now, after the application accepted it.
        handshake::send_accept(&pair.primary, &pair.conn_id, private)?;
        // The connector's primary carries its requests to us: it is our inbound side.
        ctx.make_qp(spec, pair.secondary, pair.primary)
    }

    fn reject(self: Box<Self>) {
        handshake::send_reject(&self.pair.primary, crate::exchange::REJECT_REFUSED);
        tracing::debug!(peer = %self.pair.peer, "connection request refused");
    }
}

/// A registered region as the target sees it.
pub(crate) struct MrEntry {
    region: Arc<Region>,
    base: u64,
    access: Access,
}

pub(crate) struct TcpPd {
    pub(crate) id: u64,
    table: RwLock<HashMap<u32, Arc<MrEntry>>>,
}

impl TcpPd {
    /// Checks `rkey`, bounds and rights; returns the entry (to hold) and the local address.
    pub(crate) fn resolve(
        &self,
        rkey: u32,
        addr: u64,
        len: u64,
        need: Access,
    ) -> Option<(Arc<MrEntry>, *mut u8)> {
        let entry = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&rkey)?
            .clone();
        let off = addr.checked_sub(entry.base)?;
        let end = off.checked_add(len)?;
        if end > entry.region.len() as u64 || !entry.access.contains(need) {
            return None;
        }
        // SAFETY: off + len <= region length, checked above.
        let ptr = unsafe { entry.region.ptr().add(off as usize) };
        Some((entry, ptr))
    }
}

impl PdOps for TcpPd {
    fn id(&self) -> u64 {
        self.id
    }

    fn register(self: Arc<Self>, region: &Arc<Region>, access: Access) -> Result<Registration> {
        let mut rng = rand::rng();
        // Peers see a random page-aligned base, not our address: a key alone locates nothing.
        let base = ((rng.random::<u64>() >> 8) & !0xfff) | (1 << 44);
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let rkey = loop {
            let k: u32 = rng.random();
            if k != 0 && !table.contains_key(&k) {
                break k;
            }
        };
        let entry = Arc::new(MrEntry {
            region: region.clone(),
            base,
            access,
        });
        let weak = Arc::downgrade(&entry);
        table.insert(rkey, entry);
        Ok(Registration {
            lkey: rng.random(),
            rkey,
            remote_addr: base,
            _guard: Box::new(Deregister {
                pd: Arc::downgrade(&self),
                rkey,
                entry: weak,
            }),
        })
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// Removes the key from the table when the memory region is dropped; requests already being
/// served keep the memory through their own reference.
struct Deregister {
    pd: Weak<TcpPd>,
    rkey: u32,
    entry: Weak<MrEntry>,
}

/// How long deregistration waits for a request in flight (it normally takes microseconds; a
/// target thread stuck on a dead peer gives up after its operation timeout).
const DEREG_WAIT: Duration = Duration::from_secs(30);

impl Drop for Deregister {
    fn drop(&mut self) {
        if let Some(pd) = self.pd.upgrade() {
            pd.table
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.rkey);
        }
        // Like ibv_dereg_mr: once this returns, no peer operation touches the memory any more,
        // so it can be zeroed and lent to someone else.
        let start = std::time::Instant::now();
        while self.entry.strong_count() > 0 {
            if start.elapsed() > DEREG_WAIT {
                tracing::error!(
                    rkey = self.rkey,
                    "deregistration gave up waiting for a request in flight"
                );
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}
