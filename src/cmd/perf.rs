//! `rmem perf`: perftest-style measurements over either provider.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use rmem_bench::{Client, PerfConfig, PerfMode, PerfOp, Report};
use rmem_transport::open;

use super::{parse_size, ProviderArgs};
use crate::exit::{Code, Failed};

#[derive(Subcommand, Debug)]
pub enum PerfCmd {
    /// Register a buffer and serve perf clients until interrupted.
    ///
    /// Example: rmem perf server --listen 0.0.0.0:18515 --busy-poll
    Server(ServerArgs),
    /// Measure against a perf server.
    ///
    /// Example: rmem perf client 10.0.0.2:18515 --op read --size 4K --iters 100000 --busy-poll
    Client(ClientArgs),
    /// Run a server and a client in this process over loopback (a quick self-check).
    Loopback(LoopbackArgs),
    /// Draw saved `--json` reports in one SVG picture, to compare runs (providers, hosts).
    ///
    /// Example: rmem perf plot --input tcp=tcp.json --input verbs=verbs.json --out read.svg
    Plot(PlotArgs),
    /// Measure a donor's slab allocation: latency of one slab (allocate and free), and slabs
    /// served per second in batches. Uses RMEM_SECRET.
    ///
    /// Example: RMEM_SECRET=... rmem perf alloc 10.0.0.2:7470 -n 2000
    Alloc(AllocArgs),
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A run: LABEL=FILE.json (the JSON `rmem perf client --json` printed); repeatable.
    #[arg(long, required_unless_present = "bars")]
    input: Vec<String>,
    /// Instead: single figures of several tools side by side, as the benches/compare-*.sh
    /// scripts write them ({title, groups: [{measure, unit, bars: [[tool, value]]}]}).
    #[arg(long, conflicts_with = "input")]
    bars: Option<std::path::PathBuf>,
    /// The SVG file to write.
    #[arg(long)]
    out: std::path::PathBuf,
}

#[derive(Args, Debug)]
pub struct AllocArgs {
    /// The donor's control address.
    donor: SocketAddr,
    /// Allocate-and-free round trips to time.
    #[arg(long, short = 'n', default_value_t = 2000)]
    iters: u64,
    /// Slabs per request in the throughput run.
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Seconds the donor may take to accept, authenticate and connect the data path before
    /// giving up (exit status 5).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout: u64,
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    provider: ProviderArgs,
    /// Address for the out-of-band connection exchange.
    #[arg(long, default_value = "0.0.0.0:18515")]
    listen: SocketAddr,
    /// Size of the served buffer (largest message a client may use).
    #[arg(long, default_value = "16M", value_parser = message_size)]
    max_size: usize,
    /// Keep the target side spinning between requests (lowest latency, one core busy).
    #[arg(long)]
    busy_poll: bool,
    /// Seconds a queue pair waits on a silent client before failing (the transport's
    /// operation timeout, like perftest's --qp-timeout; default 4).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    op_timeout: Option<u64>,
    /// Print the listening address as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Operation: read, write or atomic (8-byte fetch-and-add).
    #[arg(long, default_value = "read")]
    op: PerfOp,
    /// Measure bandwidth (a window of --tx-depth operations in flight) instead of latency.
    #[arg(long)]
    bw: bool,
    /// Message size (4096, 64K, 1M...). Repeat for several sizes.
    #[arg(long = "size", short = 's', value_parser = message_size, default_value = "4096")]
    sizes: Vec<usize>,
    /// Every power of two from 2 B to 8 MiB, like perftest's -a.
    #[arg(long, short = 'a')]
    all: bool,
    /// Measured iterations per size.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    iters: u64,
    /// Unmeasured iterations first.
    #[arg(long, default_value_t = 1_000)]
    warmup: u64,
    /// Operations in flight for bandwidth runs.
    #[arg(long, default_value_t = 64)]
    tx_depth: u32,
    /// Bandwidth runs: signal one request in N (perftest's --cq-mod).
    #[arg(long, default_value_t = 32)]
    cq_mod: u32,
    /// Bandwidth runs: spread the requests over this many bytes (e.g. 1G) on each side instead
    /// of reusing one message's buffer, so they move memory that is not in the CPU's caches,
    /// as a migration or a swap device does. The server's --max-size must cover it.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    span: usize,
    /// Spin on completions instead of sleeping (lowest latency, one core busy).
    #[arg(long)]
    busy_poll: bool,
    /// Seconds to wait on a silent server before failing the run (the transport's operation
    /// timeout, like perftest's --qp-timeout; default 4).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    op_timeout: Option<u64>,
    /// Clock for latency: tsc (the CPU's counter, calibrated; x86_64) or os (clock_gettime).
    #[arg(long, default_value = "tsc")]
    clock: rmem_bench::ClockKind,
    /// After measuring, check data end to end (WRITE a pattern, READ it back; consecutive
    /// fetch-and-adds); exit status 4 when it differs. Use with a server no one else uses.
    #[arg(long)]
    verify: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Also draw the results as an SVG picture: the latency distribution (a CDF per message
    /// size), or bandwidth by message size with --bw.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
}

/// A size of at least one byte: a zero-byte operation measures nothing.
fn message_size(s: &str) -> Result<usize, String> {
    match parse_size(s)? {
        0 => Err("a message size must be at least 1 byte".into()),
        n => Ok(n),
    }
}

impl RunArgs {
    fn op_timeout(&self) -> Option<Duration> {
        self.op_timeout.map(Duration::from_secs)
    }

    fn config(&self) -> PerfConfig {
        let sizes = if self.all {
            PerfConfig::all_sizes(self.op)
        } else if self.op == PerfOp::Atomic {
            vec![8]
        } else {
            self.sizes.clone()
        };
        PerfConfig {
            op: self.op,
            mode: if self.bw { PerfMode::Bw } else { PerfMode::Lat },
            sizes,
            iters: self.iters,
            warmup: self.warmup,
            tx_depth: self.tx_depth,
            busy_poll: self.busy_poll,
            clock: self.clock,
            cq_mod: self.cq_mod,
            span: self.span,
            op_timeout: self.op_timeout(),
        }
    }
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The server's address (host:port).
    server: SocketAddr,
    #[command(flatten)]
    provider: ProviderArgs,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
pub struct LoopbackArgs {
    #[command(flatten)]
    provider: ProviderArgs,
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(cmd: PerfCmd) -> Result<(), Failed> {
    match cmd {
        PerfCmd::Server(a) => server(a),
        PerfCmd::Client(a) => {
            let ctx = open(&a.provider.open_options())?;
            client(&ctx, a.server, &a.run)
        }
        PerfCmd::Loopback(a) => loopback(a),
        PerfCmd::Alloc(a) => alloc(a),
        PerfCmd::Plot(a) => plot(a),
    }
}

fn server(a: ServerArgs) -> Result<(), Failed> {
    let ctx = open(&a.provider.open_options())?;
    let json = a.json;
    rmem_bench::serve(
        &ctx,
        a.listen,
        a.max_size,
        a.busy_poll,
        a.op_timeout.map(Duration::from_secs),
        |addr| {
            if json {
                println!("{}", serde_json::json!({ "listening": addr.to_string() }));
            } else {
                println!(
                    "rmem perf server listening on {addr} ({} provider)",
                    ctx.provider()
                );
            }
        },
        || false,
    )?;
    Ok(())
}

fn client(ctx: &rmem_transport::Context, server: SocketAddr, a: &RunArgs) -> Result<(), Failed> {
    let cfg = a.config();
    let c = Client::connect(ctx, server, &cfg)?;
    let bar = progress_bar(a.json, cfg.iters * cfg.sizes.len() as u64);
    let mut report = c.run(&cfg, &|done, _| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.verify {
        c.verify(&cfg)?;
        report.verified = Some(true);
        if !a.json {
            println!("verified: data written and read back identical");
        }
    }
    c.finish()?;
    print_report(&report, a.json);
    if let Some(path) = &a.plot {
        draw(&[(report.provider.clone(), report)], path)?;
    }
    Ok(())
}

/// Draws `runs` (label, report) into `path`.
fn draw(runs: &[(String, Report)], path: &std::path::Path) -> Result<(), Failed> {
    let series: Vec<rmem_bench::plot::Series<'_>> = runs
        .iter()
        .map(|(label, report)| rmem_bench::plot::Series {
            label: label.clone(),
            report,
        })
        .collect();
    rmem_bench::plot::plot(&series, path).map_err(|e| Failed::new(Code::Failure, e))?;
    eprintln!("drew {}", path.display());
    Ok(())
}

fn plot(a: PlotArgs) -> Result<(), Failed> {
    if let Some(file) = &a.bars {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Failed::new(Code::Usage, format!("{}: {e}", file.display())))?;
        let b: rmem_bench::plot::Bars = serde_json::from_str(&text)
            .map_err(|e| Failed::new(Code::Usage, format!("{}: {e}", file.display())))?;
        rmem_bench::plot::bars(&b, &a.out).map_err(|e| Failed::new(Code::Failure, e))?;
        eprintln!("drew {}", a.out.display());
        return Ok(());
    }
    let mut runs = Vec::new();
    for spec in &a.input {
        let (label, file) = spec.split_once('=').ok_or_else(|| {
            Failed::new(Code::Usage, format!("{spec:?}: expected LABEL=FILE.json"))
        })?;
        let text = std::fs::read_to_string(file)
            .map_err(|e| Failed::new(Code::Usage, format!("{file}: {e}")))?;
        let report: Report = serde_json::from_str(&text).map_err(|e| {
            Failed::new(
                Code::Usage,
                format!("{file}: not an `rmem perf --json` report: {e}"),
            )
        })?;
        runs.push((label.to_owned(), report));
    }
    draw(&runs, &a.out)
}

fn loopback(a: LoopbackArgs) -> Result<(), Failed> {
    let opts = a.provider.open_options();
    let server_ctx = open(&opts)?;
    let client_ctx = open(&opts)?;
    let cfg = a.run.config();
    let max = cfg.sizes.iter().copied().max().unwrap_or(8).max(cfg.span);
    let busy = cfg.busy_poll;
    let op_timeout = cfg.op_timeout;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let stop2 = stop.clone();
    let listen: SocketAddr = match a.provider.local_ip {
        Some(ip) => SocketAddr::new(ip, 0),
        None => "127.0.0.1:0".parse().expect("literal address"),
    };
    let server = std::thread::spawn(move || {
        rmem_bench::serve(
            &server_ctx,
            listen,
            max,
            busy,
            op_timeout,
            |addr| {
                let _ = tx.send(addr);
            },
            || stop2.load(Ordering::Relaxed),
        )
    });
    let addr = match rx.recv() {
        Ok(addr) => addr,
        Err(_) => {
            return match server.join() {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(Failed::new(
                    crate::exit::Code::Failure,
                    "perf server did not start",
                )),
            }
        }
    };
    let result = client(&client_ctx, addr, &a.run);
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    result
}

fn progress_bar(json: bool, total: u64) -> Option<indicatif::ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} iterations {eta}")
            .expect("valid template"),
    );
    Some(b)
}

fn print_report(r: &Report, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("report serialises")
        );
    } else {
        println!("{}", rmem_bench::render_table(r));
    }
}

fn alloc(a: AllocArgs) -> Result<(), Failed> {
    use rmem_swapclient::{Client, ClientConfig};
    use std::time::Instant;
    let secret = std::env::var("RMEM_SECRET")
        .unwrap_or_default()
        .into_bytes();
    if secret.is_empty() {
        return Err(Failed::new(
            crate::exit::Code::Usage,
            "set RMEM_SECRET to the donor's shared secret",
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::new(crate::exit::Code::Failure, e))?;
    let context = format!("donor {}", a.donor);
    let peer = |e: rmem_swapclient::ClientError| crate::exit::client_failed(&context, &e);
    let mut cc = ClientConfig::new(a.donor, secret);
    cc.connect_timeout = std::time::Duration::from_secs(a.connect_timeout);
    rt.block_on(async {
        let c = Client::connect(cc).await.map_err(peer)?;
        let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
            .expect("valid histogram bounds");
        for i in 0..a.iters + a.iters / 10 {
            let t = Instant::now();
            let s = c.alloc(1).await.map_err(peer)?;
            let ns = t.elapsed().as_nanos() as u64;
            c.free(&[s[0].slab]).await.map_err(peer)?;
            if i >= a.iters / 10 {
                hist.saturating_record(ns.max(1));
            }
        }
        let free = c.stats().await.map_err(peer)?.slabs_free;
        let batch = a.batch.min(free).max(1);
        let (mut slabs, t) = (0u64, Instant::now());
        while t.elapsed().as_secs_f64() < 2.0 {
            let s = c.alloc(batch).await.map_err(peer)?;
            let ids: Vec<u32> = s.iter().map(|g| g.slab).collect();
            c.free(&ids).await.map_err(peer)?;
            slabs += u64::from(batch);
        }
        let per_sec = slabs as f64 / t.elapsed().as_secs_f64();
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let v = serde_json::json!({
            "slab_size": c.slab_size(),
            "alloc_one_p50_us": us(0.5),
            "alloc_one_p99_us": us(0.99),
            "alloc_one_p999_us": us(0.999),
            "iterations": a.iters,
            "batch": batch,
            "slabs_per_sec": per_sec,
        });
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&v).expect("report serialises")
            );
        } else {
            println!(
                "one slab of {} MiB: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us ({} allocations)",
                c.slab_size() >> 20,
                us(0.5),
                us(0.99),
                us(0.999),
                a.iters
            );
            println!("batches of {batch}: {per_sec:.0} slabs allocated and freed per second");
        }
        Ok(())
    })
}
