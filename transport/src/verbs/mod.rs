//! The libibverbs provider: InfiniBand, RoCE, Soft-RoCE (rxe) and siw through rdma-core.
//!
//! Objects map one to one onto verbs objects, and each holds an `Arc` to its parent so teardown
//! runs in the right order whatever the caller drops first: memory region -> protection domain ->
//! [`device::Device`] (the open `ibv_context`), queue pair -> protection domain and completion
//! queues, completion queue -> its completion channel -> device.
//!
//! Choosing what to open ([`crate::OpenOptions`]):
//! - `device`: a device name (`mlx5_0`, `rxe0`); the first device otherwise.
//! - `port`: 1 unless given.
//! - GID: an explicit `gid_index`; else, with `local_ip`, the device, port and index whose
//!   RoCE v2 GID is that address (IPv4-mapped `::ffff:a.b.c.d`, or the IPv6 address itself),
//!   searched over every device and port not pinned by the options; else on an Ethernet port the
//!   first RoCE v2 GID (routable ones before link-local ones), on InfiniBand GID 0 and the LID.
//!
//! [`devices`] lists what is there, for `rmem devices`.
//!
//! Queue pairs are connected by the out-of-band TCP exchange in [`connect`]. The provider keeps
//! no target-side counters (the NIC serves peers), so `Context::stats` reports zeros.
//!
//! Raw bindings come from the `rdma-sys` crate; `unsafe` stays in these files, at the FFI calls.

pub mod connect;
mod cq;
mod device;
mod pd;
mod qp;
mod slots;
mod timers;

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use device::{devices, DeviceDesc, GidDesc, PortDesc};

use crate::backend::{ContextOps, CqOps, ListenerOps, PdOps, QpOps, QpSpec};
use crate::gate::ListenLimits;
use crate::types::{DeviceInfo, Provider, TargetStats};
use crate::{OpenOptions, Result};
use cq::VerbsCq;
use device::Device;
use pd::VerbsPd;

/// The verbs provider's probe: available where libibverbs lists a device.
pub(crate) const PROBE: crate::backend::Probe = crate::backend::Probe {
    provider: Provider::Verbs,
    available: device::any_device,
    open: |opts| Ok(Arc::new(VerbsContext::open(opts)?)),
};

/// An open verbs device: the provider's context.
pub(crate) struct VerbsContext {
    dev: Arc<Device>,
}

impl VerbsContext {
    /// Opens the device, port and GID chosen by `opts` (see the module docs).
    pub(crate) fn open(opts: &OpenOptions) -> Result<VerbsContext> {
        Ok(VerbsContext {
            dev: Arc::new(Device::open(opts)?),
        })
    }
}

impl ContextOps for VerbsContext {
    fn provider(&self) -> Provider {
        Provider::Verbs
    }

    fn device(&self) -> DeviceInfo {
        let d = &self.dev;
        DeviceInfo {
            provider: Provider::Verbs,
            name: d.name.clone(),
            port: d.port,
            gid_index: Some(d.gid_index),
            gid: Some(d.gid_text()),
            mtu: device::mtu_bytes(d.active_mtu),
            max_qp_wr: d.max_qp_wr,
            max_sge: d.max_sge,
            max_msg: d.max_msg,
        }
    }

    fn alloc_pd(&self) -> Result<Arc<dyn PdOps>> {
        Ok(VerbsPd::alloc(&self.dev)?)
    }

    fn create_cq(&self, depth: usize) -> Result<Arc<dyn CqOps>> {
        Ok(Arc::new(VerbsCq::new(&self.dev, depth)?))
    }

    fn listen(&self, addr: SocketAddr, limits: ListenLimits) -> Result<Box<dyn ListenerOps>> {
        Ok(Box::new(connect::VerbsListener::bind(addr, limits)?))
    }

    fn connect(
        &self,
        addr: SocketAddr,
        spec: &QpSpec,
        private: &[u8],
        timeout: Duration,
    ) -> Result<(Arc<dyn QpOps>, Vec<u8>)> {
        connect::connect(addr, spec, private, timeout)
    }

    fn stats(&self) -> TargetStats {
        TargetStats::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent across a panic (plain bookkeeping).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// True when `fd` became readable within `timeout`.
fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> std::io::Result<bool> {
    Ok(crate::wait::wait_fd(fd, libc::POLLIN, timeout)? != 0)
}
