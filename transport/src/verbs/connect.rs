//! The out-of-band exchange that connects two verbs queue pairs over a TCP connection.
//!
//! Each side sends one fixed-size little-endian *hello* followed by its private data:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"RMVB"` |
//! | 4 | 2 | protocol version ([`VERSION`]) |
//! | 6 | 2 | flags: bit 0 `REJECT` (the listener refuses; see below), others 0 |
//! | 8 | 4 | queue-pair number (24 bits) |
//! | 12 | 4 | first packet sequence number (random, 24 bits) |
//! | 16 | 2 | LID (InfiniBand; 0 on RoCE) |
//! | 18 | 1 | active MTU of the port (`enum ibv_mtu`, 1..=5) |
//! | 19 | 1 | RNR timer code the sender wants its peer to advertise (5 bits) |
//! | 20 | 16 | GID (RoCE: the RoCE v2 GID of the sender's address) |
//! | 36 | 2 | private data length (at most [`MAX_PRIVATE_DATA`]) |
//! | 38 | n | private data |
//!
//! ```text
//! connector                                  listener
//!   create QP (INIT)
//!   TCP connect ------------------------------> accept
//!   hello {qpn, psn, gid, ...} + private ----->
//!                                              create QP (INIT), RTR, RTS
//!   <----------------------------- hello {...} + private
//!   RTR, RTS
//!   READY ------------------------------------>
//!   <------------------------------------------ READY
//!   (both may post)                            (both may post)
//! ```
//!
//! The READY bytes make sure neither side posts before its peer is ready to receive: the
//! listener is RTR before it replies, the connector only after it read the reply. Every read has
//! a deadline (the connect timeout, or [`PEER_TIMEOUT`] on the listener); anything malformed is
//! an [`Error::Handshake`].
//!
//! The listener reads hellos through the provider-neutral gate (all pending peers at once, each
//! with a deadline for its whole hello, bounded per source address) and creates no queue pair
//! until the application accepts the request. A refused request, or one whose version differs,
//! gets a *reject* hello instead of an endpoint: the `REJECT` flag set, the listener's own
//! version at offset 4, the reason at offset 8 (`u16`: [`REJECT_VERSION`] or [`REJECT_REFUSED`])
//! and zeros elsewhere.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

use super::lock;
use super::qp::VerbsQp;
use crate::backend::{IncomingOps, ListenerOps, QpOps, QpSpec};
use crate::gate::{Framing, Gate, ListenLimits, Refusal};
use crate::{Error, Result, MAX_PRIVATE_DATA};

/// First bytes of every hello.
pub const MAGIC: [u8; 4] = *b"RMVB";
/// Version of the exchange described in the module docs.
pub const VERSION: u16 = 1;
/// Length of a hello without its private data.
pub const HELLO_LEN: usize = 38;
/// How long a listener waits for each step of a connecting peer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
const READY: u8 = b'R';
/// Flag of a reject hello.
const FLAG_REJECT: u16 = 1;
/// Reject reason: the versions differ.
pub const REJECT_VERSION: u16 = 1;
/// Reject reason: the application refused the request.
pub const REJECT_REFUSED: u16 = 2;

/// How to reach a queue pair: what each side tells the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) qpn: u32,
    pub(crate) psn: u32,
    pub(crate) lid: u16,
    pub(crate) gid: [u8; 16],
    pub(crate) mtu: u8,
    pub(crate) rnr_timer: u8,
}

pub(crate) fn encode(ep: &Endpoint, private_len: u16) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[8..12].copy_from_slice(&ep.qpn.to_le_bytes());
    b[12..16].copy_from_slice(&ep.psn.to_le_bytes());
    b[16..18].copy_from_slice(&ep.lid.to_le_bytes());
    b[18] = ep.mtu;
    b[19] = ep.rnr_timer;
    b[20..36].copy_from_slice(&ep.gid);
    b[36..38].copy_from_slice(&private_len.to_le_bytes());
    b
}

/// A reject hello with its reason.
pub(crate) fn encode_reject(reason: u16) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&FLAG_REJECT.to_le_bytes());
    b[8..10].copy_from_slice(&reason.to_le_bytes());
    b
}

/// Checks every field of a hello; returns the endpoint and the private-data length. A reject
/// hello is an error saying why the peer refused.
pub(crate) fn decode(b: &[u8; HELLO_LEN]) -> Result<(Endpoint, u16)> {
    let bad = |m: String| Err(Error::Handshake(m));
    if b[0..4] != MAGIC {
        return bad("the peer is not an rmem verbs endpoint (bad magic)".into());
    }
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let version = u16_at(4);
    let flags = u16_at(6);
    if flags == FLAG_REJECT {
        return bad(match u16_at(8) {
            REJECT_VERSION => {
                format!("the peer speaks exchange version {version}, we speak {VERSION}")
            }
            REJECT_REFUSED => "the peer refused the connection".into(),
            r => format!("the peer refused the connection (reason {r})"),
        });
    }
    if flags != 0 {
        return bad(format!("unknown flags {flags:#x}"));
    }
    if version != VERSION {
        return bad(format!(
            "the peer speaks exchange version {version}, we speak {VERSION}"
        ));
    }
    let ep = Endpoint {
        qpn: u32_at(8),
        psn: u32_at(12),
        lid: u16_at(16),
        mtu: b[18],
        rnr_timer: b[19],
        gid: b[20..36].try_into().expect("16-byte slice"),
    };
    let private_len = u16_at(36);
    if ep.qpn == 0 || ep.qpn > 0x00ff_ffff {
        return bad(format!("queue-pair number {:#x} out of range", ep.qpn));
    }
    if ep.psn > 0x00ff_ffff {
        return bad(format!("packet sequence number {:#x} out of range", ep.psn));
    }
    if !(1..=5).contains(&ep.mtu) {
        return bad(format!("MTU code {} out of range", ep.mtu));
    }
    if ep.rnr_timer > 31 {
        return bad(format!("RNR timer code {} out of range", ep.rnr_timer));
    }
    if usize::from(private_len) > MAX_PRIVATE_DATA {
        return bad(format!("{private_len} bytes of private data"));
    }
    Ok((ep, private_len))
}

fn io_error(what: &'static str, timeout: Duration) -> impl Fn(io::Error) -> Error {
    move |e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout(timeout),
        io::ErrorKind::UnexpectedEof => Error::Handshake(format!("the peer closed during {what}")),
        _ => Error::os(what, e),
    }
}

fn send_hello(s: &mut TcpStream, ep: &Endpoint, private: &[u8], timeout: Duration) -> Result<()> {
    let mut buf = Vec::with_capacity(HELLO_LEN + private.len());
    buf.extend_from_slice(&encode(ep, private.len() as u16));
    buf.extend_from_slice(private);
    s.write_all(&buf)
        .map_err(io_error("send connection hello", timeout))
}

fn read_hello(s: &mut TcpStream, timeout: Duration) -> Result<(Endpoint, Vec<u8>)> {
    let mut b = [0u8; HELLO_LEN];
    s.read_exact(&mut b)
        .map_err(io_error("receive connection hello", timeout))?;
    let (ep, len) = decode(&b)?;
    let mut private = vec![0u8; usize::from(len)];
    s.read_exact(&mut private)
        .map_err(io_error("receive private data", timeout))?;
    Ok((ep, private))
}

fn exchange_ready(s: &mut TcpStream, send_first: bool, timeout: Duration) -> Result<()> {
    let send = |s: &mut TcpStream| {
        s.write_all(&[READY])
            .map_err(io_error("send ready", timeout))
    };
    if send_first {
        send(s)?;
    }
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .map_err(io_error("receive ready", timeout))?;
    if b[0] != READY {
        return Err(Error::Handshake(format!(
            "expected READY, got {:#04x}",
            b[0]
        )));
    }
    if !send_first {
        send(s)?;
    }
    Ok(())
}

fn tune(s: &TcpStream, timeout: Duration) -> Result<()> {
    let e = |op| move |err| Error::os(op, err);
    s.set_nodelay(true).map_err(e("TCP_NODELAY"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(e("SO_RCVTIMEO"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(e("SO_SNDTIMEO"))?;
    Ok(())
}

fn random_psn() -> u32 {
    rand::rng().random::<u32>() & 0x00ff_ffff
}

/// The connector's side of the exchange.
pub(crate) fn connect(
    addr: SocketAddr,
    spec: &QpSpec,
    private: &[u8],
    timeout: Duration,
) -> Result<(Arc<dyn QpOps>, Vec<u8>)> {
    let qp = VerbsQp::create(spec)?;
    let psn = random_psn();
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::Timeout(timeout),
        _ => Error::os("connect", e),
    })?;
    tune(&s, timeout)?;
    send_hello(&mut s, &qp.endpoint(psn), private, timeout)?;
    let (peer, peer_private) = read_hello(&mut s, timeout)?;
    qp.connect_to(psn, &peer)?;
    exchange_ready(&mut s, true, timeout)?;
    tracing::debug!(qp = qp.num(), peer_qp = peer.qpn, %addr, "verbs queue pair connected");
    Ok((Arc::new(qp), peer_private))
}

/// Accepts verbs queue-pair connections on a TCP socket.
pub(crate) struct VerbsListener {
    gate: Mutex<Gate>,
    local: SocketAddr,
    /// Connection attempts dropped at the gate (the provider keeps no other counters).
    dropped: AtomicU64,
}

/// How the gate reads a verbs hello.
struct VerbsFraming;

impl Framing for VerbsFraming {
    fn header_len(&self) -> usize {
        HELLO_LEN
    }

    fn body_len(&self, header: &[u8]) -> std::result::Result<usize, Refusal> {
        let refuse = |reason: String| Refusal {
            reply: None,
            reason,
        };
        let b: &[u8; HELLO_LEN] = header
            .try_into()
            .map_err(|_| refuse("short hello".into()))?;
        let version = u16::from_le_bytes([b[4], b[5]]);
        if b[0..4] == MAGIC && version != VERSION {
            return Err(Refusal {
                reply: Some(encode_reject(REJECT_VERSION).to_vec()),
                reason: format!("exchange version {version}"),
            });
        }
        let (_, len) = decode(b).map_err(|e| refuse(e.to_string()))?;
        Ok(usize::from(len))
    }
}

impl VerbsListener {
    pub(crate) fn bind(addr: SocketAddr, limits: ListenLimits) -> Result<VerbsListener> {
        let gate = Gate::bind(addr, limits)?;
        let local = gate.local_addr()?;
        Ok(VerbsListener {
            gate: Mutex::new(gate),
            local,
            dropped: AtomicU64::new(0),
        })
    }
}

impl ListenerOps for VerbsListener {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn next(&self, timeout: Option<Duration>) -> Result<Box<dyn IncomingOps>> {
        let a = lock(&self.gate).next(&VerbsFraming, timeout, &|_| 0, &self.dropped)?;
        let (hello, private) = a.hello.split_at(HELLO_LEN);
        let (peer_ep, _) = decode(hello.try_into().expect("the gate read a whole header"))?;
        Ok(Box::new(VerbsIncoming {
            stream: a.stream,
            peer: a.peer,
            peer_ep,
            private: private.to_vec(),
        }))
    }
}

/// A verbs connection request: the peer's endpoint and private data; no queue pair yet.
struct VerbsIncoming {
    stream: TcpStream,
    peer: SocketAddr,
    peer_ep: Endpoint,
    private: Vec<u8>,
}

impl IncomingOps for VerbsIncoming {
    fn private(&self) -> &[u8] {
        &self.private
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn accept(self: Box<Self>, spec: &QpSpec, private: &[u8]) -> Result<Arc<dyn QpOps>> {
        let mut s = &self.stream;
        tune(&self.stream, PEER_TIMEOUT)?;
        let qp = match VerbsQp::create(spec) {
            Ok(qp) => qp,
            Err(e) => {
                let _ = s.write_all(&encode_reject(REJECT_REFUSED));
                return Err(e);
            }
        };
        let psn = random_psn();
        // A peer can make RTR fail with a GID or MTU our port cannot use.
        if let Err(e) = qp.connect_to(psn, &self.peer_ep) {
            let _ = s.write_all(&encode_reject(REJECT_REFUSED));
            return Err(e);
        }
        let mut stream = self.stream;
        send_hello(&mut stream, &qp.endpoint(psn), private, PEER_TIMEOUT)?;
        exchange_ready(&mut stream, false, PEER_TIMEOUT)?;
        tracing::debug!(qp = qp.num(), peer = %self.peer, "verbs queue pair accepted");
        Ok(Arc::new(qp))
    }

    fn reject(self: Box<Self>) {
        let _ = tune(&self.stream, PEER_TIMEOUT);
        let mut s = &self.stream;
        let _ = s.write_all(&encode_reject(REJECT_REFUSED));
        tracing::debug!(peer = %self.peer, "connection request refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoint {
        Endpoint {
            qpn: 0x12_3456,
            psn: 0xab_cdef,
            lid: 7,
            gid: *b"0123456789abcdef",
            mtu: 3,
            rnr_timer: 22,
        }
    }

    #[test]
    fn hello_round_trip() {
        let b = encode(&ep(), 4096);
        assert_eq!(&b[..4], b"RMVB");
        assert_eq!(decode(&b).unwrap(), (ep(), 4096));
    }

    #[test]
    fn reject_hello_says_why() {
        let refused = decode(&encode_reject(REJECT_REFUSED)).unwrap_err();
        assert!(refused.to_string().contains("refused"), "{refused}");
        let mut b = encode_reject(REJECT_VERSION);
        b[4..6].copy_from_slice(&7u16.to_le_bytes());
        let version = decode(&b).unwrap_err();
        assert!(version.to_string().contains("version 7"), "{version}");
        let mut b = encode(&ep(), 0);
        b[6] = 2;
        assert!(decode(&b).is_err(), "unknown flag accepted");
    }

    #[test]
    fn hello_rejections() {
        let good = encode(&ep(), 0);
        type Mutation = fn(&mut [u8; HELLO_LEN]);
        let cases: [(&str, Mutation); 8] = [
            ("magic", |b| b[0] = b'X'),
            ("version", |b| b[4] = 2),
            ("zero qpn", |b| {
                b[8..12].copy_from_slice(&0u32.to_le_bytes())
            }),
            ("wide qpn", |b| b[11] = 1),
            ("wide psn", |b| b[15] = 1),
            ("mtu", |b| b[18] = 6),
            ("rnr timer", |b| b[19] = 32),
            ("private length", |b| {
                b[36..38].copy_from_slice(&(MAX_PRIVATE_DATA as u16 + 1).to_le_bytes())
            }),
        ];
        for (what, mutate) in cases {
            let mut b = good;
            mutate(&mut b);
            assert!(
                matches!(decode(&b), Err(Error::Handshake(_))),
                "{what} accepted"
            );
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let mut b = [0u8; HELLO_LEN];
            for byte in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            if x & 1 == 0 {
                b[..4].copy_from_slice(&MAGIC);
                b[4..6].copy_from_slice(&VERSION.to_le_bytes());
            }
            let _ = decode(&b);
        }
    }
}
