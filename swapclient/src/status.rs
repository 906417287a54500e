//! What a running swap device reports: I/O counters, its front end and the store's replicas
//! (`rmem swap status`, and the metrics endpoint renders the same).

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::blockio::IoCounters;
use crate::store::{Store, StoreStatus};

/// What `status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    pub device: String,
    /// "ublk" or "nbd".
    pub backend: &'static str,
    pub pid: u32,
    pub swapon: bool,
    pub reads: u64,
    pub writes: u64,
    /// Bytes paged in from the device (swap-in).
    pub bytes_in: u64,
    /// Bytes paged out to the device (swap-out).
    pub bytes_out: u64,
    pub io_errors: u64,
    /// The most requests in flight at once since start.
    pub peak_in_flight: u64,
    pub store: StoreStatus,
}

pub(crate) fn status(
    store: &Store,
    device: &str,
    backend: &'static str,
    swapon: bool,
    io: &IoCounters,
) -> DeviceStatus {
    DeviceStatus {
        device: device.to_string(),
        backend,
        pid: std::process::id(),
        swapon,
        reads: io.reads.load(Ordering::Relaxed),
        writes: io.writes.load(Ordering::Relaxed),
        bytes_in: io.bytes_read.load(Ordering::Relaxed),
        bytes_out: io.bytes_written.load(Ordering::Relaxed),
        io_errors: io.errors.load(Ordering::Relaxed),
        peak_in_flight: io.peak_in_flight.load(Ordering::Relaxed),
        store: store.status(),
    }
}
