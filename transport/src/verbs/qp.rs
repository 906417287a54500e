//! Reliable-connected queue pairs: creation, the INIT -> RTR -> RTS transitions, posting.
//!
//! A post validates each request like the `tcp` provider does, takes a slot for it (see
//! `slots.rs`), writes the chain into reusable `ibv_send_wr`/`ibv_sge` buffers, and rings the
//! doorbell once with a single `ibv_post_send`.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;
use rdma_sys as sys;

use super::connect::Endpoint;
use super::cq::VerbsCq;
use super::lock;
use super::pd::VerbsPd;
use super::slots::{QpState, Slot, WorkQueue, RECV_BIT};
use super::timers::{ack_timeout_settings, rnr_settings};
use crate::backend::{CqOps, QpOps, QpSpec};
use crate::types::QpCaps;
use crate::{Error, Op, RecvWr, Result, SendWr, Sge, WcOpcode};

pub(crate) struct VerbsQp {
    qp: NonNull<sys::ibv_qp>,
    num: u32,
    caps: QpCaps,
    state: Arc<QpState>,
    shut: AtomicBool,
    pd: Arc<VerbsPd>,
    send_cq: Arc<VerbsCq>,
    recv_cq: Arc<VerbsCq>,
}

// SAFETY: libibverbs lets any thread post to and modify a QP; our own bookkeeping is behind the
// locks of QpState.
unsafe impl Send for VerbsQp {}
// SAFETY: as above.
unsafe impl Sync for VerbsQp {}

fn downcast_cq(cq: &Arc<dyn CqOps>) -> Result<Arc<VerbsCq>> {
    crate::backend::downcast(cq.clone().into_any(), "completion queue")
}

fn rc_error(op: &'static str, rc: i32) -> Error {
    Error::os(op, io::Error::from_raw_os_error(rc.abs()))
}

impl VerbsQp {
    /// Creates the queue pair and moves it to INIT.
    pub(crate) fn create(spec: &QpSpec) -> Result<VerbsQp> {
        let pd: Arc<VerbsPd> =
            crate::backend::downcast(spec.pd.clone().into_any(), "protection domain")?;
        let send_cq = downcast_cq(&spec.send_cq)?;
        let recv_cq = downcast_cq(&spec.recv_cq)?;
        let dev = &pd.dev;
        if !Arc::ptr_eq(&send_cq.dev, dev) || !Arc::ptr_eq(&recv_cq.dev, dev) {
            return Err(Error::InvalidArgument(
                "completion queues and protection domain belong to different contexts".into(),
            ));
        }
        let caps = spec.caps;
        let wr_max = caps.max_send_wr.max(caps.max_recv_wr);
        if wr_max > dev.max_qp_wr || caps.max_sge > dev.max_sge {
            return Err(Error::InvalidArgument(format!(
                "{} supports {} work requests and {} SGEs per queue",
                dev.name, dev.max_qp_wr, dev.max_sge
            )));
        }
        // SAFETY: plain C struct; zero is valid (null pointers, zero counts).
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = send_cq.as_ptr();
        init.recv_cq = recv_cq.as_ptr();
        init.cap.max_send_wr = caps.max_send_wr;
        init.cap.max_recv_wr = caps.max_recv_wr;
        init.cap.max_send_sge = caps.max_sge;
        init.cap.max_recv_sge = caps.max_sge;
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: valid PD and CQs of one context; `init` outlives the call.
        let qp = unsafe { sys::ibv_create_qp(pd.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| Error::last_os("ibv_create_qp"))?;
        // SAFETY: a live QP; its number never changes.
        let num = unsafe { (*qp.as_ptr()).qp_num };
        let mut rng = rand::rng();
        let state = Arc::new(QpState {
            send: Mutex::new(WorkQueue::new(caps.max_send_wr as usize, rng.random())),
            recv: Mutex::new(WorkQueue::new(caps.max_recv_wr as usize, rng.random())),
            failed: AtomicBool::new(false),
        });
        send_cq.attach(num, &state);
        recv_cq.attach(num, &state);
        // From here on Drop destroys the QP and detaches it.
        let me = VerbsQp {
            qp,
            num,
            caps,
            state,
            shut: AtomicBool::new(false),
            pd,
            send_cq,
            recv_cq,
        };
        let mut attr = me.zero_attr();
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = me.pd.dev.port;
        attr.qp_access_flags = (sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC)
            .0;
        use sys::ibv_qp_attr_mask as M;
        me.modify(
            &mut attr,
            M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;
        Ok(me)
    }

    pub(crate) fn num(&self) -> u32 {
        self.num
    }

    /// What the peer needs to reach this queue pair.
    pub(crate) fn endpoint(&self, psn: u32) -> Endpoint {
        let dev = &self.pd.dev;
        Endpoint {
            qpn: self.num,
            psn,
            lid: dev.lid,
            gid: dev.gid,
            mtu: dev.active_mtu as u8,
            rnr_timer: rnr_settings(self.caps.rnr_timeout).0,
        }
    }

    fn zero_attr(&self) -> sys::ibv_qp_attr {
        // SAFETY: plain C struct; zero is valid.
        unsafe { std::mem::zeroed() }
    }

    fn modify(
        &self,
        attr: &mut sys::ibv_qp_attr,
        mask: sys::ibv_qp_attr_mask,
        op: &'static str,
    ) -> Result<()> {
        // SAFETY: live QP; `attr` is valid for the fields `mask` names.
        let rc = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as i32) };
        if rc != 0 {
            return Err(rc_error(op, rc));
        }
        Ok(())
    }

    /// Moves the queue pair to RTR towards `peer`, then to RTS.
    pub(crate) fn connect_to(&self, local_psn: u32, peer: &Endpoint) -> Result<()> {
        let dev = &self.pd.dev;
        use sys::ibv_qp_attr_mask as M;
        let mut a = self.zero_attr();
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = dev.active_mtu.min(sys::ibv_mtu::Type::from(peer.mtu));
        a.dest_qp_num = peer.qpn;
        a.rq_psn = peer.psn;
        a.max_dest_rd_atomic = dev.max_dest_rd_atomic;
        // The peer chose how long its RNR retries wait (it knows its rnr_timeout).
        a.min_rnr_timer = peer.rnr_timer;
        a.ah_attr.port_num = dev.port;
        a.ah_attr.sl = 0;
        if dev.is_roce() {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = sys::ibv_gid { raw: peer.gid };
            a.ah_attr.grh.sgid_index = dev.gid_index;
            a.ah_attr.grh.hop_limit = 64;
        } else {
            a.ah_attr.dlid = peer.lid;
        }
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;
        let (timeout, retry_cnt) = ack_timeout_settings(self.caps.op_timeout);
        let mut a = self.zero_attr();
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        a.timeout = timeout;
        a.retry_cnt = retry_cnt;
        a.rnr_retry = rnr_settings(self.caps.rnr_timeout).1;
        a.sq_psn = local_psn;
        a.max_rd_atomic = dev.max_rd_atomic;
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )
    }

    fn check_pd(&self, sgl: &[Sge<'_>]) -> Result<()> {
        if sgl.iter().any(|s| s.mr.0.pd_id != self.pd.id) {
            return Err(Error::LocalProtection(
                "an SGE's region belongs to another protection domain",
            ));
        }
        Ok(())
    }

    /// After `op` refused request `idx` of a chain of `n`: gives back the slots of the requests
    /// not posted and says which one the device refused.
    fn rejected_by_device(
        &self,
        op: &'static str,
        rc: i32,
        idx: usize,
        n: usize,
        ring: &mut super::slots::Ring,
    ) -> Error {
        ring.pop_back(n - idx);
        let source = if rc.abs() == libc::ENOMEM {
            Error::QueueFull(ring.len())
        } else {
            rc_error(op, rc)
        };
        Error::Rejected {
            index: idx,
            source: Box::new(source),
        }
    }
}

fn sge(s: &Sge<'_>) -> sys::ibv_sge {
    sys::ibv_sge {
        addr: s.mr.addr_at(s.offset),
        length: s.len,
        lkey: s.mr.lkey(),
    }
}

fn send_wr(wr: &SendWr<'_>, id: u64, sg_list: *mut sys::ibv_sge) -> sys::ibv_send_wr {
    use sys::ibv_wr_opcode::*;
    // SAFETY: plain C struct of integers, raw pointers and unions of those; zero is valid.
    let mut w: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
    w.wr_id = id;
    w.sg_list = sg_list;
    w.num_sge = wr.sgl.len() as i32;
    w.send_flags = if wr.signaled {
        sys::ibv_send_flags::IBV_SEND_SIGNALED.0
    } else {
        0
    };
    let rdma = |r: crate::RemoteAddr| sys::rdma_t {
        remote_addr: r.addr,
        rkey: r.rkey,
    };
    match wr.op {
        Op::Read(r) => {
            w.opcode = IBV_WR_RDMA_READ;
            w.wr.rdma = rdma(r);
        }
        Op::Write(r) => {
            w.opcode = IBV_WR_RDMA_WRITE;
            w.wr.rdma = rdma(r);
        }
        Op::WriteImm(r, imm) => {
            w.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
            w.wr.rdma = rdma(r);
            w.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        Op::Send => w.opcode = IBV_WR_SEND,
        Op::SendImm(imm) => {
            w.opcode = IBV_WR_SEND_WITH_IMM;
            w.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        Op::CompareSwap {
            remote,
            compare,
            swap,
        } => {
            w.opcode = IBV_WR_ATOMIC_CMP_AND_SWP;
            w.wr.atomic = sys::atomic_t {
                remote_addr: remote.addr,
                compare_add: compare,
                swap,
                rkey: remote.rkey,
            };
        }
        Op::FetchAdd { remote, add } => {
            w.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
            w.wr.atomic = sys::atomic_t {
                remote_addr: remote.addr,
                compare_add: add,
                swap: 0,
                rkey: remote.rkey,
            };
        }
    }
    w
}

/// Index of the request `bad` points to in a chain starting at `base`.
fn bad_index<T>(base: *const T, bad: *const T, n: usize) -> usize {
    let off = (bad as usize).wrapping_sub(base as usize) / std::mem::size_of::<T>();
    if bad.is_null() || off >= n {
        0
    } else {
        off
    }
}

impl QpOps for VerbsQp {
    fn qp_num(&self) -> u32 {
        self.num
    }

    fn post_send(&self, wrs: &[SendWr<'_>]) -> Result<()> {
        let max_sge = self.caps.max_sge as usize;
        let max_msg = self.pd.dev.max_msg;
        let mut q = lock(&self.state.send);
        let WorkQueue {
            ring,
            wrs: chain,
            sges,
        } = &mut *q;
        chain.clear();
        sges.clear();
        let mut rejected = None;
        let mut first_seq = 0;
        for (i, wr) in wrs.iter().enumerate() {
            let check = wr
                .validate(max_sge, max_msg)
                .and_then(|_| self.check_pd(wr.sgl));
            if let Err(e) = check {
                rejected = Some((i, e));
                break;
            }
            if ring.is_full() {
                rejected = Some((i, Error::QueueFull(ring.len())));
                break;
            }
            let seq = ring.push(Slot {
                wr_id: wr.wr_id,
                opcode: wr.op.wc_opcode(),
                _held: wr.sgl.iter().map(|s| s.mr.0.clone()).collect(),
            });
            if i == 0 {
                first_seq = seq;
            }
            sges.extend(wr.sgl.iter().map(sge));
        }
        let n = rejected.as_ref().map_or(wrs.len(), |(i, _)| *i);
        if n > 0 {
            // `sges` is complete: pointers into it stay valid while `chain` is built.
            let mut at = 0;
            for (k, wr) in wrs[..n].iter().enumerate() {
                let sg = if wr.sgl.is_empty() {
                    std::ptr::null_mut()
                } else {
                    sges[at..].as_mut_ptr()
                };
                at += wr.sgl.len();
                chain.push(send_wr(wr, first_seq + k as u64, sg));
            }
            let base = chain.as_mut_ptr();
            for k in 1..n {
                // SAFETY: k < n = chain.len(); the links point inside `chain`, which is not
                // touched again until the post below returns.
                unsafe { (*base.add(k - 1)).next = base.add(k) };
            }
            let mut bad = std::ptr::null_mut();
            // SAFETY: live QP; a well-formed chain whose SGEs point at registered memory held by
            // the slots just taken.
            let rc = unsafe { sys::ibv_post_send(self.qp.as_ptr(), base, &mut bad) };
            if rc != 0 {
                let idx = bad_index(base, bad, n);
                return Err(self.rejected_by_device("ibv_post_send", rc, idx, n, ring));
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

    fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        let max_sge = self.caps.max_sge as usize;
        let mut q = lock(&self.state.recv);
        let WorkQueue {
            ring,
            wrs: chain,
            sges,
        } = &mut *q;
        chain.clear();
        sges.clear();
        let mut rejected = None;
        let mut first_seq = 0;
        for (i, wr) in wrs.iter().enumerate() {
            let check = wr.validate(max_sge).and_then(|_| self.check_pd(wr.sgl));
            if let Err(e) = check {
                rejected = Some((i, e));
                break;
            }
            if ring.is_full() {
                rejected = Some((i, Error::QueueFull(ring.len())));
                break;
            }
            let seq = ring.push(Slot {
                wr_id: wr.wr_id,
                opcode: WcOpcode::Recv,
                _held: wr.sgl.iter().map(|s| s.mr.0.clone()).collect(),
            });
            if i == 0 {
                first_seq = seq;
            }
            sges.extend(wr.sgl.iter().map(sge));
        }
        let n = rejected.as_ref().map_or(wrs.len(), |(i, _)| *i);
        if n > 0 {
            let mut at = 0;
            for (k, wr) in wrs[..n].iter().enumerate() {
                let sg = if wr.sgl.is_empty() {
                    std::ptr::null_mut()
                } else {
                    sges[at..].as_mut_ptr()
                };
                at += wr.sgl.len();
                chain.push(sys::ibv_recv_wr {
                    wr_id: (first_seq + k as u64) | RECV_BIT,
                    next: std::ptr::null_mut(),
                    sg_list: sg,
                    num_sge: wr.sgl.len() as i32,
                });
            }
            let base = chain.as_mut_ptr();
            for k in 1..n {
                // SAFETY: as in post_send.
                unsafe { (*base.add(k - 1)).next = base.add(k) };
            }
            let mut bad = std::ptr::null_mut();
            // SAFETY: live QP; a well-formed chain over registered memory held by the slots.
            let rc = unsafe { sys::ibv_post_recv(self.qp.as_ptr(), base, &mut bad) };
            if rc != 0 {
                let idx = bad_index(base, bad, n);
                return Err(self.rejected_by_device("ibv_post_recv", rc, idx, n, ring));
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

    fn is_error(&self) -> bool {
        self.state.failed.load(Ordering::Acquire)
    }

    /// Moves the queue pair to the error state. The device flushes outstanding work, and work
    /// posted afterwards, with `WrFlushErr` completions.
    fn shutdown(&self) {
        if self.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        self.state.failed.store(true, Ordering::Release);
        let mut a = self.zero_attr();
        a.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        if let Err(e) = self.modify(
            &mut a,
            sys::ibv_qp_attr_mask::IBV_QP_STATE,
            "ibv_modify_qp(ERR)",
        ) {
            tracing::warn!(qp = self.num, error = %e, "could not move queue pair to the error state");
        }
    }
}

impl Drop for VerbsQp {
    fn drop(&mut self) {
        // SAFETY: the QP is destroyed once; nothing posts to it any more (we are its only
        // owner). The device stops using posted buffers before destroy returns.
        let rc = unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
        if rc != 0 {
            tracing::warn!(qp = self.num, rc, "ibv_destroy_qp failed");
        }
        self.send_cq.detach(self.num, &self.state);
        self.recv_cq.detach(self.num, &self.state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_index_is_bounded() {
        let v = [0u64; 4];
        let base = v.as_ptr();
        assert_eq!(bad_index(base, base.wrapping_add(2), 4), 2);
        assert_eq!(bad_index(base, std::ptr::null(), 4), 0);
        assert_eq!(bad_index(base, base.wrapping_add(9), 4), 0);
    }
}
