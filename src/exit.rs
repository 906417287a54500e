//! Exit codes and error reporting for the command line.

use std::io::ErrorKind;

use rmem_swapclient::ClientError;
use rmem_transport::Error as TError;
use rmem_wire::protocol::FrameError;

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
    /// Refused before anything changed: a guest rmem cannot move, a destination not waiting
    /// or with another RAM layout, a secret that does not match.
    Refused = 6,
    /// A migration abandoned or cancelled after it began; the source was put back as it was.
    Aborted = 7,
}

/// An error with the exit code it maps to.
pub struct Failed {
    pub code: Code,
    pub error: Box<dyn std::error::Error + Send + Sync>,
}

impl Failed {
    pub fn code(&self) -> Code {
        self.code
    }
    pub fn new(code: Code, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Failed {
            code,
            error: error.into(),
        }
    }
}

/// The exit code of a transport error.
fn transport_code(e: &TError) -> Code {
    match e {
        TError::NoDevice { .. }
        | TError::DeviceNotFound(_)
        | TError::NoGid(_)
        | TError::ProviderUnavailable(_)
        | TError::Unsupported(_) => Code::NoDevice,
        TError::InvalidArgument(_) => Code::Usage,
        TError::Timeout(_) | TError::Handshake(_) | TError::QpError => Code::Peer,
        TError::Os { op, .. } if *op == "connect" => Code::Peer,
        TError::Os { source, .. } if peer_kind(source.kind()).is_some() => Code::Peer,
        _ => Code::Failure,
    }
}

/// What an I/O error kind says about the peer, when it says something.
fn peer_kind(k: ErrorKind) -> Option<&'static str> {
    match k {
        // A socket read timeout (SO_RCVTIMEO) reports EAGAIN.
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Some("timed out: the peer did not answer"),
        ErrorKind::ConnectionRefused => Some("connection refused: nothing listens there"),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => {
            Some("the peer closed the connection")
        }
        _ => None,
    }
}

const CHECK_PEER: &str =
    "check the address and port, that the peer runs there, and that no firewall drops the traffic";

/// A field of /proc/meminfo, in kB (or a count, for the HugePages_ lines).
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// What to do when the host could not back `bytes`.
fn no_memory_hint(bytes: usize, huge: bool) -> String {
    const MIB: u64 = 1 << 20;
    let bytes = bytes as u64;
    if huge {
        let page = meminfo("Hugepagesize").map_or(2 * MIB, |kb| kb << 10);
        let need = bytes.div_ceil(page);
        match (meminfo("HugePages_Free"), meminfo("HugePages_Total")) {
            (Some(free), Some(total)) => format!(
                "{need} huge pages of {} MiB needed, {free} free (HugePages_Free in /proc/meminfo): \
                 reserve them with `echo {} > /proc/sys/vm/nr_hugepages` as root, or use \
                 --hugepages try",
                page / MIB,
                total + need.saturating_sub(free)
            ),
            _ => format!(
                "{need} huge pages of {} MiB needed: reserve them in /proc/sys/vm/nr_hugepages, or \
                 use --hugepages try",
                page / MIB
            ),
        }
    } else {
        match meminfo("MemAvailable") {
            Some(kb) => format!(
                "asked for {} MiB, the host has {} MiB available (MemAvailable in /proc/meminfo): \
                 ask for less with --size",
                bytes / MIB,
                (kb << 10) / MIB
            ),
            None => format!("asked for {} MiB: ask for less with --size", bytes / MIB),
        }
    }
}

impl From<TError> for Failed {
    fn from(e: TError) -> Self {
        let code = transport_code(&e);
        if let TError::NoMemory { bytes, huge, .. } = &e {
            return Failed::new(code, format!("{e}; {}", no_memory_hint(*bytes, *huge)));
        }
        if let TError::Os { op, source } = &e {
            if let Some(what) = peer_kind(source.kind()) {
                // The OS text ("Resource temporarily unavailable") would mislead.
                return Failed::new(code, format!("{op}: {what}; {CHECK_PEER}"));
            }
        }
        Failed::new(code, e)
    }
}

/// The exit code of a client library error: the donor unreachable, silent or gone is 5, a
/// secret that does not match is a usage error.
pub fn client_code(e: &ClientError) -> Code {
    match e {
        ClientError::Connect(_)
        | ClientError::Timeout(_)
        | ClientError::Closed
        | ClientError::Completion(_)
        | ClientError::Frame(FrameError::Closed | FrameError::Io(_)) => Code::Peer,
        ClientError::Transport(t) => transport_code(t),
        ClientError::Auth(_) => Code::Usage,
        _ => Code::Failure,
    }
}

/// What to check after a client error, when there is something to check.
pub fn client_hint(e: &ClientError) -> Option<&'static str> {
    match e {
        ClientError::Connect(_) | ClientError::Timeout(_) => Some(
            "check that the donor runs, that the address is its control port (rmem server \
             --listen), and that no firewall drops the traffic",
        ),
        ClientError::Closed | ClientError::Frame(FrameError::Closed | FrameError::Io(_)) => {
            Some("the donor closed the connection: its log says why")
        }
        ClientError::Transport(t) if transport_code(t) == Code::Peer => Some(
            "the donor answered but its data address did not: check that the donor's host can \
             be reached on its data ports and that both sides use the same provider",
        ),
        _ => None,
    }
}

/// A client error with what it concerns (`context`, e.g. the donor's address) and what to check.
pub fn client_failed(context: &str, e: &ClientError) -> Failed {
    let mut msg = format!("{context}: {}", chain(e));
    if let Some(h) = client_hint(e) {
        msg.push_str("; ");
        msg.push_str(h);
    }
    Failed::new(client_code(e), msg)
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
