//! QEMU's migration connections carried through a [`Pipe`]: on the source, rmem listens on a
//! unix socket that QEMU's `migrate` connects to; on the destination, it connects to the socket
//! of QEMU's `migrate-incoming`. Each connection (the main stream, each multifd channel) is one
//! pipe stream, both directions (QEMU's return path included).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::pipe::{Pipe, PipeError, Stream, PAYLOAD};

/// How often blocked relay threads look at whether the relay is closing.
const TICK: Duration = Duration::from_millis(100);

/// A running relay: its threads and the bytes it carried.
pub struct Relay {
    closing: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl Relay {
    /// Source side: listens on `socket` and carries each connection QEMU makes into a new stream.
    pub fn source(pipe: Arc<Pipe>, socket: &Path) -> std::io::Result<Relay> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        listener.set_nonblocking(true)?;
        let mut relay = Relay::new(Some(socket.to_path_buf()));
        let (closing, bytes) = (relay.closing.clone(), relay.bytes.clone());
        relay.threads.push(std::thread::spawn(move || {
            while !closing.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((conn, _)) => match pipe.open_stream(true) {
                        Ok(stream) => pump(conn, stream, &closing, &bytes),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot open a relay stream");
                            return;
                        }
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
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
        let (closing, bytes) = (relay.closing.clone(), relay.bytes.clone());
        relay.threads.push(std::thread::spawn(move || {
            while !closing.load(Ordering::Acquire) {
                match pipe.accept_stream(TICK) {
                    Ok(stream) => match UnixStream::connect(&socket) {
                        Ok(conn) => pump(conn, stream, &closing, &bytes),
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
            threads: Vec::new(),
            socket,
        }
    }

    /// Bytes carried so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Stops relaying; open connections are closed.
    pub fn close(mut self) -> u64 {
        self.stop();
        self.bytes()
    }

    fn stop(&mut self) {
        self.closing.store(true, Ordering::Release);
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

/// Carries one connection both ways until both directions end (or the relay closes).
fn pump(conn: UnixStream, stream: Stream, closing: &Arc<AtomicBool>, bytes: &Arc<AtomicU64>) {
    let stream = Arc::new(stream);
    let (Ok(mut up), Ok(mut down)) = (conn.try_clone(), conn.try_clone()) else {
        return;
    };
    let _ = up.set_read_timeout(Some(TICK));
    let (c1, b1, s1) = (closing.clone(), bytes.clone(), stream.clone());
    // QEMU to the peer.
    std::thread::spawn(move || {
        let mut buf = vec![0u8; PAYLOAD];
        while !c1.load(Ordering::Acquire) {
            match up.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if s1.write_all(&buf[..n]).is_err() {
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
    let (c2, b2) = (closing.clone(), bytes.clone());
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
                Err(_) => break,
            }
        }
        let _ = down.shutdown(std::net::Shutdown::Write);
    });
}
