//! The interface every provider implements. The public types in `api` wrap these trait objects,
//! in the manner of a hypervisor crate with one trait and one module per backend.

use std::any::Any;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::gate::ListenLimits;
use crate::memory::Region;
use crate::mr::Registration;
use crate::types::{DeviceInfo, Provider, QpCaps, TargetStats};
use crate::{Access, Completion, RecvWr, Result, SendWr};

/// A compiled-in provider, as `open` sees it: whether it can run on this host, and how to open
/// a context on it. Each provider module exports one as `PROBE`.
pub(crate) struct Probe {
    pub(crate) provider: Provider,
    /// `Ok` where the provider can run on this host, else why not.
    pub(crate) available: fn() -> Result<()>,
    pub(crate) open: fn(&crate::types::OpenOptions) -> Result<Arc<dyn ContextOps>>,
}

pub(crate) trait ContextOps: Send + Sync {
    fn provider(&self) -> Provider;
    fn device(&self) -> DeviceInfo;
    fn alloc_pd(&self) -> Result<Arc<dyn PdOps>>;
    fn create_cq(&self, depth: usize) -> Result<Arc<dyn CqOps>>;
    fn listen(&self, addr: SocketAddr, limits: ListenLimits) -> Result<Box<dyn ListenerOps>>;
    fn connect(
        &self,
        addr: SocketAddr,
        spec: &QpSpec,
        private: &[u8],
        timeout: Duration,
    ) -> Result<(Arc<dyn QpOps>, Vec<u8>)>;
    fn stats(&self) -> TargetStats;
}

pub(crate) trait PdOps: Send + Sync {
    fn id(&self) -> u64;
    /// Takes `Arc<Self>` so the registration can keep the protection domain alive.
    fn register(self: Arc<Self>, region: &Arc<Region>, access: Access) -> Result<Registration>;
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

pub(crate) trait CqOps: Send + Sync {
    /// Takes up to `out.len()` completions without blocking; makes provider progress on the way.
    fn poll(&self, out: &mut [Completion]) -> Result<usize>;
    /// Asks for a wake-up on `event_fd` when the next completion may be ready.
    fn arm(&self) -> Result<()>;
    /// Sleeps until `arm`ed work may have completed or `timeout` passes.
    fn block(&self, timeout: Option<Duration>) -> Result<()>;
    /// Readable when `block` would return (for async runtimes).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn event_fd(&self) -> RawFd;
    /// Consumes the readiness of `event_fd` after it fired.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn ack_event(&self) -> Result<()>;
    /// How long until some outstanding work request times out, for async waiters.
    fn next_deadline(&self) -> Option<Duration>;
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

pub(crate) trait QpOps: Send + Sync {
    fn qp_num(&self) -> u32;
    fn post_send(&self, wrs: &[SendWr<'_>]) -> Result<()>;
    fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()>;
    fn is_error(&self) -> bool;
    /// Moves the queue pair to the error state: outstanding work is flushed.
    fn shutdown(&self);
}

pub(crate) trait ListenerOps: Send + Sync {
    fn local_addr(&self) -> SocketAddr;
    /// Waits for a peer whose whole connection request has arrived. Nothing is created for it
    /// and nothing it sent is executed until [`IncomingOps::accept`].
    fn next(&self, timeout: Option<Duration>) -> Result<Box<dyn IncomingOps>>;
}

/// A connection request that has arrived and is neither accepted nor refused yet.
pub(crate) trait IncomingOps: Send {
    fn private(&self) -> &[u8];
    fn peer(&self) -> SocketAddr;
    /// Creates the queue pair from `spec`, answers with `private`, and only then lets the
    /// peer's requests run. On a local error the peer is refused.
    fn accept(self: Box<Self>, spec: &QpSpec, private: &[u8]) -> Result<Arc<dyn QpOps>>;
    /// Tells the peer it was refused and closes the connection.
    fn reject(self: Box<Self>);
}

/// A queue pair request resolved to provider objects.
pub(crate) struct QpSpec {
    pub(crate) pd: Arc<dyn PdOps>,
    pub(crate) send_cq: Arc<dyn CqOps>,
    pub(crate) recv_cq: Arc<dyn CqOps>,
    pub(crate) caps: QpCaps,
}

/// The provider's own type behind a trait object, or an error naming what came from another
/// provider (a queue pair cannot use another provider's PD or CQ).
pub(crate) fn downcast<T: Any + Send + Sync>(
    obj: Arc<dyn Any + Send + Sync>,
    what: &str,
) -> Result<Arc<T>> {
    obj.downcast::<T>()
        .map_err(|_| crate::Error::InvalidArgument(format!("{what} is from another provider")))
}
