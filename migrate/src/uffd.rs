//! The userfaultfd a QEMU process hands over through the preload library (`rmem-preload`), and
//! what the agents do with it: exact dirty pages on the source ([`WrittenLog`]), faults served
//! on the destination (post-copy).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fdpass::recv_with_fd;
use crate::uffd_abi::*;

use crate::dirty::{DirtyError, DirtyLog, PageSource};
use crate::pages::{PageSet, PAGE};

/// What the preload library is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Register {
    /// Write-protect, resolved by the kernel, written pages read with PAGEMAP_SCAN.
    WriteProtect,
    /// Minor faults, resolved by the agent (post-copy).
    Minor,
}

/// Why the preload library did not hand over a userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("no preload library answers on {path}: start QEMU with LD_PRELOAD=librmem_preload.so and RMEM_PRELOAD_SOCKET={path}")]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the preload library in QEMU refused: {0}")]
    Refused(String),
    #[error("the preload library's answer: {0}")]
    Malformed(String),
    #[error("{what}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A userfaultfd registered over QEMU's mapping of a RAM file.
#[derive(Debug)]
pub struct Handoff {
    pub uffd: OwnedFd,
    /// QEMU's process.
    pub pid: u32,
    /// QEMU's mapping of the RAM file, in QEMU's address space.
    pub addr: u64,
    pub len: u64,
}

/// Asks the preload library in the QEMU behind `socket` to register `ram_file`.
pub fn attach(
    socket: &Path,
    how: Register,
    ram_file: &Path,
    timeout: Duration,
) -> Result<Handoff, UffdError> {
    let mut s = UnixStream::connect(socket).map_err(|source| UffdError::Missing {
        path: socket.to_path_buf(),
        source,
    })?;
    let os = |what| move |source| UffdError::Os { what, source };
    s.set_read_timeout(Some(timeout))
        .map_err(os("preload socket"))?;
    let op = match how {
        Register::WriteProtect => "wp",
        Register::Minor => "minor",
    };
    writeln!(s, "{op} {}", ram_file.display()).map_err(os("preload socket"))?;
    let (line, fd) = recv_with_fd(&s).map_err(os("preload socket"))?;
    let line = line.trim();
    if let Some(why) = line.strip_prefix("err ") {
        return Err(UffdError::Refused(why.to_string()));
    }
    let f: Vec<&str> = line.split_whitespace().collect();
    let (Some(fd), ["ok", pid, addr, len]) = (fd, f.as_slice()) else {
        return Err(UffdError::Malformed(line.to_string()));
    };
    let num = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| UffdError::Malformed(line.to_string()))
    };
    Ok(Handoff {
        uffd: fd,
        pid: num(pid)? as u32,
        addr: num(addr)?,
        len: num(len)?,
    })
}

/// Exact dirty pages: the kernel marks each page QEMU writes (userfaultfd write-protect with
/// asynchronous resolution), and each scan reads the marks and protects the pages again.
pub struct WrittenLog {
    handoff: Handoff,
    pagemap: File,
    first: bool,
    regions: Vec<PageRegion>,
}

impl WrittenLog {
    pub fn new(handoff: Handoff) -> Result<WrittenLog, DirtyError> {
        let path = format!("/proc/{}/pagemap", handoff.pid);
        let pagemap = File::open(&path).map_err(|source| DirtyError::Os {
            what: "open QEMU's /proc/PID/pagemap",
            source,
        })?;
        Ok(WrittenLog {
            handoff,
            pagemap,
            first: true,
            regions: vec![PageRegion::default(); 1024],
        })
    }

    /// Adds the written pages to `out` (as page indexes of the RAM file) and protects them.
    fn scan(&mut self, out: &mut PageSet) -> Result<(), DirtyError> {
        let len = self.handoff.len;
        self.scan_range(0, len, true, out)
    }

    /// Adds the written pages of the byte range `[from, to)` of the RAM to `out`; with
    /// `protect`, write-protects them again (they count as clean until written anew).
    fn scan_range(
        &mut self,
        from: u64,
        to: u64,
        protect: bool,
        out: &mut PageSet,
    ) -> Result<(), DirtyError> {
        let base = self.handoff.addr;
        let end = base + to.min(self.handoff.len);
        let mut at = base + from;
        let flags = if protect {
            PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        } else {
            PM_SCAN_CHECK_WPASYNC
        };
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start: at,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: `arg` is a pm_scan_arg whose vec points at `self.regions` (vec_len entries),
            // both alive and exclusively borrowed for the call.
            let n = unsafe {
                libc::ioctl(
                    self.pagemap.as_raw_fd(),
                    PAGEMAP_SCAN as _,
                    &mut arg as *mut PmScanArg,
                )
            };
            if n < 0 {
                return Err(DirtyError::Os {
                    what: "PAGEMAP_SCAN on QEMU's pagemap (kernel 6.7+)",
                    source: std::io::Error::last_os_error(),
                });
            }
            for r in &self.regions[..n as usize] {
                let first = ((r.start.max(base) - base) as usize) / PAGE;
                let last = ((r.end.min(end) - base) as usize).div_ceil(PAGE);
                for p in first..last.min(out.len()) {
                    out.insert(p);
                }
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

impl DirtyLog for WrittenLog {
    fn kind(&self) -> &'static str {
        "userfaultfd write-protect (exact)"
    }

    fn cost(&self) -> &'static str {
        "a minor fault on the first write to each page per round"
    }

    fn is_exact(&self) -> bool {
        true
    }

    fn collect(&mut self, src: &dyn PageSource, out: &mut PageSet) -> Result<(), DirtyError> {
        let pages = (self.handoff.len as usize) / PAGE;
        if src.pages() != pages || out.len() != pages {
            return Err(DirtyError::Resized {
                got: src.pages(),
                want: pages,
            });
        }
        if self.first {
            // Nothing was sent yet: every page; the marks so far are cleared.
            let mut scratch = PageSet::new(pages);
            self.scan(&mut scratch)?;
            out.union_with(&PageSet::full(pages));
            self.first = false;
            return Ok(());
        }
        self.scan(out)
    }

    fn written_since(
        &mut self,
        first: usize,
        end: usize,
        out: &mut PageSet,
    ) -> Result<bool, DirtyError> {
        if self.first {
            // No round has begun: nothing counts as written since.
            return Ok(false);
        }
        self.scan_range((first * PAGE) as u64, (end * PAGE) as u64, false, out)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;

    fn uffd_ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T) {
        // SAFETY: `arg` is the argument struct `req` expects, alive for the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
        assert_eq!(rc, 0, "ioctl {req:#x}: {}", std::io::Error::last_os_error());
    }

    /// What the preload library does inside QEMU, done on this process's own mapping of a
    /// tmpfs file: a userfaultfd with async write-protect over it.
    fn handoff_for(addr: u64, len: u64) -> Handoff {
        // SAFETY: the userfaultfd syscall takes flags only.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert!(raw >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
        // SAFETY: a descriptor the kernel just returned, owned by nobody else.
        let uffd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC
                | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
                | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        uffd_ioctl(&uffd, UFFDIO_API, &mut api);
        let range = UffdioRange { start: addr, len };
        let mut reg = UffdioRegister {
            range,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        uffd_ioctl(&uffd, UFFDIO_REGISTER, &mut reg);
        let mut wp = UffdioWriteprotect {
            range,
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        uffd_ioctl(&uffd, UFFDIO_WRITEPROTECT, &mut wp);
        Handoff {
            uffd,
            pid: std::process::id(),
            addr,
            len,
        }
    }

    #[test]
    fn written_since_reports_a_rounds_writes_without_taking_them_from_the_next_collect() {
        const PAGES: usize = 32;
        let f = tempfile::tempfile_in("/dev/shm").unwrap();
        f.write_all_at(&[0u8; PAGES * PAGE], 0).unwrap();
        let buf = rmem_transport::Buffer::map_file(&f).unwrap();
        // Where the buffer lies in this process: a registration of it says.
        let ctx = rmem_transport::open(&rmem_transport::OpenOptions::new(
            rmem_transport::Provider::Tcp,
        ))
        .unwrap();
        let pd = ctx.alloc_pd().unwrap();
        let mr = pd
            .register_buffer(&buf, 0, buf.len(), rmem_transport::Access::LOCAL_WRITE)
            .unwrap();
        let addr = mr.as_ptr() as u64;
        let mut log = WrittenLog::new(handoff_for(addr, (PAGES * PAGE) as u64)).unwrap();
        let src = crate::dirty::Mapped(&buf);
        let mut all = PageSet::new(PAGES);
        log.collect(&src, &mut all).unwrap();
        assert_eq!(all.count(), PAGES, "the first collect is every page");
        for p in [3, 10, 20] {
            buf.write_at(p * PAGE, &[1]).unwrap();
        }
        let mut seen = PageSet::new(PAGES);
        assert!(log.written_since(0, 8, &mut seen).unwrap());
        assert_eq!(seen.iter().collect::<Vec<_>>(), [3]);
        assert!(log.written_since(8, 16, &mut seen).unwrap());
        assert_eq!(seen.iter().collect::<Vec<_>>(), [3, 10]);
        // Looking left the marks in place: the next collect still has every written page.
        let mut next = PageSet::new(PAGES);
        log.collect(&src, &mut next).unwrap();
        assert_eq!(next.iter().collect::<Vec<_>>(), [3, 10, 20]);
        let mut after = PageSet::new(PAGES);
        log.collect(&src, &mut after).unwrap();
        assert!(after.is_empty(), "collect protects again: {after:?}");
        buf.write_at(5 * PAGE + 7, &[2]).unwrap();
        let mut last = PageSet::new(PAGES);
        assert!(log.written_since(0, PAGES, &mut last).unwrap());
        assert_eq!(last.iter().collect::<Vec<_>>(), [5]);
    }
}
