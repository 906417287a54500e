//! The ground floor: plain, provider-neutral values every layer and every provider may use.
//! Nothing here imports a provider or the objects above it.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which implementation of the verbs semantics to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Software provider over TCP; runs anywhere.
    #[default]
    Tcp,
    /// libibverbs: InfiniBand, RoCE, Soft-RoCE (rxe), siw.
    Verbs,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Tcp => "tcp",
            Provider::Verbs => "verbs",
        })
    }
}

impl std::str::FromStr for Provider {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Provider::Tcp),
            "verbs" => Ok(Provider::Verbs),
            _ => Err(Error::InvalidArgument(format!(
                "unknown provider {s:?} (expected tcp or verbs)"
            ))),
        }
    }
}

/// What to open: the provider and, for `verbs`, which device, port and GID.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub provider: Provider,
    /// Device name (`mlx5_0`, `rxe0`); the first device when `None`.
    pub device: Option<String>,
    /// Port number, 1 when `None`.
    pub port: Option<u8>,
    /// Explicit GID index.
    pub gid_index: Option<u8>,
    /// Pick the device, port and RoCE v2 GID that carry this local address.
    pub local_ip: Option<IpAddr>,
}

impl OpenOptions {
    pub fn new(provider: Provider) -> Self {
        OpenOptions {
            provider,
            ..Default::default()
        }
    }
    pub fn device(mut self, name: impl Into<String>) -> Self {
        self.device = Some(name.into());
        self
    }
    pub fn local_ip(mut self, ip: IpAddr) -> Self {
        self.local_ip = Some(ip);
        self
    }
    pub fn gid_index(mut self, idx: u8) -> Self {
        self.gid_index = Some(idx);
        self
    }
}

/// Facts about the opened device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub provider: Provider,
    pub name: String,
    pub port: u8,
    pub gid_index: Option<u8>,
    /// The GID in text form (verbs), or `None`.
    pub gid: Option<String>,
    /// Active path MTU in bytes (verbs), or `None`.
    pub mtu: Option<u32>,
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_msg: u64,
}

/// Counters of work the local target side executed for peers (the `tcp` provider's progress
/// engine; `verbs` leaves them to the NIC and reports zeros).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetStats {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub atomics: u64,
    pub access_errors: u64,
    pub protocol_errors: u64,
    pub rnr_naks: u64,
}

/// Largest private-data blob carried by the connection exchange.
pub const MAX_PRIVATE_DATA: usize = 4096;

/// How a thread waiting on a completion queue spends its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin until a completion arrives; lowest latency, one core busy.
    Busy,
    /// Spin for the given time, then sleep until woken.
    Adaptive(Duration),
    /// Sleep at once.
    Blocking,
}

impl Default for PollMode {
    fn default() -> Self {
        PollMode::Adaptive(Duration::from_micros(50))
    }
}

/// Queue sizes and timeouts of a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_sge: u32,
    /// How long a work request may wait for its response before the queue pair fails with
    /// `RetryExcErr` (verbs: mapped to the local ACK timeout and retry count).
    pub op_timeout: Duration,
    /// How long a SEND waits for the receiver to post a RECV before `RnrRetryExcErr`.
    pub rnr_timeout: Duration,
    /// `tcp`: how long the target thread spins for the next request before it sleeps.
    pub target_spin: Duration,
}

impl Default for QpCaps {
    fn default() -> Self {
        QpCaps {
            max_send_wr: 256,
            max_recv_wr: 256,
            max_sge: 8,
            op_timeout: Duration::from_secs(4),
            rnr_timeout: Duration::from_secs(2),
            target_spin: Duration::from_micros(50),
        }
    }
}
