//! The socket inside QEMU that hands out userfaultfds over the guest's RAM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::abi::*;
use crate::fdpass::send_with_fd;

/// One mapping of a file in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub len: u64,
}

/// The largest mapping of `path` from its start, in a /proc/PID/maps text.
pub fn find_mapping(maps: &str, path: &Path) -> Option<Mapping> {
    let want = path.to_str()?;
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let _perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let _dev = f.next()?;
            let _inode = f.next()?;
            let name = f.collect::<Vec<_>>().join(" ");
            if name != want || offset != 0 {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            Some(Mapping {
                start: a,
                len: b.checked_sub(a)?,
            })
        })
        .max_by_key(|m| m.len)
}

pub(crate) fn serve(path: &Path) {
    let _ = std::fs::remove_file(path);
    let Ok(listener) = UnixListener::bind(path) else {
        return;
    };
    // Whoever holds the descriptor can read which guest pages are written: owner only.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    for conn in listener.incoming().flatten() {
        let _ = handle(conn);
    }
}

fn handle(conn: UnixStream) -> std::io::Result<()> {
    // One client at a time: a silent one must not hold the socket.
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?)
        .take(4096)
        .read_line(&mut line)?;
    match register(line.trim()) {
        Ok((fd, m)) => {
            let reply = format!("ok {} {} {}\n", std::process::id(), m.start, m.len);
            send_with_fd(&conn, reply.as_bytes(), fd.as_raw_fd())
        }
        Err(why) => (&conn).write_all(format!("err {why}\n").as_bytes()),
    }
}

fn register(req: &str) -> Result<(OwnedFd, Mapping), String> {
    let (op, path) = req
        .split_once(' ')
        .ok_or_else(|| format!("a request is `wp PATH` or `minor PATH`, not {req:?}"))?;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let m = find_mapping(&maps, Path::new(path)).ok_or_else(|| {
        format!("{path} is not mapped in this QEMU (is it the guest's RAM file?)")
    })?;
    let (features, mode) = match op {
        "wp" => (
            UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED,
            UFFDIO_REGISTER_MODE_WP,
        ),
        "minor" => (
            UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_MINOR_HUGETLBFS,
            UFFDIO_REGISTER_MODE_MINOR,
        ),
        _ => return Err(format!("unknown operation {op:?} (wp or minor)")),
    };
    let fd = new_userfaultfd(mode == UFFDIO_REGISTER_MODE_WP)?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(&fd, UFFDIO_API, &mut api).map_err(|e| {
        format!("this kernel's userfaultfd lacks the features {features:#x} ({e}); 6.7 or later is needed")
    })?;
    let range = UffdioRange {
        start: m.start,
        len: m.len,
    };
    let mut reg = UffdioRegister {
        range,
        mode,
        ioctls: 0,
    };
    ioctl(&fd, UFFDIO_REGISTER, &mut reg).map_err(|e| format!("register: {e}"))?;
    if mode == UFFDIO_REGISTER_MODE_WP {
        let mut wp = UffdioWriteprotect {
            range,
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        ioctl(&fd, UFFDIO_WRITEPROTECT, &mut wp).map_err(|e| format!("write-protect: {e}"))?;
    } else {
        // SAFETY: the range is this process's own mapping of the RAM file; MADV_DONTNEED on a
        // shared file mapping drops the page table entries only, the file keeps the data.
        let rc = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(format!("madvise: {}", std::io::Error::last_os_error()));
        }
    }
    Ok((fd, m))
}

/// A new userfaultfd. QEMU may run without CAP_SYS_PTRACE (libvirt runs it as its own user,
/// all capabilities dropped) where `vm.unprivileged_userfaultfd` is 0, the default; then
/// `/dev/userfaultfd` is tried (its file permissions decide), and for asynchronous
/// write-protect a user-mode-only descriptor: async write faults are resolved in the kernel
/// and never delivered, so a write by the kernel itself (a read(2) into guest RAM) is tracked
/// the same. Minor faults must also reach the agent from the kernel's own accesses: no such
/// fallback for them.
fn new_userfaultfd(write_protect: bool) -> Result<OwnedFd, String> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let syscall = |flags: i32| {
        // SAFETY: the userfaultfd syscall takes flags only and returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor the kernel just returned to us and nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
    };
    let first = match syscall(flags) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .and_then(|dev| {
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns a new
            // descriptor or -1; `dev` is open for the call.
            let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `raw` is a descriptor the kernel just returned to us and nobody owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        });
    let device = match device {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    if write_protect {
        if let Ok(fd) = syscall(flags | UFFD_USER_MODE_ONLY) {
            return Ok(fd);
        }
    }
    Err(format!(
        "userfaultfd: {first}; /dev/userfaultfd: {device}. QEMU's user may not create one: \
         give it access to /dev/userfaultfd (visible in its mount namespace), or set \
         vm.unprivileged_userfaultfd=1, or run it with CAP_SYS_PTRACE"
    ))
}

fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is the struct the request number encodes (checked by the abi tests), valid
    // and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ram_files_whole_mapping_is_found() {
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/qemu-system-x86_64
7f0000000000-7f0008000000 rw-s 00000000 00:1a 77 /dev/shm/vm ram
7f0010000000-7f0010001000 rw-s 00001000 00:1a 77 /dev/shm/vm ram
7f0020000000-7f0020001000 rw-s 00000000 00:1a 78 /dev/shm/other
";
        assert_eq!(
            find_mapping(maps, Path::new("/dev/shm/vm ram")),
            Some(Mapping {
                start: 0x7f00_0000_0000,
                len: 128 << 20
            })
        );
        assert_eq!(find_mapping(maps, Path::new("/dev/shm/missing")), None);
    }
}
