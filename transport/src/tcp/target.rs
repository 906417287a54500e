//! The responder: one thread per queue pair executes the peer's requests directly against
//! registered memory, after checking key, bounds and rights. The application never sees them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::link_state::LinkState;
use super::qp::QpShared;
use super::sock::{self, iovec};
use super::wire::{NakCode, ReqOp, Request, RespKind, Response, REQUEST_LEN};
use crate::{Access, Completion, WcOpcode, WcStatus};

/// See [`stall_limit`].
const PEER_STALL: Duration = Duration::from_secs(30);

/// How long a live peer may stop sending a frame it began, or stop acknowledging our bytes,
/// before it is dropped: the operation timeout or 30 s, whichever is longer. Keepalive already
/// ends a peer whose host is gone (in about 6 s), so this bounds a live peer that is held up (a
/// borrower in memory reclaim, say), which should finish, not lose its queue pair.
pub(super) fn stall_limit(op_timeout: Duration) -> Duration {
    op_timeout.max(PEER_STALL)
}

/// Why serving stopped.
enum Stop {
    /// The peer closed or vanished.
    PeerGone,
    /// The peer sent something that is not the protocol; the connection cannot continue.
    Protocol,
}

pub(crate) fn serve(q: Arc<QpShared>) {
    let mut t = Target {
        fd: q.responder.fd(),
        q,
        scratch: Vec::new(),
    };
    match t.run() {
        Stop::PeerGone => t.q.peer_gone(),
        Stop::Protocol => t.q.fail(WcStatus::WrFlushErr),
    }
}

/// A checked remote range: the region's entry (held) and the first byte.
struct Resolved(Option<Arc<super::MrEntry>>, *mut u8);

struct Target {
    q: Arc<QpShared>,
    fd: std::os::fd::RawFd,
    scratch: Vec<u8>,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Target {
    fn run(&mut self) -> Stop {
        let mut expected = 0u32;
        loop {
            let mut hdr = [0u8; REQUEST_LEN];
            // Between requests an idle peer is fine: wait without a deadline (keepalive and the
            // peer's own timeouts cover a vanished host).
            // SAFETY: a stack buffer of exactly REQUEST_LEN bytes.
            let got = unsafe {
                sock::recv_exact(
                    self.fd,
                    hdr.as_mut_ptr(),
                    REQUEST_LEN,
                    self.q.caps.target_spin,
                    None,
                )
            };
            match got {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!(qp = self.q.num, "truncated request header");
                    bump(&self.q.stats.protocol_errors, 1);
                    return Stop::Protocol;
                }
                Err(_) => return Stop::PeerGone,
            }
            let req = match Request::decode(&hdr) {
                Ok(r) if r.seq == expected => r,
                Ok(r) => {
                    tracing::warn!(
                        qp = self.q.num,
                        got = r.seq,
                        expected,
                        "request out of sequence"
                    );
                    return self.protocol_error(r.seq);
                }
                Err(e) => {
                    tracing::warn!(qp = self.q.num, error = %e, "malformed request");
                    let seq = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes"));
                    return self.protocol_error(seq);
                }
            };
            expected = expected.wrapping_add(1);
            bump(&self.q.stats.requests, 1);
            if let Err(stop) = self.execute(&req) {
                return stop;
            }
        }
    }

    fn protocol_error(&mut self, seq: u32) -> Stop {
        bump(&self.q.stats.protocol_errors, 1);
        let _ = self.respond(&Response::nak(seq, NakCode::InvalidRequest), None);
        Stop::Protocol
    }

    fn execute(&mut self, req: &Request) -> Result<(), Stop> {
        match req.op {
            ReqOp::Write | ReqOp::WriteImm => self.write(req),
            ReqOp::Read => self.read(req),
            ReqOp::CompareSwap | ReqOp::FetchAdd => self.atomic(req),
            ReqOp::Send | ReqOp::SendImm => self.send(req),
        }
    }

    /// Resolves the request's remote range, or answers it with a NAK.
    /// The returned entry keeps the region mapped while the request is carried out.
    fn resolve(&mut self, req: &Request, need: Access) -> Result<Option<Resolved>, Stop> {
        if req.len == 0 {
            return Ok(Some(Resolved(None, std::ptr::null_mut())));
        }
        match self
            .q
            .pd
            .resolve(req.rkey, req.addr, u64::from(req.len), need)
        {
            Some((entry, ptr)) => Ok(Some(Resolved(Some(entry), ptr))),
            None => {
                bump(&self.q.stats.access_errors, 1);
                if req.op.has_payload() {
                    self.discard(req.len as usize)?;
                }
                self.respond(&Response::nak(req.seq, NakCode::RemoteAccess), None)?;
                Ok(None)
            }
        }
    }

    fn write(&mut self, req: &Request) -> Result<(), Stop> {
        let Some(Resolved(_hold, ptr)) = self.resolve(req, Access::REMOTE_WRITE)? else {
            return Ok(());
        };
        if req.len > 0 {
            // SAFETY: `resolve` checked that [ptr, ptr+len) lies inside a registered region, and
            // `_hold` keeps that region mapped until this request is answered, even if it is
            // deregistered meanwhile.
            unsafe { self.recv_into(ptr, req.len as usize)? };
            bump(&self.q.stats.bytes_written, u64::from(req.len));
        }
        if req.op == ReqOp::WriteImm {
            let Some(recv) = self.q.take_recv() else {
                bump(&self.q.stats.rnr_naks, 1);
                return self.respond(&Response::nak(req.seq, NakCode::ReceiverNotReady), None);
            };
            // Acknowledge before the receiver can see its completion: a receiver that tears the
            // queue pair down on that completion must not lose the sender's acknowledgement.
            self.respond(&Response::ack(req.seq), None)?;
            self.q.recv_cq.push(Completion {
                wr_id: recv.wr_id,
                status: WcStatus::Success,
                opcode: WcOpcode::RecvWithImm,
                byte_len: req.len,
                imm: Some(req.arg0 as u32),
                qp_num: self.q.num,
            });
            return Ok(());
        }
        self.respond(&Response::ack(req.seq), None)
    }

    fn read(&mut self, req: &Request) -> Result<(), Stop> {
        let Some(Resolved(_hold, ptr)) = self.resolve(req, Access::REMOTE_READ)? else {
            return Ok(());
        };
        let resp = Response {
            kind: RespKind::ReadData,
            nak: None,
            len: req.len,
            seq: req.seq,
            value: 0,
        };
        bump(&self.q.stats.bytes_read, u64::from(req.len));
        self.respond(&resp, Some((ptr, req.len as usize)))
    }

    fn atomic(&mut self, req: &Request) -> Result<(), Stop> {
        let Some(Resolved(_hold, ptr)) = self.resolve(req, Access::REMOTE_ATOMIC)? else {
            return Ok(());
        };
        // The advertised address is 8-byte aligned (checked by the decoder), but memory a caller
        // registered itself may sit at any host address.
        if !(ptr as usize).is_multiple_of(8) {
            return self.respond(&Response::nak(req.seq, NakCode::InvalidRequest), None);
        }
        // SAFETY: `resolve` checked the 8 bytes are inside a live region, `_hold` keeps it mapped,
        // and the host address is 8-byte aligned (checked above).
        let word = unsafe { AtomicU64::from_ptr(ptr.cast()) };
        let old = match req.op {
            ReqOp::CompareSwap => {
                match word.compare_exchange(req.arg0, req.arg1, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(v) | Err(v) => v,
                }
            }
            _ => word.fetch_add(req.arg0, Ordering::AcqRel),
        };
        bump(&self.q.stats.atomics, 1);
        let resp = Response {
            kind: RespKind::Atomic,
            nak: None,
            len: 0,
            seq: req.seq,
            value: old,
        };
        self.respond(&resp, None)
    }

    fn send(&mut self, req: &Request) -> Result<(), Stop> {
        let Some(recv) = self.q.take_recv() else {
            bump(&self.q.stats.rnr_naks, 1);
            self.discard(req.len as usize)?;
            return self.respond(&Response::nak(req.seq, NakCode::ReceiverNotReady), None);
        };
        let imm = (req.op == ReqOp::SendImm).then_some(req.arg0 as u32);
        let opcode = WcOpcode::Recv;
        if u64::from(req.len) > recv.total {
            self.discard(req.len as usize)?;
            self.q.recv_cq.push(Completion {
                wr_id: recv.wr_id,
                status: WcStatus::LocLenErr,
                opcode,
                byte_len: 0,
                imm: None,
                qp_num: self.q.num,
            });
            return self.respond(&Response::nak(req.seq, NakCode::InvalidRequest), None);
        }
        let mut left = req.len as usize;
        for s in &recv.segs {
            if left == 0 {
                break;
            }
            let n = left.min(s.len as usize);
            // SAFETY: the posted receive holds its regions alive and its SGEs were bounds-checked
            // when they were built.
            unsafe { self.recv_into(s.ptr(), n)? };
            left -= n;
        }
        // Acknowledge first, as for WRITE_WITH_IMM.
        self.respond(&Response::ack(req.seq), None)?;
        self.q.recv_cq.push(Completion {
            wr_id: recv.wr_id,
            status: WcStatus::Success,
            opcode,
            byte_len: req.len,
            imm,
            qp_num: self.q.num,
        });
        Ok(())
    }

    /// How long a payload may stop arriving, from its last byte, before the peer is dropped.
    fn payload_stall(&self) -> Duration {
        stall_limit(self.q.caps.op_timeout)
    }

    /// # Safety
    /// `ptr..ptr+len` must be valid for writes.
    unsafe fn recv_into(&mut self, ptr: *mut u8, len: usize) -> Result<(), Stop> {
        // SAFETY: forwarded from the caller.
        unsafe {
            sock::recv_exact(
                self.fd,
                ptr,
                len,
                self.q.caps.target_spin,
                Some(self.payload_stall()),
            )
        }
        .map_err(|e| {
            // The header promised this payload: a close before its end is a truncated frame.
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) {
                tracing::warn!(qp = self.q.num, "truncated request payload");
                bump(&self.q.stats.protocol_errors, 1);
                Stop::Protocol
            } else {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    tracing::warn!(qp = self.q.num, stall = ?self.payload_stall(),
                        link = %LinkState::describe(self.fd),
                        "a request's payload stopped arriving: dropping the peer");
                }
                Stop::PeerGone
            }
        })
    }

    /// Consumes a payload that will not be stored, so the stream stays in step.
    fn discard(&mut self, mut len: usize) -> Result<(), Stop> {
        if self.scratch.is_empty() {
            self.scratch = vec![0; 64 << 10];
        }
        while len > 0 {
            let n = len.min(self.scratch.len());
            let p = self.scratch.as_mut_ptr();
            // SAFETY: n <= scratch.len().
            unsafe { self.recv_into(p, n)? };
            len -= n;
        }
        Ok(())
    }

    fn respond(&self, resp: &Response, data: Option<(*mut u8, usize)>) -> Result<(), Stop> {
        let hdr = resp.encode();
        let mut iov = [iovec(hdr.as_ptr(), hdr.len()), iovec(std::ptr::null(), 0)];
        if let Some((p, n)) = data {
            iov[1] = iovec(p, n);
        }
        sock::send_all(self.fd, &mut iov, self.q.caps.op_timeout).map_err(|e| {
            // Said, not only done: a peer that stops reading loses its queue pair here, and
            // from its side that looks like a donor that stopped answering.
            if e.kind() == std::io::ErrorKind::TimedOut {
                tracing::warn!(qp = self.q.num, timeout = ?self.q.caps.op_timeout,
                    link = %LinkState::describe(self.fd),
                    "the peer read no response for the operation timeout: dropping it");
            }
            Stop::PeerGone
        })
    }
}
