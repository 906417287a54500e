//! What one block request does to a [`Store`], for every kernel front end (NBD, ublk): the
//! store call, the counters, the log line and the errno the kernel sees. Nothing here
//! allocates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError};

/// Bytes moved through a device.
#[derive(Default)]
pub struct IoCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    /// The most requests ever in flight at once: the queue depth the kernel really drove.
    pub peak_in_flight: AtomicU64,
    /// Blocking requests being served now (workers of the blocking front ends).
    in_flight: AtomicU64,
}

impl IoCounters {
    /// Raises the peak to `n` requests in flight if that is a new high.
    pub fn saw_in_flight(&self, n: u64) {
        self.peak_in_flight.fetch_max(n, Ordering::Relaxed);
    }
}

/// One blocking request counted in flight while this lives.
struct Serving<'a>(&'a IoCounters);

impl<'a> Serving<'a> {
    fn start(io: &'a IoCounters) -> Self {
        io.saw_in_flight(io.in_flight.fetch_add(1, Ordering::Relaxed) + 1);
        Serving(io)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Logs and counts a failed request; returns its errno (`out_of_range` past the end, else EIO).
fn failed(
    io: &IoCounters,
    what: &str,
    off: u64,
    len: usize,
    e: &StoreError,
    out_of_range: i32,
) -> i32 {
    tracing::error!(off, len, error = %e, "{what} failed");
    io.errors.fetch_add(1, Ordering::Relaxed);
    if matches!(e, StoreError::OutOfRange { .. }) {
        out_of_range
    } else {
        libc::EIO
    }
}

/// A read of `buf.len()` bytes at `off`; Err is a positive errno.
pub fn read(store: &Store, io: &IoCounters, off: u64, buf: &mut [u8]) -> Result<(), i32> {
    let r = {
        let _serving = Serving::start(io);
        store.read(off, buf)
    };
    account(io, false, off, buf.len(), r)
}

/// A write of `buf` at `off`; Err is a positive errno.
pub fn write(store: &Store, io: &IoCounters, off: u64, buf: &[u8]) -> Result<(), i32> {
    let r = {
        let _serving = Serving::start(io);
        store.write(off, buf)
    };
    account(io, true, off, buf.len(), r)
}

/// Counts a READ (`write` false) or WRITE of `len` bytes at `off` that ended with `r`, the
/// way [`read`] and [`write`] do; Err is a positive errno.
pub fn account(
    io: &IoCounters,
    write: bool,
    off: u64,
    len: usize,
    r: Result<(), StoreError>,
) -> Result<(), i32> {
    match (r, write) {
        (Ok(()), false) => {
            io.reads.fetch_add(1, Ordering::Relaxed);
            io.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
            Ok(())
        }
        (Ok(()), true) => {
            io.writes.fetch_add(1, Ordering::Relaxed);
            io.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
            Ok(())
        }
        (Err(e), false) => Err(failed(io, "read", off, len, &e, libc::EINVAL)),
        (Err(e), true) => Err(failed(io, "write", off, len, &e, libc::ENOSPC)),
    }
}

/// A discard or write-zeroes of `len` bytes at `off`; Err is a positive errno.
pub fn zero(
    store: &Store,
    io: &IoCounters,
    off: u64,
    len: u64,
    scratch: &mut [u8],
) -> Result<(), i32> {
    store
        .zero(off, len, scratch)
        .map_err(|e| failed(io, "trim", off, len as usize, &e, libc::ENOSPC))
}

/// A request answered after this long is logged: the kernel drops the whole device once one
/// waits past its timeout, and the log says what the daemon was doing on the way there.
pub(crate) const SLOW: Duration = Duration::from_secs(5);

/// Logs a request of `front` (ublk, NBD) that took [`SLOW`] or longer since `started`.
pub(crate) fn warn_if_slow(
    front: &'static str,
    write: bool,
    off: u64,
    len: usize,
    started: Instant,
) {
    let took = started.elapsed();
    if took >= SLOW {
        tracing::warn!(
            front,
            write,
            off,
            len,
            secs = took.as_secs_f64(),
            "slow request"
        );
    }
}
