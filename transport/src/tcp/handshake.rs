//! The `tcp` provider's side of the connection exchange ([`crate::exchange`]): two connections
//! per queue pair, paired by the id in their payloads (see [`super::wire`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use super::wire::{parse_payload, payload, Role};
use super::Counters;
use crate::exchange::{self, Hello, RequestFraming};
use crate::gate::Gate;
use crate::{Error, Provider, Result};

/// Half-open pairs older than this are dropped.
const PAIR_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets the options every data connection needs: no Nagle delay, keepalive so an idle
/// connection to a vanished host ends in about 6 s, and a user timeout of `stall` for data the
/// peer does not acknowledge. The user timeout is not the operation timeout: a live peer that
/// stalls whole (a guest in memory reclaim stops acking for seconds) must keep its connection,
/// and a silent peer already fails outstanding work after `op_timeout` by the initiator's own
/// rule, so the kernel's limit only has to end connections nobody is waiting on.
pub(super) fn tune(s: &TcpStream, stall: Duration) -> Result<()> {
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
    sr.set_tcp_user_timeout(Some(stall.max(Duration::from_millis(100))))
        .map_err(e("TCP_USER_TIMEOUT"))?;
    Ok(())
}

/// Opens both connections to a listener and waits for its answer.
pub(super) fn connect(
    addr: SocketAddr,
    private: &[u8],
    timeout: Duration,
) -> Result<(TcpStream, TcpStream, Vec<u8>)> {
    let conn_id: [u8; 16] = rand::rng().random();
    let request = |role, private: &[u8]| {
        Hello::request(Provider::Tcp, &payload(&conn_id, Some(role)), private)
    };
    let primary = exchange::dial(addr, timeout)?;
    exchange::send(&primary, &request(Role::Primary, private))?;
    let secondary = exchange::dial(addr, timeout)?;
    exchange::send(&secondary, &request(Role::Secondary, &[]))?;
    let reply = exchange::read_answer(&primary, Provider::Tcp)?;
    match parse_payload(&reply.payload) {
        Some((id, None)) if id == conn_id => Ok((primary, secondary, reply.private)),
        _ => Err(Error::Handshake(
            "the listener answered another connection".into(),
        )),
    }
}

pub(super) fn send_accept(primary: &TcpStream, conn_id: &[u8; 16], private: &[u8]) -> Result<()> {
    // A peer that stopped reading cannot hold the accepting thread.
    exchange::tune(primary, PAIR_TIMEOUT)?;
    let h = Hello::accept(Provider::Tcp, &payload(conn_id, None), private);
    exchange::send(primary, &h)
}

/// Refuses a request (best effort: the peer may be gone).
pub(super) fn send_reject(primary: &TcpStream, reason: u16) {
    let _ = exchange::tune(primary, PAIR_TIMEOUT);
    let _ = exchange::send(primary, &Hello::reject(Provider::Tcp, reason));
}

/// Both halves of a queue pair whose hellos have arrived.
pub(super) struct Pair {
    pub(super) conn_id: [u8; 16],
    pub(super) peer: SocketAddr,
    pub(super) primary: TcpStream,
    pub(super) secondary: TcpStream,
    pub(super) private: Vec<u8>,
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
                &RequestFraming(Provider::Tcp),
                deadline.remaining()?,
                &held,
                &stats.protocol_errors,
            )?;
            // The gate checked the header; the payload is ours to check.
            let hello = Hello::decode(&a.hello)?;
            let Some((conn_id, Some(role))) = parse_payload(&hello.payload) else {
                stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %a.peer, "bad tcp payload in a connection request");
                continue;
            };
            self.make_room(&stats.protocol_errors);
            let half = Half {
                stream: a.stream,
                peer: a.peer,
                private: hello.private,
                since: Instant::now(),
            };
            match role {
                Role::Primary => self.primaries.insert(conn_id, half),
                Role::Secondary => self.secondaries.insert(conn_id, half),
            };
        }
    }
}
