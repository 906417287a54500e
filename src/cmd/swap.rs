//! `rmem swap`: swap to other hosts' memory.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use rmem_swapclient::daemon::{self, Backend, SwapOptions, RUN_DIR};
use rmem_swapclient::reserve::MinFree;
use rmem_swapclient::{DonorSpec, StoreConfig};
use rmem_transport::Provider;

use crate::exit::{Code, Failed};

#[derive(Subcommand, Debug)]
pub enum SwapCmd {
    /// Create a swap device on donors' memory and swap to it; stays in the foreground serving
    /// the device (run it under systemd, or with `&`) until `rmem swap down` or SIGTERM.
    ///
    /// Example: RMEM_SECRET=... rmem swap up --size 8G --donor 10.0.0.2:7470 --donor 10.0.0.3:7470 --replicas 2
    Up(Box<UpArgs>),
    /// Take swap devices down: swapoff (pages come back in), device detached, slabs returned.
    Down(DownArgs),
    /// Show devices, donors, replicas and bytes in and out.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// TOML file with any of these settings (e.g. /etc/rmem/swap/NAME.toml, as
    /// rmem-swap@NAME.service reads it; keys as the flags, `swapon`/`mlock`/`readahead` for the negated
    /// ones, `donors` a list); flags given as well override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Device size (e.g. 8G; a multiple of 4 KiB).
    #[arg(long, required_unless_present = "config")]
    size: Option<rmem_memserver::ByteSize>,
    /// A donor HOST:PORT[@DOMAIN] (repeatable). Replicas go to distinct failure domains; the
    /// domain defaults to the host's address. With --placement these are the fallback when the
    /// service cannot be reached.
    #[arg(long = "donor")]
    donors: Vec<DonorSpec>,
    /// Ask this placement service (`rmem place serve`) which donors to use, e.g.
    /// http://10.0.0.9:7460; it signs with the same shared secret.
    #[arg(long, env = "RMEM_PLACEMENT")]
    placement: Option<String>,
    /// Copies of every block, each on a donor in another failure domain [default: 1].
    #[arg(long)]
    replicas: Option<usize>,
    /// File with the donors' shared secret (else RMEM_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Transport provider: tcp or verbs [default: tcp].
    #[arg(long, env = "RMEM_PROVIDER")]
    provider: Option<Provider>,
    /// verbs: device name.
    #[arg(long, env = "RMEM_DEVICE")]
    device: Option<String>,
    /// Kernel block driver: ublk (Linux 6.4+ with ublk_drv loaded; requests on io_uring),
    /// nbd (any kernel with the nbd module; a local socket), or auto: ublk where
    /// /dev/ublk-control exists and works, else nbd [default: auto].
    #[arg(long)]
    backend: Option<Backend>,
    /// The NBD device to use (implies --backend nbd under auto) [default: the first free
    /// /dev/nbdN].
    #[arg(long)]
    nbd: Option<PathBuf>,
    /// Create the device only; no mkswap and swapon.
    #[arg(long)]
    no_swapon: bool,
    /// Swap priority (higher is used first).
    #[arg(long)]
    priority: Option<u16>,
    /// Do not lock the daemon's memory (it may then be swapped out to its own device).
    #[arg(long)]
    no_mlock: bool,
    /// Do not read ahead. By default, once reads continue one another (a process's pages
    /// swapped back in the order they went out), each queue READs the next 512 KiB from the
    /// donors before the kernel asks for them, and serves those reads from memory.
    #[arg(long)]
    no_readahead: bool,
    /// Seconds a donor may take over one operation before it is treated as dead [default: 5
    /// with replicas, 30 with one: with no other copy to turn to, riding out a stalled link
    /// (a host short of memory drops packets) beats failing the swap; the kernel waits 60].
    #[arg(long)]
    op_timeout: Option<u64>,
    /// Seconds a donor may take to accept the connection, authenticate and connect the data
    /// path before `swap up` gives up on it (exit status 5) [default: 10].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout: Option<u64>,
    /// Data queue pairs to each donor (1-16): as many requests to one donor run at once, each
    /// on its own caller thread. Each costs a connection (two with the tcp provider) and a
    /// locked 1 MiB buffer. More than one pays off only with cores to run those threads on
    /// (on 2 cores, 4 lanes measured no faster than 1: docs/perf.md).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=16))]
    lanes: Option<u8>,
    /// Serve Prometheus metrics (I/O, replica health, per-donor traffic) at
    /// http://ADDR/metrics, e.g. 127.0.0.1:9472.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// The kernel's free-memory reserve (vm.min_free_kbytes) while the device is swap: auto
    /// raises it to 64 MiB (an eighth of RAM on hosts under 512 MiB) when lower, a size (e.g.
    /// 128M) to at least that, keep leaves it. Each page swapped out needs socket memory on its
    /// way to a donor; without headroom a host that runs out of memory altogether stalls its
    /// own swap. Watermark boosting (vm.watermark_boost_factor) is off meanwhile: a boost
    /// raises that minimum too. keep leaves both. The old values come back at `rmem swap down`.
    #[arg(long, value_name = "auto|keep|SIZE")]
    min_free: Option<MinFree>,
    /// Print the ready line as JSON.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = RUN_DIR, hide = true)]
    run_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Only this device (e.g. /dev/ublkb0, /dev/nbd0) [default: every rmem swap device].
    device: Option<String>,
    /// Give up waiting after this many seconds (swapoff reads every swapped page back).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    #[arg(long, default_value = RUN_DIR, hide = true)]
    run_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// JSON for scripts.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = RUN_DIR, hide = true)]
    run_dir: PathBuf,
}

pub fn run(c: SwapCmd) -> Result<(), Failed> {
    match c {
        SwapCmd::Up(a) => up(*a),
        SwapCmd::Down(a) => down(a),
        SwapCmd::Status(a) => status(a),
    }
}

/// `rmem swap up`'s settings once the config file and the flags are merged.
struct Up {
    size: u64,
    donors: Vec<DonorSpec>,
    placement: Option<String>,
    replicas: usize,
    secret_file: Option<PathBuf>,
    provider: Provider,
    device: Option<String>,
    backend: Backend,
    nbd: Option<PathBuf>,
    swapon: bool,
    priority: Option<u16>,
    mlock: bool,
    readahead: bool,
    op_timeout: Option<u64>,
    connect_timeout: u64,
    lanes: u8,
    metrics: Option<std::net::SocketAddr>,
    min_free: MinFree,
    json: bool,
    run_dir: PathBuf,
}

/// The swap config file: every key optional, as the flags.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapFile {
    size: Option<rmem_memserver::ByteSize>,
    #[serde(default)]
    donors: Vec<String>,
    placement: Option<String>,
    replicas: Option<usize>,
    secret_file: Option<PathBuf>,
    provider: Option<Provider>,
    device: Option<String>,
    backend: Option<String>,
    nbd: Option<PathBuf>,
    swapon: Option<bool>,
    priority: Option<u16>,
    mlock: Option<bool>,
    readahead: Option<bool>,
    op_timeout: Option<u64>,
    connect_timeout: Option<u64>,
    lanes: Option<u8>,
    metrics: Option<std::net::SocketAddr>,
    min_free: Option<String>,
}

/// Merges the config file (if any) under the flags; checks what neither can say alone.
fn resolve(a: UpArgs) -> Result<Up, Failed> {
    let usage = |m: String| Failed::new(Code::Usage, m);
    let f: SwapFile = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| usage(format!("{}: {e}", p.display())))?;
            toml::from_str(&text).map_err(|e| usage(format!("{}: {e}", p.display())))?
        }
        None => SwapFile::default(),
    };
    let parse = |what: &str, v: &str| usage(format!("{what} {v:?} in the config file"));
    let file_donors = f
        .donors
        .iter()
        .map(|d| {
            d.parse::<DonorSpec>()
                .map_err(|e| usage(format!("donor {d:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let backend = match (a.backend, &f.backend) {
        (Some(b), _) => b,
        (None, Some(b)) => b.parse().map_err(|_| parse("backend", b))?,
        (None, None) => Backend::Auto,
    };
    let min_free = match (a.min_free, &f.min_free) {
        (Some(m), _) => m,
        (None, Some(m)) => m.parse().map_err(|_| parse("min_free", m))?,
        (None, None) => MinFree::Auto,
    };
    let lanes = a.lanes.or(f.lanes).unwrap_or(1);
    if !(1..=16).contains(&lanes) {
        return Err(usage(format!("lanes must be 1 to 16, not {lanes}")));
    }
    let up = Up {
        size: a
            .size
            .or(f.size)
            .ok_or_else(|| usage("no size: give --size or size in the config file".into()))?
            .0,
        donors: if a.donors.is_empty() {
            file_donors
        } else {
            a.donors
        },
        placement: a.placement.or(f.placement),
        replicas: a.replicas.or(f.replicas).unwrap_or(1),
        secret_file: a.secret_file.or(f.secret_file),
        provider: a.provider.or(f.provider).unwrap_or(Provider::Tcp),
        device: a.device.or(f.device),
        backend,
        nbd: a.nbd.or(f.nbd),
        swapon: !a.no_swapon && f.swapon.unwrap_or(true),
        priority: a.priority.or(f.priority),
        mlock: !a.no_mlock && f.mlock.unwrap_or(true),
        readahead: !a.no_readahead && f.readahead.unwrap_or(true),
        op_timeout: a.op_timeout.or(f.op_timeout),
        connect_timeout: a.connect_timeout.or(f.connect_timeout).unwrap_or(10).max(1),
        lanes,
        metrics: a.metrics.or(f.metrics),
        min_free,
        json: a.json,
        run_dir: a.run_dir,
    };
    if up.donors.is_empty() && up.placement.is_none() {
        return Err(usage(
            "no donors: give --donor (repeatable), --placement, or either in the config file"
                .into(),
        ));
    }
    Ok(up)
}

fn up(args: UpArgs) -> Result<(), Failed> {
    let a = resolve(args)?;
    let cfg = rmem_memserver::ServerConfig {
        secret_file: a.secret_file.clone(),
        ..Default::default()
    };
    let secret = cfg.load_secret().map_err(|e| Failed::new(Code::Usage, e))?;
    let (donors, plan) = match &a.placement {
        Some(url) => match placed(url, &secret, a.size, a.replicas) {
            Ok((d, p)) => (d, Some(p)),
            Err(e) if !a.donors.is_empty() && e.code() == Code::Peer => {
                tracing::warn!(error = %e.error, "placement unreachable; choosing among --donor");
                eprintln!("warning: {}; choosing among the --donor list", e.error);
                (a.donors.clone(), None)
            }
            Err(e) => return Err(e),
        },
        None => (a.donors.clone(), None),
    };
    let n_donors = donors.len();
    let secret_for_traffic = secret.clone();
    let opts = SwapOptions {
        store: StoreConfig {
            size: a.size,
            replicas: a.replicas,
            donors,
            plan,
            secret,
            provider: a.provider,
            device: a.device.clone(),
            name: format!("rmem-swap@{}", hostname()),
            op_timeout: Duration::from_secs(a.op_timeout.unwrap_or(if a.replicas > 1 {
                5
            } else {
                30
            })),
            connect_timeout: Duration::from_secs(a.connect_timeout),
            lanes: usize::from(a.lanes),
            // A rebuild's whole piece in one operation, and any request either kernel driver
            // sends, so every write's replicas go out together.
            bounce: rmem_swapclient::store::COPY_PIECE
                .max(rmem_swapclient::kernel_nbd::MAX_REQUEST)
                .max(rmem_swapclient::kernel_ublk::MAX_REQUEST as usize),
            readahead: a.readahead,
        },
        backend: a.backend,
        device: a.nbd.clone(),
        swapon: a.swapon,
        priority: a.priority,
        mlock: a.mlock,
        run_dir: a.run_dir.clone(),
        nbd_timeout: 60,
        metrics: a.metrics,
        min_free: a.min_free,
        traffic: a
            .placement
            .as_ref()
            .map(|url| traffic_reporter(url, &secret_for_traffic)),
    };
    let json = a.json;
    daemon::run(opts, |r| {
        super::notify_ready(&format!(
            "{} ready, {} MiB{}",
            r.device,
            r.size >> 20,
            if r.swapon { ", swap on" } else { "" }
        ));
        if json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            println!(
                "{} ready: {} MiB on {} donor(s), {} replica(s){}; `rmem swap status`, `rmem swap down`",
                r.device,
                r.size >> 20,
                n_donors,
                a.replicas,
                if r.swapon { ", swap on" } else { "" }
            );
        }
    })
    .map_err(|e| {
        use rmem_swapclient::daemon::SwapError;
        use rmem_swapclient::StoreError;
        if let SwapError::Store(StoreError::Donor { addr, source }) = &e {
            return crate::exit::client_failed(&format!("donor {addr}"), source);
        }
        let code = match &e {
            SwapError::Store(StoreError::Config(_)) => Code::Usage,
            SwapError::Ublk(rmem_swapclient::kernel_ublk::UblkFailure::Unavailable) => {
                Code::Usage
            }
            _ => Code::Failure,
        };
        Failed::new(code, e)
    })
}

/// Posts the daemon's per-donor traffic to the placement service's link map.
fn traffic_reporter(url: &str, secret: &[u8]) -> rmem_swapclient::daemon::TrafficReport {
    let c = rmem_placement::client::PlaceClient::new(url, secret.to_vec(), Duration::from_secs(5));
    let host = hostname();
    rmem_swapclient::daemon::TrafficReport(std::sync::Arc::new(move |deltas| {
        let t = rmem_placement::service::Traffic {
            host: host.clone(),
            deltas: deltas
                .into_iter()
                .map(|(peer, tx, rx)| rmem_placement::links::TrafficDelta {
                    peer,
                    tx_bytes: tx,
                    rx_bytes: rx,
                })
                .collect(),
        };
        if let Err(e) = c.traffic(&t) {
            tracing::debug!(error = %e, "traffic report not taken");
        }
    }))
}

/// Asks the placement service for donors: the distinct donors, and each chunk's as indices.
fn placed(
    url: &str,
    secret: &[u8],
    size: u64,
    replicas: usize,
) -> Result<(Vec<DonorSpec>, Vec<Vec<usize>>), Failed> {
    use rmem_placement::client::{ClientError, PlaceClient};
    let c = PlaceClient::new(url, secret.to_vec(), Duration::from_secs(10));
    let p = c
        .place(&rmem_placement::service::PlaceRequest {
            client: hostname(),
            bytes: size,
            replicas,
        })
        .map_err(|e| {
            let code = match &e {
                ClientError::Unreachable { .. } => Code::Peer,
                ClientError::Refused { status: 401, .. } => Code::Usage,
                ClientError::Refused { .. } => Code::Refused,
                ClientError::Decode(_) => Code::Failure,
            };
            Failed::new(code, format!("placement: {e}"))
        })?;
    let mut donors: Vec<DonorSpec> = Vec::new();
    let mut plan = Vec::with_capacity(p.chunks.len());
    for chunk in &p.chunks {
        let mut ix = Vec::with_capacity(chunk.len());
        for r in chunk {
            let spec: DonorSpec = format!("{}@{}", r.addr, r.domain).parse().map_err(|e| {
                Failed::new(
                    Code::Failure,
                    format!("placement named donor {:?}: {e}", r.addr),
                )
            })?;
            let i = match donors.iter().position(|d| d.addr == spec.addr) {
                Some(i) => i,
                None => {
                    donors.push(spec);
                    donors.len() - 1
                }
            };
            ix.push(i);
        }
        plan.push(ix);
    }
    Ok((donors, plan))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

fn down(a: DownArgs) -> Result<(), Failed> {
    let socks: Vec<_> = daemon::sockets(&a.run_dir)
        .into_iter()
        .filter(|p| match &a.device {
            None => true,
            Some(d) => {
                let name = d.trim_start_matches("/dev/");
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n == format!("swap-{name}.sock"))
            }
        })
        .collect();
    if socks.is_empty() {
        return Err(Failed::new(
            Code::Usage,
            "no rmem swap device is running (nothing in /run/rmem)",
        ));
    }
    for s in socks {
        daemon::request_down(&s, Duration::from_secs(a.timeout))
            .map_err(|e| Failed::new(Code::Failure, format!("{}: {e}", s.display())))?;
        println!("{} down", s.display());
    }
    Ok(())
}

fn status(a: StatusArgs) -> Result<(), Failed> {
    let mut all = Vec::new();
    for s in daemon::sockets(&a.run_dir) {
        match daemon::query_status(&s) {
            Ok(v) => all.push(v),
            // A stale socket of a daemon that died.
            Err(e) => tracing::warn!(socket = %s.display(), error = %e, "no answer"),
        }
    }
    if a.json {
        println!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    if all.is_empty() {
        println!("no rmem swap devices");
        return Ok(());
    }
    for v in &all {
        let st = &v["store"];
        println!(
            "{} ({})  pid {}  {} MiB  swap {}  in {} MiB  out {} MiB  io errors {}  peak in flight {}",
            v["device"].as_str().unwrap_or("?"),
            v["backend"].as_str().unwrap_or("?"),
            v["pid"],
            st["size"].as_u64().unwrap_or(0) >> 20,
            if v["swapon"].as_bool() == Some(true) {
                "on"
            } else {
                "off"
            },
            v["bytes_in"].as_u64().unwrap_or(0) >> 20,
            v["bytes_out"].as_u64().unwrap_or(0) >> 20,
            v["io_errors"],
            v["peak_in_flight"],
        );
        println!(
            "  {} chunks of {} MiB, {} replica(s): {} degraded, {} lost, {} rebuilt, {} moved ({} MiB copied)",
            st["chunks"],
            st["chunk_size"].as_u64().unwrap_or(0) >> 20,
            st["replicas"],
            st["degraded"],
            st["lost"],
            st["rebuilt"],
            st["moved"],
            st["copied_bytes"].as_u64().unwrap_or(0) >> 20
        );
        println!(
            "  read ahead {} MiB, {} MiB of reads served from it",
            st["readahead_fetched_bytes"].as_u64().unwrap_or(0) >> 20,
            st["readahead_served_bytes"].as_u64().unwrap_or(0) >> 20
        );
        for d in st["donors"].as_array().into_iter().flatten() {
            println!(
                "  donor {} [{}] {}  {} slabs  read {} MiB  written {} MiB  errors {}",
                d["addr"].as_str().unwrap_or("?"),
                d["domain"].as_str().unwrap_or("?"),
                if d["healthy"].as_bool() == Some(true) {
                    "healthy"
                } else {
                    "FAILED"
                },
                d["slabs"],
                d["bytes_read"].as_u64().unwrap_or(0) >> 20,
                d["bytes_written"].as_u64().unwrap_or(0) >> 20,
                d["errors"]
            );
        }
    }
    Ok(())
}
