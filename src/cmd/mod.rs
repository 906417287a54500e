//! Command-line definitions and dispatch.

mod conformance;
mod demo;
mod devices;
mod dist;
mod memcheck;
mod migrate;
mod perf;
mod place;
mod server;
mod swap;

use clap::{Args, Parser, Subcommand};
use rmem_transport::{OpenOptions, Provider};

use crate::exit::Failed;

/// rmem lends and borrows memory across hosts over one-sided RDMA.
///
/// Every data movement is a one-sided READ, WRITE or atomic: the host that owns the memory
/// spends no CPU on it. Providers: `verbs` (InfiniBand, RoCE, Soft-RoCE) and `tcp` (software,
/// any host).
///
/// Exit status: 0 success, 1 failure, 2 usage, 3 no RDMA device or provider, 4 data or
/// conformance check failed, 5 peer unreachable, gone or timed out, 6 refused before anything
/// changed (migrate: guest not movable, destination not waiting, wrong secret), 7 migration
/// abandoned or cancelled (the source put back as it was).
#[derive(Parser, Debug)]
#[command(name = "rmem", version, propagate_version = true)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug); RMEM_LOG=<filter> overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Lend this host's memory: a donor daemon serving slabs to authenticated clients.
    ///
    /// Example: RMEM_SECRET=... rmem server --size 8G --slab-size 64M --listen 0.0.0.0:7470
    Server(server::ServerArgs),
    /// Swap to other hosts' memory: a block device on donors' slabs, replicated, swapped on.
    #[command(subcommand)]
    Swap(swap::SwapCmd),
    /// Move a running QEMU guest to another host: RAM one-sided over the transport, device
    /// state (or QEMU's whole stream) relayed through it.
    #[command(subcommand)]
    Migrate(migrate::MigrateCmd),
    /// Run a target and an initiator in this process, move data, verify it, and report latency
    /// and bandwidth (the software provider; nothing to set up).
    Demo(demo::DemoArgs),
    /// Measure READ/WRITE/atomic latency and bandwidth, perftest-style.
    #[command(subcommand)]
    Perf(perf::PerfCmd),
    /// Choose donors, links and migration targets: the placement service (`serve`) and its
    /// queries, and a simulation of donor choice at cluster scale (`sim`).
    #[command(subcommand)]
    Place(place::PlaceCmd),
    /// Run the transport conformance suite against a provider (e.g. a real RDMA device).
    Conformance(conformance::ConformanceArgs),
    /// Fill memory with checksummed pages and verify them (run it under a memory limit to test
    /// a swap device end to end). Exit status 4 when a page comes back different.
    Memcheck(memcheck::MemcheckArgs),
    /// List RDMA devices, ports and GIDs (verbs).
    Devices(devices::DevicesArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// Example: rmem completions bash > /etc/bash_completion.d/rmem
    Completions(dist::CompletionsArgs),
    /// Write the man pages (rmem.1 and one per subcommand) into a directory.
    Man(dist::ManArgs),
}

/// Which provider and device to open.
#[derive(Args, Debug, Clone)]
pub struct ProviderArgs {
    /// Transport provider: `tcp` (software, any host) or `verbs` (RDMA NIC or rxe).
    #[arg(long, default_value = "tcp", env = "RMEM_PROVIDER")]
    pub provider: Provider,
    /// verbs: device name (default: the first, or the one carrying --local-ip).
    #[arg(long, env = "RMEM_DEVICE")]
    pub device: Option<String>,
    /// verbs: use the RoCE v2 GID that carries this local IP address.
    #[arg(long)]
    pub local_ip: Option<std::net::IpAddr>,
    /// verbs: explicit GID index.
    #[arg(long)]
    pub gid_index: Option<u8>,
}

impl ProviderArgs {
    pub fn open_options(&self) -> OpenOptions {
        let mut o = OpenOptions::new(self.provider);
        o.device = self.device.clone();
        o.local_ip = self.local_ip;
        o.gid_index = self.gid_index;
        o
    }
}

pub fn run(cli: Cli) -> Result<(), Failed> {
    match cli.command {
        Command::Server(a) => server::run(a),
        Command::Swap(c) => swap::run(c),
        Command::Migrate(c) => migrate::run(c),
        Command::Demo(a) => demo::run(a),
        Command::Perf(c) => perf::run(c),
        Command::Place(c) => place::run(c),
        Command::Conformance(a) => conformance::run(a),
        Command::Devices(a) => devices::run(a),
        Command::Memcheck(a) => memcheck::run(a),
        Command::Completions(a) => dist::completions(a),
        Command::Man(a) => dist::man(a),
    }
}

/// Tells systemd that a `Type=notify` daemon is ready (does nothing outside systemd: no
/// NOTIFY_SOCKET). `status` shows in `systemctl status`.
pub fn notify_ready(status: &str) {
    let state = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ];
    if let Err(e) = sd_notify::notify(false, &state) {
        tracing::warn!(error = %e, "could not tell systemd the daemon is ready");
    }
}

/// Parses sizes like `4096`, `64K`, `16M`, `1G` (binary units).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'B' => 1,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64K, 16M)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("16m"), Ok(16 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
