//! Exit codes and error reporting for the command line.

use rmem_transport::Error as TError;

/// What the process exit status means; scripts can rely on these numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// A run-time failure not covered below.
    Failure = 1,
    /// Bad command-line usage (clap uses 2 as well).
    Usage = 2,
    /// No RDMA device, or the provider is not built in.
    NoDevice = 3,
    /// Data did not verify, or a conformance case failed.
    Verify = 4,
    /// The peer could not be reached, went away, or timed out.
    Peer = 5,
}

/// An error with the exit code it maps to.
pub struct Failed {
    pub code: Code,
    pub error: Box<dyn std::error::Error + Send + Sync>,
}

impl Failed {
    pub fn new(code: Code, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Failed {
            code,
            error: error.into(),
        }
    }
}

impl From<TError> for Failed {
    fn from(e: TError) -> Self {
        let code = match &e {
            TError::NoDevice { .. }
            | TError::DeviceNotFound(_)
            | TError::NoGid(_)
            | TError::ProviderUnavailable(_)
            | TError::Unsupported(_) => Code::NoDevice,
            TError::InvalidArgument(_) => Code::Usage,
            TError::Timeout(_) | TError::Handshake(_) | TError::QpError => Code::Peer,
            TError::Os { op, .. } if *op == "connect" => Code::Peer,
            _ => Code::Failure,
        };
        Failed::new(code, e)
    }
}

impl From<rmem_bench::PerfError> for Failed {
    fn from(e: rmem_bench::PerfError) -> Self {
        match e {
            rmem_bench::PerfError::Transport(t) => t.into(),
            rmem_bench::PerfError::Completion(_) => Failed::new(Code::Peer, e),
            rmem_bench::PerfError::Verify(_) => Failed::new(Code::Verify, e),
            rmem_bench::PerfError::Invalid(_) | rmem_bench::PerfError::TooLarge { .. } => {
                Failed::new(Code::Usage, e)
            }
            other => Failed::new(Code::Failure, other),
        }
    }
}

/// "outer: inner: root" for an error and its sources.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Logs go to stderr; `RMEM_LOG` (an env-filter) overrides `-v`.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RMEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
