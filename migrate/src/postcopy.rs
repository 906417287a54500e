//! Post-copy on the destination: the guest runs before its RAM has arrived. QEMU's mapping of
//! the RAM file is registered for minor faults (through the preload library) and zapped, so
//! every first access to a page stops in the kernel until this side has READ the page from
//! the source's registered RAM into the file (through its own mapping) and mapped it with
//! UFFDIO_CONTINUE. Faults come first; between them a background pass pulls the rest in runs.
//! A page that is already right in the file (sent during pre-copy, or zero at the source) is
//! mapped without a READ.
//!
//! A page is never mapped before it is right: if the source is lost, the faults stay
//! unresolved (the guest stops) and the caller is told.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use rmem_transport::{Cq, Mr, Qp, RemoteBuf};

use crate::mover::{Link, MoveError, Mover};
use crate::pages::{PageSet, PAGE};
use crate::uffd::Handoff;
use crate::uffd_abi::*;

/// Pages pulled per background batch: small, so a fault waits little behind it.
const BATCH: usize = 256;

/// Why post-copy stopped before every page was in place.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("reading a page from the source: {0}")]
    Source(#[from] MoveError),
    #[error("{what}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("stopped before every page was in place")]
    Stopped,
    #[error(transparent)]
    Transport(#[from] rmem_transport::Error),
}

/// What the pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pulled {
    /// Faults served.
    pub faults: usize,
    /// Pages READ from the source.
    pub pages: usize,
    /// Pages mapped without a READ (already right, or zero at the source).
    pub local: usize,
    /// The longest a fault waited, µs.
    pub worst_fault_us: u64,
}

/// Live counters another thread may read.
#[derive(Debug, Default)]
pub struct Progress {
    pub mapped: AtomicUsize,
}

/// One RAM region in post-copy.
pub struct Puller<'a> {
    pub handoff: &'a Handoff,
    pub qp: &'a Qp,
    /// The queue pair's send completion queue.
    pub cq: &'a Cq,
    /// This side's RAM, registered.
    pub local: &'a Mr,
    /// The source's RAM.
    pub remote: RemoteBuf,
    pub mover: Mover,
    /// Pages already right in the file.
    pub present: PageSet,
    /// Bytes per second for the background pass (faults are never held back).
    pub rate: Option<u64>,
}

impl Puller<'_> {
    /// Serves faults and pulls every page, until all are mapped. `zeros` may bring the
    /// source's zero pages (mapped without a READ once known). `stop` ends it early.
    pub fn run(
        mut self,
        zeros: Receiver<PageSet>,
        stop: &AtomicBool,
        progress: &Progress,
    ) -> Result<Pulled, PullError> {
        let pages = self.present.len();
        let mut mapped = PageSet::new(pages);
        let mut done = Pulled::default();
        let mut cursor = 0;
        let started = Instant::now();
        let mut zeros_known = false;
        while mapped.count() < pages {
            if stop.load(Ordering::Acquire) {
                return Err(PullError::Stopped);
            }
            if let Ok(z) = zeros.try_recv() {
                if z.len() == pages {
                    self.present.union_with(&z);
                    zeros_known = true;
                }
            }
            // Faults first. Until the zero pages are known, only faults for a moment, so the
            // background pass does not READ zero pages for nothing.
            let background = zeros_known || started.elapsed() >= Duration::from_millis(500);
            let wait = if background {
                Duration::ZERO
            } else {
                Duration::from_millis(2)
            };
            self.serve_faults(wait, &mut mapped, &mut done)?;
            if !background {
                continue;
            }
            let mut batch = PageSet::new(pages);
            while batch.count() < BATCH && cursor < pages {
                if !mapped.contains(cursor) {
                    batch.insert(cursor);
                }
                cursor += 1;
            }
            if batch.is_empty() {
                cursor = 0;
                continue;
            }
            self.place(&batch, &mut mapped, &mut done)?;
            progress.mapped.store(mapped.count(), Ordering::Relaxed);
            if let Some(rate) = self.rate {
                let due = Duration::from_secs_f64((done.pages * PAGE) as f64 / rate.max(1) as f64);
                // Wait in slices so faults are still served at once.
                while started.elapsed() < due {
                    self.serve_faults(Duration::from_millis(1), &mut mapped, &mut done)?;
                }
            }
        }
        progress.mapped.store(mapped.count(), Ordering::Relaxed);
        Ok(done)
    }

    /// Serves the faults pending (waiting up to `wait` for one).
    fn serve_faults(
        &mut self,
        wait: Duration,
        mapped: &mut PageSet,
        done: &mut Pulled,
    ) -> Result<(), PullError> {
        let pages = mapped.len();
        for (page, since) in self.read_faults(wait)? {
            if page >= pages {
                continue;
            }
            done.faults += 1;
            if mapped.contains(page) {
                self.wake(page, 1)?;
            } else {
                let mut one = PageSet::new(pages);
                one.insert(page);
                self.place(&one, mapped, done)?;
            }
            done.worst_fault_us = done.worst_fault_us.max(since.elapsed().as_micros() as u64);
        }
        Ok(())
    }

    /// READs the pages of `set` not yet right, then maps every page of `set`.
    fn place(
        &mut self,
        set: &PageSet,
        mapped: &mut PageSet,
        done: &mut Pulled,
    ) -> Result<(), PullError> {
        let mut fetch = PageSet::new(set.len());
        for p in set.iter() {
            if !self.present.contains(p) {
                fetch.insert(p);
            }
        }
        if !fetch.is_empty() {
            let link = Link {
                qp: self.qp,
                cq: self.cq,
                local: self.local,
                remote: &self.remote,
            };
            let m = self.mover.read(link, &fetch)?;
            done.pages += m.pages;
            self.present.union_with(&fetch);
        }
        done.local += set.count() - fetch.count();
        for r in set.runs(usize::MAX) {
            self.map(r.start, r.end - r.start)?;
            for p in r {
                mapped.insert(p);
            }
        }
        Ok(())
    }

    /// Maps pages already in the file into QEMU (UFFDIO_CONTINUE), waking whoever faulted.
    fn map(&self, first: usize, n: usize) -> Result<(), PullError> {
        let mut at = 0;
        while at < n {
            let mut c = UffdioContinue {
                range: UffdioRange {
                    start: self.handoff.addr + ((first + at) * PAGE) as u64,
                    len: ((n - at) * PAGE) as u64,
                },
                mode: 0,
                mapped: 0,
            };
            // SAFETY: a uffdio_continue for a range inside QEMU's registered mapping.
            let rc = unsafe {
                libc::ioctl(
                    self.handoff.uffd.as_raw_fd(),
                    UFFDIO_CONTINUE as _,
                    &mut c as *mut UffdioContinue,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            let done_pages = (c.mapped.max(0) as usize) / PAGE;
            match e.raw_os_error() {
                // Already mapped (QEMU raced us to it): wake it and go on past it.
                Some(libc::EEXIST) => {
                    self.wake(first + at + done_pages, 1)?;
                    at += done_pages + 1;
                }
                Some(libc::EAGAIN) => at += done_pages,
                _ => {
                    return Err(PullError::Os {
                        what: "UFFDIO_CONTINUE",
                        source: e,
                    })
                }
            }
        }
        Ok(())
    }

    fn wake(&self, page: usize, n: usize) -> Result<(), PullError> {
        let mut r = UffdioRange {
            start: self.handoff.addr + (page * PAGE) as u64,
            len: (n * PAGE) as u64,
        };
        // SAFETY: a uffdio_range inside QEMU's registered mapping.
        let rc = unsafe {
            libc::ioctl(
                self.handoff.uffd.as_raw_fd(),
                UFFDIO_WAKE as _,
                &mut r as *mut UffdioRange,
            )
        };
        if rc < 0 {
            return Err(PullError::Os {
                what: "UFFDIO_WAKE",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Pending faults (page index, when seen), waiting up to `wait` for the first.
    fn read_faults(&self, wait: Duration) -> Result<Vec<(usize, Instant)>, PullError> {
        let fd: &OwnedFd = &self.handoff.uffd;
        if !wait.is_zero() {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, ours, for the call.
            unsafe { libc::poll(&mut p, 1, wait.as_millis().max(1) as i32) };
        }
        let mut msgs = [UffdMsg::default(); 32];
        // SAFETY: reads whole uffd_msg structs into our array; the descriptor is non-blocking.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        let now = Instant::now();
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(Vec::new());
            }
            return Err(PullError::Os {
                what: "reading QEMU's faults",
                source: e,
            });
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        Ok(msgs[..count]
            .iter()
            .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
            .filter_map(|m| {
                let off = m.address.checked_sub(self.handoff.addr)?;
                Some((off as usize / PAGE, now))
            })
            .collect())
    }
}
