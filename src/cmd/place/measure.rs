//! `rmem place probe`, `bench` and `sim`: measuring a path, the service, and donor choice.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use rmem_placement::choice::Strategy;
use rmem_placement::service::{unix_ms, ServiceConfig};
use rmem_placement::sim::{self, Setup, View, World};

use super::{failed, Common};
use crate::exit::{Code, Failed};

#[derive(Args, Debug)]
pub struct ProbeArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    provider: crate::cmd::ProviderArgs,
    /// The `rmem perf server` at the path's far end.
    #[arg(long)]
    target: SocketAddr,
    /// Bytes written in the burst.
    #[arg(long, default_value = "8M")]
    burst: rmem_memserver::ByteSize,
    /// The probe's own ceiling in bits per second (e.g. 10G): it never sends faster.
    #[arg(long, default_value = "10G", value_parser = crate::cmd::server::link_rate)]
    max_rate: u64,
    /// Start after a random delay of up to this many milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Publish the measured rate as the capacity of the path FROM -> TO (names as the link map
    /// knows them: donors by their id, other hosts by name).
    #[arg(long, requires = "to")]
    from: Option<String>,
    #[arg(long, requires = "from")]
    to: Option<String>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Donors registered before measuring.
    #[arg(long, default_value_t = 1000)]
    donors: usize,
    /// Failure domains they are spread over.
    #[arg(long, default_value_t = 100)]
    racks: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests per client.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Also measure with an etcd registry at these endpoints (a scratch prefix is used).
    #[arg(long = "etcd")]
    etcd: Vec<String>,
    /// One JSON object per measurement.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Donors in the simulated cluster.
    #[arg(long, default_value_t = 10_000)]
    donors: usize,
    /// Failure domains (racks) they are spread over.
    #[arg(long, default_value_t = 100)]
    racks: u32,
    /// Decisions per run.
    #[arg(long, default_value_t = 1_000_000)]
    decisions: u64,
    /// Decisions between refreshes of a stale view.
    #[arg(long, default_value_t = 1000)]
    refresh: u64,
    /// Worlds: homogeneous, heterogeneous (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "homogeneous,heterogeneous"
    )]
    world: Vec<World>,
    /// Views: fresh, stale (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "fresh,stale")]
    view: Vec<View>,
    /// Replica counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    replicas: Vec<usize>,
    /// Strategies (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "scan,random,least-loaded,p2c,weighted-d2,weighted-d4,weighted-d8"
    )]
    strategy: Vec<Strategy>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Link use below which weighted choice does not score headroom down.
    #[arg(long, default_value_t = rmem_placement::choice::DEFAULT_COMFORT)]
    comfort: f32,
    /// One JSON object per run on stdout.
    #[arg(long)]
    json: bool,
}

pub(super) fn probe(a: ProbeArgs) -> Result<(), Failed> {
    use rmem_placement::probe::{probe, ProbeConfig};
    let ctx = rmem_transport::open(&a.provider.open_options()).map_err(Failed::from)?;
    let cfg = ProbeConfig {
        burst: a.burst.0,
        max_rate: a.max_rate as f64 / 8.0,
        jitter: Duration::from_millis(a.jitter_ms),
        ..ProbeConfig::default()
    };
    let p = probe(&ctx, a.target, &cfg).map_err(|e| match e {
        rmem_placement::probe::ProbeError::Transport(t) => Failed::from(t),
        rmem_placement::probe::ProbeError::Invalid(_) => Failed::new(Code::Usage, e),
        other => Failed::new(Code::Peer, other),
    })?;
    if let (Some(from), Some(to)) = (&a.from, &a.to) {
        let _: serde_json::Value = a
            .common
            .client()?
            .post(
                "/capacity",
                &rmem_placement::service::Capacity {
                    from: from.clone(),
                    to: to.clone(),
                    bytes_per_sec: p.bytes_per_sec,
                },
            )
            .map_err(failed)?;
    }
    if a.common.json {
        println!(
            "{}",
            serde_json::json!({
                "target": a.target.to_string(),
                "rtt_us": p.rtt_us,
                "bits_per_sec": p.bytes_per_sec * 8.0,
                "bytes": p.bytes,
                "seconds": p.seconds,
                "published": a.from.is_some(),
            })
        );
    } else {
        println!(
            "{}: {:.1} Mbit/s ({} bytes in {:.3} s), round trip {:.0} us{}",
            a.target,
            p.bytes_per_sec * 8.0 / 1e6,
            p.bytes,
            p.seconds,
            p.rtt_us,
            if a.from.is_some() { "; published" } else { "" }
        );
    }
    Ok(())
}

pub(super) fn bench(a: BenchArgs) -> Result<(), Failed> {
    use rmem_placement::bench;
    use rmem_placement::registry::InProcess;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::new(Code::Failure, e))?;
    let slab = ServiceConfig::default().slab_bytes;
    let print = |v: serde_json::Value| {
        if a.json {
            println!("{v}");
        } else {
            let fields: Vec<String> = v
                .as_object()
                .map(|o| o.iter().map(|(k, x)| format!("{k}={x}")).collect())
                .unwrap_or_default();
            println!("{}", fields.join(" "));
        }
    };
    rt.block_on(async {
        let prefix = format!("/rmem-bench-{}", unix_ms());
        let http = bench::http_place(
            InProcess::new(slab),
            "in-process",
            a.donors,
            a.racks,
            a.clients,
            a.requests,
        )
        .await
        .map_err(|e| Failed::new(Code::Failure, e))?;
        for h in &http {
            print(json(h));
        }
        let r = InProcess::new(slab);
        let f = bench::registry(&r, &r, "in-process", slab, 20_000)
            .await
            .map_err(|e| Failed::new(Code::Failure, e))?;
        print(json(&f));
        if !a.etcd.is_empty() {
            let connect = || {
                rmem_placement::etcd::Etcd::connect(&a.etcd, &prefix, slab, Duration::from_secs(30))
            };
            let reg = connect().await.map_err(|e| Failed::new(Code::Peer, e))?;
            let http =
                bench::http_place(reg, "etcd", a.donors, a.racks, a.clients, a.requests / 10)
                    .await
                    .map_err(|e| Failed::new(Code::Failure, e))?;
            print(json(&http[0]));
            let x = connect().await.map_err(|e| Failed::new(Code::Peer, e))?;
            let y = connect().await.map_err(|e| Failed::new(Code::Peer, e))?;
            let f = bench::registry(&x, &y, "etcd", slab, 2_000)
                .await
                .map_err(|e| Failed::new(Code::Failure, e))?;
            print(json(&f));
        }
        Ok(())
    })
}

pub(super) fn simulate(a: SimArgs) -> Result<(), Failed> {
    if a.donors == 0 || a.decisions == 0 {
        return Err(Failed::new(
            Code::Usage,
            "--donors and --decisions must be at least 1",
        ));
    }
    let mut setups = Vec::new();
    for &world in &a.world {
        for &view in &a.view {
            for &replicas in &a.replicas {
                for &strategy in &a.strategy {
                    setups.push(Setup {
                        world,
                        view,
                        replicas,
                        strategy,
                        donors: a.donors,
                        racks: a.racks,
                        decisions: a.decisions,
                        refresh: a.refresh,
                        seed: a.seed,
                        comfort: a.comfort,
                    });
                }
            }
        }
    }
    let bar = (!a.json).then(|| {
        let b = indicatif::ProgressBar::new(setups.len() as u64);
        if let Ok(s) =
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} runs {eta} {msg}")
        {
            b.set_style(s);
        }
        b
    });
    if !a.json {
        println!(
            "{:<13} {:<5} {:>2} {:<12} {:>8} {:>8} {:>9} {:>9} {:>8} {:>7} {:>8} {:>6} {:>6} {:>9}",
            "WORLD",
            "VIEW",
            "R",
            "STRATEGY",
            "p50 ns",
            "p99 ns",
            "batch p50",
            "batch p99",
            "max/mean",
            "stddev",
            "Jain",
            "full",
            ">90%",
            "conflicts"
        );
    }
    for s in &setups {
        if let Some(b) = &bar {
            b.set_message(format!(
                "{} {:?} {:?} r{}",
                s.strategy, s.world, s.view, s.replicas
            ));
        }
        let r = sim::run(s);
        let line = if a.json {
            serde_json::to_string(&r).map_err(|e| Failed::new(Code::Failure, e))?
        } else {
            format!(
                "{:<13} {:<5} {:>2} {:<12} {:>8} {:>8} {:>9} {:>9} {:>8.3} {:>7.4} {:>8.5} {:>6} {:>6} {:>9}",
                format!("{:?}", r.world).to_lowercase(),
                format!("{:?}", r.view).to_lowercase(),
                r.replicas,
                r.strategy,
                r.decision_p50_ns,
                r.decision_p99_ns,
                r.batch_p50_ns,
                r.batch_p99_ns,
                r.max_over_mean,
                r.util_stddev,
                r.jain,
                r.donors_full,
                r.links_over_90,
                r.conflicts
            )
        };
        match &bar {
            // A hidden bar (stderr not a terminal) prints nothing: print the line ourselves.
            Some(b) if !b.is_hidden() => {
                b.println(line);
                b.inc(1);
            }
            _ => println!("{line}"),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}
/// A figure as JSON (figures always serialize).
fn json(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}
