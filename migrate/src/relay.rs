//! QEMU's migration connections carried through a [`Pipe`]: on the source, rmem listens on a
//! unix socket that QEMU's `migrate` connects to; on the destination, it connects to the socket
//! of QEMU's `migrate-incoming`. Each connection (the main stream, each multifd channel) is one
//! pipe stream, both directions (QEMU's return path included).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::pipe::{Pipe, PipeError, Stream, PAYLOAD};

/// Send buffer asked for on the destination's QEMU socket.
const SOCKET_BUFFER: usize = 4 << 20;

/// How often blocked relay threads look at whether the relay is closing.
const TICK: Duration = Duration::from_millis(100);

/// A running relay: its threads and the bytes it carried.
pub struct Relay {
    closing: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    /// A stream to the other agent failed: whatever QEMU reports next follows from that.
    lost: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    socket: Option<PathBuf>,
    /// Wakes the source's accepting thread when the relay closes.
    wake: Option<Arc<Wake>>,
}

impl Relay {
    /// Source side: listens on `socket` and carries each connection QEMU makes into a new stream.
    /// The socket is its `owner`'s (QEMU's user and group, when QEMU runs as another user than
    /// rmem, as under libvirt) and nobody else's: whoever connects feeds the destination QEMU.
    pub fn source(
        pipe: Arc<Pipe>,
        socket: &Path,
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<Relay> {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = owner {
            // SAFETY: geteuid has no arguments and cannot fail.
            if uid != unsafe { libc::geteuid() } {
                std::os::unix::fs::chown(socket, Some(uid), Some(gid)).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "QEMU runs as uid {uid}: its migration socket must be that user's \
                             (run rmem as root or as that user): {e}"
                        ),
                    )
                })?;
            }
        }
        listener.set_nonblocking(true)?;
        let mut relay = Relay::new(Some(socket.to_path_buf()));
        let wake = Arc::new(Wake::new()?);
        relay.wake = Some(wake.clone());
        let (closing, bytes, lost) = (
            relay.closing.clone(),
            relay.bytes.clone(),
            relay.lost.clone(),
        );
        relay.threads.push(std::thread::spawn(move || {
            while !closing.load(Ordering::Acquire) {
                // QEMU connects while the guest is paused: accept at once, not on a timer.
                if !wake.wait_readable(listener.as_raw_fd(), TICK) {
                    continue;
                }
                match listener.accept() {
                    Ok((conn, _)) => match pipe.open_stream(true) {
                        Ok(stream) => pump(conn, stream, &closing, &bytes, &lost),
                        Err(e) => {
                            lost.store(true, Ordering::Release);
                            tracing::warn!(error = %e, "cannot open a relay stream");
                            return;
                        }
                    },
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "relay socket");
                        return;
                    }
                }
            }
        }));
        Ok(relay)
    }

    /// Destination side: connects each stream the source opens to QEMU's `socket`.
    pub fn destination(pipe: Arc<Pipe>, socket: PathBuf) -> Relay {
        let mut relay = Relay::new(None);
        let (closing, bytes, lost) = (
            relay.closing.clone(),
            relay.bytes.clone(),
            relay.lost.clone(),
        );
        relay.threads.push(std::thread::spawn(move || {
            while !closing.load(Ordering::Acquire) {
                match pipe.accept_stream(TICK) {
                    Ok(stream) => match UnixStream::connect(&socket) {
                        Ok(conn) => {
                            // Room for all of a device state at once (a few hundred KB): QEMU
                            // then loads it in one go instead of waking for each piece while
                            // the guest is paused. The kernel caps it at wmem_max.
                            if let Err(e) =
                                socket2::SockRef::from(&conn).set_send_buffer_size(SOCKET_BUFFER)
                            {
                                tracing::debug!(error = %e, "relay: socket buffer size");
                            }
                            pump(conn, stream, &closing, &bytes, &lost)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, socket = %socket.display(),
                                "cannot reach QEMU's incoming socket");
                            let _ = stream.finish();
                        }
                    },
                    Err(PipeError::Timeout(_)) => {}
                    Err(_) => return,
                }
            }
        }));
        relay
    }

    fn new(socket: Option<PathBuf>) -> Relay {
        Relay {
            closing: Arc::new(AtomicBool::new(false)),
            bytes: Arc::new(AtomicU64::new(0)),
            lost: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            socket,
            wake: None,
        }
    }

    /// Bytes carried so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// True once carrying a stream to the other agent failed (it is gone, or the pipe is).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Stops relaying; open connections are closed.
    pub fn close(mut self) -> u64 {
        self.stop();
        self.bytes()
    }

    fn stop(&mut self) {
        self.closing.store(true, Ordering::Release);
        if let Some(w) = &self.wake {
            w.wake();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(s) = self.socket.take() {
            let _ = std::fs::remove_file(s);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An eventfd that ends a wait on another descriptor early.
struct Wake(OwnedFd);

impl Wake {
    fn new() -> std::io::Result<Wake> {
        // SAFETY: eventfd takes no pointers; the descriptor it returns is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        Ok(Wake(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live stack array to our own eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// True when `fd` is readable within `timeout`; false on a timeout or a wake.
    fn wait_readable(&self, fd: RawFd, timeout: Duration) -> bool {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfd structs in a live array, its length passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as libc::c_int) };
        n > 0 && fds[0].revents != 0 && fds[1].revents == 0
    }
}

/// Carries one connection both ways until both directions end (or the relay closes).
fn pump(
    conn: UnixStream,
    stream: Stream,
    closing: &Arc<AtomicBool>,
    bytes: &Arc<AtomicU64>,
    lost: &Arc<AtomicBool>,
) {
    let stream = Arc::new(stream);
    let (Ok(mut up), Ok(mut down)) = (conn.try_clone(), conn.try_clone()) else {
        return;
    };
    let _ = up.set_read_timeout(Some(TICK));
    let (c1, b1, s1, l1) = (closing.clone(), bytes.clone(), stream.clone(), lost.clone());
    // QEMU to the peer.
    std::thread::spawn(move || {
        let mut buf = vec![0u8; PAYLOAD];
        while !c1.load(Ordering::Acquire) {
            match up.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if s1.write_all(&buf[..n]).is_err() {
                        l1.store(true, Ordering::Release);
                        // The other agent is gone: QEMU must find out now, not when its
                        // socket buffer fills.
                        let _ = up.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                    b1.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = s1.finish();
    });
    // The peer to QEMU.
    let (c2, b2, l2) = (closing.clone(), bytes.clone(), lost.clone());
    std::thread::spawn(move || {
        while !c2.load(Ordering::Acquire) {
            match stream.read(TICK) {
                Ok(Some(d)) => {
                    if down.write_all(&d).is_err() {
                        break;
                    }
                    b2.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Ok(None) => break,
                Err(PipeError::Timeout(_)) => {}
                Err(_) => {
                    l2.store(true, Ordering::Release);
                    break;
                }
            }
        }
        let _ = down.shutdown(std::net::Shutdown::Write);
    });
}
