//! The responder half of a `tcp` queue pair: the inbound connection the peer's requests arrive
//! on (served by the target thread in `target.rs`) and the receive queue its SENDs land in.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::initiator::Segs;
use super::qp::{lock, QpShared};
use crate::mr::HeldSge;
use crate::{Error, RecvWr, Result, WcOpcode, WcStatus};

pub(crate) struct PostedRecv {
    pub(crate) wr_id: u64,
    pub(crate) segs: Segs,
    pub(crate) total: u64,
}

pub(crate) struct Responder {
    /// Carries the peer's requests in and our responses back.
    inn: TcpStream,
    recvs: Mutex<VecDeque<PostedRecv>>,
    recv_cv: Condvar,
}

impl Responder {
    pub(crate) fn new(inn: TcpStream, max_recv_wr: usize) -> Responder {
        Responder {
            inn,
            recvs: Mutex::new(VecDeque::with_capacity(max_recv_wr)),
            recv_cv: Condvar::new(),
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.inn.as_raw_fd()
    }

    /// Shuts the inbound connection down (ending the target thread's reads) and wakes a
    /// target waiting for a receive.
    pub(crate) fn shutdown(&self) {
        // SAFETY: shutting down a socket we own; the fd stays open until the queue pair drops.
        unsafe { libc::shutdown(self.inn.as_raw_fd(), libc::SHUT_RDWR) };
        self.recv_cv.notify_all();
    }

    /// Completes every posted receive with `WrFlushErr` after a failure.
    pub(crate) fn flush(&self, q: &QpShared) {
        let recvs: Vec<PostedRecv> = lock(&self.recvs).drain(..).collect();
        for r in recvs {
            q.recv_cq
                .push(q.completion(r.wr_id, WcStatus::WrFlushErr, WcOpcode::Recv, 0));
        }
    }

    pub(crate) fn post_recv(&self, q: &QpShared, wrs: &[RecvWr<'_>]) -> Result<()> {
        for (i, wr) in wrs.iter().enumerate() {
            let check = wr.validate(q.caps.max_sge as usize).and_then(|_| {
                if wr.sgl.iter().any(|s| s.mr.0.pd_id != q.pd.id) {
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
            if q.state.is_failed() {
                q.recv_cq
                    .push(q.completion(wr.wr_id, WcStatus::WrFlushErr, WcOpcode::Recv, 0));
                continue;
            }
            let mut queue = lock(&self.recvs);
            if queue.len() >= q.caps.max_recv_wr as usize {
                return Err(Error::Rejected {
                    index: i,
                    source: Box::new(Error::QueueFull(queue.len())),
                });
            }
            queue.push_back(PostedRecv {
                wr_id: wr.wr_id,
                segs: wr.sgl.iter().map(HeldSge::from_sge).collect(),
                total: wr.sgl.iter().map(|s| u64::from(s.len)).sum(),
            });
            self.recv_cv.notify_one();
        }
        Ok(())
    }

    /// Takes the next posted receive, waiting up to the RNR timeout for one.
    pub(crate) fn take_recv(&self, q: &QpShared) -> Option<PostedRecv> {
        let deadline = Instant::now() + q.caps.rnr_timeout;
        let mut queue = lock(&self.recvs);
        loop {
            if let Some(r) = queue.pop_front() {
                return Some(r);
            }
            let now = Instant::now();
            if q.state.is_failed() || now >= deadline {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            queue = self
                .recv_cv
                .wait_timeout(queue, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
