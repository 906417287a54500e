//! The out-of-band exchange that connects queue pairs, one for every provider.
//!
//! Every connection a connector opens to a listener starts with one *hello*: a fixed 16-byte
//! header, then a provider payload (how to reach the sender's queue pair), then the
//! application's private data. The listener answers with an accept hello (its payload and private
//! data) or a reject hello (a reason, no payload). All integers little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `RMEX` |
//! | 4 | 2 | version of this exchange ([`VERSION`]) |
//! | 6 | 1 | kind: 1 request, 2 accept, 3 reject |
//! | 7 | 1 | provider: 1 tcp, 2 verbs |
//! | 8 | 2 | reject reason ([`REJECT_VERSION`], [`REJECT_REFUSED`], [`REJECT_PROVIDER`]); 0 otherwise |
//! | 10 | 2 | provider payload length (at most [`MAX_PAYLOAD`]) |
//! | 12 | 2 | private data length (at most [`MAX_PRIVATE_DATA`]) |
//! | 14 | 2 | reserved, 0 |
//!
//! A reject carries the rejecting side's own version and is understood whatever that version
//! is, so a peer of another version hears why it was refused instead of seeing a closed socket.
//! A listener of one provider refuses a request of another with [`REJECT_PROVIDER`].
//!
//! The listener reads requests through the [`Gate`](crate::gate) (every pending peer at once,
//! each with a deadline for its whole hello); the connector reads the answer with the connect
//! timeout. What follows the exchange on the socket belongs to the provider.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::gate::{Framing, Refusal};
use crate::types::{Provider, MAX_PRIVATE_DATA};
use crate::{Error, Result};

/// First bytes of every hello.
pub const MAGIC: [u8; 4] = *b"RMEX";
/// Version of the exchange described in the module docs.
pub const VERSION: u16 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Largest provider payload.
pub const MAX_PAYLOAD: usize = 64;

/// Reject reason: the versions differ.
pub const REJECT_VERSION: u16 = 1;
/// Reject reason: the application refused the request.
pub const REJECT_REFUSED: u16 = 2;
/// Reject reason: the listener runs another provider.
pub const REJECT_PROVIDER: u16 = 3;

/// What a hello is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 1,
    Accept = 2,
    Reject = 3,
}

/// Why a hello could not be decoded.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("the peer is not an rmem endpoint (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("the peer speaks exchange version {0}, this build speaks {VERSION}")]
    Version(u16),
    #[error("unknown {what} code {code}")]
    UnknownCode { what: &'static str, code: u16 },
    #[error("reserved field is not zero")]
    Reserved,
    #[error("{what} length {len} exceeds {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("the hello is {got} bytes, its header announces {want}")]
    Length { got: usize, want: usize },
}

impl From<HelloError> for Error {
    fn from(e: HelloError) -> Error {
        Error::Handshake(e.to_string())
    }
}

fn provider_code(p: Provider) -> u8 {
    match p {
        Provider::Tcp => 1,
        Provider::Verbs => 2,
    }
}

fn provider_of(code: u8) -> Option<Provider> {
    match code {
        1 => Some(Provider::Tcp),
        2 => Some(Provider::Verbs),
        _ => None,
    }
}

/// One hello: header fields, provider payload and private data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub kind: Kind,
    /// The sender's version: always [`VERSION`] except in a reject from another version.
    pub version: u16,
    pub provider: Provider,
    /// Reject reason, 0 otherwise.
    pub reason: u16,
    pub payload: Vec<u8>,
    pub private: Vec<u8>,
}

/// The fixed header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub version: u16,
    pub provider: Provider,
    pub reason: u16,
    pub payload_len: usize,
    pub private_len: usize,
}

impl Header {
    /// Bytes that follow the header.
    pub fn body_len(&self) -> usize {
        self.payload_len + self.private_len
    }

    /// Checks every field. A reject decodes whatever its version; a request or accept only in
    /// this version.
    pub fn decode(b: &[u8; HEADER_LEN]) -> std::result::Result<Header, HelloError> {
        let magic: [u8; 4] = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(HelloError::BadMagic(magic));
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let version = u16_at(4);
        let kind = match b[6] {
            1 => Kind::Request,
            2 => Kind::Accept,
            3 => Kind::Reject,
            code => {
                return Err(HelloError::UnknownCode {
                    what: "hello kind",
                    code: code.into(),
                })
            }
        };
        if kind != Kind::Reject && version != VERSION {
            return Err(HelloError::Version(version));
        }
        let provider = provider_of(b[7]).ok_or(HelloError::UnknownCode {
            what: "provider",
            code: b[7].into(),
        })?;
        let reason = u16_at(8);
        let (payload_len, private_len) = (usize::from(u16_at(10)), usize::from(u16_at(12)));
        if u16_at(14) != 0 || (kind != Kind::Reject && reason != 0) {
            return Err(HelloError::Reserved);
        }
        if payload_len > MAX_PAYLOAD {
            return Err(HelloError::TooLong {
                what: "provider payload",
                len: payload_len,
                max: MAX_PAYLOAD,
            });
        }
        if private_len > MAX_PRIVATE_DATA {
            return Err(HelloError::TooLong {
                what: "private data",
                len: private_len,
                max: MAX_PRIVATE_DATA,
            });
        }
        if kind == Kind::Reject && payload_len + private_len != 0 {
            return Err(HelloError::Reserved);
        }
        Ok(Header {
            kind,
            version,
            provider,
            reason,
            payload_len,
            private_len,
        })
    }
}

impl Hello {
    /// A connection request.
    pub fn request(provider: Provider, payload: &[u8], private: &[u8]) -> Hello {
        Hello::with(Kind::Request, provider, payload, private)
    }

    /// A listener's acceptance.
    pub fn accept(provider: Provider, payload: &[u8], private: &[u8]) -> Hello {
        Hello::with(Kind::Accept, provider, payload, private)
    }

    /// A refusal with its reason.
    pub fn reject(provider: Provider, reason: u16) -> Hello {
        Hello {
            reason,
            ..Hello::with(Kind::Reject, provider, &[], &[])
        }
    }

    fn with(kind: Kind, provider: Provider, payload: &[u8], private: &[u8]) -> Hello {
        Hello {
            kind,
            version: VERSION,
            provider,
            reason: 0,
            payload: payload.to_vec(),
            private: private.to_vec(),
        }
    }

    /// Header, payload and private data, ready to write. Lengths are the caller's to bound
    /// (payload at most [`MAX_PAYLOAD`], private data at most [`MAX_PRIVATE_DATA`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + self.payload.len() + self.private.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.push(self.kind as u8);
        b.push(provider_code(self.provider));
        b.extend_from_slice(&self.reason.to_le_bytes());
        b.extend_from_slice(&(self.payload.len() as u16).to_le_bytes());
        b.extend_from_slice(&(self.private.len() as u16).to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.payload);
        b.extend_from_slice(&self.private);
        b
    }

    /// Reads one hello from a stream; a malformed one is an `InvalidData` error carrying the
    /// [`HelloError`].
    pub fn read_from(mut r: impl Read) -> io::Result<Hello> {
        let invalid = |e: HelloError| io::Error::new(io::ErrorKind::InvalidData, e);
        let mut b = vec![0u8; HEADER_LEN];
        r.read_exact(&mut b)?;
        let h =
            Header::decode(b.as_slice().try_into().expect("HEADER_LEN bytes")).map_err(invalid)?;
        b.resize(HEADER_LEN + h.body_len(), 0);
        r.read_exact(&mut b[HEADER_LEN..])?;
        Hello::decode(&b).map_err(invalid)
    }

    /// Decodes a whole hello (header and body).
    pub fn decode(b: &[u8]) -> std::result::Result<Hello, HelloError> {
        let header: &[u8; HEADER_LEN] =
            b.get(..HEADER_LEN)
                .and_then(|h| h.try_into().ok())
                .ok_or(HelloError::Length {
                    got: b.len(),
                    want: HEADER_LEN,
                })?;
        let h = Header::decode(header)?;
        let want = HEADER_LEN + h.body_len();
        if b.len() != want {
            return Err(HelloError::Length { got: b.len(), want });
        }
        let (payload, private) = b[HEADER_LEN..].split_at(h.payload_len);
        Ok(Hello {
            kind: h.kind,
            version: h.version,
            provider: h.provider,
            reason: h.reason,
            payload: payload.to_vec(),
            private: private.to_vec(),
        })
    }
}

/// How the gate reads a request for `provider`: the header, then the body it announces. A
/// request of another version or provider is answered with a reject saying so.
pub(crate) struct RequestFraming(pub(crate) Provider);

impl Framing for RequestFraming {
    fn header_len(&self) -> usize {
        HEADER_LEN
    }

    fn body_len(&self, header: &[u8]) -> std::result::Result<usize, Refusal> {
        let refuse = |reason: String| Refusal {
            reply: None,
            reason,
        };
        let b: &[u8; HEADER_LEN] = header
            .try_into()
            .map_err(|_| refuse("short hello".into()))?;
        let answer = |why: u16, reason: String| Refusal {
            reply: Some(Hello::reject(self.0, why).encode()),
            reason,
        };
        match Header::decode(b) {
            Ok(h) if h.kind != Kind::Request => {
                Err(refuse("the connection opened with a reply".into()))
            }
            Ok(h) if h.provider != self.0 => Err(answer(
                REJECT_PROVIDER,
                format!("a {} request at a {} listener", h.provider, self.0),
            )),
            Ok(h) => Ok(h.body_len()),
            Err(HelloError::Version(v)) => {
                Err(answer(REJECT_VERSION, format!("exchange version {v}")))
            }
            Err(e) => Err(refuse(format!("bad hello: {e}"))),
        }
    }
}

/// Maps a socket error during the exchange to what the caller should see. A timeout stays an
/// OS error naming the step, so the message says what the peer did not answer.
pub(crate) fn io_error(what: &'static str) -> impl Fn(io::Error) -> Error {
    move |e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Handshake(format!("the peer closed during {what}")),
        _ => Error::os(what, e),
    }
}

/// Bounds every read and write of the exchange by `timeout` and turns off Nagle's delay (a
/// hello is one small message waiting for an answer).
pub(crate) fn tune(s: &TcpStream, timeout: Duration) -> Result<()> {
    let e = |op| move |err| Error::os(op, err);
    s.set_nodelay(true).map_err(e("TCP_NODELAY"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(e("SO_RCVTIMEO"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(e("SO_SNDTIMEO"))?;
    Ok(())
}

/// Opens a connection for the exchange, bounded by `timeout`.
pub(crate) fn dial(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::Timeout(timeout),
        _ => Error::os("connect", e),
    })?;
    tune(&s, timeout)?;
    Ok(s)
}

/// Writes one hello (the socket's timeouts, set by [`tune`], bound it).
pub(crate) fn send(mut s: &TcpStream, hello: &Hello) -> Result<()> {
    s.write_all(&hello.encode())
        .map_err(io_error("send connection hello"))
}

/// Reads the listener's answer to a request. A reject becomes an error saying why; an accept
/// from another provider is a protocol error.
pub(crate) fn read_answer(s: &TcpStream, ours: Provider) -> Result<Hello> {
    let hello = Hello::read_from(s).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => Error::Handshake(e.to_string()),
        _ => io_error("receive connection hello")(e),
    })?;
    match hello.kind {
        Kind::Accept if hello.provider == ours => Ok(hello),
        Kind::Accept => Err(Error::Handshake(format!(
            "a {} listener answered a {ours} request",
            hello.provider
        ))),
        Kind::Reject => Err(Error::Handshake(refusal_text(&hello, ours))),
        Kind::Request => Err(Error::Handshake(
            "the listener answered with a request".into(),
        )),
    }
}

fn refusal_text(h: &Hello, ours: Provider) -> String {
    match h.reason {
        REJECT_VERSION => format!(
            "the peer speaks exchange version {}, this build speaks {VERSION}",
            h.version
        ),
        REJECT_REFUSED => "the peer refused the connection".into(),
        REJECT_PROVIDER => format!(
            "the peer listens with the {} provider, not {ours}",
            h.provider
        ),
        r => format!("the peer refused the connection (reason {r})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trips() {
        let h = Hello::request(Provider::Verbs, &[1, 2, 3], b"token");
        let b = h.encode();
        assert_eq!(b.len(), HEADER_LEN + 3 + 5);
        assert_eq!(Hello::decode(&b).unwrap(), h);
        let r = Hello::reject(Provider::Tcp, REJECT_REFUSED);
        assert_eq!(Hello::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn each_bad_field_is_named() {
        let good = Hello::request(Provider::Tcp, &[9; 17], b"").encode();
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            Hello::decode(&b)
        };
        assert!(matches!(with(0, b'X'), Err(HelloError::BadMagic(_))));
        assert_eq!(with(4, 2), Err(HelloError::Version(2)));
        assert!(matches!(with(6, 9), Err(HelloError::UnknownCode { .. })));
        assert!(matches!(with(7, 0), Err(HelloError::UnknownCode { .. })));
        assert_eq!(with(8, 1), Err(HelloError::Reserved));
        assert_eq!(with(14, 1), Err(HelloError::Reserved));
        assert!(matches!(with(10, 65), Err(HelloError::TooLong { .. })));
        assert!(matches!(with(13, 0x20), Err(HelloError::TooLong { .. })));
        assert!(matches!(with(10, 16), Err(HelloError::Length { .. })));
        assert!(matches!(
            Hello::decode(&good[..20]),
            Err(HelloError::Length { .. })
        ));
    }

    #[test]
    fn a_reject_of_another_version_still_says_why() {
        let mut r = Hello::reject(Provider::Tcp, REJECT_VERSION);
        r.version = 7;
        let back = Hello::decode(&r.encode()).unwrap();
        assert_eq!(back.version, 7);
        assert!(refusal_text(&back, Provider::Tcp).contains("version 7"));
        // ...but a reject carries nothing else.
        let mut b = r.encode();
        b[10] = 1;
        b.push(0);
        assert_eq!(Hello::decode(&b), Err(HelloError::Reserved));
    }

    #[test]
    fn the_gate_answers_other_versions_and_providers() {
        let f = RequestFraming(Provider::Verbs);
        let hdr = |h: &Hello| h.encode()[..HEADER_LEN].to_vec();
        let ok = Hello::request(Provider::Verbs, &[0; 28], b"abc");
        assert_eq!(f.body_len(&hdr(&ok)).unwrap(), 31);

        let tcp = Hello::request(Provider::Tcp, &[0; 17], b"");
        let r = f.body_len(&hdr(&tcp)).unwrap_err();
        let reply = Hello::decode(&r.reply.unwrap()).unwrap();
        assert_eq!((reply.kind, reply.reason), (Kind::Reject, REJECT_PROVIDER));

        let mut newer = hdr(&ok);
        newer[4] = 2;
        let r = f.body_len(&newer).unwrap_err();
        let reply = Hello::decode(&r.reply.unwrap()).unwrap();
        assert_eq!((reply.reason, reply.version), (REJECT_VERSION, VERSION));

        let accept = Hello::accept(Provider::Verbs, &[0; 28], b"");
        assert!(f.body_len(&hdr(&accept)).unwrap_err().reply.is_none());
        assert!(f.body_len(&[0xee; HEADER_LEN]).unwrap_err().reply.is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_reencode_exactly(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(h) = Hello::decode(&b) {
                prop_assert_eq!(h.encode(), b);
            }
        }

        #[test]
        fn any_request_round_trips(p in proptest::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD),
                                   d in proptest::collection::vec(any::<u8>(), 0..256), verbs: bool) {
            let prov = if verbs { Provider::Verbs } else { Provider::Tcp };
            let h = Hello::request(prov, &p, &d);
            prop_assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        }
    }
}
