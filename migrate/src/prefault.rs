//! Allocating a destination's RAM ahead of the source's WRITEs.
//!
//! A WRITE into a page the destination never touched makes its receiving side allocate, zero
//! and map the page as it lands; on the hosts measured that cost more than the copy itself.
//! The destination allocates the pages that hold data at the source before they arrive:
//! before the source pauses (stop-copy, post-copy), or alongside the first pre-copy round
//! while the guest still runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use rmem_transport::Buffer;

use crate::pages::PAGE;

/// Pages allocated per call: small enough that a stop is seen quickly.
const STEP_PAGES: u64 = 4096;

/// Page runs `[first, end)` of each buffer being allocated on a thread of their own.
pub struct Prefault {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Prefault {
    /// Starts allocating `runs` of each buffer (clipped to it).
    pub fn start(work: Vec<(Buffer, Vec<[u64; 2]>)>) -> Prefault {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rmem-prefault".into())
            .spawn(move || allocate(&work, &s))
            .map_err(|e| tracing::debug!(error = %e, "no prefault thread; WRITEs allocate"))
            .ok();
        Prefault { stop, thread }
    }

    /// Waits until every run is allocated; returns the pages allocated.
    pub fn wait(mut self) -> u64 {
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Allocates and maps the runs (MADV_POPULATE_WRITE). Only a speed-up: a kernel without it
/// (before 5.14) lets the WRITEs allocate instead.
fn allocate(work: &[(Buffer, Vec<[u64; 2]>)], stop: &AtomicBool) -> u64 {
    let mut done = 0;
    for (buf, runs) in work {
        let pages = (buf.len() / PAGE) as u64;
        for &[first, end] in runs {
            let mut at = first;
            let end = end.min(pages);
            while at < end {
                if stop.load(Ordering::Acquire) {
                    return done;
                }
                let n = (end - at).min(STEP_PAGES);
                if let Err(e) = buf.populate(at as usize * PAGE, n as usize * PAGE) {
                    tracing::debug!(error = %e, "pages not allocated ahead");
                    return done;
                }
                done += n;
                at += n;
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn blocks(f: &std::fs::File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn allocates_exactly_the_runs_and_keeps_the_data() {
        let f = tempfile::tempfile_in("/dev/shm").unwrap();
        f.set_len(64 * PAGE as u64).unwrap();
        f.write_all_at(&[5], 2 * PAGE as u64).unwrap();
        let buf = Buffer::map_file(&f).unwrap();
        let n = Prefault::start(vec![(buf.clone(), vec![[2, 6], [10, 12], [60, 99]])]).wait();
        assert_eq!(n, 4 + 2 + 4, "runs are clipped to the buffer");
        assert_eq!(blocks(&f), 10 * PAGE as u64, "only the runs are allocated");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 2 * PAGE as u64).unwrap();
        assert_eq!(b, [5]);
        assert!(buf.is_zero(3 * PAGE, 61 * PAGE).unwrap());
    }

    #[test]
    fn a_dropped_prefault_stops() {
        let f = tempfile::tempfile_in("/dev/shm").unwrap();
        let pages = 1 << 16; // 256 MiB, far more than a stop lets through
        f.set_len(pages * PAGE as u64).unwrap();
        let buf = Buffer::map_file(&f).unwrap();
        drop(Prefault::start(vec![(buf, vec![[0, pages]])]));
        assert!(
            blocks(&f) < pages * PAGE as u64,
            "allocated all {} bytes",
            blocks(&f)
        );
    }
}
