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
        let (base, end) = (self.handoff.addr, self.handoff.addr + self.handoff.len);
        let mut at = base;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
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
}
