//! Work requests and completions.
//!
//! A [`SendWr`] names local memory through [`Sge`]s that borrow their [`Mr`](crate::Mr); the provider keeps
//! the region alive until the request completes, so registered memory always outlives the work
//! that uses it.

use crate::mr::Sge;
use crate::{remote::RemoteAddr, Access, Error, Result};

/// What a send-queue work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Copy remote memory into the local SGL.
    Read(RemoteAddr),
    /// Copy the local SGL into remote memory.
    Write(RemoteAddr),
    /// WRITE, then consume a RECV at the peer that completes with `imm`.
    WriteImm(RemoteAddr, u32),
    /// Two-sided message into the peer's next posted RECV.
    Send,
    /// SEND carrying 32 bits of immediate data.
    SendImm(u32),
    /// 64-bit compare-and-swap at an 8-byte aligned remote address; the old value lands in the SGL.
    CompareSwap {
        remote: RemoteAddr,
        compare: u64,
        swap: u64,
    },
    /// 64-bit fetch-and-add at an 8-byte aligned remote address; the old value lands in the SGL.
    FetchAdd { remote: RemoteAddr, add: u64 },
}

impl Op {
    /// True when the local SGL is written by the operation (needs LOCAL_WRITE).
    pub fn writes_local(&self) -> bool {
        matches!(
            self,
            Op::Read(_) | Op::CompareSwap { .. } | Op::FetchAdd { .. }
        )
    }
    /// True for compare-and-swap and fetch-and-add.
    pub fn is_atomic(&self) -> bool {
        matches!(self, Op::CompareSwap { .. } | Op::FetchAdd { .. })
    }
    /// The completion opcode this request produces at the initiator.
    pub fn wc_opcode(&self) -> WcOpcode {
        match self {
            Op::Read(_) => WcOpcode::Read,
            Op::Write(_) | Op::WriteImm(..) => WcOpcode::Write,
            Op::Send | Op::SendImm(_) => WcOpcode::Send,
            Op::CompareSwap { .. } => WcOpcode::CompareSwap,
            Op::FetchAdd { .. } => WcOpcode::FetchAdd,
        }
    }
}

/// A send-queue work request. Build one with the constructors, adjust with the `with_*` methods.
#[derive(Debug, Clone, Copy)]
pub struct SendWr<'a> {
    pub wr_id: u64,
    pub op: Op,
    pub sgl: &'a [Sge<'a>],
    /// Produce a completion on success (errors always produce one).
    pub signaled: bool,
}

impl<'a> SendWr<'a> {
    pub fn new(wr_id: u64, op: Op, sgl: &'a [Sge<'a>]) -> Self {
        SendWr {
            wr_id,
            op,
            sgl,
            signaled: true,
        }
    }
    pub fn read(wr_id: u64, sgl: &'a [Sge<'a>], remote: RemoteAddr) -> Self {
        Self::new(wr_id, Op::Read(remote), sgl)
    }
    pub fn write(wr_id: u64, sgl: &'a [Sge<'a>], remote: RemoteAddr) -> Self {
        Self::new(wr_id, Op::Write(remote), sgl)
    }
    pub fn write_imm(wr_id: u64, sgl: &'a [Sge<'a>], remote: RemoteAddr, imm: u32) -> Self {
        Self::new(wr_id, Op::WriteImm(remote, imm), sgl)
    }
    pub fn send(wr_id: u64, sgl: &'a [Sge<'a>]) -> Self {
        Self::new(wr_id, Op::Send, sgl)
    }
    pub fn fetch_add(wr_id: u64, result: &'a [Sge<'a>], remote: RemoteAddr, add: u64) -> Self {
        Self::new(wr_id, Op::FetchAdd { remote, add }, result)
    }
    pub fn compare_swap(
        wr_id: u64,
        result: &'a [Sge<'a>],
        remote: RemoteAddr,
        compare: u64,
        swap: u64,
    ) -> Self {
        Self::new(
            wr_id,
            Op::CompareSwap {
                remote,
                compare,
                swap,
            },
            result,
        )
    }
    /// No completion on success.
    pub fn unsignaled(mut self) -> Self {
        self.signaled = false;
        self
    }

    /// Total bytes described by the SGL.
    pub fn total_len(&self) -> u64 {
        self.sgl.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Checks what both providers check before posting: SGL size, local rights, atomic shape.
    pub(crate) fn validate(&self, max_sge: usize, max_msg: u64) -> Result<()> {
        if self.sgl.len() > max_sge {
            return Err(Error::InvalidArgument(format!(
                "{} SGEs exceed the queue pair's max_sge of {max_sge}",
                self.sgl.len()
            )));
        }
        if self.total_len() > max_msg {
            return Err(Error::InvalidArgument(format!(
                "message of {} bytes exceeds the maximum of {max_msg}",
                self.total_len()
            )));
        }
        if self.op.writes_local()
            && self
                .sgl
                .iter()
                .any(|s| !s.mr.access().contains(Access::LOCAL_WRITE))
        {
            return Err(Error::LocalProtection(
                "READ and atomic results need a LOCAL_WRITE region",
            ));
        }
        if let Op::CompareSwap { remote, .. } | Op::FetchAdd { remote, .. } = self.op {
            if self.total_len() != 8 {
                return Err(Error::InvalidArgument(
                    "an atomic needs exactly 8 bytes of local SGL".into(),
                ));
            }
            if !remote.addr.is_multiple_of(8) {
                return Err(Error::InvalidArgument(
                    "atomic remote address must be 8-byte aligned".into(),
                ));
            }
        }
        Ok(())
    }
}

/// A receive-queue work request: where the next incoming SEND (or WRITE_WITH_IMM notice) lands.
#[derive(Debug, Clone, Copy)]
pub struct RecvWr<'a> {
    pub wr_id: u64,
    pub sgl: &'a [Sge<'a>],
}

impl<'a> RecvWr<'a> {
    pub fn new(wr_id: u64, sgl: &'a [Sge<'a>]) -> Self {
        RecvWr { wr_id, sgl }
    }

    pub(crate) fn validate(&self, max_sge: usize) -> Result<()> {
        if self.sgl.len() > max_sge {
            return Err(Error::InvalidArgument(format!(
                "{} SGEs exceed the queue pair's max_sge of {max_sge}",
                self.sgl.len()
            )));
        }
        if self
            .sgl
            .iter()
            .any(|s| !s.mr.access().contains(Access::LOCAL_WRITE))
        {
            return Err(Error::LocalProtection(
                "RECV buffers need a LOCAL_WRITE region",
            ));
        }
        Ok(())
    }
}

/// Completion status, numbered as `enum ibv_wc_status`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[repr(u32)]
pub enum WcStatus {
    #[default]
    Success = 0,
    LocLenErr = 1,
    LocQpOpErr = 2,
    LocProtErr = 4,
    WrFlushErr = 5,
    BadRespErr = 7,
    LocAccessErr = 8,
    RemInvReqErr = 9,
    RemAccessErr = 10,
    RemOpErr = 11,
    RetryExcErr = 12,
    RnrRetryExcErr = 13,
    RemAbortErr = 16,
    FatalErr = 19,
    RespTimeoutErr = 20,
    GeneralErr = 21,
}

impl WcStatus {
    /// Maps a raw `ibv_wc_status`; unknown values become `GeneralErr`.
    pub fn from_raw(v: u32) -> Self {
        use WcStatus::*;
        match v {
            0 => Success,
            1 => LocLenErr,
            2 => LocQpOpErr,
            4 => LocProtErr,
            5 => WrFlushErr,
            7 => BadRespErr,
            8 => LocAccessErr,
            9 => RemInvReqErr,
            10 => RemAccessErr,
            11 => RemOpErr,
            12 => RetryExcErr,
            13 => RnrRetryExcErr,
            16 => RemAbortErr,
            19 => FatalErr,
            20 => RespTimeoutErr,
            _ => GeneralErr,
        }
    }
    pub fn is_ok(self) -> bool {
        self == WcStatus::Success
    }
}

impl std::fmt::Display for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            WcStatus::Success => "success",
            WcStatus::LocLenErr => "local length error",
            WcStatus::LocQpOpErr => "local QP operation error",
            WcStatus::LocProtErr => "local protection error",
            WcStatus::WrFlushErr => "work request flushed",
            WcStatus::BadRespErr => "bad response",
            WcStatus::LocAccessErr => "local access error",
            WcStatus::RemInvReqErr => "remote invalid request",
            WcStatus::RemAccessErr => "remote access error",
            WcStatus::RemOpErr => "remote operation error",
            WcStatus::RetryExcErr => "transport retry counter exceeded",
            WcStatus::RnrRetryExcErr => "receiver-not-ready retry counter exceeded",
            WcStatus::RemAbortErr => "remote aborted",
            WcStatus::FatalErr => "fatal error",
            WcStatus::RespTimeoutErr => "response timeout",
            WcStatus::GeneralErr => "general error",
        };
        f.write_str(s)
    }
}

/// Completion opcode, numbered as `enum ibv_wc_opcode`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[repr(u32)]
pub enum WcOpcode {
    #[default]
    Send = 0,
    Write = 1,
    Read = 2,
    CompareSwap = 3,
    FetchAdd = 4,
    Recv = 128,
    RecvWithImm = 129,
}

/// One work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Completion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    /// Bytes received (RECV, RECV_RDMA_WITH_IMM) or read; 0 where the provider does not report it.
    pub byte_len: u32,
    /// Immediate data of SEND_WITH_IMM and WRITE_WITH_IMM, in host order.
    pub imm: Option<u32>,
    /// The local queue pair number.
    pub qp_num: u32,
}

impl Completion {
    pub fn is_ok(&self) -> bool {
        self.status.is_ok()
    }
}
