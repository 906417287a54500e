//! The fault handler: one thread serving every MISSING and write-protect fault of a region in
//! order, with FIFO eviction and stride prefetch (see the module docs of `region`).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{Channel, ClientError};
use rmem_transport::{Buffer, Completion, HugePages, Mr, RemoteBuf};
use userfaultfd::{Event, FaultKind, ReadWrite, Uffd};

use super::raw::{copy_page, poison_page};
use super::{bump, Backing, Counters, PollMode, RegionConfig, PAGE};

const RESIDENT: u8 = 1;
const DIRTY: u8 = 2;
/// The remote copy holds the page (else it is zeros).
const VALID: u8 = 4;
/// Installed write-protected (clean).
const WP: u8 = 8;
/// Could not be read back: poisoned, every access raises SIGBUS.
const POISONED: u8 = 16;

const EVICT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const EVICT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where a page being installed comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Never written remotely: zeros.
    Zeros,
    /// Staging slot `k`.
    Staged(usize),
    /// The READ failed past the deadline.
    Lost,
}

/// A detected stride stream: the next miss expected just past the prefetched window.
#[derive(Debug, Clone, Copy)]
struct Stream {
    stride: i64,
    next: i64,
    window: u64,
}

pub(crate) struct Handler {
    uffd: Arc<Uffd>,
    base: usize,
    pages: usize,
    budget: usize,
    prefetch: usize,
    backing: Backing,
    state: Vec<u8>,
    fifo: VecDeque<u32>,
    counters: Arc<Counters>,
    staging: Vec<u8>,
    /// With the backing's channel: the staging pages registered there, READ into directly.
    direct: Option<(Channel, Mr)>,
    zeros: Vec<u8>,
    history: VecDeque<i64>,
    stream: Option<Stream>,
    /// The kernel has UFFDIO_POISON.
    poison: bool,
    remote_deadline: Duration,
    /// After a failed write-back, eviction waits until then.
    evict_paused_until: Option<Instant>,
    evict_backoff: Duration,
}

impl Handler {
    pub(crate) fn new(
        uffd: Arc<Uffd>,
        base: usize,
        pages: usize,
        cfg: &RegionConfig,
        backing: Backing,
        counters: Arc<Counters>,
        poison: bool,
    ) -> Handler {
        let mut backing = backing;
        let slots = cfg.prefetch + 1;
        let direct = backing.channel.take().and_then(|ch| {
            let buf = Buffer::alloc(PAGE * slots, HugePages::Never).ok()?;
            match ch.register(&buf) {
                Ok(mr) => Some((ch, mr)),
                Err(e) => {
                    tracing::warn!(error = %e, "no registered staging: faults read through a copy");
                    None
                }
            }
        });
        Handler {
            direct,
            uffd,
            base,
            pages,
            budget: cfg.budget_pages.max(1),
            prefetch: cfg.prefetch,
            backing,
            state: vec![0; pages],
            fifo: VecDeque::new(),
            counters,
            staging: vec![0u8; PAGE * slots],
            zeros: vec![0u8; PAGE],
            history: VecDeque::new(),
            stream: None,
            poison,
            remote_deadline: cfg.remote_deadline,
            evict_paused_until: None,
            evict_backoff: EVICT_BACKOFF_MIN,
        }
    }
}

impl Handler {
    pub(crate) fn run(mut self, stop: Arc<AtomicBool>, mode: PollMode, wake_fd: i32) {
        let fd = self.uffd.as_raw_fd();
        let mut idle_since = Instant::now();
        while !stop.load(Ordering::Acquire) {
            let ev = match self.uffd.read_event() {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::error!(error = %e, "userfaultfd read failed; handler stops");
                    return;
                }
            };
            let Some(ev) = ev else {
                // Idle: make room ahead of the next faults, a page at a time so a fault that
                // arrives meanwhile waits for one eviction at most.
                if self.fifo.len() > self.low_water() && self.evict_to(self.low_water(), 1) {
                    idle_since = Instant::now();
                    continue;
                }
                let spin = match mode {
                    PollMode::Busy { spin } => idle_since.elapsed() < spin,
                    PollMode::Blocking => false,
                };
                if spin {
                    std::hint::spin_loop();
                } else {
                    let mut fds = [
                        libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: wake_fd,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: two valid pollfd structs on the stack.
                    unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
                    idle_since = Instant::now();
                }
                continue;
            };
            match ev {
                Event::Pagefault {
                    kind: FaultKind::Missing,
                    rw,
                    addr,
                    ..
                } => self.missing(self.page_of(addr as usize), rw == ReadWrite::Write),
                Event::Pagefault {
                    kind: FaultKind::WriteProtected,
                    addr,
                    ..
                } => self.write_protected(self.page_of(addr as usize)),
                other => tracing::warn!(event = ?other, "unexpected userfaultfd event"),
            }
            // Only past the budget itself: the idle loop keeps below it.
            self.evict_to(self.budget, usize::MAX);
            idle_since = Instant::now();
        }
    }

    fn page_of(&self, addr: usize) -> usize {
        (addr - self.base) / PAGE
    }

    fn addr(&self, page: usize) -> usize {
        self.base + page * PAGE
    }

    fn wake(&self, page: usize) {
        if let Err(e) = self.uffd.wake(self.addr(page) as *mut _, PAGE) {
            tracing::error!(page, error = %e, "userfaultfd wake failed");
        }
    }

    fn missing(&mut self, page: usize, write: bool) {
        bump(&self.counters.faults, 1);
        if self.state[page] & RESIDENT != 0 {
            // Served already (another thread's fault, or a prefetch).
            self.wake(page);
            return;
        }
        if self.state[page] & POISONED != 0 {
            // Dropped by the application (MADV_DONTNEED clears the marker): still lost.
            self.poison(page);
            return;
        }
        let ahead = self.plan_prefetch(page as i64);
        bump(&self.counters.prefetched, ahead.len() as u64);
        self.serve(page, write, &ahead);
    }

    fn write_protected(&mut self, page: usize) {
        bump(&self.counters.wp_faults, 1);
        if self.state[page] & RESIDENT == 0 {
            // Evicted while the writer waited: it retries and takes a MISSING fault.
            self.wake(page);
            return;
        }
        self.state[page] = (self.state[page] | DIRTY) & !WP;
        let a = self.addr(page) as *mut _;
        if let Err(e) = self.uffd.remove_write_protection(a, PAGE, true) {
            tracing::error!(page, error = %e, "unprotect failed");
            self.wake(page);
        }
    }

    /// Pages to fetch ahead of a miss at `page`, updating the stride detector.
    fn plan_prefetch(&mut self, page: i64) -> Vec<usize> {
        if self.prefetch == 0 {
            return Vec::new();
        }
        let stride = match self.stream {
            Some(s) if s.next == page => {
                bump(&self.counters.prefetch_hits, s.window);
                Some(s.stride)
            }
            _ => {
                self.stream = None;
                self.history.push_back(page);
                if self.history.len() > 3 {
                    self.history.pop_front();
                }
                let h = &self.history;
                if h.len() == 3 {
                    let (d1, d2) = (h[1] - h[0], h[2] - h[1]);
                    (d1 == d2 && d1 != 0 && d1.abs() <= 64).then_some(d1)
                } else {
                    None
                }
            }
        };
        let Some(stride) = stride else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(self.prefetch);
        let mut p = page;
        for _ in 0..self.prefetch {
            p += stride;
            if p < 0 || p >= self.pages as i64 {
                break;
            }
            if self.state[p as usize] & RESIDENT == 0 {
                out.push(p as usize);
            }
        }
        self.stream = Some(Stream {
            stride,
            next: p + stride,
            window: out.len() as u64,
        });
        self.history.clear();
        out
    }

    /// Fetches the faulting `page` and the prefetch pages `ahead` (none resident) and
    /// installs them: `ahead` write-protected and clean, `page` write-protected unless this is
    /// a write fault. Runs of consecutive remote pages in one slab take one READ, so a
    /// sequential miss with its prefetch window is one round trip. `page` goes in last, so the
    /// faulting thread, woken by its copy, finds the window in place.
    fn serve(&mut self, page: usize, write: bool, ahead: &[usize]) {
        let mut all: Vec<usize> = ahead.to_vec();
        all.push(page);
        all.sort_unstable();
        let mut slots: Vec<Source> = vec![Source::Zeros; all.len()];
        let (mut i, mut k) = (0, 0);
        while i < all.len() {
            let p = all[i];
            if self.state[p] & VALID == 0 {
                i += 1;
                continue;
            }
            // The longest run p, p+1, ... of remote pages in the same slab.
            let (slab, off) = self.backing.locate(p);
            let slab_id = slab.slab;
            let mut n = 1;
            while i + n < all.len()
                && all[i + n] == p + n
                && self.state[p + n] & VALID != 0
                && self.backing.locate(p + n).0.slab == slab_id
            {
                n += 1;
            }
            let ok = self.read_remote(p, off, k, n);
            if ok {
                bump(&self.counters.fetched, n as u64);
            }
            for j in 0..n {
                slots[i + j] = if ok {
                    Source::Staged(k + j)
                } else {
                    Source::Lost
                };
            }
            (i, k) = (i + n, k + n);
        }
        let slot_of = |p: usize| {
            all.binary_search(&p)
                .map(|i| slots[i])
                .unwrap_or(Source::Zeros)
        };
        for &p in ahead {
            // A prefetch page that failed is left alone: its own fault decides.
            match slot_of(p) {
                Source::Lost => {}
                s => self.install(p, s, true),
            }
        }
        match slot_of(page) {
            Source::Lost => self.poison(page),
            s => self.install(page, s, !write),
        }
    }

    /// Marks `page` lost and poisons it, which wakes its faulting thread into a SIGBUS.
    fn poison(&mut self, page: usize) {
        self.state[page] |= POISONED;
        bump(&self.counters.poisoned, 1);
        tracing::error!(
            page,
            "page lost with its remote memory; poisoned (SIGBUS on access)"
        );
        if let Err(e) = poison_page(&self.uffd, self.addr(page)) {
            tracing::error!(page, errno = e, "UFFDIO_POISON failed");
            self.wake(page);
        }
    }

    /// READs `n` pages starting at `page` (at `off` of its slab) into staging slots `k..`,
    /// retrying with back-off. Gives up (false) after `remote_deadline` where the page can be
    /// poisoned; without poison the faulting thread has no other way out, so it retries on.
    fn read_remote(&mut self, page: usize, off: u64, k: usize, n: usize) -> bool {
        let mut delay = Duration::from_millis(1);
        let start = Instant::now();
        loop {
            let (slab, _) = self.backing.locate(page);
            let remote = slab.remote;
            let got = match &mut self.direct {
                Some((ch, mr)) => read_direct(ch, mr, k * PAGE, n * PAGE, remote, off),
                None => self.backing.client.read_remote(
                    remote,
                    off,
                    &mut self.staging[k * PAGE..(k + n) * PAGE],
                ),
            };
            if matches!(got, Err(ClientError::Timeout(_))) && self.direct.is_some() {
                // A READ may still land in the staging pages: stop using them (dropping the
                // channel waits out what it has in flight); faults read through the lanes.
                tracing::warn!(
                    page,
                    "a direct READ timed out: faults read through a copy now"
                );
                self.direct = None;
            }
            match got {
                Ok(()) => return true,
                Err(e) => {
                    bump(&self.counters.remote_errors, 1);
                    if self.poison && start.elapsed() >= self.remote_deadline {
                        tracing::error!(page, error = %e, "remote READ failed; giving up");
                        return false;
                    }
                    tracing::error!(page, error = %e, "remote READ failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Installs one page from staging slot `slot` (or zeros), updating state before the copy
    /// wakes anyone.
    fn install(&mut self, page: usize, slot: Source, wp: bool) {
        if slot == Source::Zeros {
            bump(&self.counters.zero_fills, 1);
        }
        // Only a write fault installs a page writable, and that page is dirty already.
        self.state[page] = (self.state[page] & VALID) | RESIDENT | if wp { WP } else { DIRTY };
        self.fifo.push_back(page as u32);
        bump(&self.counters.resident, 1);
        let src = match (slot, &self.direct) {
            // SAFETY: slot k of the registered staging pages, which the READ into it (reaped
            // before this) filled; no request is in flight on it now.
            (Source::Staged(k), Some((_, mr))) => unsafe {
                std::slice::from_raw_parts(mr.as_ptr().add(k * PAGE), PAGE)
            },
            (Source::Staged(k), None) => &self.staging[k * PAGE..(k + 1) * PAGE],
            (Source::Zeros | Source::Lost, _) => &self.zeros[..],
        };
        match copy_page(&self.uffd, src, self.addr(page), wp) {
            Ok(()) => {}
            Err(libc::EEXIST) => {
                tracing::warn!(page, "page present though not tracked resident");
                self.wake(page);
            }
            Err(e) => tracing::error!(page, errno = e, "UFFDIO_COPY failed"),
        }
    }

    /// Where idle time evicts down to: room for a fault and its prefetch window (and a
    /// sixteenth of the budget) before the budget forces an eviction inline.
    fn low_water(&self) -> usize {
        let room = (self.prefetch + 1).max(self.budget / 16);
        self.budget.saturating_sub(room.min(self.budget / 2))
    }

    /// Evicts the oldest resident pages, at most `max`, until no more than `target` are left;
    /// true when it evicted any. A failed write-back keeps its page and pauses eviction for a
    /// growing back-off.
    fn evict_to(&mut self, target: usize, max: usize) -> bool {
        if let Some(until) = self.evict_paused_until {
            if Instant::now() < until {
                return false;
            }
            self.evict_paused_until = None;
        }
        let mut evicted = 0;
        while self.fifo.len() > target && evicted < max {
            let Some(v) = self.fifo.pop_front() else {
                break;
            };
            evicted += 1;
            let v = v as usize;
            let a = self.addr(v);
            let st = self.state[v];
            if st & WP == 0 {
                // From here writers block in a WP fault, served after this eviction.
                if let Err(e) = self.uffd.write_protect(a as *mut _, PAGE) {
                    tracing::error!(page = v, error = %e, "write-protect failed; page kept");
                    self.fifo.push_back(v as u32);
                    return evicted > 1;
                }
                self.state[v] |= WP;
            }
            if st & DIRTY != 0 {
                if let Err(e) = self.write_back(v, a) {
                    bump(&self.counters.remote_errors, 1);
                    bump(&self.counters.writeback_failures, 1);
                    tracing::error!(page = v, error = %e, backoff = ?self.evict_backoff,
                        "remote WRITE failed; page kept resident, eviction paused");
                    // Oldest first again next time; a writer meanwhile takes a WP fault
                    // and finds the page dirty and resident.
                    self.fifo.push_front(v as u32);
                    self.evict_paused_until = Some(Instant::now() + self.evict_backoff);
                    self.evict_backoff = (self.evict_backoff * 2).min(EVICT_BACKOFF_MAX);
                    return evicted > 1;
                }
                self.evict_backoff = EVICT_BACKOFF_MIN;
                self.state[v] |= VALID;
                bump(&self.counters.writebacks, 1);
            } else {
                bump(&self.counters.clean_drops, 1);
            }
            self.state[v] &= VALID;
            self.counters.resident.fetch_sub(1, Ordering::Relaxed);
            // SAFETY: `a` is a page of the registered mapping; dropping it makes the next
            // access a MISSING fault, which this thread serves from the copy just written.
            let r = unsafe { libc::madvise(a as *mut _, PAGE, libc::MADV_DONTNEED) };
            if r != 0 {
                tracing::error!(page = v, error = %std::io::Error::last_os_error(), "MADV_DONTNEED failed");
            }
        }
        evicted > 0
    }

    fn write_back(&mut self, page: usize, addr: usize) -> Result<(), ClientError> {
        // SAFETY: the page is resident and write-protected, so nobody changes it while it is
        // copied; the mapping outlives this thread.
        let data = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE) };
        let (slab, off) = self.backing.locate(page);
        self.backing.client.write_remote(slab.remote, off, data)
    }
}

/// One READ of `len` bytes at `off` of `remote` into `mr[at..]`, waited for. Each READ
/// carries its own number: a completion of an earlier one (given up on after a timeout) is
/// passed over, never taken for this one's.
fn read_direct(
    ch: &mut Channel,
    mr: &Mr,
    at: usize,
    len: usize,
    remote: RemoteBuf,
    off: u64,
) -> Result<(), ClientError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    ch.post_read(id, mr, at, len, remote, off)?;
    let mut c = [Completion::default(); 1];
    loop {
        match ch.wait(&mut c)? {
            0 => return Err(ClientError::Timeout(Duration::ZERO)),
            _ if c[0].wr_id != id => continue,
            _ if c[0].is_ok() => return Ok(()),
            _ => return Err(ClientError::Completion(c[0].status)),
        }
    }
}
