//! The out-of-band exchange that connects two verbs queue pairs over a TCP connection.
//!
//! Each side sends one fixed-size little-endian *hello* followed by its private data:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"RMVB"` |
//! | 4 | 2 | protocol version ([`VERSION`]) |
//! | 6 | 2 | flags, 0 (reserved) |
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
//! an [`Error::Handshake`]. A listener drops a bad connection and waits for the next one.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

use super::qp::VerbsQp;
use super::{lock, wait_readable};
use crate::backend::{ListenerOps, QpOps, QpSpec};
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

/// Checks every field of a hello; returns the endpoint and the private-data length.
pub(crate) fn decode(b: &[u8; HELLO_LEN]) -> Result<(Endpoint, u16)> {
    let bad = |m: String| Err(Error::Handshake(m));
    if b[0..4] != MAGIC {
        return bad("the peer is not an rmem verbs endpoint (bad magic)".into());
    }
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let version = u16_at(4);
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
    listener: TcpListener,
    local: SocketAddr,
    /// One accept at a time: each owns the socket until it has a queue pair.
    accepting: Mutex<()>,
}

/// Why one incoming connection did not produce a queue pair.
enum Failed {
    /// The peer misbehaved or vanished: drop it and wait for the next.
    Peer(Error),
    /// Our side failed (queue-pair creation): give up.
    Local(Error),
}

impl VerbsListener {
    pub(crate) fn bind(addr: SocketAddr) -> Result<VerbsListener> {
        let listener = TcpListener::bind(addr).map_err(|e| Error::os("bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::os("O_NONBLOCK", e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::os("getsockname", e))?;
        Ok(VerbsListener {
            listener,
            local,
            accepting: Mutex::new(()),
        })
    }

    fn serve(
        &self,
        mut s: TcpStream,
        spec: &QpSpec,
        private: &[u8],
    ) -> std::result::Result<(VerbsQp, Vec<u8>), Failed> {
        s.set_nonblocking(false)
            .map_err(|e| Failed::Peer(Error::os("O_NONBLOCK", e)))?;
        tune(&s, PEER_TIMEOUT).map_err(Failed::Peer)?;
        let (peer, peer_private) = read_hello(&mut s, PEER_TIMEOUT).map_err(Failed::Peer)?;
        let qp = VerbsQp::create(spec).map_err(Failed::Local)?;
        let psn = random_psn();
        // A peer can make RTR fail with a GID or MTU our port cannot use: its fault.
        qp.connect_to(psn, &peer).map_err(Failed::Peer)?;
        send_hello(&mut s, &qp.endpoint(psn), private, PEER_TIMEOUT).map_err(Failed::Peer)?;
        exchange_ready(&mut s, false, PEER_TIMEOUT).map_err(Failed::Peer)?;
        Ok((qp, peer_private))
    }
}

impl ListenerOps for VerbsListener {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn accept(
        &self,
        spec: &QpSpec,
        private: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(Arc<dyn QpOps>, Vec<u8>)> {
        let _one = lock(&self.accepting);
        let deadline = crate::wait::Deadline::after(timeout);
        loop {
            let left = deadline.remaining()?;
            if !wait_readable(self.listener.as_raw_fd(), left)
                .map_err(|e| Error::os("poll listener", e))?
            {
                continue;
            }
            let (s, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(Error::os("accept", e)),
            };
            match self.serve(s, spec, private) {
                Ok((qp, peer_private)) => {
                    tracing::debug!(qp = qp.num(), %peer, "verbs queue pair accepted");
                    return Ok((Arc::new(qp), peer_private));
                }
                Err(Failed::Local(e)) => return Err(e),
                Err(Failed::Peer(e)) => {
                    tracing::warn!(%peer, error = %e, "dropped a connection attempt");
                }
            }
        }
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
