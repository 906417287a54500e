//! `rmem server` configuration: a TOML file, overridden by flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rmem_transport::{HugePages, Provider};
use serde::{Deserialize, Serialize};

/// A byte count written as a number or with a binary suffix ("64M", "1G").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "u64")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Num(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for ByteSize {
    type Error = String;
    fn try_from(r: SizeRepr) -> Result<Self, String> {
        match r {
            SizeRepr::Num(n) => Ok(ByteSize(n)),
            SizeRepr::Text(s) => s.parse(),
        }
    }
}

impl From<ByteSize> for u64 {
    fn from(b: ByteSize) -> u64 {
        b.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (num, mult) = match s.chars().last() {
            Some(c) if c.is_ascii_alphabetic() => {
                let m: u64 = match c.to_ascii_uppercase() {
                    'K' => 1 << 10,
                    'M' => 1 << 20,
                    'G' => 1 << 30,
                    'T' => 1 << 40,
                    _ => return Err(format!("unknown size suffix in {s:?} (K, M, G or T)")),
                };
                (&s[..s.len() - 1], m)
            }
            _ => (s, 1),
        };
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

/// A block device served over NBD, carved from the pool at start-up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub name: String,
    pub size: ByteSize,
}

/// Everything a donor needs. Every field has a default, so a file names only what it changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Control-plane address clients connect to.
    pub listen: SocketAddr,
    /// Memory to lend.
    pub size: ByteSize,
    /// Unit of lending.
    pub slab_size: ByteSize,
    /// How long a client keeps its slabs without renewing.
    pub lease_secs: u64,
    /// File holding the shared secret clients authenticate with (or RMEM_SECRET).
    pub secret_file: Option<PathBuf>,
    pub hugepages: HugePages,
    pub provider: Provider,
    /// verbs: device name.
    pub device: Option<String>,
    /// Where the HTTP admin endpoint (/metrics, /status) listens; none when unset.
    pub admin_listen: Option<SocketAddr>,
    /// Where the NBD export listens (loopback by default: NBD has no authentication).
    pub nbd_listen: SocketAddr,
    /// Block devices served over NBD, each carved from the pool at start-up.
    pub exports: Vec<ExportConfig>,
    /// Limits on NBD clients (the protocol has no authentication).
    pub nbd: NbdConfig,
    /// Taking memory back from clients.
    pub reclaim: ReclaimConfig,
    /// The data listener every session's queue pair connects to, and its bounds.
    pub data: crate::data::DataConfig,
    /// Bounds on the control port.
    pub control: ControlConfig,
}

/// Bounds on the control port: connections open at once, in total and per source address,
/// and the time a new connection has to authenticate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub max_connections: usize,
    pub max_per_source: usize,
    pub handshake_timeout_ms: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            max_connections: 4096,
            max_per_source: 256,
            handshake_timeout_ms: 10_000,
        }
    }
}

/// How the donor takes memory back: on `rmem server shrink`, and on its own when its host is
/// under memory pressure (PSI, /proc/pressure/memory).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReclaimConfig {
    /// Time clients get to move their data off a reclaimed slab.
    pub grace_secs: u64,
    /// Time clients get when the donor shuts down.
    pub shutdown_grace_secs: u64,
    /// Shrink on memory pressure.
    pub pressure: bool,
    /// PSI file read for pressure.
    pub pressure_file: PathBuf,
    /// Shrink when `some avg10` reaches this (percent of time stalled).
    pub high_avg10: f64,
    /// Grow back once `some avg10` stays at or below this for `settle_secs`.
    pub low_avg10: f64,
    /// Memory taken back (or given again) per step [default: an eighth of `size`].
    pub step: Option<ByteSize>,
    /// Never shrink below this much lendable memory.
    pub min_size: ByteSize,
    /// Between two steps, and before growing back.
    pub settle_secs: u64,
    /// How often the pressure file is read.
    pub interval_ms: u64,
}

/// What one NBD client may hold of the donor: connections, time to finish the handshake,
/// memory for replies it has not read yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections served at once from one source address.
    pub max_connections_per_ip: usize,
    /// Time a client has from connecting to the end of option haggling.
    pub handshake_timeout_secs: u64,
    /// Bytes of replies a connection may have waiting for its socket; past this, the donor
    /// reads no more of its requests until the client reads replies. At least one largest
    /// READ reply (32 MiB and a 16-byte header).
    pub max_queued_replies: ByteSize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            max_connections: 64,
            max_connections_per_ip: 16,
            handshake_timeout_secs: 10,
            max_queued_replies: ByteSize(64 << 20),
        }
    }
}

impl NbdConfig {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0
            || self.max_connections_per_ip == 0
            || self.handshake_timeout_secs == 0
        {
            return Err(ConfigError::Invalid(
                "nbd: max_connections, max_connections_per_ip and handshake_timeout_secs must \
                 be at least 1"
                    .into(),
            ));
        }
        let one = u64::from(crate::nbd_wire::MAX_REQUEST) + crate::nbd_wire::REPLY_HEADER as u64;
        if self.max_queued_replies.0 < one {
            return Err(ConfigError::Invalid(format!(
                "nbd: max_queued_replies ({}) must hold one largest READ reply ({one} bytes)",
                self.max_queued_replies.0
            )));
        }
        Ok(())
    }
}

impl Default for ReclaimConfig {
    fn default() -> Self {
        ReclaimConfig {
            grace_secs: 10,
            shutdown_grace_secs: 5,
            pressure: true,
            pressure_file: "/proc/pressure/memory".into(),
            high_avg10: 10.0,
            low_avg10: 1.0,
            step: None,
            min_size: ByteSize(0),
            settle_secs: 30,
            interval_ms: 1000,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:7470".parse().expect("literal address"),
            size: ByteSize(1 << 30),
            slab_size: ByteSize(16 << 20),
            lease_secs: 30,
            secret_file: None,
            hugepages: HugePages::Try,
            provider: Provider::Tcp,
            device: None,
            admin_listen: None,
            nbd_listen: "127.0.0.1:10809".parse().expect("literal address"),
            exports: Vec::new(),
            nbd: NbdConfig::default(),
            reclaim: ReclaimConfig::default(),
            data: crate::data::DataConfig::default(),
            control: ControlConfig::default(),
        }
    }
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Where and what, on one line (toml's own text is a multi-line excerpt).
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ServerConfig {
    pub fn from_file(path: &std::path::Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| {
            // 1-based line and column of where the error starts (1:1 when toml gives none).
            let at = e.span().map_or(0, |s| s.start).min(text.len());
            let before = text.get(..at).unwrap_or("");
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            ConfigError::Parse {
                path: path.into(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }

    /// Checks the numbers fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.data.validate().map_err(ConfigError::Invalid)?;
        let c = &self.control;
        if c.max_connections == 0 || c.max_per_source == 0 || c.handshake_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "[control] max_connections, max_per_source and handshake_timeout_ms must be above 0"
                    .into(),
            ));
        }
        let (size, slab) = (self.size.0, self.slab_size.0);
        if slab < 4096 || slab % 4096 != 0 {
            return Err(ConfigError::Invalid(format!(
                "slab_size {slab} must be a multiple of 4096 and at least 4096"
            )));
        }
        if size < slab {
            return Err(ConfigError::Invalid(format!(
                "size {size} is smaller than one slab ({slab})"
            )));
        }
        if size / slab > u64::from(u32::MAX) {
            return Err(ConfigError::Invalid(
                "too many slabs: use larger slabs".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut export_slabs = 0u64;
        for e in &self.exports {
            if e.name.is_empty() || e.name.len() > 4096 || !names.insert(&e.name) {
                return Err(ConfigError::Invalid(format!(
                    "export name {:?} is empty, too long or repeated",
                    e.name
                )));
            }
            if e.size.0 == 0 {
                return Err(ConfigError::Invalid(format!(
                    "export {:?} has size 0",
                    e.name
                )));
            }
            export_slabs += e.size.0.div_ceil(slab);
        }
        if export_slabs > size / slab {
            return Err(ConfigError::Invalid(format!(
                "exports need {export_slabs} slabs, the pool has {}",
                size / slab
            )));
        }
        let r = &self.reclaim;
        if !(r.low_avg10 >= 0.0 && r.low_avg10 < r.high_avg10 && r.high_avg10 <= 100.0) {
            return Err(ConfigError::Invalid(format!(
                "reclaim: need 0 <= low_avg10 ({}) < high_avg10 ({}) <= 100",
                r.low_avg10, r.high_avg10
            )));
        }
        if r.interval_ms == 0 || r.step.is_some_and(|s| s.0 < slab) {
            return Err(ConfigError::Invalid(
                "reclaim: interval_ms must be positive and step at least one slab".into(),
            ));
        }
        if self.lease_secs == 0 {
            return Err(ConfigError::Invalid("lease_secs must be at least 1".into()));
        }
        self.nbd.validate()
    }

    /// Slabs per reclaim step.
    pub fn reclaim_step_slabs(&self) -> u32 {
        let bytes = self.reclaim.step.map_or(self.size.0 / 8, |s| s.0);
        (bytes / self.slab_size.0).max(1) as u32
    }

    /// The secret from `secret_file`, else RMEM_SECRET; an error when neither is set.
    pub fn load_secret(&self) -> Result<Vec<u8>, ConfigError> {
        crate::auth::load_secret(self.secret_file.as_deref()).map_err(|e| match e {
            crate::auth::SecretError::Read { path, source } => ConfigError::Read { path, source },
            crate::auth::SecretError::Short => ConfigError::Invalid(
                "a shared secret of at least 16 bytes is required (secret_file or RMEM_SECRET)"
                    .into(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_sizes_parses_and_validates() {
        let c: ServerConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\nsize = \"64M\"\nslab_size = 1048576\nlease_secs = 5\n",
        )
        .unwrap();
        assert_eq!(c.size.0, 64 << 20);
        assert_eq!(c.slab_size.0, 1 << 20);
        c.validate().unwrap();
        assert!(
            toml::from_str::<ServerConfig>("sise = 1").is_err(),
            "typos are refused"
        );
        let bad = ServerConfig {
            slab_size: ByteSize(1000),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn nbd_limits_parse_and_out_of_range_ones_are_refused() {
        let c: ServerConfig = toml::from_str(
            "[nbd]\nmax_connections = 8\nmax_connections_per_ip = 2\nhandshake_timeout_secs = 3\nmax_queued_replies = \"128M\"\n",
        )
        .unwrap();
        assert_eq!(c.nbd.max_connections, 8);
        assert_eq!(c.nbd.max_queued_replies.0, 128 << 20);
        c.validate().unwrap();
        assert!(toml::from_str::<ServerConfig>("[nbd]\nmax_conections = 1\n").is_err());
        for bad in [
            "max_connections = 0",
            "max_connections_per_ip = 0",
            "handshake_timeout_secs = 0",
            "max_queued_replies = \"32M\"",
        ] {
            let c: ServerConfig = toml::from_str(&format!("[nbd]\n{bad}\n")).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_file_error_names_file_line_and_column_on_one_line() {
        let dir = std::env::temp_dir().join(format!("rmem-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.toml");
        std::fs::write(&p, "size = \"4M\"\n  slab_sise = \"1M\"\n").unwrap();
        let e = ServerConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}:2:3: unknown field `slab_sise`", p.display())),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
