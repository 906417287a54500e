//! A `tcp` queue pair: its two halves around one [`QpState`]. The [`Initiator`] posts our
//! requests and reads their responses on the outbound connection; the [`Responder`] holds the
//! inbound connection the target thread (`target.rs`) serves and the receive queue. Failure is
//! the one thing both halves share, so it lives here: the state moves to `Error` once, both
//! connections close, and each half flushes its own queue.

use std::net::TcpStream;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cq::TcpCq;
use super::initiator::{Initiator, RxState};
use super::responder::{PostedRecv, Responder};
use super::sock;
use super::state::{QpState, StateCell};
use super::{Counters, TcpPd};
use crate::backend::QpOps;
use crate::types::QpCaps;
use crate::{Completion, RecvWr, Result, SendWr, WcOpcode, WcStatus};

pub(crate) struct QpShared {
    pub(crate) num: u32,
    pub(crate) caps: QpCaps,
    pub(crate) pd: Arc<TcpPd>,
    pub(crate) send_cq: Arc<TcpCq>,
    pub(crate) recv_cq: Arc<TcpCq>,
    pub(crate) stats: Arc<Counters>,
    pub(crate) state: StateCell,
    pub(crate) initiator: Initiator,
    pub(crate) responder: Responder,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
            state: StateCell::new(),
            initiator: Initiator::new(out, caps.max_send_wr as usize),
            responder: Responder::new(inn, caps.max_recv_wr as usize),
        }
    }

    pub(crate) fn completion(
        &self,
        wr_id: u64,
        status: WcStatus,
        opcode: WcOpcode,
        len: u32,
    ) -> Completion {
        Completion {
            wr_id,
            status,
            opcode,
            byte_len: len,
            imm: None,
            qp_num: self.num,
        }
    }

    pub(crate) fn out_fd(&self) -> RawFd {
        self.initiator.out_fd()
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.initiator.outstanding()
    }

    /// Reads whatever responses have arrived, without blocking (see [`Initiator::progress`]).
    pub(crate) fn progress(&self) -> bool {
        self.initiator.progress(self)
    }

    pub(crate) fn check_idle(&self) {
        self.initiator.check_idle(self)
    }

    pub(crate) fn deadline_in(&self) -> Option<Duration> {
        self.initiator.deadline_in(self)
    }

    /// Takes the next posted receive for the target, waiting up to the RNR timeout.
    pub(crate) fn take_recv(&self) -> Option<PostedRecv> {
        self.responder.take_recv(self)
    }

    /// Fails the queue pair from any thread: the first outstanding request completes with
    /// `status`, everything else with `WrFlushErr`, and both connections close.
    pub(crate) fn fail(&self, status: WcStatus) {
        if self.mark_failed(status) {
            // Wait for a concurrent reader to leave the buffers it may be filling.
            let mut rx = lock(&self.initiator.rx);
            self.flush(&mut rx, status);
        }
    }

    /// The peer closed our inbound connection. Responses it sent before closing may still sit
    /// unread on the other connection: take them (up to a short grace) so work the peer finished
    /// completes successfully, then fail the rest.
    pub(crate) fn peer_gone(&self) {
        if self.state.is_failed() {
            return;
        }
        let mut rx = lock(&self.initiator.rx);
        let deadline = Instant::now() + self.caps.op_timeout.min(Duration::from_secs(1));
        while self.outstanding() > 0 {
            if let Err(status) = self.initiator.progress_locked(self, &mut rx) {
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

    /// [`fail`](Self::fail) for a caller that already holds the rx lock.
    pub(crate) fn fail_locked(&self, rx: &mut RxState, status: WcStatus) {
        if self.mark_failed(status) {
            self.flush(rx, status);
        }
    }

    /// The one transition: `Ready -> Error`. Only the caller that makes it closes the
    /// connections and flushes.
    fn mark_failed(&self, status: WcStatus) -> bool {
        if !self.state.fail(status) {
            return false;
        }
        tracing::debug!(qp = self.num, %status, "queue pair failed");
        self.initiator.shutdown();
        self.responder.shutdown();
        self.send_cq.forget_fd(self.out_fd());
        true
    }

    fn flush(&self, rx: &mut RxState, status: WcStatus) {
        debug_assert_eq!(self.state.get(), QpState::Error { first: status });
        self.initiator.flush(self, rx, status);
        self.responder.flush(self);
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
        self.shared.initiator.post_send(&self.shared, wrs)
    }
    fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        self.shared.responder.post_recv(&self.shared, wrs)
    }
    fn is_error(&self) -> bool {
        self.shared.state.is_failed()
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
