//! Moving pages one-sided: every run of a [`PageSet`] as one WRITE (pre-copy, stop-and-copy:
//! the source pushes into the destination's registered RAM) or one READ (post-copy: the
//! destination pulls from the source's), with many requests in flight from one thread.
//!
//! Both sides' RAM has the same layout, so a page's offset is the same on each side. A zero page
//! is left out of a WRITE when the destination's copy is known to be zero (its fresh RAM reads
//! as zeros); a page that became zero after it was sent is written like any other.

use std::time::Duration;

use rmem_transport::{Completion, Cq, Mr, Qp, RemoteBuf, SendWr, WcStatus};

use crate::pages::{PageSet, PAGE};

/// Why pages did not move.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("the remote region is {remote} bytes, the local one {local}: the layouts differ")]
    Layout { local: usize, remote: u64 },
    #[error("a page set of {pages} pages for a {bytes}-byte region")]
    PageSet { pages: usize, bytes: usize },
    #[error("a {what} of pages {first}..{end} completed with {status}")]
    Completion {
        what: &'static str,
        first: usize,
        end: usize,
        status: WcStatus,
    },
    #[error(transparent)]
    Transport(#[from] rmem_transport::Error),
}

/// What a call moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Pages that went over the wire.
    pub pages: usize,
    /// Zero pages left out.
    pub zero_pages: usize,
    /// Work requests (one per run).
    pub requests: usize,
}

impl Moved {
    pub fn bytes(&self) -> u64 {
        (self.pages * PAGE) as u64
    }
}

/// Settings for one queue pair's worth of movement.
#[derive(Debug, Clone, Copy)]
pub struct Mover {
    /// Requests in flight at most (keep under the queue pair's send depth).
    pub depth: usize,
    /// Pages per request at most.
    pub max_run_pages: usize,
    /// How long a completion may take before the peer counts as gone.
    pub timeout: Duration,
    /// Bytes per second at most, averaged from the call's start (`--bandwidth`); `None`: as
    /// fast as the transport goes.
    pub rate: Option<u64>,
}

impl Default for Mover {
    fn default() -> Self {
        Mover {
            depth: 32,
            max_run_pages: 64,
            timeout: Duration::from_secs(10),
            rate: None,
        }
    }
}

/// The two RAMs and the queue pair between them.
#[derive(Clone, Copy)]
pub struct Link<'a> {
    pub qp: &'a Qp,
    /// The queue pair's send completion queue.
    pub cq: &'a Cq,
    /// This side's RAM, registered.
    pub local: &'a Mr,
    /// The other side's RAM.
    pub remote: &'a RemoteBuf,
}

#[derive(Clone, Copy)]
enum Dir {
    Write,
    Read,
}

impl Mover {
    /// WRITEs `pages` of the local RAM to the same offsets of the remote one. `dest_zero` holds
    /// the pages the destination is known to hold as zeros: a zero page among them is left out,
    /// and the set is kept up to date with what was sent. Pass an empty set to send every page.
    pub fn write(
        &self,
        link: Link<'_>,
        pages: &PageSet,
        dest_zero: &mut PageSet,
    ) -> Result<Moved, MoveError> {
        self.check(link, pages)?;
        if dest_zero.len() != pages.len() {
            return Err(MoveError::PageSet {
                pages: dest_zero.len(),
                bytes: pages.len() * PAGE,
            });
        }
        let mut sending = PageSet::new(pages.len());
        let mut zero_pages = 0;
        for p in pages.iter() {
            // Checked in place: a page with data costs one load, not a copy.
            if dest_zero.contains(p) && link.local.is_zero(p * PAGE, PAGE)? {
                zero_pages += 1;
            } else {
                sending.insert(p);
                // Whatever the WRITE carries (the page may change meanwhile) is not known zero.
                dest_zero.remove(p);
            }
        }
        let mut moved = self.run(Dir::Write, link, &sending)?;
        moved.zero_pages = zero_pages;
        Ok(moved)
    }

    /// READs `pages` of the remote RAM into the same offsets of the local one.
    pub fn read(&self, link: Link<'_>, pages: &PageSet) -> Result<Moved, MoveError> {
        self.check(link, pages)?;
        self.run(Dir::Read, link, pages)
    }

    fn check(&self, link: Link<'_>, pages: &PageSet) -> Result<(), MoveError> {
        let (local, remote) = (link.local, link.remote);
        if remote.len != local.len() as u64 {
            return Err(MoveError::Layout {
                local: local.len(),
                remote: remote.len,
            });
        }
        if pages.len() * PAGE > local.len() {
            return Err(MoveError::PageSet {
                pages: pages.len(),
                bytes: local.len(),
            });
        }
        Ok(())
    }

    fn run(&self, dir: Dir, link: Link<'_>, pages: &PageSet) -> Result<Moved, MoveError> {
        let Link {
            qp,
            cq,
            local,
            remote,
        } = link;
        let depth = self.depth.max(1);
        // Each request's pages, by wr_id slot, to say which pages failed.
        let mut runs: Vec<(usize, usize)> = vec![(0, 0); depth];
        let mut free: Vec<usize> = (0..depth).rev().collect();
        let mut moved = Moved::default();
        let mut done = [Completion::default(); 16];
        let what = match dir {
            Dir::Write => "WRITE",
            Dir::Read => "READ",
        };
        let mut reap = |free: &mut Vec<usize>, runs: &[(usize, usize)], block: bool| {
            let n = if block {
                cq.wait(&mut done, Some(self.timeout))?
            } else {
                cq.poll(&mut done)?
            };
            for c in &done[..n] {
                let slot = c.wr_id as usize;
                let (first, end) = runs.get(slot).copied().unwrap_or((0, 0));
                if !c.is_ok() {
                    return Err(MoveError::Completion {
                        what,
                        first,
                        end,
                        status: c.status,
                    });
                }
                free.push(slot);
            }
            Ok::<usize, MoveError>(n)
        };
        let started = std::time::Instant::now();
        for r in pages.runs(self.max_run_pages) {
            if let Some(rate) = self.rate {
                // Paced from the start: the bytes posted so far may not outrun the rate.
                let due = Duration::from_secs_f64((moved.pages * PAGE) as f64 / rate.max(1) as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            while free.is_empty() {
                if reap(&mut free, &runs, true)? == 0 {
                    return Err(rmem_transport::Error::Timeout(self.timeout).into());
                }
            }
            let slot = free.pop().unwrap_or_default();
            runs[slot] = (r.start, r.end);
            let (off, len) = (r.start * PAGE, (r.end - r.start) * PAGE);
            let sge = [local.sge(off, len)?];
            let at = remote.at(off as u64);
            let wr = match dir {
                Dir::Write => SendWr::write(slot as u64, &sge, at),
                Dir::Read => SendWr::read(slot as u64, &sge, at),
            };
            qp.post_send(&[wr])?;
            moved.pages += r.end - r.start;
            moved.requests += 1;
            reap(&mut free, &runs, false)?;
        }
        while free.len() < depth {
            if reap(&mut free, &runs, true)? == 0 {
                return Err(rmem_transport::Error::Timeout(self.timeout).into());
            }
        }
        Ok(moved)
    }
}
