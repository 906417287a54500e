//! The kernel's ublk driver: `/dev/ublkbN` served from a [`Store`] by io_uring queue threads
//! (libublk). Needs `ublk_drv` (Linux 6.4 or newer in practice: libublk sends the
//! ioctl-encoded commands). Preferred to NBD where it exists: requests arrive on a shared ring
//! instead of a socket, with one queue thread per CPU instead of one socket reader.
//!
//! The device lives on a control thread that runs libublk's target loop; [`Started::stop`]
//! stops it (`kill_dev`, the deadlock-free way), waits for the queue threads and deletes it.
//!
//! Each queue thread serves its requests through a [`StoreChannel`](crate::store::StoreChannel)
//! opened on the tokio runtime it is given (the daemon's): all of a queue's requests are in
//! flight to the donors at once (`ublk_channel`). Without a runtime, or when a channel cannot
//! be opened (said in a warning), a queue serves one request at a time with the store's
//! blocking operations.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::sys;
use libublk::{BufDesc, UblkFlags, UblkIORes};

use rmem_transport::{Buffer, HugePages};

use crate::blockio::IoCounters;
use crate::front::Device;
use crate::store::Store;
use crate::ublk_channel;
use crate::ublk_serve::serve_request;

/// The driver's control node; present once `ublk_drv` is loaded.
pub const CONTROL: &str = "/dev/ublk-control";

/// Largest request (bytes); each tag gets a buffer of this size, allocated once and locked
/// with the rest of the daemon, so queues x depth x this stays small (8 MiB on 2 CPUs).
pub const MAX_REQUEST: u32 = 256 << 10;

/// Whether this kernel can give us a ublk device.
pub fn available() -> bool {
    Path::new(CONTROL).exists()
}

/// ublk failures.
#[derive(Debug, thiserror::Error)]
pub enum UblkFailure {
    #[error("ublk is not available ({CONTROL} missing: `modprobe ublk_drv`, Linux 6.4 or newer)")]
    Unavailable,
    #[error("ublk {what}: {detail}")]
    Driver { what: &'static str, detail: String },
    #[error("the ublk device did not start within {0:?}")]
    StartTimeout(Duration),
}

fn driver(what: &'static str) -> impl FnOnce(libublk::UblkError) -> UblkFailure {
    move |e| UblkFailure::Driver {
        what,
        detail: format!("{e} ({e:?})"),
    }
}

/// How the device is laid out.
#[derive(Debug, Clone, Copy)]
pub struct UblkConfig {
    /// Hardware queues, each served by its own thread.
    pub queues: u16,
    /// Requests in flight per queue: all of them at the donors at once when the queue serves
    /// through a store channel (each tag has a `MAX_REQUEST` slot of registered memory),
    /// otherwise one at a time with the rest waiting.
    pub depth: u16,
}

impl Default for UblkConfig {
    fn default() -> UblkConfig {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        UblkConfig {
            queues: cpus.clamp(1, 4) as u16,
            depth: 16,
        }
    }
}

/// A running device; [`start`] wraps it in a [`Device`] whose stop is [`Started::stop`].
struct Started {
    ctrl: Arc<UblkCtrl>,
    thread: Option<JoinHandle<()>>,
}

enum Event {
    Built(Arc<UblkCtrl>),
    Running(u32, String),
    Failed(UblkFailure),
}

/// libublk keeps one control ring per thread; a thread that sends a control command must have
/// one.
fn ensure_ctrl_ring() -> Result<(), UblkFailure> {
    libublk::ctrl::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(16)
                    .map_err(libublk::UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(driver("control ring"))
}

/// Creates and starts `/dev/ublkbN` of `store.size()` bytes, its queues served through store
/// channels opened on `runtime` (one request at a time per queue without one); `on_exit` runs
/// when the device has gone (stopped here or deleted from outside).
pub fn start(
    store: Arc<Store>,
    io: Arc<IoCounters>,
    cfg: UblkConfig,
    runtime: Option<tokio::runtime::Handle>,
    on_exit: impl FnOnce() + Send + 'static,
) -> Result<Device, UblkFailure> {
    if !available() {
        return Err(UblkFailure::Unavailable);
    }
    // This thread may end up with the last handle on the device, whose drop deletes it.
    ensure_ctrl_ring()?;
    let size = store.size();
    let (tx, rx) = mpsc::channel::<Event>();
    let thread = std::thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || {
            control_thread(store, io, runtime, cfg, size, tx);
            on_exit();
        })
        .map_err(|e| UblkFailure::Driver {
            what: "thread",
            detail: e.to_string(),
        })?;
    let wait = Duration::from_secs(30);
    let mut ctrl = None;
    loop {
        match rx.recv_timeout(wait) {
            Ok(Event::Built(c)) => ctrl = Some(c),
            Ok(Event::Running(id, path)) => {
                let ctrl = ctrl.ok_or(UblkFailure::StartTimeout(wait))?;
                let started = Started {
                    ctrl,
                    thread: Some(thread),
                };
                tracing::info!(device = %path, id, "ublk device started");
                return Ok(Device::new(PathBuf::from(path), "ublk", move || {
                    started.stop()
                }));
            }
            Ok(Event::Failed(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                // The thread either died without a word or is stuck in the driver.
                if let Some(c) = ctrl {
                    let _ = ensure_ctrl_ring().map(|()| c.kill_dev());
                }
                return Err(UblkFailure::StartTimeout(wait));
            }
        }
    }
}

fn control_thread(
    store: Arc<Store>,
    io: Arc<IoCounters>,
    runtime: Option<tokio::runtime::Handle>,
    cfg: UblkConfig,
    size: u64,
    tx: mpsc::Sender<Event>,
) {
    let ctrl = UblkCtrlBuilder::default()
        .name("rmem-swap")
        .id(-1)
        .nr_queues(cfg.queues)
        .depth(cfg.depth)
        .io_buf_bytes(MAX_REQUEST)
        .ctrl_flags(0)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(driver("add device"));
    let ctrl = match ctrl {
        Ok(c) => Arc::new(c),
        Err(e) => {
            let _ = tx.send(Event::Failed(e));
            return;
        }
    };
    let _ = tx.send(Event::Built(ctrl.clone()));
    let running = tx.clone();
    let r = ctrl.run_target(
        move |dev: &mut UblkDev| {
            dev.set_default_params(size);
            let p = &mut dev.tgt.params;
            // Swap discards freed slots; we zero them so a reused slot never shows old data.
            p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard = sys::ublk_param_discard {
                discard_granularity: 4096,
                max_discard_sectors: MAX_REQUEST >> 9,
                max_write_zeroes_sectors: MAX_REQUEST >> 9,
                max_discard_segments: 1,
                ..Default::default()
            };
            Ok(())
        },
        move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &store, &io, runtime.as_ref()),
        move |c: &UblkCtrl| {
            let _ = running.send(Event::Running(c.dev_info().dev_id, c.get_bdev_path()));
        },
    );
    match r {
        Ok(_) => {
            // The queues are down; nothing is in flight, so deleting cannot deadlock.
            if let Err(e) = ctrl.del_dev() {
                tracing::warn!(error = %e, "ublk: deleting the device failed");
            }
        }
        Err(e) => {
            let _ = tx.send(Event::Failed(driver("start device")(e)));
        }
    }
}

/// One queue thread: buffers allocated once per tag; requests served through a store channel
/// when one opens, otherwise one at a time in place.
fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    store: &Store,
    io: &IoCounters,
    runtime: Option<&tokio::runtime::Handle>,
) {
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    let depth = bufs.len();
    let channel = runtime.and_then(|rt| {
        let buf = Buffer::alloc(depth * MAX_REQUEST as usize, HugePages::Never)
            .map_err(|e| tracing::warn!(qid, error = %e, "ublk: no channel buffer"))
            .ok()?;
        rt.block_on(store.open_channel(buf, depth))
            .map_err(|e| {
                tracing::warn!(qid, error = %e, "ublk: no store channel: serving one at a time")
            })
            .ok()
    });
    let mut scratch = vec![0u8; MAX_REQUEST as usize];
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(qid, error = %e, "ublk: queue set-up failed");
            return;
        }
    };
    let queue = match queue.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(qid, error = %e, "ublk: fetching requests failed");
            return;
        }
    };
    if let Some(ch) = channel {
        tracing::info!(qid, depth, "ublk queue served through a store channel");
        ublk_channel::serve(&queue, &bufs, ch, store, io, MAX_REQUEST as usize);
        return;
    }
    if runtime.is_none() {
        tracing::info!(qid, "ublk queue served one request at a time (no runtime)");
    }
    let b = bufs.clone();
    queue.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _: &UblkIOCtx| {
        let Some(iobuf) = b.get(tag as usize) else {
            return;
        };
        // SAFETY: between the kernel handing us request `tag` and our commit of it, the
        // driver does not touch this tag's buffer, and only this thread serves the tag.
        let buf = unsafe { std::slice::from_raw_parts_mut(iobuf.as_mut_ptr(), iobuf.len()) };
        let res = serve_request(store, io, q.get_iod(tag), buf, &mut scratch);
        if let Err(e) = q.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(iobuf.as_slice()),
            Ok(UblkIORes::Result(res)),
        ) {
            tracing::error!(qid, tag, error = %e, "ublk: completing a request failed");
        }
    });
}

impl Started {
    /// Stops the device (the kernel fails what is still queued), waits for its threads and
    /// deletes it. Swap must be off first.
    fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        match ensure_ctrl_ring() {
            Ok(()) => {
                if let Err(e) = self.ctrl.kill_dev() {
                    tracing::warn!(error = %e, "ublk: stopping the device failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "ublk: cannot stop the device"),
        }
        let _ = t.join();
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.shutdown();
    }
}
