//! The `tcp` provider's wire format, version 1. All integers little-endian.
//!
//! A queue pair is two TCP connections opened by the connecting side: the *primary* carries its
//! requests to the listener (and their responses back), the *secondary* the listener's requests.
//! Each connection starts with a request hello of the connection exchange ([`crate::exchange`])
//! whose provider payload ([`payload`], [`PAYLOAD_LEN`] bytes) is the connection id both halves
//! share and the half's [`Role`]; the listener answers on the primary once both halves have
//! arrived, with the same id and role 0. After that each connection carries fixed-size
//! [`Request`] headers one way (followed by the payload of WRITE and SEND) and [`Response`]
//! headers the other way (followed by the data of a READ). Requests are executed in order; each
//! gets exactly one response, echoing its sequence number.
//!
//! ```text
//!  initiator                                        listener
//!     |-- primary:   request{id, Primary, private} ---->|
//!     |-- secondary: request{id, Secondary} ----------->|
//!     |<-- primary:  accept{id, private} ---------------|   (or reject{reason})
//!     |== primary:   Request -> / <- Response =========|   initiator's work
//!     |== secondary: <- Request / Response -> =========|   listener's work
//! ```
//! Any decoding failure ends the connection (a byte stream cannot resynchronise); the target
//! counts it and answers with a `Nak(InvalidRequest)` where it still can.

/// Largest single message (READ, WRITE or SEND payload).
pub const MAX_MSG: u64 = 1 << 30;

pub const REQUEST_LEN: usize = 40;
pub const RESPONSE_LEN: usize = 24;

/// Why bytes could not be decoded.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown {what} code {code}")]
    UnknownCode { what: &'static str, code: u8 },
    #[error("reserved field is not zero")]
    Reserved,
    #[error("{what} length {len} exceeds {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("out-of-order sequence number {got} (expected {expected})")]
    Sequence { got: u32, expected: u32 },
    #[error("{0}")]
    Invalid(&'static str),
}

impl From<WireError> for crate::Error {
    fn from(e: WireError) -> crate::Error {
        crate::Error::Protocol(Box::new(e))
    }
}

/// Which of the connector's two connections a request opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Carries the connector's requests (and the listener's answer to the exchange).
    Primary = 1,
    /// Carries the listener's requests.
    Secondary = 2,
}

/// The `tcp` provider's payload in the exchange: the connection id both halves share, and
/// which half this is (0 in the accept).
pub const PAYLOAD_LEN: usize = 17;

/// Encodes the payload of a request (or, with `role` `None`, of the accept).
pub fn payload(conn_id: &[u8; 16], role: Option<Role>) -> [u8; PAYLOAD_LEN] {
    let mut b = [0u8; PAYLOAD_LEN];
    b[..16].copy_from_slice(conn_id);
    b[16] = role.map_or(0, |r| r as u8);
    b
}

/// A whole request hello of one half, as a connector sends it.
pub fn request_hello(conn_id: &[u8; 16], role: Role, private: &[u8]) -> Vec<u8> {
    let p = payload(conn_id, Some(role));
    crate::exchange::Hello::request(crate::Provider::Tcp, &p, private).encode()
}

/// Decodes a payload; `None` if it is not one.
pub fn parse_payload(b: &[u8]) -> Option<([u8; 16], Option<Role>)> {
    let b: &[u8; PAYLOAD_LEN] = b.try_into().ok()?;
    let role = match b[16] {
        0 => None,
        1 => Some(Role::Primary),
        2 => Some(Role::Secondary),
        _ => return None,
    };
    Some((b[..16].try_into().ok()?, role))
}

/// Request opcodes. 0 is never valid, so a zeroed buffer does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReqOp {
    Write = 1,
    WriteImm = 2,
    Read = 3,
    Send = 4,
    SendImm = 5,
    CompareSwap = 6,
    FetchAdd = 7,
}

impl ReqOp {
    /// True when `len` bytes of payload follow the header.
    pub fn has_payload(self) -> bool {
        matches!(
            self,
            ReqOp::Write | ReqOp::WriteImm | ReqOp::Send | ReqOp::SendImm
        )
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: ReqOp,
    /// Payload length (WRITE, SEND), bytes wanted (READ), 8 (atomics).
    pub len: u32,
    pub seq: u32,
    pub rkey: u32,
    pub addr: u64,
    /// Immediate data, compare value, or addend.
    pub arg0: u64,
    /// Swap value.
    pub arg1: u64,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0] = self.op as u8;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.rkey.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.arg0.to_le_bytes());
        b[32..40].copy_from_slice(&self.arg1.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
        let op = match b[0] {
            1 => ReqOp::Write,
            2 => ReqOp::WriteImm,
            3 => ReqOp::Read,
            4 => ReqOp::Send,
            5 => ReqOp::SendImm,
            6 => ReqOp::CompareSwap,
            7 => ReqOp::FetchAdd,
            code => {
                return Err(WireError::UnknownCode {
                    what: "request",
                    code,
                })
            }
        };
        if b[1..4] != [0; 3] {
            return Err(WireError::Reserved);
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let r = Request {
            op,
            len: u32_at(4),
            seq: u32_at(8),
            rkey: u32_at(12),
            addr: u64_at(16),
            arg0: u64_at(24),
            arg1: u64_at(32),
        };
        if u64::from(r.len) > MAX_MSG {
            return Err(WireError::TooLong {
                what: "message",
                len: r.len.into(),
                max: MAX_MSG,
            });
        }
        match op {
            ReqOp::CompareSwap | ReqOp::FetchAdd if r.len != 8 => {
                return Err(WireError::Invalid("atomic length must be 8"))
            }
            ReqOp::CompareSwap | ReqOp::FetchAdd if !r.addr.is_multiple_of(8) => {
                return Err(WireError::Invalid("atomic address must be 8-byte aligned"))
            }
            ReqOp::WriteImm | ReqOp::SendImm if r.arg0 > u64::from(u32::MAX) => {
                return Err(WireError::Invalid("immediate data is 32 bits"))
            }
            ReqOp::Write | ReqOp::Read | ReqOp::Send if r.arg0 != 0 || r.arg1 != 0 => {
                return Err(WireError::Reserved)
            }
            ReqOp::FetchAdd | ReqOp::WriteImm | ReqOp::SendImm if r.arg1 != 0 => {
                return Err(WireError::Reserved)
            }
            _ => {}
        }
        Ok(r)
    }
}

/// Response kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RespKind {
    /// WRITE, WRITE_IMM or SEND done.
    Ack = 1,
    /// `len` bytes of READ data follow.
    ReadData = 2,
    /// `value` holds the word before the atomic.
    Atomic = 3,
    /// The request failed; `status` says why. The connection closes after it.
    Nak = 4,
}

/// Why a request failed at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NakCode {
    /// Unknown rkey, out of bounds, or missing permission.
    RemoteAccess = 1,
    /// Malformed request, or a SEND longer than the posted receive.
    InvalidRequest = 2,
    /// No receive was posted within the RNR timeout.
    ReceiverNotReady = 3,
    /// The target failed to carry out a valid request.
    RemoteOperation = 4,
}

impl NakCode {
    pub fn wc_status(self) -> crate::WcStatus {
        match self {
            NakCode::RemoteAccess => crate::WcStatus::RemAccessErr,
            NakCode::InvalidRequest => crate::WcStatus::RemInvReqErr,
            NakCode::ReceiverNotReady => crate::WcStatus::RnrRetryExcErr,
            NakCode::RemoteOperation => crate::WcStatus::RemOpErr,
        }
    }
}

/// A response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub kind: RespKind,
    /// NAK reason (only with `Nak`).
    pub nak: Option<NakCode>,
    /// Bytes of READ data that follow.
    pub len: u32,
    pub seq: u32,
    pub value: u64,
}

impl Response {
    pub fn ack(seq: u32) -> Self {
        Response {
            kind: RespKind::Ack,
            nak: None,
            len: 0,
            seq,
            value: 0,
        }
    }
    pub fn nak(seq: u32, code: NakCode) -> Self {
        Response {
            kind: RespKind::Nak,
            nak: Some(code),
            len: 0,
            seq,
            value: 0,
        }
    }

    pub fn encode(&self) -> [u8; RESPONSE_LEN] {
        let mut b = [0u8; RESPONSE_LEN];
        b[0] = self.kind as u8;
        b[1] = self.nak.map_or(0, |n| n as u8);
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; RESPONSE_LEN]) -> Result<Response, WireError> {
        let kind = match b[0] {
            1 => RespKind::Ack,
            2 => RespKind::ReadData,
            3 => RespKind::Atomic,
            4 => RespKind::Nak,
            code => {
                return Err(WireError::UnknownCode {
                    what: "response",
                    code,
                })
            }
        };
        let nak = match (kind, b[1]) {
            (RespKind::Nak, 1) => Some(NakCode::RemoteAccess),
            (RespKind::Nak, 2) => Some(NakCode::InvalidRequest),
            (RespKind::Nak, 3) => Some(NakCode::ReceiverNotReady),
            (RespKind::Nak, 4) => Some(NakCode::RemoteOperation),
            (RespKind::Nak, code) => return Err(WireError::UnknownCode { what: "nak", code }),
            (_, 0) => None,
            _ => return Err(WireError::Reserved),
        };
        if b[2..4] != [0; 2] || b[12..16] != [0; 4] {
            return Err(WireError::Reserved);
        }
        let len = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        if kind != RespKind::ReadData && len != 0 {
            return Err(WireError::Invalid("only READ data has a length"));
        }
        if u64::from(len) > MAX_MSG {
            return Err(WireError::TooLong {
                what: "READ data",
                len: len.into(),
                max: MAX_MSG,
            });
        }
        Ok(Response {
            kind,
            nak,
            len,
            seq: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            value: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op_strategy() -> impl Strategy<Value = ReqOp> {
        prop_oneof![
            Just(ReqOp::Write),
            Just(ReqOp::WriteImm),
            Just(ReqOp::Read),
            Just(ReqOp::Send),
            Just(ReqOp::SendImm),
            Just(ReqOp::CompareSwap),
            Just(ReqOp::FetchAdd),
        ]
    }

    prop_compose! {
        fn valid_request()(op in op_strategy(), len in 0u32..(1 << 30), seq: u32, rkey: u32,
                           addr: u64, a0: u64, a1: u64) -> Request {
            let (len, addr, arg0, arg1) = match op {
                ReqOp::CompareSwap => (8, addr & !7, a0, a1),
                ReqOp::FetchAdd => (8, addr & !7, a0, 0),
                ReqOp::WriteImm | ReqOp::SendImm => (len, addr, a0 & 0xffff_ffff, 0),
                _ => (len, addr, 0, 0),
            };
            Request { op, len, seq, rkey, addr, arg0, arg1 }
        }
    }

    proptest! {
        #[test]
        fn request_round_trips(r in valid_request()) {
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn arbitrary_request_bytes_never_panic_and_reencode_exactly(b in any::<[u8; REQUEST_LEN]>()) {
            if let Ok(r) = Request::decode(&b) {
                prop_assert_eq!(r.encode(), b);
            }
        }

        #[test]
        fn arbitrary_response_bytes_never_panic_and_reencode_exactly(b in any::<[u8; RESPONSE_LEN]>()) {
            if let Ok(r) = Response::decode(&b) {
                prop_assert_eq!(r.encode(), b);
            }
        }

        #[test]
        fn payloads_round_trip(id: [u8; 16], r in 0u8..3) {
            let role = [None, Some(Role::Primary), Some(Role::Secondary)][usize::from(r)];
            prop_assert_eq!(parse_payload(&payload(&id, role)), Some((id, role)));
        }

        #[test]
        fn response_round_trips(seq: u32, value: u64, len in 0u32..(1 << 30), k in 0u8..4, n in 1u8..5) {
            let r = match k {
                0 => Response::ack(seq),
                1 => Response { kind: RespKind::ReadData, nak: None, len, seq, value: 0 },
                2 => Response { kind: RespKind::Atomic, nak: None, len: 0, seq, value },
                _ => {
                    let code = [NakCode::RemoteAccess, NakCode::InvalidRequest,
                                NakCode::ReceiverNotReady, NakCode::RemoteOperation][usize::from(n - 1)];
                    Response::nak(seq, code)
                }
            };
            prop_assert_eq!(Response::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn rejects_each_bad_field() {
        let good = Request {
            op: ReqOp::FetchAdd,
            len: 8,
            seq: 1,
            rkey: 2,
            addr: 16,
            arg0: 1,
            arg1: 0,
        };
        let mut b = good.encode();
        b[0] = 0;
        assert!(matches!(
            Request::decode(&b),
            Err(WireError::UnknownCode { .. })
        ));
        let mut b = good.encode();
        b[2] = 1;
        assert_eq!(Request::decode(&b), Err(WireError::Reserved));
        let bad_len = Request { len: 9, ..good };
        assert!(matches!(
            Request::decode(&bad_len.encode()),
            Err(WireError::Invalid(_))
        ));
        let misaligned = Request { addr: 12, ..good };
        assert!(matches!(
            Request::decode(&misaligned.encode()),
            Err(WireError::Invalid(_))
        ));
        let huge = Request {
            op: ReqOp::Write,
            len: (1 << 30) + 1,
            arg0: 0,
            ..good
        };
        assert!(matches!(
            Request::decode(&huge.encode()),
            Err(WireError::TooLong { .. })
        ));

        let mut p = payload(&[7; 16], Some(Role::Primary));
        p[16] = 3;
        assert_eq!(parse_payload(&p), None);
        assert_eq!(parse_payload(&p[..16]), None);

        let mut r = Response::ack(3).encode();
        r[4] = 1;
        assert!(matches!(Response::decode(&r), Err(WireError::Invalid(_))));
    }
}
