//! What mkswap, swapon and swapoff do, without needing their binaries: the swap header is
//! written straight into the store; swapon/swapoff are system calls.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::store::{Store, StoreError};

const PAGE: usize = 4096;
// <linux/swap.h>
const SWAP_FLAG_PREFER: i32 = 0x8000;
const SWAP_FLAG_PRIO_MASK: i32 = 0x7fff;

/// The version-1 swap header (see <linux/swap.h> `union swap_header`) for a `size`-byte device.
pub fn header(size: u64, uuid: [u8; 16], label: &str) -> Vec<u8> {
    let mut h = vec![0u8; PAGE];
    let pages = size / PAGE as u64;
    h[1024..1028].copy_from_slice(&1u32.to_ne_bytes()); // version
    h[1028..1032].copy_from_slice(&((pages - 1) as u32).to_ne_bytes()); // last_page
                                                                        // nr_badpages stays 0.
    h[1036..1052].copy_from_slice(&uuid);
    let l = label.as_bytes();
    let n = l.len().min(15);
    h[1052..1052 + n].copy_from_slice(&l[..n]);
    h[PAGE - 10..].copy_from_slice(b"SWAPSPACE2");
    h
}

/// Formats the store as swap (mkswap).
pub fn format(store: &Store, label: &str) -> Result<(), StoreError> {
    let uuid: [u8; 16] = rand::random();
    store.write(0, &header(store.size(), uuid, label))
}

fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))
}

/// swapon(2), with a priority when given (higher is used first).
pub fn swapon(dev: &Path, priority: Option<u16>) -> std::io::Result<()> {
    let p = c_path(dev)?;
    let flags = match priority {
        Some(prio) => SWAP_FLAG_PREFER | (i32::from(prio) & SWAP_FLAG_PRIO_MASK),
        None => 0,
    };
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    if unsafe { libc::swapon(p.as_ptr(), flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// swapoff(2): pages everything on the device back in first, so it can take a while.
pub fn swapoff(dev: &Path) -> std::io::Result<()> {
    let p = c_path(dev)?;
    // SAFETY: as above.
    if unsafe { libc::swapoff(p.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Locks the process's memory now and in future: the swap daemon runs exactly when memory is
/// short, and must not itself be swapped out to the device it serves.
pub fn lock_memory() -> std::io::Result<()> {
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Marks the calling thread as one the kernel's writeback depends on (PR_SET_IO_FLUSHER): its
/// allocations never wait on I/O reclaim, so serving a swap request cannot block on the very
/// swap device it serves when the whole host is out of memory. New threads inherit it. Needs
/// CAP_SYS_RESOURCE.
pub fn mark_io_flusher() -> std::io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; it changes this thread's flags.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_flusher_is_set_and_inherited_by_new_threads() {
        const PR_GET_IO_FLUSHER: libc::c_int = 58;
        // SAFETY: prctl query with no pointer arguments.
        let get = || unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) };
        // In a thread of its own, so the test harness's threads keep their flags.
        std::thread::spawn(move || {
            match mark_io_flusher() {
                Ok(()) => {}
                // Without CAP_SYS_RESOURCE (which the query needs too): nothing to check.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => return,
                Err(e) => panic!("{e}"),
            }
            assert_eq!(get(), 1);
            assert_eq!(std::thread::spawn(get).join().unwrap(), 1);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn header_has_the_kernel_layout() {
        let h = header(64 << 20, [7; 16], "rmem-swap");
        assert_eq!(&h[PAGE - 10..], b"SWAPSPACE2");
        assert_eq!(u32::from_ne_bytes(h[1024..1028].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_ne_bytes(h[1028..1032].try_into().unwrap()),
            (64 << 20) / 4096 - 1
        );
        assert_eq!(&h[1036..1052], &[7; 16]);
        assert_eq!(&h[1052..1061], b"rmem-swap");
        assert!(h[..1024].iter().all(|&b| b == 0), "boot block left alone");
    }
}
