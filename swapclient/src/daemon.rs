//! `rmem swap up`: the daemon behind one swap device. It borrows the slabs, creates the block
//! device (ublk where the kernel has it, else NBD on a local socket) and serves it, formats
//! and enables swap, repairs
//! replicas in the background, answers `status` and `down` on a Unix socket, and undoes it all
//! on `down`, SIGINT or SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::blockio::IoCounters;
use crate::front::Device;
use crate::kernel_nbd;
use crate::kernel_ublk::{self, UblkConfig};
use crate::reserve;
use crate::status::status;
use crate::store::{Store, StoreConfig};
use crate::swapfile;

/// Where daemons put their control sockets.
pub const RUN_DIR: &str = "/run/rmem";

/// Daemon failures.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(transparent)]
    Store(#[from] crate::StoreError),
    #[error(transparent)]
    Nbd(#[from] kernel_nbd::NbdError),
    #[error(transparent)]
    Ublk(#[from] kernel_ublk::UblkFailure),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SwapError {
    let what = what.into();
    move |source| SwapError::Io { what, source }
}

/// Which kernel block driver carries the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// ublk where `/dev/ublk-control` exists and works, else NBD.
    Auto,
    Ublk,
    Nbd,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "ublk" => Ok(Backend::Ublk),
            "nbd" => Ok(Backend::Nbd),
            _ => Err(format!("unknown backend {s:?} (auto, ublk or nbd)")),
        }
    }
}

/// `rmem swap up` options.
#[derive(Debug, Clone)]
pub struct SwapOptions {
    pub store: StoreConfig,
    pub backend: Backend,
    /// NBD: `/dev/nbdN`; the first free one when `None`.
    pub device: Option<PathBuf>,
    pub swapon: bool,
    pub priority: Option<u16>,
    pub mlock: bool,
    pub run_dir: PathBuf,
    /// Seconds the kernel waits for one request before failing it.
    pub nbd_timeout: u64,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics: Option<std::net::SocketAddr>,
    /// The kernel's free-memory reserve while the device is swap (see [`reserve`]).
    pub min_free: reserve::MinFree,
    /// Called every [`TRAFFIC_EVERY`] with the bytes written to and read from each donor since
    /// the last call, as (donor address, written, read): a placement service's link map.
    pub traffic: Option<TrafficReport>,
}

/// Receives per-donor traffic deltas; it runs on the blocking pool (it may do network I/O).
#[derive(Clone)]
pub struct TrafficReport(pub Arc<dyn Fn(Vec<DonorTraffic>) + Send + Sync>);

/// (donor address, bytes written to it, bytes read from it) since the last report.
pub type DonorTraffic = (String, u64, u64);

impl std::fmt::Debug for TrafficReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrafficReport")
    }
}

/// How often traffic is reported.
pub const TRAFFIC_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What `up` reports once the device is in use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    pub device: String,
    pub size: u64,
    pub swapon: bool,
    pub socket: String,
    pub pid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Request {
    Status,
    Down,
}

/// Runs the device until `down` or a signal; `ready` is called once swap is on.
pub fn run(opts: SwapOptions, ready: impl FnOnce(&Ready)) -> Result<(), SwapError> {
    if opts.mlock {
        swapfile::lock_memory().map_err(io_err(
            "mlockall (the daemon must not be swapped out; run as root or raise RLIMIT_MEMLOCK, or pass --no-mlock)",
        ))?;
    }
    // Before any thread is made, so every thread of the daemon inherits it.
    if let Err(e) = swapfile::mark_io_flusher() {
        tracing::warn!(error = %e, "PR_SET_IO_FLUSHER failed: under host-wide memory pressure \
            the daemon may wait on its own device");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io_err("tokio runtime"))?;
    // Before anything is borrowed.
    if opts.backend == Backend::Ublk && !kernel_ublk::available() {
        return Err(kernel_ublk::UblkFailure::Unavailable.into());
    }
    let store = rt.block_on(Store::create(&opts.store))?;
    if opts.swapon {
        swapfile::format(&store, "rmem-swap")?;
    }
    let io = Arc::new(IoCounters::default());
    let (front, kernel_done) = match attach(&opts, &store, &io, rt.handle()) {
        Ok(f) => f,
        Err(e) => {
            rt.block_on(store.release());
            return Err(e);
        }
    };
    let dev = front.path.clone();
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rmem".into());
    wait_for_size(&name, store.size());
    // Held until the swap area is gone (dropped last: the old value comes back after swapoff).
    let _reserve = if opts.swapon {
        raise_reserve(opts.min_free)
    } else {
        Vec::new()
    };

    let result = rt.block_on(serve_device(
        &opts,
        &store,
        &front,
        &name,
        &io,
        kernel_done,
        ready,
    ));
    // Tear down in order: swap off (pages come back in), device removed, slabs returned.
    let swapped = matches!(result, Ok(true));
    if swapped {
        tracing::info!(device = %dev.display(), "swapoff (paging everything back in)");
        if let Err(e) = swapfile::swapoff(&dev) {
            tracing::error!(error = %e, "swapoff failed; leaving the device attached");
            // The device must outlive the swap area the kernel still holds on it.
            std::mem::forget(front);
            return Err(SwapError::Io {
                what: format!("swapoff {}", dev.display()),
                source: e,
            });
        }
    }
    front.stop();
    rt.block_on(store.release());
    let _ = std::fs::remove_file(socket_path(&opts.run_dir, &name));
    result.map(|_| ())
}

/// Raises vm.min_free_kbytes for the device's life; a failure (no root, a read-only /proc/sys)
/// is a warning: swap still works while the host as a whole keeps some memory free. Watermark
/// boosting goes off with it (see [`reserve`]); `--min-free keep` leaves both.
fn raise_reserve(want: reserve::MinFree) -> Vec<reserve::Raised> {
    if want == reserve::MinFree::Keep {
        return Vec::new();
    }
    let mut held: Vec<reserve::Raised> = raise_min_free(want).into_iter().collect();
    match reserve::set(std::path::Path::new(reserve::BOOST_SYSCTL), 0) {
        Ok(Some(r)) => {
            tracing::info!(
                from = r.old_kib(),
                "vm.watermark_boost_factor 0 while swapping to rmem (a boost raises the minimum \
                 the daemon's own allocations wait at)"
            );
            held.push(r);
        }
        Ok(None) => {}
        // Kernels before 5.0 have no boosting.
        Err(e) => tracing::debug!(error = %e, "vm.watermark_boost_factor left as is"),
    }
    held
}

fn raise_min_free(want: reserve::MinFree) -> Option<reserve::Raised> {
    let r = reserve::mem_total_kib()
        .and_then(|total| reserve::raise(std::path::Path::new(reserve::SYSCTL), want, total));
    match r {
        Ok(Some(r)) => {
            tracing::info!(
                from_kib = r.old_kib(),
                to_kib = r.set_kib(),
                "raised vm.min_free_kbytes while swapping to rmem (--min-free keep leaves it)"
            );
            Some(r)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise vm.min_free_kbytes: if the whole host \
                runs out of memory, swapping to rmem may stall");
            None
        }
    }
}

type KernelDone = tokio::sync::oneshot::Receiver<()>;

/// Creates the block device on the chosen (or best available) driver.
/// Its I/O threads open their store channels on `rt`.
fn attach(
    opts: &SwapOptions,
    store: &Arc<Store>,
    io: &Arc<IoCounters>,
    rt: &tokio::runtime::Handle,
) -> Result<(Device, KernelDone), SwapError> {
    let ublk = match opts.backend {
        Backend::Ublk => true,
        Backend::Nbd => false,
        // An explicit NBD device means NBD.
        Backend::Auto => opts.device.is_none() && kernel_ublk::available(),
    };
    // Each front end tells the daemon when its device has gone (stopped, or removed outside).
    let notifier = || {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            move || {
                let _ = tx.send(());
            },
            rx,
        )
    };
    if ublk {
        let (on_exit, gone) = notifier();
        let cfg = UblkConfig::default();
        match kernel_ublk::start(store.clone(), io.clone(), cfg, Some(rt.clone()), on_exit) {
            Ok(d) => return Ok((d, gone)),
            Err(e) if opts.backend == Backend::Auto => {
                tracing::warn!(error = %e, "ublk failed; using NBD");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (on_exit, gone) = notifier();
    // NBD is served by blocking workers, not store channels (which ublk uses): on channels the
    // two-VM swap test keeps its donors over tcp, but its verbs phase (rxe in a one-vCPU guest,
    // over a link that drops datagrams) stalls 5-13 s at a time in some runs, about one to
    // three of the queue pair's retransmission waits, and read-ahead fetched nothing there
    // (docs/swap.md). Callers of kernel_nbd::start can still pass a runtime.
    let d = kernel_nbd::start(
        opts.device.as_deref(),
        store.clone(),
        io.clone(),
        opts.nbd_timeout,
        None,
        on_exit,
    )?;
    Ok((d, gone))
}

fn wait_for_size(name: &str, size: u64) {
    for _ in 0..200 {
        let s = std::fs::read_to_string(format!("/sys/block/{name}/size")).unwrap_or_default();
        if s.trim().parse::<u64>().unwrap_or(0) * 512 == size {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    tracing::warn!(
        device = name,
        "the kernel has not reported the device size yet"
    );
}

pub fn socket_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("swap-{name}.sock"))
}

/// Swap on, then serve control requests, repair replicas and watch donors until told to stop.
/// Returns whether swap was turned on.
async fn serve_device(
    opts: &SwapOptions,
    store: &Arc<Store>,
    front: &Device,
    name: &str,
    io: &Arc<IoCounters>,
    mut kernel_done: KernelDone,
    ready: impl FnOnce(&Ready),
) -> Result<bool, SwapError> {
    std::fs::create_dir_all(&opts.run_dir)
        .map_err(io_err(format!("{}", opts.run_dir.display())))?;
    let dev = &front.path;
    let sock_path = socket_path(&opts.run_dir, name);
    let _ = std::fs::remove_file(&sock_path);
    let listener = tokio::net::UnixListener::bind(&sock_path)
        .map_err(io_err(format!("control socket {}", sock_path.display())))?;
    let metrics = match opts.metrics {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io_err(format!("metrics listener {addr}")))?;
            let (store, io) = (store.clone(), io.clone());
            let (device, backend, swapon) = (dev.display().to_string(), front.kind, opts.swapon);
            let registry = Arc::new(crate::metrics::registry(move || {
                status(&store, &device, backend, swapon, &io)
            }));
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let text = crate::metrics::encode(&registry);
                    async move {
                        match text {
                            Ok(text) => ([("content-type", crate::metrics::CONTENT_TYPE)], text)
                                .into_response(),
                            Err(e) => {
                                tracing::error!(error = %e, "metrics scrape failed");
                                axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
                            }
                        }
                    }
                }),
            );
            tracing::info!(%addr, "metrics at /metrics");
            Some(tokio::spawn(async move {
                if let Err(e) = rmem_wire::http::serve(l, app).await {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            }))
        }
        None => None,
    };
    let reporter = opts.traffic.clone().map(|report| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut last: std::collections::HashMap<String, (u64, u64)> = Default::default();
            let mut tick = tokio::time::interval(TRAFFIC_EVERY);
            loop {
                tick.tick().await;
                let now: Vec<(String, u64, u64)> = store
                    .status()
                    .donors
                    .into_iter()
                    .map(|d| (d.addr, d.bytes_written, d.bytes_read))
                    .collect();
                let deltas = now
                    .iter()
                    .map(|(a, w, r)| {
                        let (lw, lr) = last.get(a).copied().unwrap_or((0, 0));
                        (a.clone(), w.saturating_sub(lw), r.saturating_sub(lr))
                    })
                    .collect();
                last = now.into_iter().map(|(a, w, r)| (a, (w, r))).collect();
                let report = report.0.clone();
                let _ = tokio::task::spawn_blocking(move || report(deltas)).await;
            }
        })
    });
    if opts.swapon {
        let (d, prio) = (dev.to_path_buf(), opts.priority);
        tokio::task::spawn_blocking(move || swapfile::swapon(&d, prio))
            .await
            .map_err(|e| SwapError::Io {
                what: "swapon".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(io_err(format!("swapon {}", dev.display())))?;
    }
    ready(&Ready {
        device: dev.display().to_string(),
        size: store.size(),
        swapon: opts.swapon,
        socket: sock_path.display().to_string(),
        pid: std::process::id(),
    });

    // Donor notices: reclaimed slabs are copied elsewhere, a closing donor is replaced.
    let wake = Arc::new(tokio::sync::Notify::new());
    for (i, mut rx) in store.notices() {
        let (store, wake) = (store.clone(), wake.clone());
        tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                match n {
                    crate::client::Notice::Reclaim { slabs, .. } => {
                        tracing::warn!(
                            donor = i,
                            slabs = slabs.len(),
                            "donor reclaims slabs; moving them"
                        );
                        store.mark_leaving(i, &slabs);
                    }
                    crate::client::Notice::Closing { reason, .. } => {
                        store.mark_failed(i, &reason);
                    }
                }
                wake.notify_one();
            }
        });
    }
    let repair = Repair::start(store, &wake)?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("signal"))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(io_err("signal"))?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = &mut kernel_done => {
                tracing::warn!(backend = front.kind, "the kernel dropped the device");
                repair.stop();
                if let Some(m) = &metrics {
                    m.abort();
                }
                if let Some(r) = &reporter {
                    r.abort();
                }
                return Ok(false);
            }
            c = listener.accept() => {
                let Ok((s, _)) = c else { continue };
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                let mut r = tokio::io::BufReader::new(r);
                if r.read_line(&mut line).await.is_err() {
                    continue;
                }
                match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Status) => {
                        let st = status(store, &dev.display().to_string(), front.kind, opts.swapon, io);
                        let mut j = serde_json::to_vec(&st).unwrap_or_default();
                        j.push(b'\n');
                        let _ = w.write_all(&j).await;
                    }
                    Ok(Request::Down) => {
                        // The answer comes when the device is gone: the peer waits on the socket.
                        tokio::spawn(async move {
                            let _w = w;
                            std::future::pending::<()>().await;
                        });
                        break;
                    }
                    Err(e) => {
                        let _ = w.write_all(format!("{{\"error\":{:?}}}\n", e.to_string()).as_bytes()).await;
                    }
                }
            }
        }
    }
    repair.stop();
    if let Some(m) = &metrics {
        m.abort();
    }
    if let Some(r) = &reporter {
        r.abort();
    }
    Ok(opts.swapon)
}

/// The rebuild loop, on a thread started with the device: a rebuild runs when a donor died,
/// maybe while the host is short of memory, so it must not need a new thread then; its copies
/// block this thread, not a runtime worker.
struct Repair {
    stop: Arc<std::sync::atomic::AtomicBool>,
    store: Arc<Store>,
    wake: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Repair {
    fn start(store: &Arc<Store>, wake: &Arc<tokio::sync::Notify>) -> Result<Repair, SwapError> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rt = tokio::runtime::Handle::current();
        let (st, w, s) = (store.clone(), wake.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("rmem-repair".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    rt.block_on(async {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(500), w.notified()).await;
                    });
                    if s.load(Ordering::Acquire) {
                        break;
                    }
                    let short = rt.block_on(st.repair());
                    if short > 0 && rt.block_on(st.revive()) {
                        w.notify_one();
                    }
                }
            })
            .map_err(io_err("repair thread"))?;
        Ok(Repair {
            stop,
            store: store.clone(),
            wake: wake.clone(),
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for it: at most the chunk being copied (each of its operations
    /// bounded by the operation timeout), so the runtime outlives every call the loop makes.
    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.store.stop_repairs();
        self.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The control sockets of running daemons.
pub fn sockets(run_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("swap-") && n.ends_with(".sock"))
        })
        .collect();
    v.sort();
    v
}

/// Asks a daemon for its status.
pub fn query_status(sock: &Path) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"{\"cmd\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

/// Tells a daemon to take its device down and waits until it has (swapoff can take minutes
/// when much is swapped out).
pub fn request_down(sock: &Path, wait: Duration) -> std::io::Result<()> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(wait))?;
    s.write_all(b"{\"cmd\":\"down\"}\n")?;
    let mut line = String::new();
    // The daemon closes the socket when it exits.
    match BufReader::new(s).read_line(&mut line) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the daemon is still taking the device down",
        )),
        Err(e) => Err(e),
    }
}
