//! A `tcp` queue pair: the initiator half (posting requests, reading their responses, timeouts,
//! failure and flush). The responder half runs in `target.rs`.
//!
//! Progress on responses is *manual*: whoever polls the send CQ (or a poster whose socket is
//! full) reads them, so a latency-bound initiator spins in one thread instead of waking another.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::cq::TcpCq;
use super::sock::{self, iovec};
use super::wire::{ReqOp, Request, RespKind, Response, MAX_MSG, REQUEST_LEN, RESPONSE_LEN};
use super::{Counters, TcpPd};
use crate::backend::QpOps;
use crate::mr::HeldSge;
use crate::types::QpCaps;
use crate::{Completion, Error, Op, RecvWr, Result, SendWr, WcOpcode, WcStatus};

type Segs = SmallVec<[HeldSge; 4]>;

struct Pending {
    wr_id: u64,
    seq: u32,
    op: ReqOp,
    signaled: bool,
    len: u32,
    /// Local memory of the request, held until its response arrives.
    local: Segs,
}

pub(crate) struct PostedRecv {
    pub(crate) wr_id: u64,
    pub(crate) segs: Segs,
    pub(crate) total: u64,
}

/// Where the READ data being received goes: (pointer, length) pieces.
struct DataState {
    dests: SmallVec<[(usize, usize); 4]>,
    idx: usize,
    off: usize,
}

struct RxState {
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

pub(crate) struct QpShared {
    pub(crate) num: u32,
    pub(crate) caps: QpCaps,
    pub(crate) pd: Arc<TcpPd>,
    pub(crate) send_cq: Arc<TcpCq>,
    pub(crate) recv_cq: Arc<TcpCq>,
    pub(crate) stats: Arc<Counters>,
    /// Carries our requests out and their responses back.
    out: TcpStream,
    /// Carries the peer's requests in and our responses back (served by `target.rs`).
    pub(crate) inn: TcpStream,
    tx: Mutex<TxState>,
    rx: Mutex<RxState>,
    pending: Mutex<VecDeque<Pending>>,
    outstanding: AtomicUsize,
    failed: AtomicBool,
    first_error: AtomicU32,
    recvs: Mutex<VecDeque<PostedRecv>>,
    recv_cv: Condvar,
    /// When responses last made progress (ns since `epoch`); outside the rx lock so posters can
    /// restart the clock without taking it (lock order is tx -> rx -> pending).
    last_progress: AtomicU64,
    epoch: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves only plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl QpShared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        num: u32,
        caps: QpCaps,
        pd: Arc<TcpPd>,
        send_cq: Arc<TcpCq>,
        recv_cq: Arc<TcpCq>,
        stats: Arc<Counters>,
        out: TcpStream,
        inn: TcpStream,
    ) -> QpShared {
        QpShared {
            num,
            caps,
            pd,
            send_cq,
            recv_cq,
            stats,
            out,
            inn,
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
            pending: Mutex::new(VecDeque::with_capacity(caps.max_send_wr as usize)),
            outstanding: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            first_error: AtomicU32::new(WcStatus::WrFlushErr as u32),
            recvs: Mutex::new(VecDeque::with_capacity(caps.max_recv_wr as usize)),
            recv_cv: Condvar::new(),
            last_progress: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn touch(&self) {
        let ns = self.epoch.elapsed().as_nanos() as u64;
        self.last_progress.store(ns, Ordering::Release);
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

    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn completion(&self, wr_id: u64, status: WcStatus, opcode: WcOpcode, len: u32) -> Completion {
        Completion {
            wr_id,
            status,
            opcode,
            byte_len: len,
            imm: None,
            qp_num: self.num,
        }
    }

    pub(crate) fn post_send(&self, wrs: &[SendWr<'_>]) -> Result<()> {
        let mut tx = lock(&self.tx);
        let tx = &mut *tx;
        tx.headers.clear();
        tx.headers.reserve(wrs.len());
        tx.iov.clear();
        let mut rejected = None;
        for (i, wr) in wrs.iter().enumerate() {
            if let Err(e) = self.check_wr(wr) {
                rejected = Some((i, e));
                break;
            }
            if self.is_failed() {
                self.send_cq.push(self.completion(
                    wr.wr_id,
                    WcStatus::WrFlushErr,
                    wr.op.wc_opcode(),
                    0,
                ));
                continue;
            }
            let mut pending = lock(&self.pending);
            if pending.len() >= self.caps.max_send_wr as usize {
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
            });
            if pending.len() == 1 {
                self.touch();
            }
            self.outstanding.fetch_add(1, Ordering::AcqRel);
        }
        if !tx.iov.is_empty() {
            if let Err(e) = self.send_requests(&mut tx.iov) {
                tracing::debug!(qp = self.num, error = %e, "request send failed");
                self.fail(WcStatus::RetryExcErr);
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

    fn check_wr(&self, wr: &SendWr<'_>) -> Result<()> {
        wr.validate(self.caps.max_sge as usize, MAX_MSG)?;
        if wr.sgl.iter().any(|s| s.mr.0.pd_id != self.pd.id) {
            return Err(Error::LocalProtection(
                "an SGE's region belongs to another protection domain",
            ));
        }
        Ok(())
    }

    /// Writes the batched requests; when the socket is full, drains responses so the peer can
    /// keep answering (otherwise both sides could block on full buffers).
    fn send_requests(&self, iov: &mut [libc::iovec]) -> std::io::Result<()> {
        let fd = self.out_fd();
        let mut first = sock::advance(iov, 0);
        let mut stalled_since: Option<Instant> = None;
        while first < iov.len() {
            match sock::send_nb(fd, &iov[first..]) {
                Ok(n) => {
                    first += sock::advance(&mut iov[first..], n);
                    stalled_since = None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let since = *stalled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.caps.op_timeout {
                        return Err(std::io::ErrorKind::TimedOut.into());
                    }
                    self.progress();
                    if self.is_failed() {
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

    pub(crate) fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        for (i, wr) in wrs.iter().enumerate() {
            let check = wr.validate(self.caps.max_sge as usize).and_then(|_| {
                if wr.sgl.iter().any(|s| s.mr.0.pd_id != self.pd.id) {
                    Err(Error::LocalProtection(
                        "an SGE's region belongs to another protection domain",
                    ))
                } else {
                    Ok(())
                }
            });
            if let Err(e) = check {
                return Err(Error::Rejected {
                    index: i,
                    source: Box::new(e),
                });
            }
            if self.is_failed() {
                self.recv_cq.push(self.completion(
                    wr.wr_id,
                    WcStatus::WrFlushErr,
                    WcOpcode::Recv,
                    0,
                ));
                continue;
            }
            let mut q = lock(&self.recvs);
            if q.len() >= self.caps.max_recv_wr as usize {
                return Err(Error::Rejected {
                    index: i,
                    source: Box::new(Error::QueueFull(q.len())),
                });
            }
            q.push_back(PostedRecv {
                wr_id: wr.wr_id,
                segs: wr.sgl.iter().map(HeldSge::from_sge).collect(),
                total: wr.sgl.iter().map(|s| u64::from(s.len)).sum(),
            });
            self.recv_cv.notify_one();
        }
        Ok(())
    }

    /// Takes the next posted receive, waiting up to the RNR timeout for one.
    pub(crate) fn take_recv(&self) -> Option<PostedRecv> {
        let deadline = Instant::now() + self.caps.rnr_timeout;
        let mut q = lock(&self.recvs);
        loop {
            if let Some(r) = q.pop_front() {
                return Some(r);
            }
            let now = Instant::now();
            if self.is_failed() || now >= deadline {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            q = self
                .recv_cv
                .wait_timeout(q, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reads whatever responses have arrived, without blocking. Returns true if it got the lock.
    pub(crate) fn progress(&self) -> bool {
        let Ok(mut rx) = self.rx.try_lock() else {
            return false;
        };
        if let Err(status) = self.progress_locked(&mut rx) {
            self.fail_locked(&mut rx, status);
        }
        true
    }

    fn progress_locked(&self, rx: &mut RxState) -> std::result::Result<(), WcStatus> {
        if self.is_failed() {
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
                            self.complete_front(WcStatus::Success);
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
                        tracing::warn!(qp = self.num, error = %e, "malformed response");
                        WcStatus::BadRespErr
                    })?;
                    self.handle_response(rx, resp)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(WcStatus::RetryExcErr),
            }
        }
        if self.outstanding() > 0 && self.since_progress() > self.caps.op_timeout {
            tracing::debug!(qp = self.num, "response timeout");
            return Err(WcStatus::RetryExcErr);
        }
        Ok(())
    }

    fn handle_response(
        &self,
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
                self.complete_front(WcStatus::Success);
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
                self.complete_front(WcStatus::Success);
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
                    self.complete_front(WcStatus::Success);
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

    fn complete_front(&self, status: WcStatus) {
        let p = lock(&self.pending).pop_front();
        if let Some(p) = p {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            if p.signaled || !status.is_ok() {
                let len = if p.op == ReqOp::Read { p.len } else { 0 };
                self.send_cq
                    .push(self.completion(p.wr_id, status, wc_opcode(p.op), len));
            }
        }
    }

    /// Fails the queue pair from any thread: the first outstanding request completes with
    /// `status`, everything else with `WrFlushErr`, and both connections close.
    pub(crate) fn fail(&self, status: WcStatus) {
        if self.mark_failed(status) {
            // Wait for a concurrent reader to leave the buffers it may be filling.
            let mut rx = lock(&self.rx);
            self.flush(&mut rx);
        }
    }

    /// The peer closed our inbound connection. Responses it sent before closing may still sit
    /// unread on the other connection: take them (up to a short grace) so work the peer finished
    /// completes successfully, then fail the rest.
    pub(crate) fn peer_gone(&self) {
        if self.is_failed() {
            return;
        }
        let mut rx = lock(&self.rx);
        let deadline = Instant::now() + self.caps.op_timeout.min(Duration::from_secs(1));
        while self.outstanding() > 0 {
            if let Err(status) = self.progress_locked(&mut rx) {
                self.fail_locked(&mut rx, status);
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.outstanding() == 0 {
                break;
            }
            let _ = sock::wait_fd(
                self.out_fd(),
                libc::POLLIN,
                Some(left.min(Duration::from_millis(10))),
            );
        }
        self.fail_locked(&mut rx, WcStatus::RetryExcErr);
    }

    fn fail_locked(&self, rx: &mut RxState, status: WcStatus) {
        if self.mark_failed(status) {
            self.flush(rx);
        }
    }

    fn mark_failed(&self, status: WcStatus) -> bool {
        if self.failed.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.first_error.store(status as u32, Ordering::Release);
        tracing::debug!(qp = self.num, %status, "queue pair failed");
        // SAFETY: shutting down sockets we own; the fds stay open until the streams drop.
        unsafe {
            libc::shutdown(self.out.as_raw_fd(), libc::SHUT_RDWR);
            libc::shutdown(self.inn.as_raw_fd(), libc::SHUT_RDWR);
        }
        self.send_cq.forget_fd(self.out_fd());
        self.recv_cv.notify_all();
        true
    }

    fn flush(&self, rx: &mut RxState) {
        rx.data = None;
        rx.got = 0;
        let mut status = WcStatus::from_raw(self.first_error.load(Ordering::Acquire));
        let drained: Vec<Pending> = lock(&self.pending).drain(..).collect();
        self.outstanding.store(0, Ordering::Release);
        for p in drained {
            self.send_cq
                .push(self.completion(p.wr_id, status, wc_opcode(p.op), 0));
            status = WcStatus::WrFlushErr;
        }
        let recvs: Vec<PostedRecv> = lock(&self.recvs).drain(..).collect();
        for r in recvs {
            self.recv_cq
                .push(self.completion(r.wr_id, WcStatus::WrFlushErr, WcOpcode::Recv, 0));
        }
    }

    /// Called when the socket is readable while nothing is outstanding: only EOF or garbage can
    /// be there.
    pub(crate) fn check_idle(&self) {
        if self.outstanding() > 0 || self.is_failed() {
            return;
        }
        let ev = sock::wait_fd(
            self.out_fd(),
            libc::POLLIN | libc::POLLRDHUP,
            Some(Duration::ZERO),
        )
        .unwrap_or(libc::POLLERR);
        if ev & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            self.fail(WcStatus::RetryExcErr);
        } else if ev & libc::POLLIN != 0 {
            tracing::warn!(qp = self.num, "unsolicited bytes from peer");
            self.fail(WcStatus::BadRespErr);
        }
    }

    /// Time left before the oldest outstanding request times out.
    pub(crate) fn deadline_in(&self) -> Option<Duration> {
        if self.outstanding() == 0 || self.is_failed() {
            return None;
        }
        Some(self.caps.op_timeout.saturating_sub(self.since_progress()))
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

/// The handle the public `Qp` holds: owns the target thread.
pub(crate) struct TcpQp {
    pub(crate) shared: Arc<QpShared>,
    pub(crate) target: Mutex<Option<JoinHandle<()>>>,
}

impl QpOps for TcpQp {
    fn qp_num(&self) -> u32 {
        self.shared.num
    }
    fn post_send(&self, wrs: &[SendWr<'_>]) -> Result<()> {
        self.shared.post_send(wrs)
    }
    fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        self.shared.post_recv(wrs)
    }
    fn is_error(&self) -> bool {
        self.shared.is_failed()
    }
    fn shutdown(&self) {
        self.shared.fail(WcStatus::WrFlushErr);
        let handle = lock(&self.target).take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() && h.join().is_err() {
                tracing::error!(qp = self.shared.num, "target thread panicked");
            }
        }
    }
}
