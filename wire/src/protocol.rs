//! The control protocol between a donor (`rmem server`) and its clients, version 1.
//!
//! A TCP connection carries frames: a 4-byte big-endian length (at most [`MAX_FRAME`]) and that
//! many bytes of JSON, one [`ClientMsg`] or [`ServerMsg`] each (`"type"` names the variant;
//! unknown fields are refused). The first exchange authenticates both sides with a shared secret
//! that never crosses the wire (HMAC-SHA256 challenge-response, see `auth.rs`):
//!
//! ```text
//!  client                                              server
//!    |-- Hello{version, client, nonce_c} ------------------>|
//!    |<-------------------------- Challenge{version, nonce_s}|
//!    |-- Auth{mac = HMAC(secret, "client" nonce_s nonce_c client)} ->|
//!    |<-- Welcome{mac = HMAC(secret, "server" nonce_c nonce_s), session,
//!    |            slab_size, lease_ms, data_addr, data_token} |   (or Error, then close)
//!    |== queue pair to data_addr, private data = data_token ==|
//!    |-- Alloc{id, count} / Free / Renew / Stats / Reconnect ->|
//!    |<---- Allocated / Freed / Renewed / Stats / Reconnect / Error|
//!    |<---- Reclaim{slabs, deadline_ms} / Closing{reason, deadline_ms}  (unsolicited)
//! ```
//! Requests carry an `id` echoed by the reply; replies may arrive between a request and its
//! reply only as the two unsolicited notices, which carry no `id`. `Reclaim` means the donor
//! needs those slabs back: copy what matters and free them within `deadline_ms`; at the deadline
//! they are taken (deregistered, zeroed) whatever the client did. `Closing` means the session
//! ends within `deadline_ms` (donor shutting down; 0 when the lease already expired). A malformed frame of a valid length gets an
//! `Error{code: "bad_request"}` and the connection goes on; an over-long length closes it (the
//! stream cannot be resynchronised).

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Data queue pairs one session may hold at once (lanes 0 to MAX_LANES - 1).
pub const MAX_LANES: u8 = 16;

fn is_zero(v: &u8) -> bool {
    *v == 0
}

use rmem_transport::RemoteBuf;

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// Largest frame body.
pub const MAX_FRAME: usize = 64 * 1024;
/// Most slabs one request may allocate or free.
pub const MAX_SLABS_PER_REQUEST: u32 = 4096;

/// Messages from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    Hello {
        version: u32,
        client: String,
        /// 32 random bytes, hex.
        nonce: String,
    },
    Auth {
        /// HMAC-SHA256, hex.
        mac: String,
    },
    /// Lend `count` slabs (all or none).
    Alloc {
        id: u64,
        count: u32,
    },
    /// Give slabs back; they are zeroed before anyone else gets them.
    Free {
        id: u64,
        slabs: Vec<u32>,
    },
    /// Extend the lease on everything this client holds.
    Renew {
        id: u64,
    },
    Stats {
        id: u64,
    },
    /// A new data queue pair for `lane` (the old one failed, e.g. after a remote access error,
    /// or the client wants another lane: one queue pair per I/O thread, up to [`MAX_LANES`]).
    Reconnect {
        id: u64,
        /// Omitted for lane 0, so a one-lane client speaks exactly as before lanes.
        #[serde(default, skip_serializing_if = "is_zero")]
        lane: u8,
    },
}

/// One lent slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlabGrant {
    pub slab: u32,
    pub remote: RemoteBuf,
}

/// What the donor reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DonorStats {
    pub slab_size: u64,
    pub slabs_total: u32,
    pub slabs_free: u32,
    pub clients: u32,
    /// Slabs held by the asking client.
    pub slabs_held: u32,
    /// Slabs the donor has taken back from lending (memory returned to its host).
    pub slabs_retired: u32,
    /// Lent slabs the donor has asked back and not yet received.
    pub slabs_reclaiming: u32,
}

/// Messages from the donor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMsg {
    Challenge {
        version: u32,
        nonce: String,
    },
    Welcome {
        mac: String,
        session: String,
        slab_size: u64,
        lease_ms: u64,
        /// Where to connect the data queue pair.
        data_addr: String,
        /// Private data that queue pair must carry.
        data_token: String,
    },
    Allocated {
        id: u64,
        slabs: Vec<SlabGrant>,
        lease_ms: u64,
    },
    Freed {
        id: u64,
    },
    Renewed {
        id: u64,
        lease_ms: u64,
    },
    Stats {
        id: u64,
        stats: DonorStats,
    },
    Reconnect {
        id: u64,
        data_addr: String,
        data_token: String,
    },
    /// Unsolicited: these slabs are taken back `deadline_ms` from now.
    Reclaim {
        slabs: Vec<u32>,
        deadline_ms: u64,
    },
    /// Unsolicited: the session ends `deadline_ms` from now.
    Closing {
        reason: String,
        deadline_ms: u64,
    },
    Error {
        /// The request's id, when it had one.
        id: Option<u64>,
        code: ErrorCode,
        message: String,
    },
}

impl ServerMsg {
    /// The request a reply answers; `None` for notices and request-less errors.
    pub fn id(&self) -> Option<u64> {
        match self {
            ServerMsg::Allocated { id, .. }
            | ServerMsg::Freed { id }
            | ServerMsg::Renewed { id, .. }
            | ServerMsg::Stats { id, .. }
            | ServerMsg::Reconnect { id, .. } => Some(*id),
            ServerMsg::Error { id, .. } => *id,
            ServerMsg::Challenge { .. }
            | ServerMsg::Welcome { .. }
            | ServerMsg::Reclaim { .. }
            | ServerMsg::Closing { .. } => None,
        }
    }
}

/// Why a request failed; clients decide with this, not with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Version,
    AuthFailed,
    PoolExhausted,
    UnknownSlab,
    NotOwner,
    TooMany,
    Internal,
}

/// Frame-level failures.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
    #[error("i/o")]
    Io(#[from] std::io::Error),
}

/// Reads one frame body.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(body)
}

/// Decodes a frame body (also the fuzzing entry point: any input, no panic).
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Malformed)
}

/// Writes one message as a frame.
pub async fn write_msg<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg).map_err(FrameError::Malformed)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLong(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip_and_reject_unknown_fields() {
        let m = ClientMsg::Alloc { id: 3, count: 2 };
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#"{"type":"alloc","id":3,"count":2}"#);
        assert_eq!(decode::<ClientMsg>(j.as_bytes()).unwrap(), m);
        assert!(decode::<ClientMsg>(br#"{"type":"alloc","id":3,"count":2,"x":1}"#).is_err());
        assert!(decode::<ClientMsg>(br#"{"type":"format_disk"}"#).is_err());
        assert!(decode::<ClientMsg>(br#"{"type":"alloc","id":-1,"count":2}"#).is_err());
    }

    #[test]
    fn frames_round_trip_and_enforce_the_limit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut buf = Vec::new();
            write_msg(&mut buf, &ClientMsg::Renew { id: 9 })
                .await
                .unwrap();
            let body = read_frame(&mut buf.as_slice()).await.unwrap();
            assert_eq!(
                decode::<ClientMsg>(&body).unwrap(),
                ClientMsg::Renew { id: 9 }
            );
            let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
            assert!(matches!(
                read_frame(&mut huge.as_slice()).await,
                Err(FrameError::TooLong(_))
            ));
            let short = [0u8, 0, 0, 10, b'{'];
            assert!(matches!(
                read_frame(&mut short.as_slice()).await,
                Err(FrameError::Io(_))
            ));
            assert!(matches!(
                read_frame(&mut [].as_slice()).await,
                Err(FrameError::Closed)
            ));
        });
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<ClientMsg>(&b);
            let _ = decode::<ServerMsg>(&b);
        }
    }
}
