//! The public, provider-independent objects: context, protection domain, completion queue,
//! queue pair and listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{ContextOps, CqOps, IncomingOps, ListenerOps, PdOps, QpOps, QpSpec};
use crate::gate::ListenLimits;
use crate::memory::{HugePages, Region};
use crate::mr::{Mr, MrInner};
use crate::rate::{PeerBytes, PeerCounter, PeerTraffic, TokenBucket};
use crate::types::{DeviceInfo, PollMode, Provider, QpCaps, TargetStats, MAX_PRIVATE_DATA};
use crate::{Access, Completion, Error, RecvWr, Result, SendWr};

/// An open device: the root of every other object ([`crate::open`] makes one).
#[derive(Clone)]
pub struct Context {
    ops: Arc<dyn ContextOps>,
    peers: Arc<PeerTraffic>,
}

impl Context {
    pub(crate) fn from_ops(ops: Arc<dyn ContextOps>) -> Context {
        Context {
            ops,
            peers: Arc::default(),
        }
    }

    /// Bytes this host's queue pairs moved to and from each peer host since the context opened
    /// (as initiator: WRITE and SEND out, READ in).
    pub fn peer_traffic(&self) -> Vec<PeerBytes> {
        self.peers.snapshot()
    }

    pub fn provider(&self) -> Provider {
        self.ops.provider()
    }
    pub fn device(&self) -> DeviceInfo {
        self.ops.device()
    }
    /// What this context's target side has served so far.
    pub fn stats(&self) -> TargetStats {
        self.ops.stats()
    }
    /// A protection domain: memory regions and queue pairs of one PD only see each other.
    pub fn alloc_pd(&self) -> Result<Pd> {
        Ok(Pd {
            ops: self.ops.alloc_pd()?,
            ctx: self.clone(),
        })
    }
    /// A completion queue with room for `depth` completions.
    pub fn create_cq(&self, depth: usize) -> Result<Cq> {
        if depth == 0 {
            return Err(Error::InvalidArgument("CQ depth must be at least 1".into()));
        }
        Ok(Cq {
            ops: self.ops.create_cq(depth)?,
            mode: PollMode::default(),
        })
    }
    /// Listens for queue-pair connections on `addr` (the out-of-band exchange, see `docs/`)
    /// with the default [`ListenLimits`].
    pub fn listen(&self, addr: SocketAddr) -> Result<Listener> {
        self.listen_with(addr, ListenLimits::default())
    }

    /// Like [`Context::listen`], with explicit bounds on the connections held before they are
    /// accepted.
    pub fn listen_with(&self, addr: SocketAddr, limits: ListenLimits) -> Result<Listener> {
        Ok(Listener {
            ops: self.ops.listen(addr, limits)?,
            peers: self.peers.clone(),
        })
    }
    /// Connects a new queue pair to a peer's [`Listener`], sending `private` (at most
    /// [`MAX_PRIVATE_DATA`] bytes) and returning the peer's private data with the queue pair.
    pub fn connect(&self, addr: SocketAddr, cfg: &QpConfig, private: &[u8]) -> Result<Connected> {
        check_private(private)?;
        let spec = cfg.resolve()?;
        let (ops, private) = self
            .ops
            .connect(addr, &spec, private, cfg.connect_timeout)?;
        Ok(Connected {
            qp: Qp {
                ops,
                counter: self.peers.counter(addr.ip()),
                limit: None,
            },
            private,
        })
    }
}

fn check_private(p: &[u8]) -> Result<()> {
    if p.len() > MAX_PRIVATE_DATA {
        return Err(Error::InvalidArgument(format!(
            "private data of {} bytes exceeds {MAX_PRIVATE_DATA}",
            p.len()
        )));
    }
    Ok(())
}

/// A protection domain.
#[derive(Clone)]
pub struct Pd {
    pub(crate) ops: Arc<dyn PdOps>,
    ctx: Context,
}

impl Pd {
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Allocates `len` zeroed bytes and registers them.
    pub fn alloc_mr(&self, len: usize, access: Access) -> Result<Mr> {
        self.alloc_mr_with(len, access, HugePages::Never)
    }

    /// Like [`Pd::alloc_mr`], choosing the page size.
    pub fn alloc_mr_with(&self, len: usize, access: Access, huge: HugePages) -> Result<Mr> {
        let region = Arc::new(Region::alloc(len, huge)?);
        self.register_region(region, access)
    }

    /// Registers memory the caller owns (a VM's guest memory, a mapped file).
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped, readable and writable until the returned [`Mr`], all its
    /// clones and every work request that used it are gone: the provider and peers write into it
    /// at any time until then.
    pub unsafe fn register_raw(&self, ptr: *mut u8, len: usize, access: Access) -> Result<Mr> {
        // SAFETY: forwarded to the caller (see the # Safety section).
        let region = Arc::new(unsafe { Region::borrowed(ptr, len)? });
        self.register_region(region, access)
    }

    /// Registers `[offset, offset + len)` of a shared [`Buffer`](crate::Buffer); the buffer stays
    /// mapped while the region lives. Dropping the last clone of the region deregisters it and
    /// waits for remote operations in flight on it, so the memory can then be reused safely.
    pub fn register_buffer(
        &self,
        buf: &crate::Buffer,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<Mr> {
        let region = Arc::new(Region::slice(&buf.0, offset, len)?);
        self.register_region(region, access)
    }

    fn register_region(&self, region: Arc<Region>, access: Access) -> Result<Mr> {
        let reg = self.ops.clone().register(&region, access)?;
        Ok(Mr(Arc::new(MrInner {
            reg,
            region,
            access,
            pd_id: self.ops.id(),
        })))
    }
}

/// A completion queue.
#[derive(Clone)]
pub struct Cq {
    pub(crate) ops: Arc<dyn CqOps>,
    mode: PollMode,
}

impl Cq {
    /// Sets how [`Cq::wait`] waits.
    pub fn set_poll_mode(&mut self, mode: PollMode) {
        self.mode = mode;
    }

    /// Takes up to `out.len()` completions without blocking.
    pub fn poll(&self, out: &mut [Completion]) -> Result<usize> {
        self.ops.poll(out)
    }

    /// Waits for at least one completion, then returns as many as are ready (up to `out.len()`).
    /// `None` waits without a deadline; outstanding work still ends by its own timeout.
    pub fn wait(&self, out: &mut [Completion], timeout: Option<Duration>) -> Result<usize> {
        if out.is_empty() {
            return Err(Error::InvalidArgument("empty completion buffer".into()));
        }
        // Reading the clock can cost more than a poll (an emulated HPET in a VM): busy waits
        // without a deadline never read it, others only every CLOCK_EVERY empty polls.
        const CLOCK_EVERY: u32 = 64;
        if self.mode == PollMode::Busy && timeout.is_none() {
            loop {
                let n = self.ops.poll(out)?;
                if n > 0 {
                    return Ok(n);
                }
                std::hint::spin_loop();
            }
        }
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        let spin_until = match self.mode {
            PollMode::Busy => None,
            PollMode::Adaptive(d) => Some(start + d),
            PollMode::Blocking => Some(start),
        };
        let check_every = if self.mode == PollMode::Blocking {
            1
        } else {
            CLOCK_EVERY
        };
        let mut empty = 0u32;
        loop {
            let n = self.ops.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            empty = empty.wrapping_add(1);
            if !empty.is_multiple_of(check_every) {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if let Some(d) = deadline {
                if now >= d {
                    return Err(Error::Timeout(timeout.unwrap_or_default()));
                }
            }
            match spin_until {
                None => std::hint::spin_loop(),
                Some(s) if now < s => std::hint::spin_loop(),
                Some(_) => {
                    self.ops.arm()?;
                    // A completion that arrived before arming would not wake us: look again.
                    let n = self.ops.poll(out)?;
                    if n > 0 {
                        return Ok(n);
                    }
                    self.ops
                        .block(deadline.map(|d| d.saturating_duration_since(now)))?;
                }
            }
        }
    }

    /// Waits for exactly one completion.
    pub fn wait_one(&self, timeout: Option<Duration>) -> Result<Completion> {
        let mut c = [Completion::default()];
        self.wait(&mut c, timeout)?;
        Ok(c[0])
    }

    /// Awaits completions from a tokio runtime (the provider's event fd drives the wake-up).
    #[cfg(feature = "tokio")]
    pub async fn next(&self, out: &mut [Completion]) -> Result<usize> {
        use tokio::io::{unix::AsyncFd, Interest};
        if out.is_empty() {
            return Err(Error::InvalidArgument("empty completion buffer".into()));
        }
        // SAFETY: the fd belongs to the CQ, which `self` keeps open for longer than this
        // AsyncFd lives (it is dropped when this function returns), and nothing replaces it.
        let fd = unsafe {
            AsyncFd::register_with_interest(EventFd(self.ops.event_fd()), Interest::READABLE)
        }
        .map_err(|e| Error::os("register completion fd with tokio", e.into()))?;
        loop {
            let n = self.ops.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            self.ops.arm()?;
            let n = self.ops.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            // Wake for outstanding work's timeouts even when no event arrives.
            let limit = self.ops.next_deadline().unwrap_or(Duration::from_secs(1));
            if let Ok(guard) = tokio::time::timeout(limit, fd.readable()).await {
                let mut guard = guard.map_err(|e| Error::os("await completion fd", e))?;
                self.ops.ack_event()?;
                guard.clear_ready();
            }
        }
    }
}

#[cfg(feature = "tokio")]
struct EventFd(std::os::fd::RawFd);

#[cfg(feature = "tokio")]
impl std::os::fd::AsRawFd for EventFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// Everything needed to create a queue pair; built with the `with_*`-style setters.
#[derive(Clone)]
pub struct QpConfig {
    pd: Pd,
    send_cq: Cq,
    recv_cq: Cq,
    pub caps: QpCaps,
    pub connect_timeout: Duration,
}

impl QpConfig {
    /// A queue pair in `pd` whose send and receive completions both go to `cq`.
    pub fn new(pd: &Pd, cq: &Cq) -> Self {
        QpConfig {
            pd: pd.clone(),
            send_cq: cq.clone(),
            recv_cq: cq.clone(),
            caps: QpCaps::default(),
            connect_timeout: Duration::from_secs(10),
        }
    }
    pub fn recv_cq(mut self, cq: &Cq) -> Self {
        self.recv_cq = cq.clone();
        self
    }
    pub fn max_send_wr(mut self, n: u32) -> Self {
        self.caps.max_send_wr = n;
        self
    }
    pub fn max_recv_wr(mut self, n: u32) -> Self {
        self.caps.max_recv_wr = n;
        self
    }
    pub fn max_sge(mut self, n: u32) -> Self {
        self.caps.max_sge = n;
        self
    }
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.caps.op_timeout = t;
        self
    }
    pub fn rnr_timeout(mut self, t: Duration) -> Self {
        self.caps.rnr_timeout = t;
        self
    }
    pub fn target_spin(mut self, t: Duration) -> Self {
        self.caps.target_spin = t;
        self
    }
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    fn resolve(&self) -> Result<QpSpec> {
        let c = &self.caps;
        if c.max_send_wr == 0 || c.max_recv_wr == 0 || c.max_sge == 0 {
            return Err(Error::InvalidArgument(
                "queue depths and max_sge must be at least 1".into(),
            ));
        }
        Ok(QpSpec {
            pd: self.pd.ops.clone(),
            send_cq: self.send_cq.ops.clone(),
            recv_cq: self.recv_cq.ops.clone(),
            caps: self.caps,
        })
    }
}

/// A reliable-connected queue pair.
pub struct Qp {
    ops: Arc<dyn QpOps>,
    counter: Arc<PeerCounter>,
    limit: Option<Arc<TokenBucket>>,
}

impl Qp {
    pub fn qp_num(&self) -> u32 {
        self.ops.qp_num()
    }
    /// Paces every later post to `bucket`'s rate (a bandwidth grant); `None` lifts the limit.
    pub fn set_rate_limit(&mut self, bucket: Option<Arc<TokenBucket>>) {
        self.limit = bucket;
    }
    /// Posts a chain of send-queue work requests in one call. On error the requests before the
    /// rejected one ([`Error::Rejected`]'s `index`) were posted. Under a rate limit the call
    /// first waits until the chain's bytes are within the rate.
    pub fn post_send(&self, wrs: &[SendWr<'_>]) -> Result<()> {
        if let Some(b) = &self.limit {
            let n: u64 = wrs
                .iter()
                .flat_map(|w| w.sgl.iter())
                .map(|s| u64::from(s.len()))
                .sum();
            b.acquire(n);
        }
        match self.ops.post_send(wrs) {
            Ok(()) => {
                self.counter.count(wrs);
                Ok(())
            }
            Err(e) => {
                if let Error::Rejected { index, .. } = &e {
                    self.counter.count(&wrs[..(*index).min(wrs.len())]);
                }
                Err(e)
            }
        }
    }
    /// Posts receive buffers.
    pub fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        self.ops.post_recv(wrs)
    }
    /// True once the queue pair has failed (a remote error, a dead peer, a timeout).
    pub fn is_error(&self) -> bool {
        self.ops.is_error()
    }
    /// Moves the queue pair to the error state, flushing outstanding work.
    pub fn shutdown(&self) {
        self.ops.shutdown()
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        self.ops.shutdown();
    }
}

/// A connected queue pair with the private data the peer sent.
pub struct Connected {
    pub qp: Qp,
    pub private: Vec<u8>,
}

/// Accepts queue-pair connections.
///
/// A peer's connection request is read in full before the application sees it, and nothing is
/// created for the peer, nor anything it sent executed, until the application accepts it:
///
/// ```no_run
/// # fn f(l: &rmem_transport::Listener, cfg: &rmem_transport::QpConfig) -> rmem_transport::Result<()> {
/// let req = l.incoming(None)?;
/// if req.private() != b"the session's token" {
///     req.reject(); // no queue pair, no target: its pipelined requests never run
///     return Ok(());
/// }
/// let qp = req.accept(cfg, b"")?;
/// # Ok(()) }
/// ```
pub struct Listener {
    ops: Box<dyn ListenerOps>,
    peers: Arc<PeerTraffic>,
}

impl Listener {
    pub fn local_addr(&self) -> SocketAddr {
        self.ops.local_addr()
    }

    /// Waits for the next connection request. Malformed, slow or over-the-limit connection
    /// attempts are dropped and counted, never returned; only the deadline or a failing listener
    /// is an error.
    pub fn incoming(&self, timeout: Option<Duration>) -> Result<Incoming> {
        Ok(Incoming {
            ops: Some(self.ops.next(timeout)?),
            peers: self.peers.clone(),
        })
    }

    /// Accepts whoever connects next: waits for a request, creates its queue pair from `cfg`,
    /// and replies with `private`. A peer that fails during its accept (it went away, say) is
    /// logged and the wait goes on; only local errors and the deadline end it.
    pub fn accept(
        &self,
        cfg: &QpConfig,
        private: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Connected> {
        check_private(private)?;
        cfg.resolve()?;
        let deadline = crate::wait::Deadline::after(timeout);
        loop {
            let req = self.incoming(deadline.remaining()?)?;
            let peer = req.peer_addr();
            let theirs = req.private().to_vec();
            match req.accept(cfg, private) {
                Ok(qp) => {
                    return Ok(Connected {
                        qp,
                        private: theirs,
                    })
                }
                Err(e @ Error::InvalidArgument(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "a connecting peer failed during accept")
                }
            }
        }
    }
}

/// A connection request whose hello and private data have arrived. Accept it to get the queue
/// pair, or reject it; dropping it rejects it.
pub struct Incoming {
    ops: Option<Box<dyn IncomingOps>>,
    peers: Arc<PeerTraffic>,
}

impl Incoming {
    /// The private data the peer sent (a token, a descriptor).
    pub fn private(&self) -> &[u8] {
        self.ops.as_ref().map_or(&[], |o| o.private())
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.ops
            .as_ref()
            .map(|o| o.peer())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Creates the queue pair from `cfg` and replies with `private` (at most
    /// [`MAX_PRIVATE_DATA`] bytes); the peer's requests run from then on.
    pub fn accept(mut self, cfg: &QpConfig, private: &[u8]) -> Result<Qp> {
        let ops = self.ops.take().ok_or(Error::QpError)?;
        let spec = match check_private(private).and_then(|_| cfg.resolve()) {
            Ok(s) => s,
            Err(e) => {
                ops.reject();
                return Err(e);
            }
        };
        let peer = ops.peer().ip();
        Ok(Qp {
            ops: ops.accept(&spec, private)?,
            counter: self.peers.counter(peer),
            limit: None,
        })
    }

    /// Refuses the request: the peer's connect fails with a refusal.
    pub fn reject(mut self) {
        if let Some(o) = self.ops.take() {
            o.reject();
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(o) = self.ops.take() {
            o.reject();
        }
    }
}
