//! Protection domains and memory registration.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rdma_sys as sys;

use super::device::Device;
use crate::backend::PdOps;
use crate::memory::Region;
use crate::mr::Registration;
use crate::{Access, Error, Result};

// `Access` uses libibverbs' values so registration passes the bits through unchanged.
const _: () = {
    assert!(Access::LOCAL_WRITE.bits() == sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    assert!(Access::REMOTE_WRITE.bits() == sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    assert!(Access::REMOTE_READ.bits() == sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
    assert!(Access::REMOTE_ATOMIC.bits() == sys::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0);
};

/// Protection-domain ids are unique in the process, so a region of one context's PD never
/// passes the same-PD check of another context's queue pair.
static NEXT_PD_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) struct VerbsPd {
    pd: NonNull<sys::ibv_pd>,
    pub(crate) id: u64,
    /// Keeps the context open until the PD is gone.
    pub(crate) dev: Arc<Device>,
}

// SAFETY: a PD is an opaque handle that libibverbs lets any thread use.
unsafe impl Send for VerbsPd {}
// SAFETY: as above; we never touch its fields.
unsafe impl Sync for VerbsPd {}

impl VerbsPd {
    pub(crate) fn alloc(dev: &Arc<Device>) -> Result<Arc<VerbsPd>> {
        // SAFETY: valid open context.
        let pd = unsafe { sys::ibv_alloc_pd(dev.ctx.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| Error::last_os("ibv_alloc_pd"))?;
        Ok(Arc::new(VerbsPd {
            pd,
            id: NEXT_PD_ID.fetch_add(1, Ordering::Relaxed),
            dev: dev.clone(),
        }))
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_pd {
        self.pd.as_ptr()
    }
}

impl Drop for VerbsPd {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of this PD holds an Arc to it, so none is left.
        let rc = unsafe { sys::ibv_dealloc_pd(self.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dealloc_pd failed");
        }
    }
}

impl PdOps for VerbsPd {
    fn id(&self) -> u64 {
        self.id
    }

    fn register(self: Arc<Self>, region: &Arc<Region>, access: Access) -> Result<Registration> {
        // Verbs refuses REMOTE_WRITE or REMOTE_ATOMIC without LOCAL_WRITE (EINVAL): the device
        // writes the memory for the peer. Add it for the device only; `Mr::access` keeps what
        // the caller asked for, and posts check LOCAL_WRITE against that, as on `tcp`.
        let device_access = if access.intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC) {
            access | Access::LOCAL_WRITE
        } else {
            access
        };
        // SAFETY: the region is mapped for its whole length and outlives the registration
        // (MrInner drops the Registration before its Region).
        let mr = unsafe {
            sys::ibv_reg_mr(
                self.as_ptr(),
                region.ptr().cast(),
                region.len(),
                device_access.bits() as i32,
            )
        };
        let Some(mr) = NonNull::new(mr) else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOMEM) {
                tracing::warn!(
                    len = region.len(),
                    "ibv_reg_mr: out of memory; is the locked-memory limit (ulimit -l) too low?"
                );
            }
            return Err(Error::os("ibv_reg_mr", e));
        };
        // SAFETY: a successfully registered MR; its keys never change.
        let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
        Ok(Registration {
            lkey,
            rkey,
            remote_addr: region.ptr() as u64,
            _guard: Box::new(MrGuard {
                mr,
                _pd: self.clone(),
            }),
        })
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// Deregisters on drop; keeps the PD (and so the context) alive until then.
struct MrGuard {
    mr: NonNull<sys::ibv_mr>,
    _pd: Arc<VerbsPd>,
}

// SAFETY: an MR handle is only passed to ibv_dereg_mr, once, from whichever thread drops it.
unsafe impl Send for MrGuard {}
// SAFETY: shared references never use the pointer.
unsafe impl Sync for MrGuard {}

impl Drop for MrGuard {
    fn drop(&mut self) {
        // SAFETY: registered by us, deregistered once. Work requests using it hold the MrInner
        // (and so this guard) until they completed.
        let rc = unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dereg_mr failed");
        }
    }
}
