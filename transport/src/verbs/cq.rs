//! Completion queues: a basic CQ (`ibv_create_cq`) bound to its own completion channel.
//!
//! Not the extended CQ: rdma-core 44 (Debian 12) miscounts an extended CQ on rxe when it is read
//! until empty, and completions stop.
//!
//! Polling maps each `ibv_wc` back to the caller's work request through the queue pair's slot
//! ring (see `slots.rs`), which also releases the memory regions the request held. Polls of one
//! CQ are serialised so the rings see completions in the order the device produced them.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdma_sys as sys;

use super::device::Device;
use super::slots::{QpState, RECV_BIT};
use super::{lock, wait_readable};
use crate::backend::CqOps;
use crate::{Completion, Error, Result, WcOpcode, WcStatus};

/// Completions taken from the device per `ibv_poll_cq` call.
const BATCH: usize = 32;

struct CqPtr(NonNull<sys::ibv_cq>);

impl Drop for CqPtr {
    fn drop(&mut self) {
        // SAFETY: every queue pair using this CQ holds an Arc to it, so none is left; every
        // event was acknowledged when it was read.
        let rc = unsafe { sys::ibv_destroy_cq(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_destroy_cq failed");
        }
    }
}

struct ChannelPtr(NonNull<sys::ibv_comp_channel>);

impl Drop for ChannelPtr {
    fn drop(&mut self) {
        // SAFETY: the CQ using this channel was destroyed first (field order of VerbsCq).
        let rc = unsafe { sys::ibv_destroy_comp_channel(self.0.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_destroy_comp_channel failed");
        }
    }
}

pub(crate) struct VerbsCq {
    // Field order is teardown order: CQ, then its channel, then the context.
    cq: CqPtr,
    channel: ChannelPtr,
    fd: RawFd,
    /// Queue pairs completing here, by number.
    qps: RwLock<HashMap<u32, Arc<QpState>>>,
    poll: Mutex<()>,
    pub(crate) dev: Arc<Device>,
}

// SAFETY: CQ and channel handles may be used from any thread (libibverbs serialises polls of a
// CQ internally, and we serialise them again for the slot rings); the table is behind a lock.
unsafe impl Send for VerbsCq {}
// SAFETY: as above.
unsafe impl Sync for VerbsCq {}

impl VerbsCq {
    pub(crate) fn new(dev: &Arc<Device>, depth: usize) -> Result<VerbsCq> {
        let cqe = i32::try_from(depth)
            .ok()
            .filter(|d| *d as u32 <= dev.max_cqe)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "CQ depth {depth} exceeds the device's maximum of {}",
                    dev.max_cqe
                ))
            })?;
        // SAFETY: valid open context.
        let ch = unsafe { sys::ibv_create_comp_channel(dev.ctx.as_ptr()) };
        let channel = NonNull::new(ch)
            .map(ChannelPtr)
            .ok_or_else(|| Error::last_os("ibv_create_comp_channel"))?;
        // SAFETY: the channel is live; its fd is owned by libibverbs and closed by
        // ibv_destroy_comp_channel.
        let fd = unsafe { (*channel.0.as_ptr()).fd };
        set_nonblocking(fd)?;
        // SAFETY: valid context and channel; no CQ context pointer.
        let cq = unsafe {
            sys::ibv_create_cq(
                dev.ctx.as_ptr(),
                cqe,
                std::ptr::null_mut(),
                channel.0.as_ptr(),
                0,
            )
        };
        let cq = NonNull::new(cq)
            .map(CqPtr)
            .ok_or_else(|| Error::last_os("ibv_create_cq"))?;
        Ok(VerbsCq {
            cq,
            channel,
            fd,
            qps: RwLock::new(HashMap::new()),
            poll: Mutex::new(()),
            dev: dev.clone(),
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_cq {
        self.cq.0.as_ptr()
    }

    pub(crate) fn attach(&self, qp_num: u32, state: &Arc<QpState>) {
        self.qps
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(qp_num, state.clone());
    }

    /// Forgets a destroyed queue pair (unless its number already belongs to a new one).
    pub(crate) fn detach(&self, qp_num: u32, state: &Arc<QpState>) {
        let mut qps = self.qps.write().unwrap_or_else(|e| e.into_inner());
        if qps.get(&qp_num).is_some_and(|s| Arc::ptr_eq(s, state)) {
            qps.remove(&qp_num);
        }
    }

    /// Reads one pending channel event, if any, and acknowledges it.
    fn take_event(&self) -> Result<bool> {
        let mut cq = std::ptr::null_mut();
        let mut ctx = std::ptr::null_mut();
        // SAFETY: valid channel and out-pointers; the fd is non-blocking.
        let rc = unsafe { sys::ibv_get_cq_event(self.channel.0.as_ptr(), &mut cq, &mut ctx) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                _ => Err(Error::os("ibv_get_cq_event", e)),
            };
        }
        // SAFETY: the event names our only CQ on this channel; ack it at once so destroying
        // the CQ never waits for unacknowledged events.
        unsafe { sys::ibv_ack_cq_events(cq, 1) };
        Ok(true)
    }

    /// Maps one work completion; `None` when it belongs to no known work request (a destroyed
    /// queue pair's late flush).
    fn map(&self, qps: &HashMap<u32, Arc<QpState>>, wc: &sys::ibv_wc) -> Option<Completion> {
        let Some(state) = qps.get(&wc.qp_num) else {
            tracing::debug!(
                qp = wc.qp_num,
                "completion of an unknown queue pair dropped"
            );
            return None;
        };
        let seq = wc.wr_id & !RECV_BIT;
        let slot = if wc.wr_id & RECV_BIT != 0 {
            lock(&state.recv).ring.complete(seq, false)
        } else {
            lock(&state.send).ring.complete(seq, true)
        };
        let Some(slot) = slot else {
            tracing::warn!(
                qp = wc.qp_num,
                wr_id = wc.wr_id,
                "completion of an unknown work request dropped"
            );
            return None;
        };
        let status = WcStatus::from_raw(wc.status);
        if !status.is_ok() {
            if !state.failed.swap(true, Ordering::AcqRel) {
                tracing::debug!(qp = wc.qp_num, %status, vendor_err = wc.vendor_err, "queue pair failed");
            }
            return Some(Completion {
                wr_id: slot.wr_id,
                status,
                opcode: slot.opcode,
                byte_len: 0,
                imm: None,
                qp_num: wc.qp_num,
            });
        }
        let opcode = wc_opcode(wc.opcode).unwrap_or(slot.opcode);
        let imm = (wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0).then(|| {
            // SAFETY: with IBV_WC_WITH_IMM the union holds the immediate data (a plain u32 in
            // network byte order).
            u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })
        });
        let byte_len = match opcode {
            WcOpcode::Read | WcOpcode::Recv | WcOpcode::RecvWithImm => wc.byte_len,
            _ => 0,
        };
        Some(Completion {
            wr_id: slot.wr_id,
            status,
            opcode,
            byte_len,
            imm,
            qp_num: wc.qp_num,
        })
        // `slot` drops here, outside the ring's lock, releasing the regions it held.
    }
}

fn wc_opcode(op: sys::ibv_wc_opcode::Type) -> Option<WcOpcode> {
    use sys::ibv_wc_opcode::*;
    Some(match op {
        IBV_WC_SEND => WcOpcode::Send,
        IBV_WC_RDMA_WRITE => WcOpcode::Write,
        IBV_WC_RDMA_READ => WcOpcode::Read,
        IBV_WC_COMP_SWAP => WcOpcode::CompareSwap,
        IBV_WC_FETCH_ADD => WcOpcode::FetchAdd,
        IBV_WC_RECV => WcOpcode::Recv,
        IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvWithImm,
        _ => return None,
    })
}

fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we keep open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::last_os("fcntl(F_GETFL)"));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(Error::last_os("fcntl(F_SETFL)"));
    }
    Ok(())
}

impl CqOps for VerbsCq {
    fn poll(&self, out: &mut [Completion]) -> Result<usize> {
        let _serial = lock(&self.poll);
        let qps = self.qps.read().unwrap_or_else(|e| e.into_inner());
        let mut wcs: [MaybeUninit<sys::ibv_wc>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        let mut n = 0;
        while n < out.len() {
            let want = (out.len() - n).min(BATCH);
            // SAFETY: valid CQ; the device writes at most `want` entries into `wcs`.
            let got = unsafe { sys::ibv_poll_cq(self.as_ptr(), want as i32, wcs[0].as_mut_ptr()) };
            if got < 0 {
                return Err(Error::os(
                    "ibv_poll_cq",
                    io::Error::other(format!("returned {got}")),
                ));
            }
            let got = got as usize;
            for wc in &wcs[..got] {
                // SAFETY: ibv_poll_cq initialised the first `got` entries.
                let wc = unsafe { wc.assume_init_ref() };
                if let Some(c) = self.map(&qps, wc) {
                    out[n] = c;
                    n += 1;
                }
            }
            if got < want {
                break;
            }
        }
        Ok(n)
    }

    fn arm(&self) -> Result<()> {
        // SAFETY: valid CQ; 0 asks for an event on the next completion of any kind.
        let rc = unsafe { sys::ibv_req_notify_cq(self.as_ptr(), 0) };
        if rc != 0 {
            return Err(Error::os(
                "ibv_req_notify_cq",
                io::Error::from_raw_os_error(rc.abs()),
            ));
        }
        Ok(())
    }

    fn block(&self, timeout: Option<Duration>) -> Result<()> {
        if wait_readable(self.fd, timeout).map_err(|e| Error::os("poll", e))? {
            while self.take_event()? {}
        }
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        self.fd
    }

    fn ack_event(&self) -> Result<()> {
        while self.take_event()? {}
        Ok(())
    }

    fn next_deadline(&self) -> Option<Duration> {
        // The device times work out itself (ACK timeout and retry count).
        None
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}
