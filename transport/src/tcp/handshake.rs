//! The out-of-band exchange that turns two TCP connections into a queue pair (see [`super::wire`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;

use super::sock;
use super::wire::{Hello, HelloKind, WireError, HELLO_LEN, REJECT_VERSION};
use super::Counters;
use crate::{Error, Result};

/// How long a connecting peer may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Half-open pairs older than this are dropped.
const PAIR_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many half-open pairs are kept (a flood of primaries cannot grow memory).
const MAX_HALF_OPEN: usize = 256;

/// Sets the options every data connection needs: no Nagle delay, and keepalive plus a user
/// timeout so a vanished host is noticed within about `op_timeout`.
pub(super) fn tune(s: &TcpStream, op_timeout: Duration) -> Result<()> {
    let e = |op| move |err| Error::os(op, err);
    s.set_nodelay(true).map_err(e("TCP_NODELAY"))?;
    s.set_read_timeout(None).map_err(e("SO_RCVTIMEO"))?;
    s.set_write_timeout(None).map_err(e("SO_SNDTIMEO"))?;
    let sr = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(1))
        .with_interval(Duration::from_secs(1))
        .with_retries(5);
    sr.set_tcp_keepalive(&ka).map_err(e("TCP keepalive"))?;
    sr.set_tcp_user_timeout(Some(op_timeout.max(Duration::from_millis(100))))
        .map_err(e("TCP_USER_TIMEOUT"))?;
    Ok(())
}

fn write_hello(s: &mut TcpStream, h: &Hello, private: &[u8]) -> Result<()> {
    let mut buf = Vec::with_capacity(HELLO_LEN + private.len());
    buf.extend_from_slice(&h.encode());
    buf.extend_from_slice(private);
    s.write_all(&buf).map_err(|e| Error::os("send hello", e))
}

fn read_hello(s: &mut TcpStream) -> std::result::Result<(Hello, Vec<u8>), HelloError> {
    let mut b = [0u8; HELLO_LEN];
    s.read_exact(&mut b).map_err(HelloError::Io)?;
    let h = Hello::decode(&b).map_err(HelloError::Wire)?;
    let mut private = vec![0u8; usize::from(h.private_len)];
    s.read_exact(&mut private).map_err(HelloError::Io)?;
    Ok((h, private))
}

enum HelloError {
    Io(std::io::Error),
    Wire(WireError),
}

impl From<HelloError> for Error {
    fn from(e: HelloError) -> Error {
        match e {
            HelloError::Io(e) => Error::os("receive hello", e),
            HelloError::Wire(e) => Error::Protocol(e),
        }
    }
}

/// Opens both connections to a listener and waits for its answer.
pub(super) fn connect(
    addr: SocketAddr,
    private: &[u8],
    timeout: Duration,
) -> Result<(TcpStream, TcpStream, Vec<u8>)> {
    let conn_id: [u8; 16] = rand::rng().random();
    let dial = || TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::os("connect", e));
    let mut primary = dial()?;
    let hello = |kind, len| Hello {
        kind,
        conn_id,
        private_len: len,
        status: 0,
    };
    write_hello(
        &mut primary,
        &hello(HelloKind::Primary, private.len() as u16),
        private,
    )?;
    let mut secondary = dial()?;
    write_hello(&mut secondary, &hello(HelloKind::Secondary, 0), &[])?;
    primary
        .set_read_timeout(Some(timeout))
        .map_err(|e| Error::os("SO_RCVTIMEO", e))?;
    let (reply, reply_private) = read_hello(&mut primary).map_err(Error::from)?;
    match reply.kind {
        HelloKind::Accept if reply.conn_id == conn_id => Ok((primary, secondary, reply_private)),
        HelloKind::Reject => Err(Error::Handshake(match reply.status {
            REJECT_VERSION => "the peer speaks another protocol version".into(),
            s => format!("the peer refused the connection (reason {s})"),
        })),
        _ => Err(Error::Handshake("unexpected reply to hello".into())),
    }
}

pub(super) fn send_accept(primary: &TcpStream, conn_id: &[u8; 16], private: &[u8]) -> Result<()> {
    let mut s = primary
        .try_clone()
        .map_err(|e| Error::os("dup socket", e))?;
    let h = Hello {
        kind: HelloKind::Accept,
        conn_id: *conn_id,
        private_len: private.len() as u16,
        status: 0,
    };
    write_hello(&mut s, &h, private)
}

/// Both halves of an accepted queue pair.
pub(super) struct Pair {
    pub(super) conn_id: [u8; 16],
    pub(super) primary: TcpStream,
    pub(super) secondary: TcpStream,
    pub(super) private: Vec<u8>,
}

/// Matches primaries with secondaries as they arrive on the listening socket.
pub(super) struct Pairing {
    listener: TcpListener,
    primaries: HashMap<[u8; 16], (TcpStream, Vec<u8>, Instant)>,
    secondaries: HashMap<[u8; 16], (TcpStream, Instant)>,
}

impl Pairing {
    pub(super) fn new(listener: TcpListener) -> Pairing {
        Pairing {
            listener,
            primaries: HashMap::new(),
            secondaries: HashMap::new(),
        }
    }

    fn take_complete(&mut self) -> Option<Pair> {
        let id = *self
            .primaries
            .keys()
            .find(|id| self.secondaries.contains_key(*id))?;
        let (primary, private, _) = self.primaries.remove(&id)?;
        let (secondary, _) = self.secondaries.remove(&id)?;
        Some(Pair {
            conn_id: id,
            primary,
            secondary,
            private,
        })
    }

    fn expire(&mut self) {
        let now = Instant::now();
        self.primaries
            .retain(|_, (_, _, t)| now.duration_since(*t) < PAIR_TIMEOUT);
        self.secondaries
            .retain(|_, (_, t)| now.duration_since(*t) < PAIR_TIMEOUT);
    }

    /// Waits for a complete pair. Bad hellos are counted and dropped; only a timeout or a
    /// failing listener is returned as an error.
    pub(super) fn next_pair(
        &mut self,
        timeout: Option<Duration>,
        stats: &Counters,
    ) -> Result<Pair> {
        let deadline = crate::wait::Deadline::after(timeout);
        loop {
            if let Some(p) = self.take_complete() {
                return Ok(p);
            }
            self.expire();
            let left = deadline.remaining()?;
            let ev = sock::wait_fd(self.listener.as_raw_fd(), libc::POLLIN, left)
                .map_err(|e| Error::os("poll listener", e))?;
            if ev == 0 {
                continue;
            }
            let (mut s, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::os("accept", e)),
            };
            if s.set_read_timeout(Some(HELLO_TIMEOUT)).is_err() {
                continue;
            }
            let (hello, private) = match read_hello(&mut s) {
                Ok(x) => x,
                Err(err) => {
                    stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    if let HelloError::Wire(WireError::Version(v)) = &err {
                        let reject = Hello {
                            kind: HelloKind::Reject,
                            conn_id: [0; 16],
                            private_len: 0,
                            status: REJECT_VERSION,
                        };
                        let _ = write_hello(&mut s, &reject, &[]);
                        tracing::warn!(%peer, version = v, "rejected connection: protocol version");
                    } else {
                        tracing::warn!(%peer, error = %Error::from(err), "dropped connection with a bad hello");
                    }
                    continue;
                }
            };
            let half_open = self.primaries.len() + self.secondaries.len();
            if half_open >= MAX_HALF_OPEN {
                tracing::warn!(%peer, "too many half-open connections; dropping one");
                stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let now = Instant::now();
            match hello.kind {
                HelloKind::Primary => {
                    self.primaries.insert(hello.conn_id, (s, private, now));
                }
                HelloKind::Secondary => {
                    self.secondaries.insert(hello.conn_id, (s, now));
                }
                HelloKind::Accept | HelloKind::Reject => {
                    stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "dropped connection that opened with a reply");
                }
            }
        }
    }
}
