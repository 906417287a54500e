//! The userfaultfd ioctls the `userfaultfd` crate does not expose: `UFFDIO_COPY` with its
//! write-protect mode, and `UFFDIO_POISON` (Linux 6.6), which `userfaultfd-sys` predates.

use std::os::fd::AsRawFd;

use userfaultfd::Uffd;
use userfaultfd_sys as sys;

use super::PAGE;

/// UFFD_FEATURE_POISON and the UFFDIO_POISON ioctl (Linux 6.6), which userfaultfd-sys predates.
pub(crate) const UFFD_FEATURE_POISON: u64 = 1 << 14;
pub(crate) const UFFDIO_POISON_NR: u64 = 0x08;
/// _IOWR(0xAA, 0x08, struct uffdio_poison): read/write, 32-byte argument.
const UFFDIO_POISON: u64 = (3 << 30) | (32 << 16) | (0xAA << 8) | UFFDIO_POISON_NR;

#[repr(C)]
struct UffdioPoison {
    range: sys::uffdio_range,
    mode: u64,
    updated: i64,
}

// The kernel's struct uffdio_poison is 32 bytes, as the ioctl number encodes.
const _: () = assert!(std::mem::size_of::<UffdioPoison>() == 32);

/// UFFDIO_COPY with the write-protect mode the crate does not expose.
pub(crate) fn copy_page(uffd: &Uffd, src: &[u8], dst: usize, wp: bool) -> Result<(), i32> {
    let mut c = sys::uffdio_copy {
        dst: dst as u64,
        src: src.as_ptr() as u64,
        len: PAGE as u64,
        mode: if wp { sys::UFFDIO_COPY_MODE_WP } else { 0 },
        copy: 0,
    };
    debug_assert!(src.len() >= PAGE);
    // SAFETY: `src` is a readable page of our memory; `dst` is a page inside the registered
    // range; the kernel only fills it if it is not present.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_COPY as _, &mut c) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

/// UFFDIO_POISON on one page: it stays unmapped and every access raises SIGBUS; wakes the
/// faulting thread.
pub(crate) fn poison_page(uffd: &Uffd, dst: usize) -> Result<(), i32> {
    let mut p = UffdioPoison {
        range: sys::uffdio_range {
            start: dst as u64,
            len: PAGE as u64,
        },
        mode: 0,
        updated: 0,
    };
    // SAFETY: `dst` is a page inside the registered range and `p` a valid argument struct; the
    // kernel only installs a poison marker where no page is present.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_POISON as _, &mut p) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}
