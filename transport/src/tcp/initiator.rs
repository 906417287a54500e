//! The initiator half of a `tcp` queue pair: posting requests on the outbound connection,
//! reading their responses, timeouts, and flushing what is outstanding when the queue pair fails.
//!
//! Progress on responses is *manual*: whoever polls the send CQ (or a poster whose socket is
//! full) reads them, so a latency-bound initiator spins in one thread instead of waking another.
//! Lock order: tx -> rx -> pending.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::link_state::LinkState;
use super::qp::{lock, QpShared};
use super::sock::{self, iovec};
use super::wire::{ReqOp, Request, RespKind, Response, MAX_MSG, REQUEST_LEN, RESPONSE_LEN};
use crate::mr::HeldSge;
use crate::{Error, Op, Result, SendWr, WcOpcode, WcStatus};

pub(crate) type Segs = SmallVec<[HeldSge; 4]>;

struct Pending {
    wr_id: u64,
    seq: u32,
    op: ReqOp,
    signaled: bool,
    len: u32,
    /// Local memory of the request, held until its response arrives.
    local: Segs,
    /// When its last byte went to the socket (ns since `epoch`); `NOT_SENT` until then.
    sent_ns: u64,
    /// Bytes written to the socket up to and including it (see `Initiator::written`).
    end_pos: u64,
}

const NOT_SENT: u64 = u64::MAX;

/// Where the READ data being received goes: (pointer, length) pieces.
struct DataState {
    dests: SmallVec<[(usize, usize); 4]>,
    idx: usize,
    off: usize,
}

pub(crate) struct RxState {
    hdr: [u8; RESPONSE_LEN],
    got: usize,
    data: Option<DataState>,
}

struct TxState {
    next_seq: u32,
    headers: Vec<[u8; REQUEST_LEN]>,
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs only point into `headers` and into registered memory held by pending work
// requests; they are rebuilt under the tx lock for every post and never read outside it.
unsafe impl Send for TxState {}

pub(crate) struct Initiator {
    /// Carries our requests out and their responses back.
    out: TcpStream,
    tx: Mutex<TxState>,
    pub(crate) rx: Mutex<RxState>,
    pending: Mutex<VecDeque<Pending>>,
    outstanding: AtomicUsize,
    /// When responses last made progress (ns since `epoch`); outside the rx lock so posters can
    /// restart the clock without taking it.
    last_progress: AtomicU64,
    epoch: Instant,
    /// Bytes written to the socket so far: with the bytes it still holds (`SIOCOUTQ`), where
    /// the peer's acknowledgements have reached.
    written: AtomicU64,
    /// The oldest request found delivered to the peer, and when (ns since `epoch`), by
    /// [`Self::overdue`].
    delivered: Mutex<(u32, u64)>,
}

impl Initiator {
    pub(crate) fn new(out: TcpStream, max_send_wr: usize) -> Initiator {
        Initiator {
            out,
            tx: Mutex::new(TxState {
                next_seq: 0,
                headers: Vec::with_capacity(16),
                iov: Vec::with_capacity(64),
            }),
            rx: Mutex::new(RxState {
                hdr: [0; RESPONSE_LEN],
                got: 0,
                data: None,
            }),
            pending: Mutex::new(VecDeque::with_capacity(max_send_wr)),
            outstanding: AtomicUsize::new(0),
            last_progress: AtomicU64::new(0),
            epoch: Instant::now(),
            written: AtomicU64::new(0),
            delivered: Mutex::new((0, NOT_SENT)),
        }
    }

    /// Shuts the outbound connection down (the fd stays open until the queue pair drops).
    pub(crate) fn shutdown(&self) {
        // SAFETY: shutting down a socket we own.
        unsafe { libc::shutdown(self.out.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Completes everything outstanding after a failure: the first with `first`, the rest with
    /// `WrFlushErr`. The caller holds the rx lock, so no reader is filling a buffer.
    pub(crate) fn flush(&self, q: &QpShared, rx: &mut RxState, first: WcStatus) {
        rx.data = None;
        rx.got = 0;
        let mut status = first;
        let drained: Vec<Pending> = lock(&self.pending).drain(..).collect();
        self.outstanding.store(0, Ordering::Release);
        for p in drained {
            q.send_cq
                .push(q.completion(p.wr_id, status, wc_opcode(p.op), 0));
            status = WcStatus::WrFlushErr;
        }
    }

    fn touch(&self) {
        let ns = self.epoch.elapsed().as_nanos() as u64;
        self.last_progress.store(ns, Ordering::Release);
    }

    /// Stamps the batch `first..first+n` as sent now (those not answered yet).
    fn mark_sent(&self, first: u32, n: u32) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let end = self.written.load(Ordering::Acquire);
        for p in lock(&self.pending).iter_mut().rev() {
            if p.seq.wrapping_sub(first) < n {
                p.sent_ns = now;
                p.end_pos = end;
            } else {
                break;
            }
        }
    }

    /// Whether the peer is late: requests outstanding and no response byte for the operation
    /// timeout, counted from when the oldest request's last byte was sent if that is later (a
    /// sender held up itself, descheduled or in reclaim inside sendmsg, must not find the peer
    /// late on return). A request still being sent is the sender's stall check's business.
    ///
    /// Bytes handed to the socket are not yet the peer's: on a slow or lossy link they may sit
    /// in our send queue for seconds. While the oldest request has not reached the peer, the
    /// peer is late only if the link has gone quiet (see [`link_gone`]); once it has, the
    /// peer gets the operation timeout from when that was first seen.
    fn overdue(&self, q: &QpShared) -> bool {
        let t = q.caps.op_timeout;
        if self.waited().is_none_or(|w| w <= t) {
            return false;
        }
        let Some(link) = LinkState::of(self.out_fd()) else {
            return true;
        };
        let Some((seq, end)) = lock(&self.pending).front().map(|p| (p.seq, p.end_pos)) else {
            return false;
        };
        let acked = self
            .written
            .load(Ordering::Acquire)
            .saturating_sub(u64::from(link.queued));
        if acked < end {
            return link_gone(&link, t);
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        let mut d = lock(&self.delivered);
        if d.0 != seq || d.1 == NOT_SENT {
            *d = (seq, now);
            return false;
        }
        Duration::from_nanos(now.saturating_sub(d.1)) > t
    }

    /// How long the peer has owed an answer, by the rule of [`Self::overdue`]; None when it
    /// owes none yet.
    fn waited(&self) -> Option<Duration> {
        if self.outstanding() == 0 {
            return None;
        }
        let front_sent = lock(&self.pending).front()?.sent_ns;
        if front_sent == NOT_SENT {
            return None;
        }
        let since_sent = self
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_nanos(front_sent));
        Some(self.since_progress().min(since_sent))
    }

    fn since_progress(&self) -> Duration {
        let last = Duration::from_nanos(self.last_progress.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }

    pub(crate) fn out_fd(&self) -> RawFd {
        self.out.as_raw_fd()
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    pub(crate) fn post_send(&self, q: &QpShared, wrs: &[SendWr<'_>]) -> Result<()> {
        let mut tx = lock(&self.tx);
        let tx = &mut *tx;
        let first_seq = tx.next_seq;
        tx.headers.clear();
        tx.headers.reserve(wrs.len());
        tx.iov.clear();
        let mut rejected = None;
        for (i, wr) in wrs.iter().enumerate() {
            if let Err(e) = self.check_wr(q, wr) {
                rejected = Some((i, e));
                break;
            }
            if q.state.is_failed() {
                q.send_cq
                    .push(q.completion(wr.wr_id, WcStatus::WrFlushErr, wr.op.wc_opcode(), 0));
                continue;
            }
            let mut pending = lock(&self.pending);
            if pending.len() >= q.caps.max_send_wr as usize {
                rejected = Some((i, Error::QueueFull(pending.len())));
                break;
            }
            let req = request_for(wr, tx.next_seq);
            tx.next_seq = tx.next_seq.wrapping_add(1);
            // `reserve` above keeps this push from moving earlier headers the iovecs point to.
            tx.headers.push(req.encode());
            let h = tx.headers.last().expect("just pushed");
            tx.iov.push(iovec(h.as_ptr(), REQUEST_LEN));
            if req.op.has_payload() {
                for s in wr.sgl.iter().filter(|s| s.len > 0) {
                    tx.iov
                        .push(iovec(s.mr.addr_at(s.offset) as *const u8, s.len as usize));
                }
            }
            pending.push_back(Pending {
                wr_id: wr.wr_id,
                seq: req.seq,
                op: req.op,
                signaled: wr.signaled,
                len: req.len,
                local: wr.sgl.iter().map(HeldSge::from_sge).collect(),
                sent_ns: NOT_SENT,
                end_pos: u64::MAX,
            });
            if pending.len() == 1 {
                self.touch();
            }
            self.outstanding.fetch_add(1, Ordering::AcqRel);
        }
        if !tx.iov.is_empty() {
            let sent = self.send_requests(q, &mut tx.iov);
            if sent.is_ok() {
                self.mark_sent(first_seq, tx.next_seq.wrapping_sub(first_seq));
            }
            if let Err(e) = sent {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    tracing::warn!(qp = q.num, timeout = ?q.caps.op_timeout,
                        link = %LinkState::describe(self.out_fd()),
                        "requests could not be sent and nothing was answered for the operation timeout");
                } else {
                    tracing::debug!(qp = q.num, error = %e, "request send failed");
                }
                q.fail(WcStatus::RetryExcErr);
            }
        }
        match rejected {
            Some((index, e)) => Err(Error::Rejected {
                index,
                source: Box::new(e),
            }),
            None => Ok(()),
        }
    }

    fn check_wr(&self, q: &QpShared, wr: &SendWr<'_>) -> Result<()> {
        wr.validate(q.caps.max_sge as usize, MAX_MSG)?;
        if wr.sgl.iter().any(|s| s.mr.0.pd_id != q.pd.id) {
            return Err(Error::LocalProtection(
                "an SGE's region belongs to another protection domain",
            ));
        }
        Ok(())
    }

    /// Writes the batched requests; when the socket is full, drains responses so the peer can
    /// keep answering (otherwise both sides could block on full buffers).
    fn send_requests(&self, q: &QpShared, iov: &mut [libc::iovec]) -> std::io::Result<()> {
        let fd = self.out_fd();
        let mut first = sock::advance(iov, 0);
        let mut stalled_since: Option<Instant> = None;
        while first < iov.len() {
            match sock::send_nb(fd, &iov[first..]) {
                Ok(n) => {
                    self.written.fetch_add(n as u64, Ordering::AcqRel);
                    first += sock::advance(&mut iov[first..], n);
                    stalled_since = None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // A full socket is back-pressure, not a dead peer, while the peer still
                    // answers earlier requests or the link still carries our bytes: only a
                    // stall with no answer and a quiet link times out.
                    let t = q.caps.op_timeout;
                    let since = *stalled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > t
                        && self.since_progress() > t
                        && LinkState::of(fd).is_none_or(|l| link_gone(&l, t))
                    {
                        return Err(std::io::ErrorKind::TimedOut.into());
                    }
                    self.progress(q);
                    if q.state.is_failed() {
                        return Err(std::io::ErrorKind::BrokenPipe.into());
                    }
                    sock::wait_fd(
                        fd,
                        libc::POLLOUT | libc::POLLIN,
                        Some(Duration::from_millis(1)),
                    )?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads whatever responses have arrived, without blocking. Returns true if it got the lock.
    pub(crate) fn progress(&self, q: &QpShared) -> bool {
        let Ok(mut rx) = self.rx.try_lock() else {
            return false;
        };
        if let Err(status) = self.progress_locked(q, &mut rx) {
            q.fail_locked(&mut rx, status);
        }
        true
    }

    pub(crate) fn progress_locked(
        &self,
        q: &QpShared,
        rx: &mut RxState,
    ) -> std::result::Result<(), WcStatus> {
        if q.state.is_failed() {
            return Ok(());
        }
        let fd = self.out_fd();
        loop {
            if let Some(d) = rx.data.as_mut() {
                let (ptr, len) = d.dests[d.idx];
                // SAFETY: the destination is inside registered memory held by the front pending
                // request, which only this lock holder removes.
                match unsafe { sock::recv_nb(fd, (ptr as *mut u8).add(d.off), len - d.off) } {
                    Ok(0) => return Err(WcStatus::RetryExcErr),
                    Ok(n) => {
                        self.touch();
                        d.off += n;
                        if d.off == len {
                            d.idx += 1;
                            d.off = 0;
                        }
                        if d.idx == d.dests.len() {
                            rx.data = None;
                            self.complete_front(q, WcStatus::Success);
                        }
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return Err(WcStatus::RetryExcErr),
                }
            }
            if self.outstanding() == 0 {
                break;
            }
            let got = rx.got;
            // SAFETY: writes stay inside `rx.hdr` (got < RESPONSE_LEN).
            match unsafe { sock::recv_nb(fd, rx.hdr.as_mut_ptr().add(got), RESPONSE_LEN - got) } {
                Ok(0) => return Err(WcStatus::RetryExcErr),
                Ok(n) => {
                    self.touch();
                    rx.got += n;
                    if rx.got < RESPONSE_LEN {
                        continue;
                    }
                    rx.got = 0;
                    let resp = Response::decode(&rx.hdr).map_err(|e| {
                        tracing::warn!(qp = q.num, error = %e, "malformed response");
                        WcStatus::BadRespErr
                    })?;
                    self.handle_response(q, rx, resp)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(WcStatus::RetryExcErr),
            }
        }
        if self.overdue(q) {
            tracing::warn!(qp = q.num, timeout = ?q.caps.op_timeout,
                link = %LinkState::describe(fd), "no response for the operation timeout");
            return Err(WcStatus::RetryExcErr);
        }
        Ok(())
    }

    fn handle_response(
        &self,
        q: &QpShared,
        rx: &mut RxState,
        resp: Response,
    ) -> std::result::Result<(), WcStatus> {
        let pending = lock(&self.pending);
        let Some(front) = pending.front() else {
            return Err(WcStatus::BadRespErr);
        };
        if front.seq != resp.seq {
            return Err(WcStatus::BadRespErr);
        }
        match (resp.kind, front.op) {
            (RespKind::Nak, _) => {
                drop(pending);
                return Err(resp.nak.map_or(WcStatus::BadRespErr, |n| n.wc_status()));
            }
            (RespKind::Ack, ReqOp::Write | ReqOp::WriteImm | ReqOp::Send | ReqOp::SendImm) => {
                drop(pending);
                self.complete_front(q, WcStatus::Success);
            }
            (RespKind::Atomic, ReqOp::CompareSwap | ReqOp::FetchAdd) => {
                let bytes = resp.value.to_ne_bytes();
                let mut at = 0;
                for s in &front.local {
                    let n = s.len as usize;
                    // SAFETY: the SGEs total exactly 8 bytes (checked at post) and are held alive
                    // by the pending request.
                    unsafe { std::ptr::copy_nonoverlapping(bytes[at..].as_ptr(), s.ptr(), n) };
                    at += n;
                }
                drop(pending);
                self.complete_front(q, WcStatus::Success);
            }
            (RespKind::ReadData, ReqOp::Read) if resp.len == front.len => {
                let dests: SmallVec<[(usize, usize); 4]> = front
                    .local
                    .iter()
                    .filter(|s| s.len > 0)
                    .map(|s| (s.ptr() as usize, s.len as usize))
                    .collect();
                drop(pending);
                if dests.is_empty() {
                    self.complete_front(q, WcStatus::Success);
                } else {
                    rx.data = Some(DataState {
                        dests,
                        idx: 0,
                        off: 0,
                    });
                }
            }
            _ => return Err(WcStatus::BadRespErr),
        }
        Ok(())
    }

    fn complete_front(&self, q: &QpShared, status: WcStatus) {
        let p = lock(&self.pending).pop_front();
        if let Some(p) = p {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            if p.signaled || !status.is_ok() {
                let len = if p.op == ReqOp::Read { p.len } else { 0 };
                q.send_cq
                    .push(q.completion(p.wr_id, status, wc_opcode(p.op), len));
            }
        }
    }

    /// Called when the socket is readable while nothing is outstanding: only EOF or garbage can
    /// be there.
    pub(crate) fn check_idle(&self, q: &QpShared) {
        if self.outstanding() > 0 || q.state.is_failed() {
            return;
        }
        let ev = sock::wait_fd(
            self.out_fd(),
            libc::POLLIN | libc::POLLRDHUP,
            Some(Duration::ZERO),
        )
        .unwrap_or(libc::POLLERR);
        if ev & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            q.fail(WcStatus::RetryExcErr);
        } else if ev & libc::POLLIN != 0 {
            tracing::warn!(qp = q.num, "unsolicited bytes from peer");
            q.fail(WcStatus::BadRespErr);
        }
    }

    /// Time left before the oldest outstanding request times out.
    pub(crate) fn deadline_in(&self, q: &QpShared) -> Option<Duration> {
        if self.outstanding() == 0 || q.state.is_failed() {
            return None;
        }
        let waited = self.waited().unwrap_or_default();
        Some(q.caps.op_timeout.saturating_sub(waited))
    }
}

fn wc_opcode(op: ReqOp) -> WcOpcode {
    match op {
        ReqOp::Write | ReqOp::WriteImm => WcOpcode::Write,
        ReqOp::Read => WcOpcode::Read,
        ReqOp::Send | ReqOp::SendImm => WcOpcode::Send,
        ReqOp::CompareSwap => WcOpcode::CompareSwap,
        ReqOp::FetchAdd => WcOpcode::FetchAdd,
    }
}

fn request_for(wr: &SendWr<'_>, seq: u32) -> Request {
    let len = wr.total_len() as u32;
    let (op, addr, rkey, arg0, arg1) = match wr.op {
        Op::Read(r) => (ReqOp::Read, r.addr, r.rkey, 0, 0),
        Op::Write(r) => (ReqOp::Write, r.addr, r.rkey, 0, 0),
        Op::WriteImm(r, imm) => (ReqOp::WriteImm, r.addr, r.rkey, u64::from(imm), 0),
        Op::Send => (ReqOp::Send, 0, 0, 0, 0),
        Op::SendImm(imm) => (ReqOp::SendImm, 0, 0, u64::from(imm), 0),
        Op::CompareSwap {
            remote,
            compare,
            swap,
        } => (ReqOp::CompareSwap, remote.addr, remote.rkey, compare, swap),
        Op::FetchAdd { remote, add } => (ReqOp::FetchAdd, remote.addr, remote.rkey, add, 0),
    };
    Request {
        op,
        len,
        seq,
        rkey,
        addr,
        arg0,
        arg1,
    }
}

/// Whether a link with our bytes on it has gone quiet for `t`: no acknowledgement for that
/// long (the peer's host or the path is gone), or a closed window (the peer stopped reading).
/// A link that keeps acknowledging, however slowly, is carrying our bytes to a live peer.
fn link_gone(link: &LinkState, t: Duration) -> bool {
    link.peer_window == 0 || u128::from(link.since_ack_recv_ms) >= t.as_millis()
}
