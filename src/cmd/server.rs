//! `rmem server`: lend this host's memory.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use rmem_memserver::{ByteSize, Server, ServerConfig};
use rmem_transport::{HugePages, Provider};

use crate::exit::{Code, Failed};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    action: Option<ServerAction>,
    #[command(flatten)]
    run: RunArgs,
}

/// Acting on a running donor through its admin endpoint.
#[derive(Subcommand, Debug)]
enum ServerAction {
    /// Take memory back from lending: free slabs at once; lent slabs after their clients were
    /// told and had the grace period (reclaim.grace_secs) to move their data.
    ///
    /// Example: rmem server shrink --by 2G
    Shrink(AdminArgs),
    /// Lend memory taken back by an earlier shrink again.
    Grow(AdminArgs),
}

#[derive(Args, Debug)]
struct AdminArgs {
    /// How much (e.g. 512M, 2G; rounded up to whole slabs).
    #[arg(long, value_parser = amount)]
    by: ByteSize,
    /// The donor's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:7471")]
    admin: String,
    /// File with the donor's shared secret (else RMEM_SECRET): requests are signed with it.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Print the donor's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// TOML configuration file (see docs/memserver.md); flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Control address clients connect to [default: 0.0.0.0:7470].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Memory to lend (e.g. 8G) [default: 1G].
    #[arg(long)]
    size: Option<ByteSize>,
    /// Unit of lending [default: 16M].
    #[arg(long)]
    slab_size: Option<ByteSize>,
    /// Seconds a client keeps its slabs without renewing [default: 30].
    #[arg(long)]
    lease_secs: Option<u64>,
    /// File with the shared secret clients authenticate with (else RMEM_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Transport provider [default: tcp].
    #[arg(long)]
    provider: Option<Provider>,
    /// verbs: device name.
    #[arg(long)]
    device: Option<String>,
    /// Back the pool with 2 MiB huge pages [default: try].
    #[arg(long, value_enum)]
    hugepages: Option<Huge>,
    /// Serve an NBD export NAME of SIZE bytes from the pool (repeatable), e.g. swap0=4G.
    #[arg(long = "export", value_parser = parse_export)]
    exports: Vec<rmem_memserver::ExportConfig>,
    /// Address of the NBD export [default: 127.0.0.1:10809; NBD has no authentication].
    #[arg(long)]
    nbd_listen: Option<std::net::SocketAddr>,
    /// Address of the HTTP admin endpoint (/metrics, /status) [default: 127.0.0.1:7471].
    #[arg(long)]
    admin_listen: Option<std::net::SocketAddr>,
    /// No admin endpoint.
    #[arg(long, conflicts_with = "admin_listen")]
    no_admin: bool,
    /// Do not shrink the pool when the host's memory pressure (PSI) rises; only
    /// `rmem server shrink` takes memory back. For donors that share a host with the
    /// workload they serve (tests, demos), where the borrower's own paging is the pressure.
    #[arg(long)]
    no_pressure: bool,
    /// Register with this placement service (`rmem place serve`, e.g. http://10.0.0.9:7460)
    /// and heartbeat to it, so borrowers asking it find this donor.
    #[arg(long, env = "RMEM_PLACEMENT")]
    placement: Option<String>,
    /// The address borrowers reach this donor at [default: the listen address, or when that
    /// is 0.0.0.0 the local address facing the placement service].
    #[arg(long)]
    advertise: Option<std::net::SocketAddr>,
    /// This donor's failure domain (rack, power feed): replicas of one block never share one
    /// [default: the advertised IP address].
    #[arg(long)]
    domain: Option<String>,
    /// The donor's link rate in bits per second (e.g. 10G, 100M) for the link map [default:
    /// unknown].
    #[arg(long, value_parser = link_rate)]
    link_rate: Option<u64>,
    /// Seconds of the donor's lease with the placement service (heartbeats every quarter).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    placement_lease: u64,
    /// Print the start-up line as JSON.
    #[arg(long)]
    json: bool,
}

/// A rate like 10G, 100M or 1000000 (bits per second, decimal units).
pub(crate) fn link_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1_000_000_000),
        Some('M' | 'm') => (&s[..s.len() - 1], 1_000_000),
        Some('K' | 'k') => (&s[..s.len() - 1], 1_000),
        _ => (s, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (e.g. 10G, 100M)"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("{s:?}: the rate must be more than 0"));
    }
    Ok((n * mult as f64) as u64)
}

/// A positive amount of memory.
fn amount(s: &str) -> Result<ByteSize, String> {
    match s.parse::<ByteSize>()? {
        ByteSize(0) => Err("the amount must be more than 0 (e.g. 512M, 2G)".into()),
        b => Ok(b),
    }
}

fn parse_export(s: &str) -> Result<rmem_memserver::ExportConfig, String> {
    let (name, size) = s
        .split_once('=')
        .ok_or("expected NAME=SIZE, e.g. swap0=4G")?;
    Ok(rmem_memserver::ExportConfig {
        name: name.to_string(),
        size: size.parse()?,
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Huge {
    Never,
    Try,
    Require,
}

impl RunArgs {
    fn config(&self) -> Result<ServerConfig, Failed> {
        let mut c = match &self.config {
            Some(p) => ServerConfig::from_file(p).map_err(|e| Failed::new(Code::Usage, e))?,
            None => ServerConfig::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.size {
            c.size = v;
        }
        if let Some(v) = self.slab_size {
            c.slab_size = v;
        }
        if let Some(v) = self.lease_secs {
            c.lease_secs = v;
        }
        if let Some(v) = &self.secret_file {
            c.secret_file = Some(v.clone());
        }
        if let Some(v) = self.provider {
            c.provider = v;
        }
        if let Some(v) = &self.device {
            c.device = Some(v.clone());
        }
        c.exports.extend(self.exports.iter().cloned());
        if self.no_admin {
            c.admin_listen = None;
        } else if let Some(v) = self.admin_listen {
            c.admin_listen = Some(v);
        } else if c.admin_listen.is_none() {
            c.admin_listen = Some("127.0.0.1:7471".parse().expect("literal address"));
        }
        if let Some(v) = self.nbd_listen {
            c.nbd_listen = v;
        }
        if self.no_pressure {
            c.reclaim.pressure = false;
        }
        if let Some(h) = self.hugepages {
            c.hugepages = match h {
                Huge::Never => HugePages::Never,
                Huge::Try => HugePages::Try,
                Huge::Require => HugePages::Require,
            };
        }
        c.validate().map_err(|e| Failed::new(Code::Usage, e))?;
        Ok(c)
    }
}

pub fn run(a: ServerArgs) -> Result<(), Failed> {
    match a.action {
        Some(ServerAction::Shrink(x)) => admin_post("/shrink", x),
        Some(ServerAction::Grow(x)) => admin_post("/grow", x),
        None => serve(a.run),
    }
}

/// Signs and sends an amount to the donor's admin endpoint, prints its answer.
fn admin_post(path: &str, a: AdminArgs) -> Result<(), Failed> {
    let cfg = ServerConfig {
        secret_file: a.secret_file.clone(),
        ..Default::default()
    };
    let secret = cfg.load_secret().map_err(|e| Failed::new(Code::Usage, e))?;
    let body = serde_json::to_vec(&rmem_memserver::Amount::Bytes(a.by.0))
        .map_err(|e| Failed::new(Code::Failure, e))?;
    let auth = rmem_memserver::admin_authorization(&secret, "POST", path, &body);
    let url = format!("http://{}{path}", a.admin);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .post(&url)
        .header("Authorization", &auth)
        .header("Content-Type", "application/json")
        .send(&body[..])
        .map_err(|e| Failed::new(Code::Peer, format!("{url}: {e}")))?;
    let status = resp.status();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| Failed::new(Code::Peer, format!("{url}: {e}")))?;
    if !status.is_success() {
        let code = if status == 401 {
            Code::Usage
        } else {
            Code::Failure
        };
        return Err(Failed::new(code, format!("{url}: {status}: {text}")));
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Failed::new(Code::Peer, e))?;
    if a.json {
        println!("{v}");
        return Ok(());
    }
    let d = &v["donor"];
    if let Some(r) = v.get("report") {
        println!(
            "retired {} free slabs now; asked {} lent slabs back (deadline {} ms); {} short",
            r["retired"], r["reclaiming"], r["deadline_ms"], r["short"]
        );
    } else {
        println!("lending {} slabs again", v["grown"]);
    }
    println!(
        "donor: {} slabs, {} free, {} retired, {} being reclaimed",
        d["slabs_total"], d["slabs_free"], d["slabs_retired"], d["slabs_reclaiming"]
    );
    Ok(())
}

fn serve(a: RunArgs) -> Result<(), Failed> {
    let cfg = a.config()?;
    let secret = cfg.load_secret().map_err(|e| Failed::new(Code::Usage, e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::new(Code::Failure, e))?;
    rt.block_on(async move {
        let server = Server::bind(cfg.clone(), secret)
            .await
            .map_err(|e| match e {
                rmem_memserver::ServerError::Transport(t) => Failed::from(t),
                other => Failed::new(Code::Failure, other),
            })?;
        let st = server.stats();
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "listening": server.local_addr().to_string(),
                    "provider": cfg.provider,
                    "slab_size": st.slab_size,
                    "slabs": st.slabs_total,
                    "nbd": server.nbd_addr().map(|a| a.to_string()),
                    "admin": server.admin_addr().map(|a| a.to_string()),
                })
            );
        } else {
            println!(
                "rmem server lending {} slabs of {} MiB on {} ({} provider)",
                st.slabs_total,
                st.slab_size >> 20,
                server.local_addr(),
                cfg.provider
            );
            if let Some(a) = server.admin_addr() {
                println!("metrics on http://{a}/metrics, status on http://{a}/status");
            }
            if let Some(a) = server.nbd_addr() {
                let names: Vec<_> = cfg.exports.iter().map(|e| e.name.as_str()).collect();
                println!("NBD exports {} on {a}", names.join(", "));
            }
        }
        let _heartbeats = match &a.placement {
            Some(url) => Some(register(&a, url, &server, &cfg)?),
            None => None,
        };
        super::notify_ready(&format!(
            "lending {} slabs on {}",
            st.slabs_total,
            server.local_addr()
        ));
        server.run(shutdown_signal()).await;
        Ok(())
    })
}

/// Starts heartbeating this donor to the placement service at `url`.
fn register(
    a: &RunArgs,
    url: &str,
    server: &Server,
    cfg: &ServerConfig,
) -> Result<rmem_placement::heartbeat::Heartbeats, Failed> {
    use rmem_placement::client::PlaceClient;
    let secret = cfg.load_secret().map_err(|e| Failed::new(Code::Usage, e))?;
    let client = PlaceClient::new(url, secret, std::time::Duration::from_secs(5));
    let local = server.local_addr();
    let advertise = match a.advertise {
        Some(x) => x,
        None if !local.ip().is_unspecified() => local,
        None => {
            let ip = facing(url).ok_or_else(|| {
                Failed::new(
                    Code::Usage,
                    "cannot tell which address borrowers reach this donor at: give --advertise",
                )
            })?;
            std::net::SocketAddr::new(ip, local.port())
        }
    };
    let st = server.stats();
    let report = rmem_placement::registry::DonorReport {
        id: advertise.to_string(),
        addr: advertise.to_string(),
        domain: a
            .domain
            .clone()
            .unwrap_or_else(|| advertise.ip().to_string()),
        slab_bytes: st.slab_size,
        total_slabs: st.slabs_total - st.slabs_retired,
        free_slabs: st.slabs_free,
        link_bps: a.link_rate.unwrap_or(0),
        labels: Default::default(),
    };
    let control = server.control();
    Ok(rmem_placement::heartbeat::start(
        client,
        report,
        std::time::Duration::from_secs(a.placement_lease),
        Box::new(move || {
            let s = control.stats();
            (s.slabs_free, s.slabs_total - s.slabs_retired)
        }),
    ))
}

/// The local IP address that routes to the host in `url` (no packet is sent).
fn facing(url: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let hostport = url.split("://").last()?.split('/').next()?;
    let peer = hostport.to_socket_addrs().ok()?.next()?;
    let bind = if peer.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(peer).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// SIGINT or SIGTERM: stop taking clients, end every session (slabs zeroed), exit 0.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("shutting down");
}
