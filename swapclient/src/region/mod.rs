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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::client::{Client, ClientError};
use rmem_wire::protocol::SlabGrant;
mod handler;
mod raw;

use handler::Handler;
use raw::{UFFDIO_POISON_NR, UFFD_FEATURE_POISON};
use userfaultfd::{FeatureFlags, IoctlFlags, RegisterMode, Uffd, UffdBuilder};

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
    /// A data queue pair of the handler's own: faults READ straight into the page the
    /// kernel then copies in (one copy), instead of through the client's bounce buffer.
    channel: Option<crate::client::Channel>,
}

impl Backing {
    pub fn new(client: Arc<Client>, slabs: Vec<SlabGrant>) -> Backing {
        let slab_size = client.slab_size();
        Backing {
            client,
            slabs,
            slab_size,
            channel: None,
        }
    }

    /// Gives the fault handler a channel of its own (see [`Backing`]); without one, faults
    /// read through the client's lanes.
    pub async fn with_channel(mut self) -> Result<Backing, crate::client::ClientError> {
        self.channel = Some(self.client.open_channel().await?);
        Ok(self)
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
pub(crate) struct Counters {
    pub(crate) faults: AtomicU64,
    pub(crate) wp_faults: AtomicU64,
    pub(crate) fetched: AtomicU64,
    pub(crate) zero_fills: AtomicU64,
    pub(crate) writebacks: AtomicU64,
    pub(crate) clean_drops: AtomicU64,
    pub(crate) prefetched: AtomicU64,
    pub(crate) prefetch_hits: AtomicU64,
    pub(crate) resident: AtomicU64,
    pub(crate) remote_errors: AtomicU64,
    pub(crate) poisoned: AtomicU64,
    pub(crate) writeback_failures: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
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
        let backing = match Backing::new(client.clone(), slabs).with_channel().await {
            Ok(b) => b,
            Err(e) => {
                let _ = client.free(&ids).await;
                return Err(e.into());
            }
        };
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
        let handler = Handler::new(
            uffd.clone(),
            base as usize,
            pages,
            &cfg,
            backing,
            counters.clone(),
            poison,
        );
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
