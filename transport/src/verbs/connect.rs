//! The verbs provider's side of the connection exchange ([`crate::exchange`]), over one TCP
//! connection per queue pair.
//!
//! Each side's hello carries its queue pair's endpoint as the provider payload
//! ([`PAYLOAD_LEN`] bytes, little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | queue-pair number (24 bits, not 0) |
//! | 4 | 4 | first packet sequence number (random, 24 bits) |
//! | 8 | 2 | LID (InfiniBand; 0 on RoCE) |
//! | 10 | 1 | active MTU of the port (`enum ibv_mtu`, 1..=5) |
//! | 11 | 1 | RNR timer code the sender wants its peer to advertise (5 bits) |
//! | 12 | 16 | GID (RoCE: the RoCE v2 GID of the sender's address) |
//!
//! ```text
//! connector                                  listener
//!   create QP (INIT)
//!   TCP connect ------------------------------> gate reads the request
//!   request {endpoint} + private ------------->
//!                                              accept: create QP (INIT), RTR, RTS
//!   <----------------------------- accept {endpoint} + private   (or reject {reason})
//!   RTR, RTS
//!   READY ------------------------------------>
//!   <------------------------------------------ READY
//!   (both may post)                            (both may post)
//! ```
//!
//! The READY bytes make sure neither side posts before its peer is ready to receive: the
//! listener is RTR before it replies, the connector only after it read the reply. Every read has
//! a deadline (the connect timeout, or [`PEER_TIMEOUT`] on the listener); anything malformed is
//! an [`Error::Handshake`]. The listener creates no queue pair until the application accepts
//! the request; a refused request gets a reject.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

use super::lock;
use super::qp::VerbsQp;
use crate::backend::{IncomingOps, ListenerOps, QpOps, QpSpec};
use crate::exchange::{self, Hello, RequestFraming, REJECT_REFUSED};
use crate::gate::{Gate, ListenLimits};
use crate::{Error, Provider, Result};

/// Length of the endpoint payload.
pub const PAYLOAD_LEN: usize = 28;
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

impl Endpoint {
    pub(crate) fn encode(&self) -> [u8; PAYLOAD_LEN] {
        let mut b = [0u8; PAYLOAD_LEN];
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..10].copy_from_slice(&self.lid.to_le_bytes());
        b[10] = self.mtu;
        b[11] = self.rnr_timer;
        b[12..28].copy_from_slice(&self.gid);
        b
    }

    /// Checks every field of a peer's endpoint.
    pub(crate) fn decode(b: &[u8]) -> Result<Endpoint> {
        let bad = |m: String| Err(Error::Handshake(m));
        let Ok(b) = <&[u8; PAYLOAD_LEN]>::try_from(b) else {
            return bad(format!("a {}-byte verbs endpoint", b.len()));
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let ep = Endpoint {
            qpn: u32_at(0),
            psn: u32_at(4),
            lid: u16::from_le_bytes([b[8], b[9]]),
            mtu: b[10],
            rnr_timer: b[11],
            gid: b[12..28].try_into().expect("16-byte slice"),
        };
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
        Ok(ep)
    }
}

/// The socket's timeouts (set by [`exchange::tune`]) bound both steps.
fn exchange_ready(s: &mut TcpStream, send_first: bool) -> Result<()> {
    let send = |s: &mut TcpStream| {
        s.write_all(&[READY])
            .map_err(exchange::io_error("send ready"))
    };
    if send_first {
        send(s)?;
    }
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .map_err(exchange::io_error("receive ready"))?;
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
    let mut s = exchange::dial(addr, timeout)?;
    let request = Hello::request(Provider::Verbs, &qp.endpoint(psn).encode(), private);
    exchange::send(&s, &request)?;
    let answer = exchange::read_answer(&s, Provider::Verbs)?;
    let peer = Endpoint::decode(&answer.payload)?;
    qp.connect_to(psn, &peer)?;
    exchange_ready(&mut s, true)?;
    tracing::debug!(qp = qp.num(), peer_qp = peer.qpn, %addr, "verbs queue pair connected");
    Ok((Arc::new(qp), answer.private))
}

/// Accepts verbs queue-pair connections on a TCP socket.
pub(crate) struct VerbsListener {
    gate: Mutex<Gate>,
    local: SocketAddr,
    /// Connection attempts dropped at the gate (the provider keeps no other counters).
    dropped: AtomicU64,
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
        let framing = RequestFraming(Provider::Verbs);
        loop {
            let a = lock(&self.gate).next(&framing, timeout, &|_| 0, &self.dropped)?;
            // The gate checked the header; the endpoint is ours to check.
            let hello = Hello::decode(&a.hello)?;
            match Endpoint::decode(&hello.payload) {
                Ok(peer_ep) => {
                    return Ok(Box::new(VerbsIncoming {
                        stream: a.stream,
                        peer: a.peer,
                        peer_ep,
                        private: hello.private,
                    }))
                }
                Err(e) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %a.peer, "bad verbs endpoint in a request: {e}");
                }
            }
        }
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
        exchange::tune(&self.stream, PEER_TIMEOUT)?;
        let refuse = || {
            let no = Hello::reject(Provider::Verbs, REJECT_REFUSED);
            let _ = exchange::send(&self.stream, &no);
        };
        let qp = VerbsQp::create(spec).inspect_err(|_| refuse())?;
        let psn = random_psn();
        // A peer can make RTR fail with a GID or MTU our port cannot use.
        qp.connect_to(psn, &self.peer_ep)
            .inspect_err(|_| refuse())?;
        let answer = Hello::accept(Provider::Verbs, &qp.endpoint(psn).encode(), private);
        exchange::send(&self.stream, &answer)?;
        let mut stream = self.stream;
        exchange_ready(&mut stream, false)?;
        tracing::debug!(qp = qp.num(), peer = %self.peer, "verbs queue pair accepted");
        Ok(Arc::new(qp))
    }

    fn reject(self: Box<Self>) {
        let _ = exchange::tune(&self.stream, PEER_TIMEOUT);
        let _ = exchange::send(
            &self.stream,
            &Hello::reject(Provider::Verbs, REJECT_REFUSED),
        );
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
    fn endpoint_round_trip() {
        assert_eq!(Endpoint::decode(&ep().encode()).unwrap(), ep());
        assert!(Endpoint::decode(&ep().encode()[..27]).is_err());
    }

    #[test]
    fn endpoint_rejections() {
        let good = ep().encode();
        type Mutation = fn(&mut [u8; PAYLOAD_LEN]);
        let cases: [(&str, Mutation); 6] = [
            ("zero qpn", |b| b[0..4].copy_from_slice(&0u32.to_le_bytes())),
            ("wide qpn", |b| b[3] = 1),
            ("wide psn", |b| b[7] = 1),
            ("mtu", |b| b[10] = 6),
            ("zero mtu", |b| b[10] = 0),
            ("rnr timer", |b| b[11] = 32),
        ];
        for (what, mutate) in cases {
            let mut b = good;
            mutate(&mut b);
            assert!(
                matches!(Endpoint::decode(&b), Err(Error::Handshake(_))),
                "{what} accepted"
            );
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let mut b = [0u8; PAYLOAD_LEN];
            for byte in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            let _ = Endpoint::decode(&b);
        }
    }
}
