//! One error type for the whole transport.
//!
//! Errors that a caller may want to retry are recognised with [`Error::is_transient`] rather than by
//! matching variants; work that failed on the wire is reported as a [`crate::WcStatus`] in a
//! completion, not as an `Error`.

use std::io;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a transport call.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No RDMA device is present (or none matches the request).
    #[error("no RDMA device found: {hint}")]
    NoDevice { hint: String },
    /// The named device does not exist.
    #[error("RDMA device {0:?} not found")]
    DeviceNotFound(String),
    /// No RoCE v2 GID maps the given IP address on any port.
    #[error("no RoCE v2 GID for address {0}")]
    NoGid(std::net::IpAddr),
    /// The provider was not compiled into this build.
    #[error("the {0} provider is not built into this binary (rebuild with --features {0})")]
    ProviderUnavailable(&'static str),
    /// The provider cannot do this (EOPNOTSUPP).
    #[error("{0} is not supported by this provider")]
    Unsupported(&'static str),
    /// A system or library call failed.
    #[error("{op} failed")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The host could not back an allocation (mmap's ENOMEM): too little memory, or too few
    /// huge pages reserved.
    #[error("cannot allocate {bytes} bytes{}", if *huge { " of 2 MiB huge pages" } else { "" })]
    NoMemory {
        bytes: usize,
        huge: bool,
        #[source]
        source: io::Error,
    },
    /// An argument is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A local buffer lacks the access a work request needs (LOCAL_WRITE for READ and atomics).
    #[error("local protection error: {0}")]
    LocalProtection(&'static str),
    /// The send or receive queue has no free slot; poll completions and retry.
    #[error("work queue full ({0} outstanding)")]
    QueueFull(usize),
    /// A work request of a chain was rejected; the ones before it were posted.
    #[error("work request {index} of the chain was rejected")]
    Rejected {
        index: usize,
        #[source]
        source: Box<Error>,
    },
    /// The out-of-band connection exchange failed.
    #[error("connection handshake failed: {0}")]
    Handshake(String),
    /// The peer broke its provider's wire protocol; the source says how (each provider converts
    /// its own decoding errors into this).
    #[error("wire protocol violation")]
    Protocol(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A deadline passed.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The queue pair has failed; it only flushes work from now on.
    #[error("queue pair is in the error state")]
    QpError,
}

impl Error {
    /// True when retrying the same call later can succeed (a full queue, a timeout, EINTR/EAGAIN).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::QueueFull(_) | Error::Timeout(_) => true,
            Error::Os { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            Error::Rejected { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// Wraps the last OS error for the named call.
    pub(crate) fn last_os(op: &'static str) -> Self {
        Error::Os {
            op,
            source: io::Error::last_os_error(),
        }
    }

    pub(crate) fn os(op: &'static str, source: io::Error) -> Self {
        Error::Os { op, source }
    }
}
