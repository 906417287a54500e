//! A donor's side of the registry: register, then heartbeat until told to stop.
//!
//! Runs on its own thread (the client is blocking). A heartbeat goes out every quarter lease, so
//! three may be lost before the lease lapses; when the service answers that it no longer knows
//! the donor (its lease lapsed, or the service restarted with an in-process registry) the donor
//! registers again with sequence numbers starting over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::client::{ClientError, PlaceClient};
use crate::registry::{DonorReport, Heartbeat};

/// What a donor reports of itself each time: (free slabs, lendable slabs).
pub type Figures = Box<dyn Fn() -> (u32, u32) + Send>;

/// Handle on a running heartbeat thread; dropping it stops the thread.
pub struct Heartbeats {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts registering `report` and heartbeating with `figures` every `lease / 4`.
pub fn start(
    client: PlaceClient,
    report: DonorReport,
    lease: Duration,
    figures: Figures,
) -> Heartbeats {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name("rmem-heartbeat".into())
        .spawn(move || run(&client, report, lease, &figures, &s))
        .expect("spawning a thread");
    Heartbeats {
        stop,
        thread: Some(thread),
    }
}

/// Sleeps `d` in short steps so a stop is noticed within 100 ms.
fn nap(d: Duration, stop: &AtomicBool) {
    let step = Duration::from_millis(100);
    let mut left = d;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) {
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}

fn run(
    c: &PlaceClient,
    mut report: DonorReport,
    lease: Duration,
    figures: &Figures,
    stop: &AtomicBool,
) {
    let every = lease / 4;
    let mut seq: Option<u64> = None;
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        let (free, total) = figures();
        match seq {
            None => {
                report.free_slabs = free;
                report.total_slabs = total;
                match c.register(report.clone(), lease) {
                    Ok(()) => {
                        tracing::info!(url = c.url(), id = %report.id, "registered with placement");
                        seq = Some(0);
                        warned = false;
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(url = c.url(), error = %e, "cannot register with placement; retrying");
                            warned = true;
                        }
                        nap(every.min(Duration::from_secs(5)), stop);
                        continue;
                    }
                }
            }
            Some(n) => {
                let hb = Heartbeat {
                    id: report.id.clone(),
                    seq: n + 1,
                    free_slabs: free,
                    total_slabs: total,
                    traffic: Vec::new(),
                };
                match c.heartbeat(&hb) {
                    Ok(()) => {
                        seq = Some(n + 1);
                        warned = false;
                    }
                    Err(ClientError::Refused { code, .. })
                        if code == "unknown_donor"
                            || code == "lease_expired"
                            || code == "sequence_back" =>
                    {
                        tracing::info!(
                            code,
                            "placement no longer knows this donor; registering again"
                        );
                        seq = None;
                        continue;
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(url = c.url(), error = %e, "heartbeat failed; retrying");
                            warned = true;
                        }
                    }
                }
            }
        }
        nap(every, stop);
    }
}
