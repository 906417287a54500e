//! What every block front end hands the daemon: the device it created and the one way to stop
//! it. `kernel_ublk::start` and `kernel_nbd::start` both return a [`Device`], so the daemon
//! attaches, serves and detaches without knowing which driver runs underneath.

use std::path::PathBuf;

/// A running block device served from a store.
pub struct Device {
    /// The device node (`/dev/ublkbN`, `/dev/nbdN`).
    pub path: PathBuf,
    /// The driver: `"ublk"` or `"nbd"` (in status and metrics).
    pub kind: &'static str,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Device {
    pub(crate) fn new(
        path: PathBuf,
        kind: &'static str,
        stop: impl FnOnce() + Send + 'static,
    ) -> Device {
        Device {
            path,
            kind,
            stop: Some(Box::new(stop)),
        }
    }

    /// Removes the device (the kernel fails what is still queued) and waits for its threads.
    /// Swap on it must be off first.
    pub fn stop(mut self) {
        if let Some(f) = self.stop.take() {
            f();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(f) = self.stop.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_device_is_stopped_exactly_once_whether_stopped_or_dropped() {
        let n = Arc::new(AtomicUsize::new(0));
        let counted = |n: &Arc<AtomicUsize>| {
            let n = n.clone();
            move || {
                n.fetch_add(1, Ordering::SeqCst);
            }
        };
        Device::new("/dev/x".into(), "nbd", counted(&n)).stop();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        drop(Device::new("/dev/y".into(), "ublk", counted(&n)));
        assert_eq!(n.load(Ordering::SeqCst), 2);
        // A device whose swap area could not be turned off is leaked on purpose: never stopped.
        std::mem::forget(Device::new("/dev/z".into(), "nbd", counted(&n)));
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }
}
