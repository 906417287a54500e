//! Remote memory descriptors: what one host tells another so it can READ/WRITE its memory.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A window of a peer's registered memory: start address, length and remote key.
///
/// It is a plain value that travels on the control plane (serde). The address is the one the
/// provider advertises: a virtual address on `verbs`, a random per-region base on `tcp`, so a key
/// alone does not locate memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RemoteBuf {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

/// One remote address with its key: the target of a single work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RemoteAddr {
    pub addr: u64,
    pub rkey: u32,
}

impl RemoteBuf {
    /// The sub-window `[offset, offset + len)`, checked against this window.
    pub fn slice(&self, offset: u64, len: u64) -> Result<RemoteBuf> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument("remote slice overflows".into()))?;
        if end > self.len {
            return Err(Error::InvalidArgument(format!(
                "remote slice {offset}+{len} exceeds window of {} bytes",
                self.len
            )));
        }
        Ok(RemoteBuf {
            addr: self.addr + offset,
            len,
            rkey: self.rkey,
        })
    }

    /// The address `offset` bytes into the window (not bounds-checked: the target checks).
    pub fn at(&self, offset: u64) -> RemoteAddr {
        RemoteAddr {
            addr: self.addr.wrapping_add(offset),
            rkey: self.rkey,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_checks_bounds() {
        let b = RemoteBuf {
            addr: 0x1000,
            len: 100,
            rkey: 7,
        };
        assert_eq!(b.slice(10, 90).unwrap().addr, 0x100a);
        assert!(b.slice(10, 91).is_err());
        assert!(b.slice(u64::MAX, 2).is_err());
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<RemoteBuf>(&json).unwrap(), b);
    }
}
