//! Page-aligned memory that can be registered: owned mappings, or caller-provided ranges.

use std::ptr::NonNull;

use crate::{Error, Result};

const HUGE_PAGE: usize = 2 << 20;
/// `f_type` of hugetlbfs (linux/magic.h).
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// Whether to back an allocation with 2 MiB huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// A shared mapping of a file: its pages are the file's, so dropping them does not zero it.
    file: bool,
    /// A slice keeps the region it was cut from mapped.
    _parent: Option<std::sync::Arc<Region>>,
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
                        file: false,
                        _parent: None,
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
            file: false,
            _parent: None,
        })
    }

    /// Maps all of `file` shared, read-write.
    pub(crate) fn map_file(file: &std::fs::File) -> Result<Region> {
        use std::os::fd::AsRawFd;
        let len = file.metadata().map_err(|e| Error::os("fstat", e))?.len() as usize;
        if len == 0 {
            return Err(Error::InvalidArgument("cannot map an empty file".into()));
        }
        // SAFETY: fstatfs writes one struct statfs into the zeroed value we own.
        let huge = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::fstatfs(file.as_raw_fd(), &mut st) == 0 && st.f_type as u64 == HUGETLBFS_MAGIC
        };
        let unit = if huge { HUGE_PAGE } else { page_size() };
        let plen = len.div_ceil(unit) * unit;
        // SAFETY: a new shared mapping of a file we hold open, with no address hint: it touches
        // no existing memory. The mapping keeps the file's pages alive after `file` is closed.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                plen,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os("mmap of a file"));
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| Error::last_os("mmap of a file"))?;
        Ok(Region {
            ptr,
            len,
            mapped: Some(plen),
            huge,
            file: true,
            _parent: None,
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
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ENOMEM) {
                return Err(Error::NoMemory {
                    bytes: len,
                    huge: extra & libc::MAP_HUGETLB != 0,
                    source,
                });
            }
            return Err(Error::os("mmap", source));
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
            file: false,
            _parent: None,
        })
    }

    /// `[offset, offset + len)` of `parent`, keeping `parent` mapped while the slice lives.
    pub(crate) fn slice(
        parent: &std::sync::Arc<Region>,
        offset: usize,
        len: usize,
    ) -> Result<Region> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= parent.len => Ok(Region {
                // SAFETY: offset < parent.len (len > 0 and end <= parent.len), so in bounds.
                ptr: unsafe { NonNull::new_unchecked(parent.ptr.as_ptr().add(offset)) },
                len,
                mapped: None,
                huge: parent.huge,
                file: parent.file,
                _parent: Some(parent.clone()),
            }),
            _ => Err(Error::InvalidArgument(format!(
                "slice {offset}+{len} of a {}-byte buffer",
                parent.len
            ))),
        }
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

/// Memory allocated once and registered in pieces, possibly in several protection domains (a
/// donor's pool, lent slab by slab to different clients). Cloning shares the memory.
#[derive(Clone)]
pub struct Buffer(pub(crate) std::sync::Arc<Region>);

impl Buffer {
    /// Maps all of `file` shared: what is written through the buffer, or by a peer into a region
    /// registered from it, is in the file and in every other mapping of it (a hypervisor's
    /// guest RAM on tmpfs or hugetlbfs, say), and the other way round.
    pub fn map_file(file: &std::fs::File) -> Result<Buffer> {
        Ok(Buffer(std::sync::Arc::new(Region::map_file(file)?)))
    }

    /// Maps `len` zeroed bytes.
    pub fn alloc(len: usize, huge: HugePages) -> Result<Buffer> {
        Ok(Buffer(std::sync::Arc::new(Region::alloc(len, huge)?)))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }
    /// True when backed by huge pages.
    pub fn is_huge(&self) -> bool {
        self.0.is_huge()
    }

    /// The first byte, for callers that hand the memory to other raw interfaces (a ublk
    /// request's data address). Valid while any clone of this buffer lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.0.ptr()
    }

    /// Zeroes `[offset, offset + len)` (memory about to change hands). Whole pages go back to
    /// the kernel (`MADV_DONTNEED`: they read as zeros and cost no memory until touched again);
    /// partial pages are cleared in place. Callers make sure no registration covering the range
    /// is live (a pinned page must not be dropped), so nobody writes it concurrently.
    pub fn zero(&self, offset: usize, len: usize) -> Result<()> {
        let end = self.check(offset, len)?;
        let page = if self.is_huge() {
            HUGE_PAGE
        } else {
            page_size()
        };
        let base = self.0.ptr() as usize;
        // Page boundaries inside the range, in buffer offsets.
        let first = (base + offset).next_multiple_of(page) - base;
        let last = ((base + end) / page * page).saturating_sub(base);
        let clear = |from: usize, to: usize| {
            if to > from {
                // SAFETY: [from, to) lies inside [offset, end), inside the buffer; raw write, no
                // references to this memory exist.
                unsafe { std::ptr::write_bytes(self.0.ptr().add(from), 0, to - from) };
            }
        };
        // A file's pages would come back from the file: clear them in place.
        if first >= last || self.0.file {
            clear(offset, end);
            return Ok(());
        }
        clear(offset, first);
        clear(last, end);
        // SAFETY: [first, last) is page-aligned and inside our own anonymous private mapping;
        // MADV_DONTNEED makes it read as zeros and changes nothing else.
        let rc = unsafe {
            libc::madvise(
                self.0.ptr().add(first).cast(),
                last - first,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            clear(first, last);
        }
        Ok(())
    }

    /// Copies `data` in at `offset`. Callers make sure no registration lets a peer write the
    /// same bytes concurrently (a donor's NBD export owns its slabs outright).
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: in bounds (checked); raw copy, no references to this memory exist.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.0.ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Appends `len` bytes from `offset` to `out`, without first zero-filling `out`'s room (for
    /// data paths that move large blocks).
    pub fn append_to(&self, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        self.check(offset, len)?;
        out.reserve(len);
        let spare = out.spare_capacity_mut();
        // SAFETY: the source is in bounds (checked); the destination is `len` bytes of reserved
        // spare capacity; a raw copy initialises exactly those bytes, so the new length covers
        // only initialised memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.0.ptr().add(offset),
                spare.as_mut_ptr().cast::<u8>(),
                len,
            );
            out.set_len(out.len() + len);
        }
        Ok(())
    }

    /// Copies `len` bytes at `offset` into `dst` at `dst_offset` (another buffer, or this one
    /// with the ranges apart), with no copy in between: a block cache serving a request from
    /// memory it read ahead. The same rule as [`Buffer::write_at`] holds for `dst`.
    pub fn copy_to(
        &self,
        offset: usize,
        len: usize,
        dst: &Buffer,
        dst_offset: usize,
    ) -> Result<()> {
        self.check(offset, len)?;
        dst.check(dst_offset, len)?;
        let (src, to) = (
            self.0.ptr() as usize + offset,
            dst.0.ptr() as usize + dst_offset,
        );
        if src < to + len && to < src + len {
            return Err(Error::InvalidArgument("overlapping copy".into()));
        }
        // SAFETY: both ranges are in bounds (checked) and do not overlap (checked); raw copy,
        // no references to either memory exist.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.0.ptr().add(offset),
                dst.0.ptr().add(dst_offset),
                len,
            )
        };
        Ok(())
    }

    /// Copies bytes out.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len())?;
        // SAFETY: in bounds (checked); raw copy.
        unsafe {
            std::ptr::copy_nonoverlapping(self.0.ptr().add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// True when `[offset, offset + len)` reads as zeros, read in place (no copy) and stopping
    /// at the first non-zero word: a migration's zero-page check costs one load for a page
    /// with data. Bytes another mapping changes meanwhile may or may not be seen.
    pub fn is_zero(&self, offset: usize, len: usize) -> Result<bool> {
        self.check(offset, len)?;
        // SAFETY: the range lies inside the buffer (checked).
        Ok(unsafe { reads_zero(self.0.ptr().add(offset), len) })
    }

    /// Allocates and maps `[offset, offset + len)` now (`MADV_POPULATE_WRITE`, Linux 5.14+), so
    /// a peer's WRITEs into it later take no page faults: a migration destination does this
    /// before the source pauses. Fails (changing nothing) on kernels without it.
    pub fn populate(&self, offset: usize, len: usize) -> Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let page = page_size();
        let base = self.0.ptr() as usize;
        let first = (base + offset) / page * page;
        let last = (base + offset + len).next_multiple_of(page);
        // SAFETY: [first, last) covers the checked range rounded out to whole pages of our own
        // mapping (it starts and ends page-aligned); populating writes nothing into it.
        let rc = unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(Error::last_os("madvise(MADV_POPULATE_WRITE)"));
        }
        Ok(())
    }

    /// The end of `[offset, offset + len)` when it lies inside the buffer.
    fn check(&self, offset: usize, len: usize) -> Result<usize> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(end),
            _ => Err(Error::InvalidArgument(format!(
                "range {offset}+{len} outside the {}-byte buffer",
                self.len()
            ))),
        }
    }
}

/// True when `len` bytes at `at` read as zeros; stops at the first non-zero word.
///
/// # Safety
/// `[at, at + len)` must be mapped for the whole call. Another process may write it meanwhile
/// (a guest's RAM): the loads are volatile and no Rust reference to the memory is formed.
pub(crate) unsafe fn reads_zero(at: *const u8, len: usize) -> bool {
    // SAFETY: i < len: inside the range the caller vouches for.
    let byte = |i: usize| unsafe { std::ptr::read_volatile(at.add(i)) };
    let mut i = 0;
    while i < len && !(at as usize + i).is_multiple_of(8) {
        if byte(i) != 0 {
            return false;
        }
        i += 1;
    }
    while i + 32 <= len {
        let w = at.wrapping_add(i).cast::<u64>();
        // SAFETY: [i, i + 32) lies inside the range and `w` is 8-byte aligned (the loop above
        // aligned it).
        let v = unsafe {
            std::ptr::read_volatile(w)
                | std::ptr::read_volatile(w.add(1))
                | std::ptr::read_volatile(w.add(2))
                | std::ptr::read_volatile(w.add(3))
        };
        if v != 0 {
            return false;
        }
        i += 32;
    }
    (i..len).all(|i| byte(i) == 0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_clears_exactly_the_range_including_partial_pages() {
        let b = Buffer::alloc(5 * 4096, HugePages::Never).unwrap();
        b.write_at(0, &vec![0xaa; 5 * 4096]).unwrap();
        b.zero(100, 3 * 4096 + 50).unwrap();
        let mut all = vec![0u8; 5 * 4096];
        b.read_at(0, &mut all).unwrap();
        assert!(all[..100].iter().all(|x| *x == 0xaa));
        assert!(all[100..100 + 3 * 4096 + 50].iter().all(|x| *x == 0));
        assert!(all[100 + 3 * 4096 + 50..].iter().all(|x| *x == 0xaa));
        b.write_at(0, &[1, 2, 3]).unwrap();
        b.zero(1, 1).unwrap();
        let mut three = [0u8; 3];
        b.read_at(0, &mut three).unwrap();
        assert_eq!(three, [1, 0, 3]);
        assert!(b.zero(5 * 4096 - 1, 2).is_err());
    }

    #[test]
    fn is_zero_sees_any_non_zero_byte_wherever_it_lies() {
        let b = Buffer::alloc(3 * 4096, HugePages::Never).unwrap();
        assert!(b.is_zero(0, 3 * 4096).unwrap());
        // Every position of a range with an unaligned start and end: head, words and tail.
        for at in 3..3 + 200 {
            b.write_at(at, &[7]).unwrap();
            assert!(!b.is_zero(3, 200).unwrap(), "byte {at} missed");
            assert!(b.is_zero(at + 1, 50).unwrap());
            b.write_at(at, &[0]).unwrap();
        }
        assert!(b.is_zero(3, 200).unwrap());
        assert!(b.is_zero(0, 0).unwrap());
        assert!(b.is_zero(3 * 4096 - 1, 2).is_err());
    }

    #[test]
    fn populate_maps_a_file_range_that_keeps_reading_as_zeros() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0u8; 4 * 4096]).unwrap();
        let b = Buffer::map_file(&f).unwrap();
        b.write_at(4096, &[9]).unwrap();
        b.populate(100, 2 * 4096).unwrap();
        let mut all = vec![0u8; 4 * 4096];
        b.read_at(0, &mut all).unwrap();
        assert_eq!(all[4096], 9, "populate must not change data");
        assert_eq!(all.iter().filter(|x| **x != 0).count(), 1);
        assert!(b.populate(4 * 4096 - 1, 2).is_err());
    }

    #[test]
    fn a_mapping_the_host_cannot_back_says_so() {
        // 1 PiB: beyond any host's memory and a 47-bit address space.
        for (huge, want) in [(HugePages::Never, false), (HugePages::Require, true)] {
            match Buffer::alloc(1 << 50, huge) {
                Err(Error::NoMemory { bytes, huge, .. }) => {
                    assert!(bytes >= 1 << 50);
                    assert_eq!(huge, want);
                }
                Err(e) => panic!("expected NoMemory, got {e}"),
                Ok(_) => panic!("mapped 1 PiB"),
            }
        }
    }
}
