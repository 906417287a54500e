//! The kernel's NBD client on local sockets: `/dev/nbdN` is handed one end of a socket pair
//! per connection (ioctl interface, no handshake), and each other end is answered from a
//! [`Store`]. Works on any kernel with the nbd module; no nbd-client binary needed.
//!
//! With several connections (one per CPU, up to 4) the kernel gives each its own hardware
//! queue, and each connection has its own serving threads and store channel, as ublk has a
//! thread and a channel per queue.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rmem_transport::{Buffer, HugePages};
use rmem_wire::nbd::{TF_CAN_MULTI_CONN, TF_HAS_FLAGS, TF_SEND_FLUSH, TF_SEND_TRIM};

use crate::blockio::IoCounters;
use crate::front::Device;
use crate::nbd_channel;
use crate::nbd_serve::{serve, StoreOps};
use crate::store::Store;

// <linux/nbd.h>: _IO(0xab, n).
const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_CLEAR_QUE: libc::c_ulong = 0xab05;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

/// Largest request we let the kernel send (`max_sectors_kb`); buffers are sized for it.
pub const MAX_REQUEST: usize = 256 << 10;
/// Most requests the kernel may hand over at once (`nr_requests`, shared out between the
/// connections). Its timeout runs from the
/// hand-over, so a request can wait behind QUEUE_DEPTH x MAX_REQUEST bytes, and the pages of
/// every queued write stay in writeback until it completes: at the driver's default (128 x
/// 1 MiB) the two-VM test had about 100 MiB of a 329 MiB guest in writeback when its swap
/// stalled, close to a minute's work at the 2 MiB/s of its replicated phase. 8 MiB bounds both.
/// Served through a store channel, all of them are in flight at once (a slot of the channel's
/// registered buffer each).
pub const QUEUE_DEPTH: usize = 32;
/// Without a channel (no runtime to open one on, or the donors refused another queue pair):
/// requests carried out at once by blocking workers, each with a [`MAX_REQUEST`] buffer.
pub const WORKERS: usize = 8;
/// Most connections per device.
pub const MAX_CONNECTIONS: usize = 4;

/// Connections for a device: one per CPU, at most [`MAX_CONNECTIONS`].
pub fn connections() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, MAX_CONNECTIONS))
}

/// NBD device failures.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("no free /dev/nbdN (is the nbd module loaded? `modprobe nbd`)")]
    NoDevice,
    #[error("{path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} on {path}")]
    Ioctl {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket pair")]
    Socket(#[source] std::io::Error),
    #[error("starting a thread")]
    Thread(#[source] std::io::Error),
}

/// Attaches `path` (or the first free `/dev/nbdN`) as a device of `store.size()` bytes over
/// [`connections()`] connections and serves it: each connection's requests are answered by
/// threads of its own, through a store channel opened on `runtime` (blocking workers without
/// one); one thread sits in the kernel until the device is disconnected, then runs `on_exit`.
pub fn start(
    path: Option<&Path>,
    store: Arc<Store>,
    io: Arc<IoCounters>,
    timeout_secs: u64,
    runtime: Option<tokio::runtime::Handle>,
    on_exit: impl FnOnce() + Send + 'static,
) -> Result<Device, NbdError> {
    let dev = match path {
        Some(d) => d.to_path_buf(),
        None => free_device()?,
    };
    let n = connections();
    let (attached, socks) = attach(&dev, store.size(), timeout_secs, n)?;
    // The requests the kernel may hand over at once are shared out, so the bound on what is
    // queued (see QUEUE_DEPTH) holds whatever the number of connections.
    let depth = (QUEUE_DEPTH / socks.len()).max(4);
    if let Some(name) = dev.file_name() {
        // Before the device runs too, so no request larger than a slot is ever sent.
        let knob = format!("/sys/block/{}/queue/max_sectors_kb", name.to_string_lossy());
        let _ = std::fs::write(knob, (MAX_REQUEST / 1024).to_string());
    }
    let mut servers = Vec::with_capacity(socks.len());
    for (k, sock) in socks.into_iter().enumerate() {
        let (store, io, runtime) = (store.clone(), io.clone(), runtime.clone());
        let server = std::thread::Builder::new()
            .name(format!("nbd-serve-{k}"))
            .spawn(move || serve_connection(k, sock, &store, &io, runtime, depth))
            .map_err(NbdError::Thread)?;
        servers.push(server);
    }
    let kernel = std::thread::Builder::new()
        .name("nbd-kernel".into())
        .spawn(move || {
            let r = attached.run();
            on_exit();
            r
        })
        .map_err(NbdError::Thread)?;
    if let Some(name) = dev.file_name() {
        limit_queue(&name.to_string_lossy(), depth);
    }
    tracing::info!(device = %dev.display(), connections = n, depth, "NBD device attached");
    let path = dev.clone();
    Ok(Device::new(dev, "nbd", move || {
        let _ = disconnect(&path);
        if let Ok(Err(e)) = kernel.join() {
            tracing::warn!(error = %e, "NBD device ended with an error");
        }
        for s in servers {
            let _ = s.join();
        }
    }))
}

/// Requests no larger than our buffers (larger ones are refused, not lost), and few enough at
/// once that none waits near the kernel's timeout (see QUEUE_DEPTH): `depth` per connection.
/// Set once the device runs: starting it gives each connection a hardware queue of the
/// driver's default depth.
fn limit_queue(name: &str, depth: usize) {
    let sys = format!("/sys/block/{name}");
    for _ in 0..200 {
        if Path::new(&format!("{sys}/pid")).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    for (knob, value) in [
        ("max_sectors_kb", MAX_REQUEST / 1024),
        ("nr_requests", depth),
    ] {
        if let Err(e) = std::fs::write(format!("{sys}/queue/{knob}"), value.to_string()) {
            tracing::warn!(knob, value, error = %e, "could not limit the NBD queue");
        }
    }
}

/// Serves connection `k` until the kernel drops it: through a store channel of `depth` slots
/// when one opens, with blocking workers otherwise.
fn serve_connection(
    k: usize,
    sock: UnixStream,
    store: &Store,
    io: &IoCounters,
    runtime: Option<tokio::runtime::Handle>,
    depth: usize,
) {
    let channel = runtime.and_then(|rt| {
        let buf = Buffer::alloc(depth * MAX_REQUEST, HugePages::Never).ok()?;
        rt.block_on(store.open_channel(buf, depth))
            .map_err(|e| {
                tracing::warn!(connection = k, error = %e, "no store channel: serving with blocking workers")
            })
            .ok()
    });
    let r = match channel {
        Some(ch) => {
            tracing::info!(
                connection = k,
                depth,
                "NBD connection served through a store channel"
            );
            nbd_channel::serve(sock, ch, store, io, depth, MAX_REQUEST)
        }
        None => serve(sock, &StoreOps { store, io }, WORKERS, MAX_REQUEST),
    };
    if let Err(e) = r {
        tracing::error!(connection = k, error = %e, "NBD socket failed");
    }
}

/// The first `/dev/nbdN` with no connection.
pub fn free_device() -> Result<PathBuf, NbdError> {
    for n in 0..256 {
        let dev = PathBuf::from(format!("/dev/nbd{n}"));
        if !dev.exists() {
            break;
        }
        // A connected device has a pid file and a size.
        let sys = format!("/sys/block/nbd{n}");
        if Path::new(&format!("{sys}/pid")).exists() {
            continue;
        }
        let size = std::fs::read_to_string(format!("{sys}/size")).unwrap_or_default();
        if size.trim() == "0" || size.is_empty() {
            return Ok(dev);
        }
    }
    Err(NbdError::NoDevice)
}

fn ioctl(
    f: &File,
    path: &Path,
    what: &'static str,
    req: libc::c_ulong,
    arg: libc::c_ulong,
) -> Result<(), NbdError> {
    // SAFETY: nbd ioctls take an integer argument (or none); `f` is an open nbd device.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, arg) };
    if r < 0 {
        return Err(NbdError::Ioctl {
            what,
            path: path.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A configured device: [`Attached::run`] blocks in the kernel until [`disconnect`].
pub struct Attached {
    path: PathBuf,
    dev: File,
}

/// Configures `path` for a `size`-byte device and gives it one end of each of `connections`
/// socket pairs (at least one); returns the device and the ends to serve on.
pub fn attach(
    path: &Path,
    size: u64,
    timeout_secs: u64,
    connections: usize,
) -> Result<(Attached, Vec<UnixStream>), NbdError> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| NbdError::Open {
            path: path.into(),
            source,
        })?;
    ioctl(&dev, path, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0)?;
    ioctl(&dev, path, "NBD_SET_BLKSIZE", NBD_SET_BLKSIZE, 4096)?;
    ioctl(
        &dev,
        path,
        "NBD_SET_SIZE_BLOCKS",
        NBD_SET_SIZE_BLOCKS,
        (size / 4096) as libc::c_ulong,
    )?;
    ioctl(
        &dev,
        path,
        "NBD_SET_TIMEOUT",
        NBD_SET_TIMEOUT,
        timeout_secs as libc::c_ulong,
    )?;
    let connections = connections.clamp(1, MAX_CONNECTIONS);
    // The kernel refuses a second connection unless the server says it can take them: every
    // connection sees the same store, and a write is complete before its reply.
    let multi = if connections > 1 {
        TF_CAN_MULTI_CONN
    } else {
        0
    };
    ioctl(
        &dev,
        path,
        "NBD_SET_FLAGS",
        NBD_SET_FLAGS,
        (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_TRIM | multi) as libc::c_ulong,
    )?;
    let mut ours = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (mine, theirs) = UnixStream::pair().map_err(NbdError::Socket)?;
        let theirs: OwnedFd = theirs.into();
        ioctl(
            &dev,
            path,
            "NBD_SET_SOCK",
            NBD_SET_SOCK,
            theirs.as_raw_fd() as libc::c_ulong,
        )?;
        // The kernel holds its own reference to the socket now.
        drop(theirs);
        ours.push(mine);
    }
    Ok((
        Attached {
            path: path.into(),
            dev,
        },
        ours,
    ))
}

impl Attached {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves the block device until it is disconnected (the kernel returns from NBD_DO_IT).
    pub fn run(&self) -> Result<(), NbdError> {
        let r = ioctl(&self.dev, &self.path, "NBD_DO_IT", NBD_DO_IT, 0);
        let _ = ioctl(&self.dev, &self.path, "NBD_CLEAR_QUE", NBD_CLEAR_QUE, 0);
        let _ = ioctl(&self.dev, &self.path, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
        r
    }
}

/// Asks the kernel to drop the device's connection (NBD_DO_IT then returns).
pub fn disconnect(path: &Path) -> Result<(), NbdError> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| NbdError::Open {
            path: path.into(),
            source,
        })?;
    ioctl(&dev, path, "NBD_DISCONNECT", NBD_DISCONNECT, 0)
}
