//! The out-of-band exchange that turns two TCP connections into a queue pair (see [`super::wire`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use super::wire::{Hello, HelloKind, WireError, HELLO_LEN, REJECT_REFUSED, REJECT_VERSION};
use super::Counters;
use crate::gate::{Framing, Gate, Refusal};
use crate::{Error, Result};

/// Half-open pairs older than this are dropped.
const PAIR_TIMEOUT: Duration = Duration::from_secs(10);

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

fn write_hello(mut s: impl Write, h: &Hello, private: &[u8]) -> Result<()> {
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
            HelloError::Wire(e) => e.into(),
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
            REJECT_REFUSED => "the peer refused the connection".into(),
            s => format!("the peer refused the connection (reason {s})"),
        })),
        _ => Err(Error::Handshake("unexpected reply to hello".into())),
    }
}

pub(super) fn send_accept(primary: &TcpStream, conn_id: &[u8; 16], private: &[u8]) -> Result<()> {
    // A peer that stopped reading cannot hold the accepting thread.
    primary
        .set_write_timeout(Some(PAIR_TIMEOUT))
        .map_err(|e| Error::os("SO_SNDTIMEO", e))?;
    let h = Hello {
        kind: HelloKind::Accept,
        conn_id: *conn_id,
        private_len: private.len() as u16,
        status: 0,
    };
    write_hello(primary, &h, private)
}

/// Both halves of a queue pair whose hellos have arrived.
pub(super) struct Pair {
    pub(super) conn_id: [u8; 16],
    pub(super) peer: SocketAddr,
    pub(super) primary: TcpStream,
    pub(super) secondary: TcpStream,
    pub(super) private: Vec<u8>,
}

/// How the gate reads a `tcp` hello: a fixed header, then the private data it announces.
struct TcpFraming;

impl Framing for TcpFraming {
    fn header_len(&self) -> usize {
        HELLO_LEN
    }

    fn body_len(&self, header: &[u8]) -> std::result::Result<usize, Refusal> {
        let b: &[u8; HELLO_LEN] = header.try_into().map_err(|_| Refusal {
            reply: None,
            reason: "short hello".into(),
        })?;
        match Hello::decode(b) {
            Ok(h) if matches!(h.kind, HelloKind::Primary | HelloKind::Secondary) => {
                Ok(usize::from(h.private_len))
            }
            Ok(_) => Err(Refusal {
                reply: None,
                reason: "the connection opened with a reply".into(),
            }),
            Err(WireError::Version(v)) => Err(Refusal {
                reply: Some(reject(&[0; 16], REJECT_VERSION).to_vec()),
                reason: format!("protocol version {v}"),
            }),
            Err(e) => Err(Refusal {
                reply: None,
                reason: format!("bad hello: {e}"),
            }),
        }
    }
}

/// A `Reject` hello with its reason.
pub(super) fn reject(conn_id: &[u8; 16], status: u16) -> [u8; HELLO_LEN] {
    Hello {
        kind: HelloKind::Reject,
        conn_id: *conn_id,
        private_len: 0,
        status,
    }
    .encode()
}

/// One half of a queue pair waiting for the other.
struct Half {
    stream: TcpStream,
    peer: SocketAddr,
    private: Vec<u8>,
    since: Instant,
}

/// Matches primaries with secondaries as their hellos complete at the gate.
pub(super) struct Pairing {
    gate: Gate,
    primaries: HashMap<[u8; 16], Half>,
    secondaries: HashMap<[u8; 16], Half>,
}

impl Pairing {
    pub(super) fn new(gate: Gate) -> Pairing {
        Pairing {
            gate,
            primaries: HashMap::new(),
            secondaries: HashMap::new(),
        }
    }

    pub(super) fn local_addr(&self) -> Result<SocketAddr> {
        self.gate.local_addr()
    }

    fn take_complete(&mut self) -> Option<Pair> {
        let id = *self
            .primaries
            .keys()
            .find(|id| self.secondaries.contains_key(*id))?;
        let p = self.primaries.remove(&id)?;
        let s = self.secondaries.remove(&id)?;
        Some(Pair {
            conn_id: id,
            peer: p.peer,
            primary: p.stream,
            secondary: s.stream,
            private: p.private,
        })
    }

    fn expire(&mut self, dropped: &AtomicU64) {
        let now = Instant::now();
        for table in [&mut self.primaries, &mut self.secondaries] {
            let before = table.len();
            table.retain(|_, h| now.duration_since(h.since) < PAIR_TIMEOUT);
            dropped.fetch_add((before - table.len()) as u64, Ordering::Relaxed);
        }
    }

    /// Makes room for one more half-open connection by dropping the oldest.
    fn make_room(&mut self, dropped: &AtomicU64) {
        let max = self.gate.limits().max_pending;
        while self.primaries.len() + self.secondaries.len() >= max {
            let oldest = |t: &HashMap<[u8; 16], Half>| {
                t.iter()
                    .min_by_key(|(_, h)| h.since)
                    .map(|(k, h)| (*k, h.since))
            };
            let (table, id) = match (oldest(&self.primaries), oldest(&self.secondaries)) {
                (Some(p), Some(s)) if s.1 < p.1 => (&mut self.secondaries, s.0),
                (Some(p), _) => (&mut self.primaries, p.0),
                (None, Some(s)) => (&mut self.secondaries, s.0),
                (None, None) => return,
            };
            if let Some(h) = table.remove(&id) {
                tracing::debug!(peer = %h.peer, "too many half-open connections; dropped the oldest");
            }
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits for a complete pair. Bad, slow or surplus connections are counted and dropped
    /// (see [`Gate`]); only a timeout or a failing listener is returned as an error.
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
            self.expire(&stats.protocol_errors);
            let (prim, sec) = (&self.primaries, &self.secondaries);
            let held = |ip: IpAddr| {
                prim.values()
                    .chain(sec.values())
                    .filter(|h| h.peer.ip() == ip)
                    .count()
            };
            let a = self.gate.next(
                &TcpFraming,
                deadline.remaining()?,
                &held,
                &stats.protocol_errors,
            )?;
            let (hello, private) = a.hello.split_at(HELLO_LEN);
            let hello = Hello::decode(hello.try_into().expect("the gate read a whole header"))
                .map_err(Error::from)?;
            self.make_room(&stats.protocol_errors);
            let half = Half {
                stream: a.stream,
                peer: a.peer,
                private: private.to_vec(),
                since: Instant::now(),
            };
            match hello.kind {
                HelloKind::Primary => self.primaries.insert(hello.conn_id, half),
                _ => self.secondaries.insert(hello.conn_id, half),
            };
        }
    }
}
