//! The NBD transmission phase (the NBD protocol document): its numbers and the one codec of
//! request and reply headers, shared by the donor's export and the borrower's kernel-facing device.

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_SEND_FLUSH: u16 = 4;
pub const TF_SEND_FUA: u16 = 8;
pub const TF_SEND_TRIM: u16 = 32;
pub const TF_SEND_WRITE_ZEROES: u16 = 64;
pub const TF_CAN_MULTI_CONN: u16 = 256;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// Largest READ or WRITE one request may move.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Bytes of a simple reply's header.
pub const REPLY_HEADER: usize = 16;
/// Bytes of a request's header.
pub const REQUEST_HEADER: usize = 28;

/// A request's header: `len` bytes at `off`, answered with `cookie`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub off: u64,
    pub len: u32,
}

/// A request header that does not start with [`REQUEST_MAGIC`]: the stream is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad NBD request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl Request {
    /// A request with no flags: what a client sends for `cmd` on `len` bytes at `off`.
    pub fn new(cmd: u16, cookie: u64, off: u64, len: u32) -> Request {
        Request {
            flags: 0,
            cmd,
            cookie,
            off,
            len,
        }
    }

    /// Parses a header as it came off the wire.
    pub fn decode(h: &[u8; REQUEST_HEADER]) -> Result<Request, BadMagic> {
        let be2 = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
        let be4 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let be8 = |at: usize| u64::from(be4(at)) << 32 | u64::from(be4(at + 4));
        match be4(0) {
            REQUEST_MAGIC => Ok(Request {
                flags: be2(4),
                cmd: be2(6),
                cookie: be8(8),
                off: be8(16),
                len: be4(24),
            }),
            other => Err(BadMagic(other)),
        }
    }

    /// The header as a client sends it.
    pub fn encode(&self) -> [u8; REQUEST_HEADER] {
        let mut h = [0u8; REQUEST_HEADER];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&self.flags.to_be_bytes());
        h[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        h[16..24].copy_from_slice(&self.off.to_be_bytes());
        h[24..28].copy_from_slice(&self.len.to_be_bytes());
        h
    }
}

/// A simple reply's header as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub error: u32,
    pub cookie: u64,
}

impl Reply {
    /// Parses a simple reply's header; `None` without [`SIMPLE_REPLY_MAGIC`].
    pub fn decode(h: &[u8; REPLY_HEADER]) -> Option<Reply> {
        let be4 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        (be4(0) == SIMPLE_REPLY_MAGIC).then(|| Reply {
            error: be4(4),
            cookie: u64::from(be4(8)) << 32 | u64::from(be4(12)),
        })
    }
}

/// A simple reply's header: `error` 0 for success (READ data follows it).
pub fn reply_header(cookie: u64, error: u32) -> [u8; REPLY_HEADER] {
    let mut r = [0u8; REPLY_HEADER];
    r[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_survives_encoding_and_has_the_protocol_layout() {
        let r = Request {
            flags: 1,
            cmd: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            off: 0x1122_3344_5566_7788,
            len: 0x99aa_bbcc,
        };
        let h = r.encode();
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..8], &[0, 1, 0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&h[24..28], &[0x99, 0xaa, 0xbb, 0xcc]);
        assert_eq!(Request::decode(&h), Ok(r));
    }

    #[test]
    fn a_header_without_the_magic_is_refused() {
        let mut h = Request::new(CMD_READ, 1, 0, 4096).encode();
        h[0] ^= 1;
        assert_eq!(Request::decode(&h), Err(BadMagic(0x2460_9513)));
    }

    #[test]
    fn a_reply_header_has_the_protocol_layout() {
        let r = reply_header(0x0102_0304_0506_0708, 28);
        assert_eq!(r[0..4], [0x67, 0x44, 0x66, 0x98]);
        assert_eq!(r[4..8], [0, 0, 0, 28]);
        assert_eq!(r[8..16], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            Reply::decode(&r),
            Some(Reply {
                error: 28,
                cookie: 0x0102_0304_0506_0708
            })
        );
        let mut bad = r;
        bad[3] ^= 1;
        assert_eq!(Reply::decode(&bad), None);
    }
}
