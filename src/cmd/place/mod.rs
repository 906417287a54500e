//! `rmem place`: the placement service and its queries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use rmem_placement::bloom::BloomParams;
use rmem_placement::choice::Strategy;
use rmem_placement::client::{ClientError, PlaceClient};
use rmem_placement::fingerprint::{fingerprint_files, PageKey};
use rmem_placement::service::{
    unix_ms, Fingerprint, PlaceRequest, RankRequest, ReserveRequest, Service, ServiceConfig,
};

use crate::exit::{Code, Failed};

#[derive(Subcommand, Debug)]
pub enum PlaceCmd {
    /// Run the placement service: donors register and heartbeat here, borrowers ask it where
    /// to put their slabs, migrations ask it where to go and reserve bandwidth.
    ///
    /// Example: RMEM_SECRET=... rmem place serve --listen 0.0.0.0:7460
    ///          RMEM_SECRET=... rmem place serve --etcd http://10.0.0.9:2379   (shared registry)
    Serve(ServeArgs),
    /// List the donors with a live lease: free and total slabs, failure domain, link load.
    Donors(Common),
    /// List the paths the service knows: capacity, smoothed use, headroom.
    Links(Common),
    /// Ask where SIZE bytes should go: one donor per replica per slab-sized chunk.
    Place(PlaceArgs),
    /// Publish this host's page fingerprints (a Bloom filter of its memory files' pages).
    Fingerprint(FingerprintArgs),
    /// Rank destinations for a VM by how many of its pages they already hold.
    Rank(RankArgs),
    /// Reserve bandwidth on a path for a transfer with a deadline.
    Reserve(ReserveArgs),
    /// Simulate donor choice at cluster scale (seeded) and compare strategies side by side.
    Sim(measure::SimArgs),
    /// Measure a path: an 8-byte READ for the round trip and a short, rate-capped burst of
    /// WRITEs for its rate, against an `rmem perf server`; with --from and --to, publish the
    /// rate as the path's capacity in the link map.
    ///
    /// Example: rmem place probe --target 10.0.0.2:18515 --from $(hostname) --to donor2
    Probe(measure::ProbeArgs),
    /// Measure the service: place() latency over HTTP with concurrent clients on loopback, and
    /// the registry's timings, in-process and (with --etcd) etcd side by side.
    Bench(measure::BenchArgs),
}

/// Where the service is and how to sign requests to it.
#[derive(Args, Debug)]
pub struct Common {
    /// The placement service.
    #[arg(long, env = "RMEM_PLACEMENT", default_value = "http://127.0.0.1:7460")]
    url: String,
    /// File with the cluster's shared secret (else RMEM_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

impl Common {
    fn client(&self) -> Result<PlaceClient, Failed> {
        let secret = secret(self.secret_file.as_deref())?;
        Ok(PlaceClient::new(&self.url, secret, Duration::from_secs(10)))
    }
}

fn secret(file: Option<&std::path::Path>) -> Result<Vec<u8>, Failed> {
    rmem_wire::auth::load_secret(file).map_err(|e| {
        Failed::new(
            Code::Usage,
            format!("{e} (a shared secret of at least 16 bytes: --secret-file or RMEM_SECRET)"),
        )
    })
}

fn print_json(v: &impl serde::Serialize) -> Result<(), Failed> {
    println!(
        "{}",
        serde_json::to_string(v).map_err(|e| Failed::new(Code::Failure, e))?
    );
    Ok(())
}

/// The exit status of a failed call: refusals are 6 (nothing changed), an unreachable service 5.
fn failed(e: ClientError) -> Failed {
    let code = match &e {
        ClientError::Refused { status: 401, .. } => Code::Usage,
        ClientError::Refused { .. } => Code::Refused,
        ClientError::Unreachable { .. } => Code::Peer,
        ClientError::Decode(_) => Code::Failure,
    };
    Failed::new(code, e)
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the HTTP/JSON endpoint [default: 127.0.0.1:7460].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TOML file: listen, etcd, etcd_prefix, stale_limit, secret_file, and a [service] table
    /// (slab_bytes, strategy, seed, link_comfort, smoothing, bloom, nonces, max_chunks); flags
    /// override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Keep the registry in etcd (repeatable endpoints) so several services share it; without
    /// it the registry lives in this process.
    #[arg(long = "etcd")]
    etcd: Vec<String>,
    /// Key prefix in etcd (clusters sharing one etcd use different prefixes) [default: /rmem].
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// Seconds answers may come from the cached view while etcd is unreachable [default: 30].
    #[arg(long)]
    stale_limit: Option<u64>,
    /// The cluster's slab size: donors with another are refused [default: 16M].
    #[arg(long)]
    slab_size: Option<rmem_memserver::ByteSize>,
    /// Donor choice: weighted-dN (the best of N sampled by min(free share, link headroom)),
    /// p2c, least-loaded, random or scan [default: weighted-d2].
    #[arg(long)]
    strategy: Option<Strategy>,
    /// Seed of the sampling (decisions are reproducible for a given seed and history).
    #[arg(long)]
    seed: Option<u64>,
    /// File with the cluster's shared secret (else RMEM_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Print the start-up line as JSON.
    #[arg(long)]
    json: bool,
}

/// `rmem place serve`'s config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceFile {
    listen: Option<SocketAddr>,
    #[serde(default)]
    etcd: Vec<String>,
    etcd_prefix: Option<String>,
    stale_limit: Option<u64>,
    secret_file: Option<PathBuf>,
    #[serde(default)]
    service: ServiceConfig,
}

#[derive(Args, Debug)]
pub struct PlaceArgs {
    #[command(flatten)]
    common: Common,
    /// Bytes to place (e.g. 8G): rounded up to whole slabs.
    #[arg(long)]
    size: rmem_memserver::ByteSize,
    /// Copies of each slab, each in another failure domain.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// The borrowing host's name (its paths to donors are scored) [default: this host's name].
    #[arg(long)]
    client: Option<String>,
}

#[derive(Args, Debug)]
pub struct FingerprintArgs {
    #[command(flatten)]
    common: Common,
    /// This host's name as donors and the link map know it.
    #[arg(long)]
    host: String,
    /// Memory files to fingerprint (guests' RAM files), repeatable.
    #[arg(long = "ram", required = true)]
    ram: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RankArgs {
    #[command(flatten)]
    common: Common,
    /// The host the VM runs on now (left out of the ranking).
    #[arg(long)]
    source: String,
    /// The VM's RAM file(s).
    #[arg(long = "ram", required = true)]
    ram: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ReserveArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    from: String,
    #[arg(long)]
    to: String,
    /// Bytes to move (e.g. 4G).
    #[arg(long)]
    size: rmem_memserver::ByteSize,
    /// Seconds from now by which the transfer must be done.
    #[arg(long)]
    deadline: f64,
    /// Seconds from now before which it cannot start.
    #[arg(long, default_value_t = 0.0)]
    earliest: f64,
}

mod measure;

pub fn run(c: PlaceCmd) -> Result<(), Failed> {
    match c {
        PlaceCmd::Serve(a) => serve(a),
        PlaceCmd::Donors(a) => donors(a),
        PlaceCmd::Links(a) => links(a),
        PlaceCmd::Place(a) => place(a),
        PlaceCmd::Fingerprint(a) => fingerprint(a),
        PlaceCmd::Rank(a) => rank(a),
        PlaceCmd::Reserve(a) => reserve(a),
        PlaceCmd::Sim(a) => measure::simulate(a),
        PlaceCmd::Bench(a) => measure::bench(a),
        PlaceCmd::Probe(a) => measure::probe(a),
    }
}

fn serve(a: ServeArgs) -> Result<(), Failed> {
    let file = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Failed::new(Code::Usage, format!("{}: {e}", p.display())))?;
            toml::from_str::<PlaceFile>(&text)
                .map_err(|e| Failed::new(Code::Usage, format!("{}: {e}", p.display())))?
        }
        None => PlaceFile::default(),
    };
    let mut cfg = file.service;
    if let Some(s) = a.slab_size {
        cfg.slab_bytes = s.0;
    }
    if let Some(s) = a.strategy {
        cfg.strategy = s;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if cfg.slab_bytes == 0 || cfg.slab_bytes % 4096 != 0 {
        return Err(Failed::new(
            Code::Usage,
            "the slab size must be a multiple of 4096",
        ));
    }
    let listen = a
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7460)));
    let etcd = if a.etcd.is_empty() { file.etcd } else { a.etcd };
    let etcd_prefix = a
        .etcd_prefix
        .or(file.etcd_prefix)
        .unwrap_or_else(|| "/rmem".into());
    let stale_limit = a.stale_limit.or(file.stale_limit).unwrap_or(30);
    let secret_file = a.secret_file.or(file.secret_file);
    let secret = secret(secret_file.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::new(Code::Failure, e))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| Failed::new(Code::Failure, format!("{listen}: {e}")))?;
        let addr = listener.local_addr().map_err(|e| Failed::new(Code::Failure, e))?;
        let registry = if etcd.is_empty() {
            "in-process".to_owned()
        } else {
            format!("etcd {}", etcd.join(","))
        };
        let started = |slab: u64| {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "listening": addr.to_string(),
                        "registry": registry,
                        "slab_bytes": slab,
                    })
                );
            } else {
                println!(
                    "rmem place serving on http://{addr} ({registry} registry, {} MiB slabs); metrics on /metrics",
                    slab >> 20
                );
            }
            crate::cmd::notify_ready(&format!("serving on http://{addr} ({registry} registry)"));
        };
        let slab = cfg.slab_bytes;
        let stop = crate::cmd::server::shutdown_signal();
        if etcd.is_empty() {
            let svc = Arc::new(Service::new(
                rmem_placement::registry::InProcess::new(slab),
                secret,
                cfg,
            ));
            started(slab);
            tokio::select! {
                r = rmem_placement::http::serve(listener, svc) => r.map_err(|e| Failed::new(Code::Failure, e))?,
                _ = stop => {}
            }
        } else {
            let reg = rmem_placement::etcd::Etcd::connect(
                &etcd,
                &etcd_prefix,
                slab,
                Duration::from_secs(stale_limit),
            )
            .await
            .map_err(|e| Failed::new(Code::Peer, e))?;
            let svc = Arc::new(Service::new(reg, secret, cfg));
            started(slab);
            tokio::select! {
                r = rmem_placement::http::serve(listener, svc) => r.map_err(|e| Failed::new(Code::Failure, e))?,
                _ = stop => {}
            }
        }
        Ok(())
    })
}

fn donors(a: Common) -> Result<(), Failed> {
    let (donors, stale) = a.client()?.donors().map_err(failed)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "stale": stale, "donors": donors })
        );
        return Ok(());
    }
    if stale {
        println!("(the service's view is stale: its etcd is unreachable)");
    }
    println!(
        "{:<24} {:<22} {:<10} {:>8} {:>8} {:>8} {:>6}",
        "DONOR", "ADDRESS", "DOMAIN", "FREE", "TOTAL", "PENDING", "LINK"
    );
    for d in &donors {
        println!(
            "{:<24} {:<22} {:<10} {:>8} {:>8} {:>8} {:>5.0}%",
            d.id,
            d.addr,
            d.domain,
            d.free_slabs,
            d.total_slabs,
            d.pending_slabs,
            d.link_load * 100.0
        );
    }
    let free: u64 = donors
        .iter()
        .map(|d| u64::from(d.free_slabs) * d.slab_bytes)
        .sum();
    println!("{} donors, {} MiB free", donors.len(), free >> 20);
    Ok(())
}

fn links(a: Common) -> Result<(), Failed> {
    let v: Vec<serde_json::Value> = a.client()?.get("/links").map_err(failed)?;
    if a.json {
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<20} {:<20} {:>14} {:>14} {:>14}",
        "FROM", "TO", "CAPACITY Mb/s", "USED Mb/s", "HEADROOM Mb/s"
    );
    for l in &v {
        let mb = |k: &str| l[k].as_f64().unwrap_or(0.0) / 1e6;
        println!(
            "{:<20} {:<20} {:>14.1} {:>14.1} {:>14.1}",
            l["from"].as_str().unwrap_or("?"),
            l["to"].as_str().unwrap_or("?"),
            mb("capacity_bps"),
            mb("used_bps"),
            mb("headroom_bps")
        );
    }
    Ok(())
}

/// This host's name, for requests that name the asking host.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn place(a: PlaceArgs) -> Result<(), Failed> {
    let c = a.common.client()?;
    let p = c
        .place(&PlaceRequest {
            client: a.client.unwrap_or_else(host_name),
            bytes: a.size.0,
            replicas: a.replicas,
        })
        .map_err(failed)?;
    if a.common.json {
        print_json(&p)?;
        return Ok(());
    }
    if p.stale {
        println!("(decided on a stale view: the service's etcd is unreachable)");
    }
    let mut per: std::collections::BTreeMap<&str, (usize, &str)> = Default::default();
    for chunk in &p.chunks {
        for r in chunk {
            per.entry(r.addr.as_str())
                .or_insert((0, r.domain.as_str()))
                .0 += 1;
        }
    }
    println!(
        "{} chunks of {} MiB, {} replicas each, granted on {} donors:",
        p.chunks.len(),
        p.slab_bytes >> 20,
        a.replicas,
        per.len()
    );
    for (addr, (n, dom)) in &per {
        println!("  {addr:<22} {dom:<10} {n} slabs");
    }
    Ok(())
}

fn progress(json: bool, total: u64) -> Option<indicatif::ProgressBar> {
    if json || total < (256 << 20) {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} fingerprinted {eta}",
    ) {
        b.set_style(style);
    }
    Some(b)
}

/// A filter of `files`' pages in the cluster's layout, keyed with the cluster's secret.
fn filter_of(
    files: &[PathBuf],
    secret: &[u8],
    json: bool,
) -> Result<(rmem_placement::bloom::Bloom, u64), Failed> {
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = progress(json, total);
    let paths: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    let (bloom, seen) = fingerprint_files(
        BloomParams::default_cluster(),
        &PageKey::derive(secret),
        &paths,
        |done| {
            if let Some(b) = &bar {
                b.set_position(done);
            }
        },
    )
    .map_err(|e| Failed::new(Code::Usage, e))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((bloom, seen.pages))
}

fn fingerprint(a: FingerprintArgs) -> Result<(), Failed> {
    let secret = secret(a.common.secret_file.as_deref())?;
    let (bloom, pages) = filter_of(&a.ram, &secret, a.common.json)?;
    let c = a.common.client()?;
    let _: serde_json::Value = c
        .post(
            "/fingerprint",
            &Fingerprint {
                host: a.host.clone(),
                params: bloom.params(),
                filter: hex::encode(bloom.to_bytes()),
            },
        )
        .map_err(failed)?;
    if a.common.json {
        println!("{}", serde_json::json!({ "host": a.host, "pages": pages }));
    } else {
        println!(
            "published {pages} non-zero pages of {} for {}",
            a.ram.len(),
            a.host
        );
    }
    Ok(())
}

fn rank(a: RankArgs) -> Result<(), Failed> {
    let secret = secret(a.common.secret_file.as_deref())?;
    let (bloom, pages) = filter_of(&a.ram, &secret, a.common.json)?;
    let bytes: u64 = a
        .ram
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let ranked = a
        .common
        .client()?
        .rank(&RankRequest {
            source: a.source,
            params: bloom.params(),
            filter: hex::encode(bloom.to_bytes()),
            bytes,
        })
        .map_err(failed)?;
    if a.common.json {
        print_json(&ranked)?;
        return Ok(());
    }
    println!("{pages} non-zero pages in the VM's RAM; destinations, best first:");
    println!(
        "{:<24} {:>14} {:>12} {:>14} {:>7}",
        "HOST", "SHARED PAGES", "FREE MiB", "HEADROOM Mb/s", "SCORE"
    );
    for r in &ranked {
        println!(
            "{:<24} {:>14} {:>12} {:>14.1} {:>7.3}",
            r.host,
            r.shared_pages,
            r.free_bytes >> 20,
            r.headroom_bps / 1e6,
            r.score
        );
    }
    Ok(())
}

fn reserve(a: ReserveArgs) -> Result<(), Failed> {
    if !(a.deadline > 0.0 && a.earliest >= 0.0) {
        return Err(Failed::new(
            Code::Usage,
            "--deadline must be more than 0 and --earliest at least 0 (seconds from now)",
        ));
    }
    let now = unix_ms();
    let req = ReserveRequest {
        from: a.from,
        to: a.to,
        bytes: a.size.0,
        earliest_ms: now + (a.earliest * 1000.0) as u64,
        deadline_ms: now + (a.deadline * 1000.0) as u64,
    };
    match a.common.client()?.reserve(&req) {
        Ok(g) => {
            if a.common.json {
                print_json(&g)?;
            } else {
                println!(
                    "granted: {:.1} Mbit/s from +{:.1} s to +{:.1} s (grant {})",
                    g.rate * 8.0 / 1e6,
                    g.start_ms.saturating_sub(now) as f64 / 1000.0,
                    g.end_ms.saturating_sub(now) as f64 / 1000.0,
                    g.id
                );
            }
            Ok(())
        }
        Err(ClientError::Refused { ref body, .. })
            if body["code"] == "no_fit" && !a.common.json =>
        {
            let at = body["earliest_deadline_ms"].as_u64().unwrap_or(0);
            Err(Failed::new(
                Code::Refused,
                format!(
                    "no bandwidth to finish in time; the earliest deadline that fits is +{:.1} s",
                    at.saturating_sub(now) as f64 / 1000.0
                ),
            ))
        }
        Err(e) => Err(failed(e)),
    }
}
