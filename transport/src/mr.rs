//! Memory regions: registered memory with local and remote keys.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::memory::Region;
use crate::{Access, Error, RemoteBuf, Result};

/// What a provider returns for a registration; dropping `guard` deregisters.
pub(crate) struct Registration {
    pub(crate) lkey: u32,
    pub(crate) rkey: u32,
    /// The address peers use for the first byte.
    pub(crate) remote_addr: u64,
    pub(crate) _guard: Box<dyn std::any::Any + Send + Sync>,
}

pub(crate) struct MrInner {
    // Field order matters: the registration is dropped (deregistered) before the memory.
    pub(crate) reg: Registration,
    pub(crate) region: Arc<Region>,
    pub(crate) access: Access,
    pub(crate) pd_id: u64,
}

/// A registered memory region. Cloning is cheap and shares the registration; the memory and the
/// registration live until the last clone and the last work request using it are gone.
///
/// Peers may change the memory at any time through one-sided operations, so local access goes
/// through copies ([`Mr::read_at`], [`Mr::write_at`]) and atomics, never through Rust references.
#[derive(Clone)]
pub struct Mr(pub(crate) Arc<MrInner>);

impl std::fmt::Debug for Mr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mr")
            .field("len", &self.len())
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .field("access", &self.access())
            .finish()
    }
}

impl Mr {
    pub fn len(&self) -> usize {
        self.0.region.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn access(&self) -> Access {
        self.0.access
    }
    pub fn lkey(&self) -> u32 {
        self.0.reg.lkey
    }
    pub fn rkey(&self) -> u32 {
        self.0.reg.rkey
    }
    /// True when the memory is backed by huge pages.
    pub fn is_huge(&self) -> bool {
        self.0.region.is_huge()
    }

    /// The descriptor a peer needs to reach the whole region.
    pub fn remote(&self) -> RemoteBuf {
        RemoteBuf {
            addr: self.0.reg.remote_addr,
            len: self.len() as u64,
            rkey: self.0.reg.rkey,
        }
    }

    /// A scatter-gather element for `[offset, offset + len)`.
    pub fn sge(&self, offset: usize, len: usize) -> Result<Sge<'_>> {
        self.check(offset, len)?;
        let len = u32::try_from(len)
            .map_err(|_| Error::InvalidArgument("an SGE holds at most 4 GiB - 1".into()))?;
        Ok(Sge {
            mr: self,
            offset,
            len,
        })
    }

    /// Copies `data` into the region at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: the range is inside the live region (checked above); the copy goes through raw
        // pointers, so concurrent remote writes cannot invalidate a Rust reference.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.0.region.ptr().add(offset),
                data.len(),
            )
        };
        Ok(())
    }

    /// True when `[offset, offset + len)` reads as zeros, checked in place (no copy; stops at
    /// the first non-zero word).
    pub fn is_zero(&self, offset: usize, len: usize) -> Result<bool> {
        self.check(offset, len)?;
        // SAFETY: the range is inside the live region (checked above).
        Ok(unsafe { crate::memory::reads_zero(self.0.region.ptr().add(offset), len) })
    }

    /// Copies `out.len()` bytes from the region at `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len())?;
        // SAFETY: the range is inside the live region (checked above); see `write_at`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.0.region.ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// Fills `[offset, offset + len)` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        self.check(offset, len)?;
        // SAFETY: the range is inside the live region (checked above).
        unsafe { std::ptr::write_bytes(self.0.region.ptr().add(offset), byte, len) };
        Ok(())
    }

    /// Atomically loads the 8-byte aligned word at `offset` (targets of remote atomics, flags
    /// written by a peer's WRITE).
    pub fn load_u64(&self, offset: usize) -> Result<u64> {
        Ok(self.atomic_u64(offset)?.load(Ordering::Acquire))
    }

    /// Atomically stores the 8-byte aligned word at `offset`.
    pub fn store_u64(&self, offset: usize, v: u64) -> Result<()> {
        self.atomic_u64(offset)?.store(v, Ordering::Release);
        Ok(())
    }

    fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64> {
        self.check(offset, 8)?;
        // SAFETY: the pointer is inside the live region; alignment is checked next.
        let p = unsafe { self.0.region.ptr().add(offset) };
        if !(p as usize).is_multiple_of(8) {
            return Err(Error::InvalidArgument(
                "word offset must be 8-byte aligned".into(),
            ));
        }
        // SAFETY: aligned, in bounds, and valid for the lifetime of &self; all other accesses to
        // this word (local copies aside) are atomic too.
        Ok(unsafe { AtomicU64::from_ptr(p.cast()) })
    }

    /// The first byte of the region, for callers that hand it to other raw interfaces.
    pub fn as_ptr(&self) -> *mut u8 {
        self.0.region.ptr()
    }

    pub(crate) fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "range {offset}+{len} exceeds the {}-byte region",
                self.len()
            ))),
        }
    }

    /// Raw address of `offset` (the caller has bounds-checked).
    pub(crate) fn addr_at(&self, offset: usize) -> u64 {
        self.0.region.ptr() as u64 + offset as u64
    }
}

/// A scatter-gather element: `len` bytes at `offset` inside a registered region.
#[derive(Clone, Copy)]
pub struct Sge<'a> {
    pub(crate) mr: &'a Mr,
    pub(crate) offset: usize,
    pub(crate) len: u32,
}

impl std::fmt::Debug for Sge<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sge")
            .field("lkey", &self.mr.lkey())
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> Sge<'a> {
    /// Length in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }
    /// True for a zero-length element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Offset into the region.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// The region this element points into.
    pub fn mr(&self) -> &'a Mr {
        self.mr
    }
}

/// An SGE detached from its borrow: keeps the region alive while a work request is outstanding.
pub(crate) struct HeldSge {
    pub(crate) mr: Arc<MrInner>,
    pub(crate) offset: usize,
    pub(crate) len: u32,
}

impl HeldSge {
    pub(crate) fn from_sge(s: &Sge<'_>) -> HeldSge {
        HeldSge {
            mr: s.mr.0.clone(),
            offset: s.offset,
            len: s.len,
        }
    }
    /// Pointer to the first byte (in bounds: checked when the Sge was made).
    pub(crate) fn ptr(&self) -> *mut u8 {
        // SAFETY: `offset` was bounds-checked against the region when the Sge was built.
        unsafe { self.mr.region.ptr().add(self.offset) }
    }
}
