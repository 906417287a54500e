//! Page-aligned memory that can be registered: owned mappings, or caller-provided ranges.

use std::ptr::NonNull;

use crate::{Error, Result};

const HUGE_PAGE: usize = 2 << 20;

/// Whether to back an allocation with 2 MiB huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum HugePages {
    /// Plain pages.
    #[default]
    Never,
    /// Huge pages when the pool has enough of them, plain pages otherwise.
    Try,
    /// Huge pages or an error.
    Require,
}

/// A range of memory that a memory region covers.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
    /// Length of the mapping to unmap on drop; `None` when the caller owns the memory.
    mapped: Option<usize>,
    huge: bool,
}

// SAFETY: a Region is a raw range shared with devices and peers; it never hands out references,
// only raw pointers and copies, so moving or sharing the handle between threads is sound.
unsafe impl Send for Region {}
// SAFETY: as above; all access goes through raw copies and atomics.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len` bytes of zeroed, page-aligned anonymous memory.
    pub(crate) fn alloc(len: usize, huge: HugePages) -> Result<Region> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot allocate 0 bytes".into()));
        }
        if huge != HugePages::Never {
            let hlen = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
            match Self::map(hlen, libc::MAP_HUGETLB) {
                Ok(ptr) => {
                    return Ok(Region {
                        ptr,
                        len,
                        mapped: Some(hlen),
                        huge: true,
                    })
                }
                Err(e) if huge == HugePages::Require => return Err(e),
                Err(e) => tracing::debug!(error = %e, "huge pages unavailable, using plain pages"),
            }
        }
        let page = page_size();
        let plen = len.div_ceil(page) * page;
        let ptr = Self::map(plen, 0)?;
        Ok(Region {
            ptr,
            len,
            mapped: Some(plen),
            huge: false,
        })
    }

    fn map(len: usize, extra: libc::c_int) -> Result<NonNull<u8>> {
        // SAFETY: an anonymous private mapping with no address hint touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os("mmap"));
        }
        NonNull::new(p.cast()).ok_or_else(|| Error::last_os("mmap"))
    }

    /// Wraps memory the caller owns.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and readable/writable until the region (and every memory
    /// region and work request made from it) is dropped.
    pub(crate) unsafe fn borrowed(ptr: *mut u8, len: usize) -> Result<Region> {
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::InvalidArgument("null pointer".into()))?;
        if len == 0 {
            return Err(Error::InvalidArgument("cannot register 0 bytes".into()));
        }
        Ok(Region {
            ptr,
            len,
            mapped: None,
            huge: false,
        })
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    pub(crate) fn is_huge(&self) -> bool {
        self.huge
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Some(len) = self.mapped {
            // SAFETY: we mapped exactly this range in `alloc` and nothing references it any more
            // (every holder keeps the Region alive through an Arc).
            let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), len) };
            if rc != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "munmap failed");
            }
        }
    }
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}
