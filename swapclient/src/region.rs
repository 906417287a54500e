//! A memory region paged to remote memory with userfaultfd.
//!
//! [`Region`] maps `size` bytes of anonymous memory and registers them with userfaultfd for
//! MISSING and write-protect (WP) faults. One handler thread serves every fault:
//!
//! - MISSING: the page is read from its remote slab with one one-sided READ into a staging
//!   buffer (a page never written remotely is zeros and costs no READ) and installed with
//!   `UFFDIO_COPY`. A read fault installs it write-protected, so its first write raises a WP
//!   fault; a write fault installs it writable and dirty.
//! - WP: the page is marked dirty and unprotected (which wakes the writer).
//! - When more than `budget_pages` pages are resident, the oldest (FIFO) are evicted: each is
//!   write-protected first (writers now block in a WP fault that this thread serves only after
//!   the eviction), written to its slab if dirty, then dropped with `MADV_DONTNEED`; the next
//!   access faults it back in.
//! - Prefetch: when the last misses follow a constant stride (sequential is stride 1), the next
//!   `prefetch` pages along it are fetched too and installed write-protected and clean; a miss
//!   just past the prefetched window continues the stream.
//!
//! All faults are served in order by one thread, so eviction never races the handling of a
//! fault on the same page.
//!
//! When remote memory fails (a dead donor, a slab taken back), nothing is lost silently:
//! - A page that cannot be read within `remote_deadline` is poisoned (`UFFDIO_POISON`, Linux
//!   6.6+), so the faulting thread gets SIGBUS, as it would on a machine-check for a bad DIMM;
//!   a VMM forwards that to its guest as a memory error. On kernels without poison the READ is
//!   retried until it works, since a missing page cannot be given any other answer.
//! - A dirty page whose write-back fails stays resident and dirty (the region goes over its
//!   budget rather than drop data) and eviction pauses with a growing back-off before it tries
//!   again.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmem_memserver::{Client, ClientError, SlabGrant};
use userfaultfd::{
    Event, FaultKind, FeatureFlags, IoctlFlags, ReadWrite, RegisterMode, Uffd, UffdBuilder,
};
use userfaultfd_sys as sys;

/// The page size the region is managed in.
pub const PAGE: usize = 4096;

/// How the handler thread waits for faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin on a non-blocking read; after `spin` without a fault, block in `poll()` until the
    /// next one.
    Busy { spin: Duration },
    /// Always block in `poll()`.
    Blocking,
}

/// How a [`Region`] is laid out and paged.
#[derive(Debug, Clone)]
pub struct RegionConfig {
    /// Bytes; a multiple of 4096.
    pub size: usize,
    /// At most this many pages are resident once a fault is served: the faulting thread is
    /// woken first, then the oldest pages are evicted, so for a moment the pages of one fault
    /// (1 + prefetch) may be over.
    pub budget_pages: usize,
    /// Pages fetched ahead along a detected stride; 0 turns prefetch off.
    pub prefetch: usize,
    pub poll: PollMode,
    /// Serve faults raised by the kernel on the region too (a `read(2)` into it, say). Needs
    /// root, CAP_SYS_PTRACE or access to `/dev/userfaultfd`.
    pub kernel_faults: bool,
    /// How long a failing READ of a faulting page is retried before the page is poisoned and
    /// the faulting thread gets SIGBUS (where the kernel has `UFFDIO_POISON`).
    pub remote_deadline: Duration,
}

impl RegionConfig {
    /// `size` bytes, all of them allowed resident, prefetch of 8, busy polling for 50 µs.
    pub fn new(size: usize) -> RegionConfig {
        RegionConfig {
            size,
            budget_pages: size / PAGE,
            prefetch: 8,
            poll: PollMode::Busy {
                spin: Duration::from_micros(50),
            },
            kernel_faults: true,
            remote_deadline: Duration::from_secs(10),
        }
    }
}

/// Counters since the region was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionStats {
    /// MISSING faults (including those found already served, e.g. two threads on one page).
    pub faults: u64,
    /// Write-protect faults (first write to a clean page).
    pub wp_faults: u64,
    /// Pages read from remote memory (demand and prefetch).
    pub fetched: u64,
    /// Pages installed as zeros without a READ (never written remotely).
    pub zero_fills: u64,
    /// Dirty pages written to remote memory on eviction.
    pub writebacks: u64,
    /// Clean pages evicted without a WRITE.
    pub clean_drops: u64,
    /// Pages installed by prefetch.
    pub prefetched: u64,
    /// Prefetched pages a continuing stream went past (an estimate of prefetch hits: the
    /// scan reached the miss after the window, so it crossed these pages).
    pub prefetch_hits: u64,
    /// Pages resident now.
    pub resident: u64,
    /// Remote operations that failed (and were retried).
    pub remote_errors: u64,
    /// Pages poisoned because they could not be read back: touching one raises SIGBUS.
    pub poisoned: u64,
    /// Write-backs that failed; the page stayed resident and dirty.
    pub writeback_failures: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region size {0} is not a positive multiple of {PAGE}")]
    BadSize(usize),
    #[error("the backing slabs hold {have} bytes, the region needs {need}")]
    BackingTooSmall { have: u64, need: u64 },
    #[error("userfaultfd: {0}")]
    Uffd(#[from] userfaultfd::Error),
    #[error("userfaultfd lacks {0}")]
    Unsupported(&'static str),
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
    #[error("remote memory: {0}")]
    Remote(#[from] ClientError),
}

/// Where the region's pages live: page `i` at byte `i * 4096` of the concatenated slabs.
pub struct Backing {
    client: Arc<Client>,
    slabs: Vec<SlabGrant>,
    slab_size: u64,
}

impl Backing {
    pub fn new(client: Arc<Client>, slabs: Vec<SlabGrant>) -> Backing {
        let slab_size = client.slab_size();
        Backing {
            client,
            slabs,
            slab_size,
        }
    }

    /// The slab that holds page `page`, and the page's offset in it.
    fn locate(&self, page: usize) -> (&SlabGrant, u64) {
        let byte = (page * PAGE) as u64;
        (
            &self.slabs[(byte / self.slab_size) as usize],
            byte % self.slab_size,
        )
    }

    fn capacity(&self) -> u64 {
        self.slabs.len() as u64 * self.slab_size
    }
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    wp_faults: AtomicU64,
    fetched: AtomicU64,
    zero_fills: AtomicU64,
    writebacks: AtomicU64,
    clean_drops: AtomicU64,
    prefetched: AtomicU64,
    prefetch_hits: AtomicU64,
    resident: AtomicU64,
    remote_errors: AtomicU64,
    poisoned: AtomicU64,
    writeback_failures: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Anonymous memory paged to remote slabs; see the module documentation.
pub struct Region {
    base: *mut u8,
    len: usize,
    uffd: Arc<Uffd>,
    stop: Arc<AtomicBool>,
    wake_fd: i32,
    handler: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    client: Arc<Client>,
    slabs: Vec<SlabGrant>,
    poison: bool,
}

// SAFETY: the mapping is owned by the Region and only reached through `&self` accessors that
// hand out raw pointers or atomics; the handler thread shares it through the kernel.
unsafe impl Send for Region {}
// SAFETY: as above; no method mutates Rust-visible state through `&self` other than atomics.
unsafe impl Sync for Region {}

impl Region {
    /// Borrows enough slabs from `client` for `cfg.size` bytes and pages the region to them.
    pub async fn borrow(client: Arc<Client>, cfg: RegionConfig) -> Result<Region, RegionError> {
        check_size(cfg.size)?;
        let n = (cfg.size as u64).div_ceil(client.slab_size());
        let slabs = client.alloc(n as u32).await?;
        let ids: Vec<u32> = slabs.iter().map(|g| g.slab).collect();
        let backing = Backing::new(client.clone(), slabs);
        match Region::new(cfg, backing) {
            Ok(r) => Ok(r),
            Err(e) => {
                // Nothing was paged out yet; the slabs are simply given back.
                let _ = client.free(&ids).await;
                Err(e)
            }
        }
    }

    /// Maps the region and starts its fault handler.
    pub fn new(cfg: RegionConfig, backing: Backing) -> Result<Region, RegionError> {
        check_size(cfg.size)?;
        if backing.capacity() < cfg.size as u64 {
            return Err(RegionError::BackingTooSmall {
                have: backing.capacity(),
                need: cfg.size as u64,
            });
        }
        let build = |features: FeatureFlags| {
            UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(!cfg.kernel_faults)
                .require_features(features)
                .create()
        };
        // Poison is asked for where the kernel has it (6.6+) and done without elsewhere.
        let wp = FeatureFlags::PAGEFAULT_FLAG_WP;
        let (uffd, poison_feature) =
            match build(wp | FeatureFlags::from_bits_retain(UFFD_FEATURE_POISON)) {
                Ok(u) => (u, true),
                Err(_) => (build(wp)?, false),
            };
        let uffd = Arc::new(uffd);
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cfg.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(RegionError::Os("mmap", std::io::Error::last_os_error()));
        }
        let unmap = |e: RegionError| {
            // SAFETY: `base` is the mapping made above, of `cfg.size` bytes, not yet shared.
            unsafe { libc::munmap(base, cfg.size) };
            e
        };
        // 4 KiB pages only: COPY installs 4 KiB pages and DONTNEED on part of a THP splits it.
        // SAFETY: advice on our own mapping; it changes no contents.
        unsafe { libc::madvise(base, cfg.size, libc::MADV_NOHUGEPAGE) };
        let io = uffd
            .register_with_mode(
                base,
                cfg.size,
                RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
            )
            .map_err(|e| unmap(e.into()))?;
        if !io.contains(IoctlFlags::COPY | IoctlFlags::WRITE_PROTECT | IoctlFlags::WAKE) {
            return Err(unmap(RegionError::Unsupported("COPY/WRITE_PROTECT/WAKE")));
        }
        let poison = poison_feature && io.bits() & (1 << UFFDIO_POISON_NR) != 0;
        if !poison {
            tracing::warn!(
                "userfaultfd has no UFFDIO_POISON: an unreadable page is retried forever"
            );
        }
        // SAFETY: plain syscall creating a new descriptor.
        let wake_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake_fd < 0 {
            return Err(unmap(RegionError::Os(
                "eventfd",
                std::io::Error::last_os_error(),
            )));
        }
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (client, slabs) = (backing.client.clone(), backing.slabs.clone());
        let pages = cfg.size / PAGE;
        let handler = Handler {
            uffd: uffd.clone(),
            base: base as usize,
            pages,
            budget: cfg.budget_pages.max(1),
            prefetch: cfg.prefetch,
            backing,
            state: vec![0; pages],
            fifo: VecDeque::new(),
            counters: counters.clone(),
            staging: vec![0u8; PAGE * (cfg.prefetch + 1)],
            zeros: vec![0u8; PAGE],
            history: VecDeque::new(),
            stream: None,
            poison,
            remote_deadline: cfg.remote_deadline,
            evict_paused_until: None,
            evict_backoff: EVICT_BACKOFF_MIN,
        };
        let (stop2, poll) = (stop.clone(), cfg.poll);
        let thread = std::thread::Builder::new()
            .name("rmem-uffd".into())
            .spawn(move || handler.run(stop2, poll, wake_fd));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                // SAFETY: our own descriptor, not used elsewhere.
                unsafe { libc::close(wake_fd) };
                return Err(unmap(RegionError::Os("spawn", e)));
            }
        };
        tracing::debug!(
            size = cfg.size,
            budget = cfg.budget_pages,
            prefetch = cfg.prefetch,
            "region mapped"
        );
        Ok(Region {
            base: base as *mut u8,
            len: cfg.size,
            uffd,
            stop,
            wake_fd,
            handler: Some(thread),
            counters,
            client,
            slabs,
            poison,
        })
    }

    /// The first byte. Accesses fault pages in and out transparently.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region as 64-bit atomics, for safe shared access from several threads.
    pub fn atomics(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `len` bytes, page aligned, lives as long as `self`, and is
        // only ever mutated through atomics or by the kernel installing page contents.
        unsafe { std::slice::from_raw_parts(self.base as *const AtomicU64, self.len / 8) }
    }

    /// The region as bytes, exclusively.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as `self`; `&mut self` rules out
        // other references made through this Region.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }

    /// Whether a page lost with its remote memory raises SIGBUS (the kernel has
    /// `UFFDIO_POISON`) rather than stalling its thread while the READ is retried.
    pub fn poisons_lost_pages(&self) -> bool {
        self.poison
    }

    pub fn stats(&self) -> RegionStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RegionStats {
            faults: g(&c.faults),
            wp_faults: g(&c.wp_faults),
            fetched: g(&c.fetched),
            zero_fills: g(&c.zero_fills),
            writebacks: g(&c.writebacks),
            clean_drops: g(&c.clean_drops),
            prefetched: g(&c.prefetched),
            prefetch_hits: g(&c.prefetch_hits),
            resident: g(&c.resident),
            remote_errors: g(&c.remote_errors),
            poisoned: g(&c.poisoned),
            writeback_failures: g(&c.writeback_failures),
        }
    }

    /// Unmaps the region and gives its slabs back to the donor.
    pub async fn release(self) -> Result<(), RegionError> {
        let client = self.client.clone();
        let ids: Vec<u32> = self.slabs.iter().map(|g| g.slab).collect();
        drop(self);
        client.free(&ids).await?;
        Ok(())
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our own eventfd.
        unsafe { libc::write(self.wake_fd, (&one as *const u64).cast(), 8) };
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.shutdown();
        let _ = self.uffd.unregister(self.base.cast(), self.len);
        // SAFETY: the mapping is ours; the handler has stopped and `&mut self` means no
        // reference into it is left.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
            libc::close(self.wake_fd);
        }
    }
}

fn check_size(size: usize) -> Result<(), RegionError> {
    if size == 0 || !size.is_multiple_of(PAGE) {
        return Err(RegionError::BadSize(size));
    }
    Ok(())
}

const RESIDENT: u8 = 1;
const DIRTY: u8 = 2;
/// The remote copy holds the page (else it is zeros).
const VALID: u8 = 4;
/// Installed write-protected (clean).
const WP: u8 = 8;
/// Could not be read back: poisoned, every access raises SIGBUS.
const POISONED: u8 = 16;

/// UFFD_FEATURE_POISON and the UFFDIO_POISON ioctl (Linux 6.6), which userfaultfd-sys predates.
const UFFD_FEATURE_POISON: u64 = 1 << 14;
const UFFDIO_POISON_NR: u64 = 0x08;
/// _IOWR(0xAA, 0x08, struct uffdio_poison): read/write, 32-byte argument.
const UFFDIO_POISON: u64 = (3 << 30) | (32 << 16) | (0xAA << 8) | UFFDIO_POISON_NR;

#[repr(C)]
struct UffdioPoison {
    range: sys::uffdio_range,
    mode: u64,
    updated: i64,
}

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

struct Handler {
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

/// UFFDIO_COPY with the write-protect mode the crate does not expose.
fn copy_page(uffd: &Uffd, src: &[u8], dst: usize, wp: bool) -> Result<(), i32> {
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
fn poison_page(uffd: &Uffd, dst: usize) -> Result<(), i32> {
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

impl Handler {
    fn run(mut self, stop: Arc<AtomicBool>, mode: PollMode, wake_fd: i32) {
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
            self.evict();
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
            match self.backing.client.read_remote(
                remote,
                off,
                &mut self.staging[k * PAGE..(k + n) * PAGE],
            ) {
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
        let src = match slot {
            Source::Staged(k) => &self.staging[k * PAGE..(k + 1) * PAGE],
            Source::Zeros | Source::Lost => &self.zeros[..],
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

    /// Evicts the oldest resident pages until the budget holds. A failed write-back keeps its
    /// page and pauses eviction for a growing back-off.
    fn evict(&mut self) {
        if let Some(until) = self.evict_paused_until {
            if Instant::now() < until {
                return;
            }
            self.evict_paused_until = None;
        }
        while self.fifo.len() > self.budget {
            let Some(v) = self.fifo.pop_front() else {
                return;
            };
            let v = v as usize;
            let a = self.addr(v);
            let st = self.state[v];
            if st & WP == 0 {
                // From here writers block in a WP fault, served after this eviction.
                if let Err(e) = self.uffd.write_protect(a as *mut _, PAGE) {
                    tracing::error!(page = v, error = %e, "write-protect failed; page kept");
                    self.fifo.push_back(v as u32);
                    return;
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
                    return;
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
    }

    fn write_back(&mut self, page: usize, addr: usize) -> Result<(), ClientError> {
        // SAFETY: the page is resident and write-protected, so nobody changes it while it is
        // copied; the mapping outlives this thread.
        let data = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE) };
        let (slab, off) = self.backing.locate(page);
        self.backing.client.write_remote(slab.remote, off, data)
    }
}
