//! Access rights of a memory region, with the values libibverbs uses so they pass through unchanged.

use serde::{Deserialize, Serialize};

bitflags::bitflags! {
    /// What local and remote work requests may do with a memory region.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    pub struct Access: u32 {
        /// The local side may write into it (READ responses, atomic results, RECV payloads).
        const LOCAL_WRITE = 1;
        /// Peers may WRITE into it.
        const REMOTE_WRITE = 2;
        /// Peers may READ from it.
        const REMOTE_READ = 4;
        /// Peers may run compare-and-swap and fetch-and-add on it.
        const REMOTE_ATOMIC = 8;
    }
}

impl Access {
    /// Every right: the usual choice for a buffer lent to a trusted peer.
    pub fn all_remote() -> Self {
        Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ | Access::REMOTE_ATOMIC
    }
}
