//! Admission of out-of-band connections, shared by every provider's listener.
//!
//! A listener must not let one peer hold up the others: a hello that arrives a byte at a time, a
//! socket that never sends anything, or a flood of connections from one address. The gate reads
//! every connecting peer's hello without blocking, all of them at once with `poll(2)`, and
//! hands a connection on only when its whole hello has arrived. Each connection has a deadline
//! for its whole hello (not per read), and the gate holds at most
//! [`ListenLimits::max_pending`] connections, at most [`ListenLimits::max_per_source`] of them
//! from one IP address; past either bound the oldest unfinished hello (from that address, for
//! the second) is dropped, so a slow flood ages out while new peers keep getting in.
//!
//! The gate only reads: what the hello means, and whether the connection is accepted, is the
//! provider's business (its [`Framing`]) and then the application's ([`crate::Incoming`]).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::wait::Deadline;
use crate::{Error, Result};

/// Bounds on the connections a listener holds before the application accepts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenLimits {
    /// Connections whose hello has not fully arrived (and, on `tcp`, halves of a queue pair
    /// waiting for their other half), over all peers.
    pub max_pending: usize,
    /// The same, from one IP address.
    pub max_per_source: usize,
    /// How long a peer has to send its whole hello after connecting.
    pub hello_timeout: Duration,
}

impl Default for ListenLimits {
    fn default() -> Self {
        ListenLimits {
            max_pending: 256,
            max_per_source: 32,
            hello_timeout: Duration::from_secs(5),
        }
    }
}

impl ListenLimits {
    pub(crate) fn check(&self) -> Result<()> {
        if self.max_pending == 0 || self.max_per_source == 0 || self.hello_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "listen limits must be at least 1 connection and a non-zero hello timeout".into(),
            ));
        }
        Ok(())
    }
}

/// How a provider's hello is framed: a fixed header that says how much follows.
pub(crate) trait Framing {
    /// Length of the fixed header.
    fn header_len(&self) -> usize;
    /// Bytes that follow the header, or why the connection is refused.
    fn body_len(&self, header: &[u8]) -> std::result::Result<usize, Refusal>;
}

/// A hello the provider will not take: what to tell the peer (if anything) and why.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) reply: Option<Vec<u8>>,
    pub(crate) reason: String,
}

/// A connection whose whole hello has arrived (header and body), in blocking mode again.
pub(crate) struct Arrival {
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) hello: Vec<u8>,
}

struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    /// Bytes the hello has in all: the header's length until the header says more.
    need: usize,
    header_done: bool,
    deadline: Instant,
}

/// At most this many connections are taken off the backlog per wake-up, so reading the hellos
/// already held is never starved by a flood of new connections.
const ACCEPT_BATCH: usize = 64;

/// A listening socket and the connections it holds until their hellos are complete.
pub(crate) struct Gate {
    listener: TcpListener,
    limits: ListenLimits,
    pending: Vec<Pending>,
    log: DropLog,
}

/// Each dropped attempt is logged at debug level; a warning sums them up at most every
/// [`DropLog::EVERY`], so a flood of bad connections does not flood the log as well.
#[derive(Default)]
struct DropLog {
    since: u64,
    last: Option<Instant>,
}

impl DropLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&mut self, dropped: &AtomicU64, peer: SocketAddr, why: &str) {
        dropped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, reason = why, "dropped a connection attempt");
        self.since += 1;
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= Self::EVERY)
        {
            tracing::warn!(
                count = self.since,
                last_peer = %peer,
                last_reason = why,
                "dropped connection attempts (slow, malformed or over a limit)"
            );
            self.since = 0;
            self.last = Some(now);
        }
    }
}

impl Gate {
    pub(crate) fn bind(addr: SocketAddr, limits: ListenLimits) -> Result<Gate> {
        limits.check()?;
        let listener = TcpListener::bind(addr).map_err(|e| Error::os("bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::os("O_NONBLOCK", e))?;
        Ok(Gate {
            listener,
            limits,
            pending: Vec::new(),
            log: DropLog::default(),
        })
    }

    pub(crate) fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::os("getsockname", e))
    }

    pub(crate) fn limits(&self) -> &ListenLimits {
        &self.limits
    }

    /// Connections from `ip` the gate holds now.
    fn held_from(&self, ip: IpAddr) -> usize {
        self.pending.iter().filter(|p| p.peer.ip() == ip).count()
    }

    /// Waits for the next connection whose hello is complete. `also_held(ip)` counts what the
    /// provider itself still holds from that address (half-open pairs) against the limits.
    /// Misbehaving peers are dropped and counted in `dropped`; only the deadline or a failing
    /// listener ends the call with an error.
    pub(crate) fn next(
        &mut self,
        framing: &dyn Framing,
        timeout: Option<Duration>,
        also_held: &dyn Fn(IpAddr) -> usize,
        dropped: &AtomicU64,
    ) -> Result<Arrival> {
        let deadline = Deadline::after(timeout);
        loop {
            let now = Instant::now();
            let mut i = 0;
            while i < self.pending.len() {
                if self.pending[i].deadline <= now {
                    let p = self.pending.swap_remove(i);
                    self.log
                        .note(dropped, p.peer, "its hello did not arrive in time");
                } else {
                    i += 1;
                }
            }
            let left = deadline.remaining()?;
            let next_expiry = self
                .pending
                .iter()
                .map(|p| p.deadline.saturating_duration_since(now))
                .min();
            let wait = match (left, next_expiry) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut fds = Vec::with_capacity(self.pending.len() + 1);
            fds.push(self.listener.as_raw_fd());
            fds.extend(self.pending.iter().map(|p| p.stream.as_raw_fd()));
            let ready =
                crate::wait::wait_many(&fds, wait).map_err(|e| Error::os("poll listener", e))?;
            // Hellos first (indexes shift as connections leave, so walk backwards).
            for i in (0..self.pending.len()).rev() {
                if ready[i + 1] == 0 {
                    continue;
                }
                match self.read_some(i, framing) {
                    Step::More => {}
                    Step::Drop(why) => {
                        let p = self.pending.swap_remove(i);
                        self.log.note(dropped, p.peer, &why);
                    }
                    Step::Complete => {
                        let p = self.pending.swap_remove(i);
                        if let Err(e) = p.stream.set_nonblocking(false) {
                            self.log.note(dropped, p.peer, &e.to_string());
                            continue;
                        }
                        return Ok(Arrival {
                            stream: p.stream,
                            peer: p.peer,
                            hello: p.buf,
                        });
                    }
                }
            }
            if ready[0] != 0 {
                self.admit(framing, also_held, dropped)?;
            }
        }
    }

    /// Takes new connections off the backlog, within the limits.
    fn admit(
        &mut self,
        framing: &dyn Framing,
        also_held: &dyn Fn(IpAddr) -> usize,
        dropped: &AtomicU64,
    ) -> Result<()> {
        for _ in 0..ACCEPT_BATCH {
            let (stream, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                // Out of descriptors: what we hold ages out; try again on the next wake-up.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    tracing::warn!(error = %e, "accept failed: out of file descriptors");
                    // The backlog stays readable: do not spin on it.
                    std::thread::sleep(Duration::from_millis(20));
                    return Ok(());
                }
                Err(e) => return Err(Error::os("accept", e)),
            };
            let from_source = self.held_from(peer.ip()) + also_held(peer.ip());
            if from_source >= self.limits.max_per_source {
                // Peers behind one address (a NAT, a shared host) share its places: the oldest
                // unfinished hello from there makes room, so a stalling peer cannot keep a
                // prompt one from the same address out. Only when none is ours to drop (all
                // are the provider's half-open pairs) is the newcomer refused.
                let oldest = (0..self.pending.len())
                    .filter(|&i| self.pending[i].peer.ip() == peer.ip())
                    .min_by_key(|&i| self.pending[i].deadline);
                match oldest {
                    Some(i) => {
                        let p = self.pending.swap_remove(i);
                        self.log.note(
                            dropped,
                            p.peer,
                            "the oldest pending one from an address over its limit",
                        );
                    }
                    None => {
                        self.log
                            .note(dropped, peer, "too many connections from its address");
                        continue;
                    }
                }
            }
            if self.pending.len() >= self.limits.max_pending {
                // The oldest is the likeliest to be stalling on purpose.
                if let Some(oldest) =
                    (0..self.pending.len()).min_by_key(|&i| self.pending[i].deadline)
                {
                    let p = self.pending.swap_remove(oldest);
                    self.log.note(
                        dropped,
                        p.peer,
                        "the oldest pending one, the listener is full",
                    );
                }
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.pending.push(Pending {
                stream,
                peer,
                buf: Vec::with_capacity(framing.header_len()),
                need: framing.header_len(),
                header_done: false,
                deadline: Instant::now() + self.limits.hello_timeout,
            });
        }
        Ok(())
    }

    /// Reads what has arrived on pending connection `i`.
    fn read_some(&mut self, i: usize, framing: &dyn Framing) -> Step {
        let p = &mut self.pending[i];
        loop {
            let have = p.buf.len();
            p.buf.resize(p.need, 0);
            let r = p.stream.read(&mut p.buf[have..]);
            let got = match r {
                Ok(0) => {
                    p.buf.truncate(have);
                    return Step::Drop("the peer closed during its hello".into());
                }
                Ok(n) => n,
                Err(e) => {
                    p.buf.truncate(have);
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Step::More,
                        io::ErrorKind::Interrupted => continue,
                        _ => Step::Drop(format!("reading its hello: {e}")),
                    };
                }
            };
            p.buf.truncate(have + got);
            if p.buf.len() < p.need {
                continue;
            }
            if p.header_done {
                return Step::Complete;
            }
            match framing.body_len(&p.buf) {
                Ok(0) => return Step::Complete,
                Ok(n) => {
                    p.header_done = true;
                    p.need += n;
                }
                Err(refusal) => {
                    if let Some(reply) = refusal.reply {
                        // Best effort: the socket is fresh, the reply small.
                        let _ = p.stream.write(&reply);
                    }
                    return Step::Drop(refusal.reason);
                }
            }
        }
    }
}

enum Step {
    More,
    Complete,
    Drop(String),
}
