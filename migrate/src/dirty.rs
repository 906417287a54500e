//! Finding the pages written since the last round.
//!
//! Three logs, chosen by what the source offers:
//! - a userfaultfd with async write-protect inside the process that owns the memory, scanned
//!   with PAGEMAP_SCAN (exact, cheap; kernels 6.7+) — built with the preload library;
//! - [`PageHashLog`]: a hash of every page, compared round to round (any kernel; it reads the
//!   whole region each round, which costs the source CPU and memory bandwidth);
//! - [`EverythingDirty`]: for a source that is stopped: every page once.

use xxhash_rust::xxh3::xxh3_128;

use crate::pages::{PageSet, PAGE};

/// The region a log watches, read a page at a time.
pub trait PageSource {
    /// Pages in the region.
    fn pages(&self) -> usize;
    /// Copies page `page` into `buf`. The memory may be written meanwhile (the guest runs): a
    /// torn copy is fine, the write that tore it marks the page dirty again.
    fn read_page(&self, page: usize, buf: &mut [u8; PAGE]);
}

/// Memory of this process (whole pages) as a source: tests and in-process regions.
pub struct Slice<'a>(pub &'a [u8]);

impl PageSource for Slice<'_> {
    fn pages(&self) -> usize {
        self.0.len() / PAGE
    }

    fn read_page(&self, page: usize, buf: &mut [u8; PAGE]) {
        buf.copy_from_slice(&self.0[page * PAGE..(page + 1) * PAGE]);
    }
}

/// Memory mapped into this process from a file (a guest's RAM file) as a source.
pub struct Mapped<'a>(pub &'a rmem_transport::Buffer);

impl PageSource for Mapped<'_> {
    fn pages(&self) -> usize {
        self.0.len() / PAGE
    }

    fn read_page(&self, page: usize, buf: &mut [u8; PAGE]) {
        // In bounds by construction (page < pages()); a failure leaves the buffer as it was,
        // which only makes the page look written.
        let _ = self.0.read_at(page * PAGE, &mut buf[..]);
    }
}

/// A 128-bit hash of every page: what two sides compare to find the pages that differ.
pub fn page_hashes(src: &dyn PageSource) -> Vec<u128> {
    let mut buf = Box::new([0u8; PAGE]);
    (0..src.pages())
        .map(|p| {
            src.read_page(p, &mut buf);
            xxh3_128(&buf[..])
        })
        .collect()
}

/// Why a log could not say which pages were written.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("the region has {got} pages; the dirty log was made for {want}")]
    Resized { got: usize, want: usize },
    #[error("{what}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A way to find the pages written since the previous call.
pub trait DirtyLog: Send {
    /// What it is, for `rmem migrate send`'s output and the docs.
    fn kind(&self) -> &'static str;
    /// What using it costs the source.
    fn cost(&self) -> &'static str;
    /// Whether it never reports a page as clean that differs from what was sent, even one
    /// written while it was being sent (with the source paused, its last report is all that
    /// is left to send). A hash log is not: a page written and written back looks clean.
    fn is_exact(&self) -> bool {
        false
    }
    /// Adds to `out` every page written since the previous call; the first call adds every page
    /// (nothing has been sent yet). A page may be reported that was not written; a written page
    /// is never missed.
    fn collect(&mut self, src: &dyn PageSource, out: &mut PageSet) -> Result<(), DirtyError>;
    /// Adds to `out` pages of `[first, end)` written since the previous [`collect`], leaving
    /// them reported by the next one; returns false when this log cannot tell (the default).
    /// A round skips such a page: the guest wrote it after the round began, so the next round
    /// sends it anyway, and sending it now would move it twice.
    ///
    /// [`collect`]: DirtyLog::collect
    fn written_since(
        &mut self,
        _first: usize,
        _end: usize,
        _out: &mut PageSet,
    ) -> Result<bool, DirtyError> {
        Ok(false)
    }
}

/// For a stopped source: every page the first time, nothing after.
#[derive(Debug, Default)]
pub struct EverythingDirty {
    done: bool,
}

impl DirtyLog for EverythingDirty {
    fn kind(&self) -> &'static str {
        "everything (stopped source)"
    }

    fn cost(&self) -> &'static str {
        "none; the source must stay stopped"
    }

    fn is_exact(&self) -> bool {
        true
    }

    fn collect(&mut self, src: &dyn PageSource, out: &mut PageSet) -> Result<(), DirtyError> {
        check_len(src, out.len())?;
        if !self.done {
            out.union_with(&PageSet::full(out.len()));
            self.done = true;
        }
        Ok(())
    }
}

/// Compares a 128-bit hash of every page with the previous round's.
pub struct PageHashLog {
    hashes: Vec<u128>,
    first: bool,
    buf: Box<[u8; PAGE]>,
}

impl PageHashLog {
    pub fn new(pages: usize) -> PageHashLog {
        PageHashLog {
            hashes: vec![0; pages],
            first: true,
            buf: Box::new([0; PAGE]),
        }
    }
}

impl DirtyLog for PageHashLog {
    fn kind(&self) -> &'static str {
        "page hashes"
    }

    fn cost(&self) -> &'static str {
        "source CPU: reads and hashes the whole region every round"
    }

    fn collect(&mut self, src: &dyn PageSource, out: &mut PageSet) -> Result<(), DirtyError> {
        check_len(src, self.hashes.len())?;
        check_len(src, out.len())?;
        for (page, old) in self.hashes.iter_mut().enumerate() {
            src.read_page(page, &mut self.buf);
            let h = xxh3_128(&self.buf[..]);
            if self.first || h != *old {
                out.insert(page);
            }
            *old = h;
        }
        self.first = false;
        Ok(())
    }
}

fn check_len(src: &dyn PageSource, want: usize) -> Result<(), DirtyError> {
    match src.pages() {
        got if got == want => Ok(()),
        got => Err(DirtyError::Resized { got, want }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(log: &mut dyn DirtyLog, mem: &[u8]) -> Vec<usize> {
        let mut out = PageSet::new(mem.len() / PAGE);
        log.collect(&Slice(mem), &mut out).unwrap();
        out.iter().collect()
    }

    #[test]
    fn page_hashes_find_exactly_the_written_pages() {
        let mut mem = vec![0u8; 8 * PAGE];
        let mut log = PageHashLog::new(8);
        assert_eq!(
            collect(&mut log, &mem),
            (0..8).collect::<Vec<_>>(),
            "first round: all"
        );
        assert!(collect(&mut log, &mem).is_empty(), "nothing written");
        mem[3 * PAGE + 17] = 1;
        mem[7 * PAGE] = 9;
        assert_eq!(collect(&mut log, &mem), vec![3, 7]);
        // Written back to what it was: a hash log cannot tell, and need not (same content).
        mem[3 * PAGE + 17] = 0;
        assert_eq!(collect(&mut log, &mem), vec![3]);
        assert!(collect(&mut log, &mem).is_empty());
    }

    #[test]
    fn a_stopped_source_is_sent_once() {
        let mem = vec![0u8; 5 * PAGE];
        let mut log = EverythingDirty::default();
        assert_eq!(collect(&mut log, &mem).len(), 5);
        assert!(collect(&mut log, &mem).is_empty());
    }

    #[test]
    fn a_resized_region_is_an_error_not_a_missed_page() {
        let mut log = PageHashLog::new(4);
        let mem = vec![0u8; 5 * PAGE];
        let mut out = PageSet::new(5);
        assert!(matches!(
            log.collect(&Slice(&mem), &mut out),
            Err(DirtyError::Resized { got: 5, want: 4 })
        ));
    }
}
