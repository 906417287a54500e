//! `rmem perf`: perftest-style latency and bandwidth of one-sided operations over any provider.
//!
//! A server registers one buffer and hands its [`RemoteBuf`] to each client as connection private
//! data; the client then drives READ, WRITE or fetch-and-add against it. Latency is measured per
//! operation from post to completion (one round trip for READ, WRITE and atomics: the responder
//! acknowledges a WRITE); bandwidth keeps `tx_depth` operations in flight. Every figure comes from
//! an HdrHistogram or a wall-clock span of the whole run, never from a sample.

mod clock;
pub mod plot;

pub use clock::{Clock, ClockKind};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rmem_transport::{
    Access, Completion, Context, Cq, Mr, PollMode, Qp, QpConfig, RecvWr, RemoteBuf, SendWr,
    WcStatus,
};
use serde::{Deserialize, Serialize};

/// Errors of a perf run.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    #[error(transparent)]
    Transport(#[from] rmem_transport::Error),
    #[error("the server sent an unreadable buffer descriptor")]
    BadDescriptor(#[source] serde_json::Error),
    #[error("work request failed: {0}")]
    Completion(WcStatus),
    #[error("size {size} exceeds the server's buffer of {max} bytes")]
    TooLarge { size: usize, max: u64 },
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error("verification failed: {0}")]
    Verify(String),
}

pub type Result<T, E = PerfError> = std::result::Result<T, E>;

/// The operation measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PerfOp {
    Read,
    Write,
    /// 8-byte fetch-and-add.
    Atomic,
}

impl PerfOp {
    pub fn as_str(self) -> &'static str {
        match self {
            PerfOp::Read => "read",
            PerfOp::Write => "write",
            PerfOp::Atomic => "atomic",
        }
    }
}

impl std::str::FromStr for PerfOp {
    type Err = PerfError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "read" => Ok(PerfOp::Read),
            "write" => Ok(PerfOp::Write),
            "atomic" | "fetch-add" => Ok(PerfOp::Atomic),
            _ => Err(PerfError::Invalid(format!("unknown op {s:?}"))),
        }
    }
}

/// Latency (one operation at a time) or bandwidth (a window of operations in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PerfMode {
    Lat,
    Bw,
}

/// What a client run does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerfConfig {
    pub op: PerfOp,
    pub mode: PerfMode,
    pub sizes: Vec<usize>,
    pub iters: u64,
    pub warmup: u64,
    pub tx_depth: u32,
    /// Spin on the completion queue instead of sleeping between completions.
    pub busy_poll: bool,
    /// The clock that times latency runs.
    #[serde(default)]
    pub clock: ClockKind,
    /// Bandwidth runs signal one request in `cq_mod` (a completion retires the ones before it),
    /// like perftest's --cq-mod: fewer completions for the device to write.
    #[serde(default = "default_cq_mod")]
    pub cq_mod: u32,
    /// Bandwidth runs: spread the requests over this many bytes on each side instead of
    /// reusing one message's worth, so they move memory that is not in the CPU's caches (a
    /// migration's or a swap device's case). 0: perftest's way, one buffer reused.
    #[serde(default)]
    pub span: usize,
    /// How long the client's queue pair waits for the server before failing its work (the
    /// transport's `op_timeout`); None keeps the transport's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_timeout: Option<Duration>,
}

fn default_cq_mod() -> u32 {
    32
}

impl PerfConfig {
    /// perftest's `-a`: every power of two from 2 B to 8 MiB (8 B only for atomics).
    pub fn all_sizes(op: PerfOp) -> Vec<usize> {
        if op == PerfOp::Atomic {
            vec![8]
        } else {
            (1..=23).map(|p| 1usize << p).collect()
        }
    }

    fn validate(&self) -> Result<()> {
        if self.sizes.is_empty() || self.iters == 0 || self.tx_depth == 0 {
            return Err(PerfError::Invalid(
                "sizes, iterations and tx depth must be non-zero".into(),
            ));
        }
        if self.op == PerfOp::Atomic && self.sizes.iter().any(|s| *s != 8) {
            return Err(PerfError::Invalid("atomics move exactly 8 bytes".into()));
        }
        Ok(())
    }
}

/// Latency figures in microseconds, perftest's columns plus p50.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatStats {
    pub min_us: f64,
    pub max_us: f64,
    pub typical_us: f64,
    pub avg_us: f64,
    pub stdev_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// The distribution as (latency in us, share of operations at or below it) points, for a
    /// CDF plot: every 5% to 90%, then ever finer to the maximum.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdf: Vec<[f64; 2]>,
}

/// Quantiles a latency CDF is drawn through.
const CDF_QUANTILES: &[f64] = &[
    0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8,
    0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
];

/// Bandwidth of a whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BwStats {
    pub bytes_per_sec: f64,
    pub mib_per_sec: f64,
    pub gbit_per_sec: f64,
    pub msg_rate_mpps: f64,
}

/// One row: one message size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SizeResult {
    pub bytes: usize,
    pub iters: u64,
    pub lat: Option<LatStats>,
    pub bw: Option<BwStats>,
}

/// A whole client run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub provider: String,
    pub device: String,
    pub op: PerfOp,
    pub mode: PerfMode,
    pub busy_poll: bool,
    pub tx_depth: u32,
    pub clock: ClockKind,
    /// The TSC rate measured against the OS clock, when the TSC clock was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tsc_mhz: Option<f64>,
    pub results: Vec<SizeResult>,
    /// Whether an end-to-end data check ran after the measurement and passed (`--verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

/// Registers `max_size` bytes and serves perf clients until `stop` returns true.
pub fn serve(
    ctx: &Context,
    listen: SocketAddr,
    max_size: usize,
    busy_poll: bool,
    op_timeout: Option<Duration>,
    ready: impl FnOnce(SocketAddr),
    stop: impl Fn() -> bool,
) -> Result<()> {
    let pd = ctx.alloc_pd()?;
    let cq = ctx.create_cq(64)?;
    let buf = pd.alloc_mr(max_size.max(4096), Access::all_remote())?;
    // Touched once: a run measures moving memory, not this side allocating its pages.
    buf.fill(0, buf.len(), 0)?;
    let desc = serde_json::to_vec(&buf.remote()).expect("RemoteBuf serialises");
    let listener = ctx.listen(listen)?;
    ready(listener.local_addr());
    let cfg = qp_config(&pd, &cq, 64, busy_poll, op_timeout);
    // Only the serving side spins its target thread; clients send it nothing.
    let bye = pd.alloc_mr(64, Access::LOCAL_WRITE)?;
    while !stop() {
        let conn = match listener.accept(&cfg, &desc, Some(Duration::from_millis(500))) {
            Ok(c) => c,
            Err(e) if e.is_transient() => continue,
            Err(e) => return Err(e.into()),
        };
        tracing::info!(qp = conn.qp.qp_num(), "client connected");
        // The client says goodbye with a SEND; its death flushes this receive instead. A client
        // that is already gone ends its own session, never the server.
        let s = [bye.sge(0, 64)?];
        if let Err(e) = conn.qp.post_recv(&[RecvWr::new(1, &s)]) {
            tracing::warn!(error = %e, "client lost before its session started");
            continue;
        }
        loop {
            match cq.wait_one(Some(Duration::from_millis(500))) {
                Ok(c) => {
                    tracing::info!(status = %c.status, "client done");
                    break;
                }
                Err(e) if e.is_transient() && !stop() && !conn.qp.is_error() => continue,
                Err(_) => break,
            }
        }
    }
    Ok(())
}

fn qp_config(
    pd: &rmem_transport::Pd,
    cq: &Cq,
    depth: u32,
    busy: bool,
    op_timeout: Option<Duration>,
) -> QpConfig {
    let mut cfg = QpConfig::new(pd, cq)
        .max_send_wr(depth.max(2))
        .max_recv_wr(4);
    if let Some(t) = op_timeout {
        cfg = cfg.op_timeout(t);
    }
    if busy {
        // The target thread never sleeps between requests.
        cfg.target_spin(Duration::from_secs(3600))
    } else {
        cfg
    }
}

/// A connected perf client.
pub struct Client {
    ctx: Context,
    pd: rmem_transport::Pd,
    cq: Cq,
    qp: Qp,
    local: Mr,
    remote: RemoteBuf,
}

impl Client {
    pub fn connect(ctx: &Context, server: SocketAddr, cfg: &PerfConfig) -> Result<Client> {
        cfg.validate()?;
        let pd = ctx.alloc_pd()?;
        let mut cq = ctx.create_cq(cfg.tx_depth as usize * 2 + 16)?;
        cq.set_poll_mode(if cfg.busy_poll {
            PollMode::Busy
        } else {
            PollMode::default()
        });
        // The client's own target thread serves nothing: never let it spin.
        let conn = ctx.connect(
            server,
            &qp_config(&pd, &cq, cfg.tx_depth, false, cfg.op_timeout),
            b"",
        )?;
        let remote: RemoteBuf =
            serde_json::from_slice(&conn.private).map_err(PerfError::BadDescriptor)?;
        let max = cfg.sizes.iter().copied().max().unwrap_or(8);
        if max as u64 > remote.len {
            return Err(PerfError::TooLarge {
                size: max,
                max: remote.len,
            });
        }
        let need = max.max(cfg.span);
        if need as u64 > remote.len {
            return Err(PerfError::TooLarge {
                size: need,
                max: remote.len,
            });
        }
        let local = pd.alloc_mr(need.max(4096), Access::all_remote())?;
        if cfg.span > 0 {
            // Touched once, so the run measures moving memory, not allocating it.
            local.fill(0, need, 1)?;
        }
        Ok(Client {
            ctx: ctx.clone(),
            pd: pd.clone(),
            cq,
            qp: conn.qp,
            local,
            remote,
        })
    }

    fn wr<'a>(&self, op: PerfOp, id: u64, sge: &'a [rmem_transport::Sge<'a>]) -> SendWr<'a> {
        self.wr_at(op, id, sge, 0)
    }

    fn wr_at<'a>(
        &self,
        op: PerfOp,
        id: u64,
        sge: &'a [rmem_transport::Sge<'a>],
        offset: u64,
    ) -> SendWr<'a> {
        let at = self.remote.at(offset);
        match op {
            PerfOp::Read => SendWr::read(id, sge, at),
            PerfOp::Write => SendWr::write(id, sge, at),
            PerfOp::Atomic => SendWr::fetch_add(id, sge, at, 1),
        }
    }

    fn check(c: &Completion) -> Result<()> {
        if c.is_ok() {
            Ok(())
        } else {
            Err(PerfError::Completion(c.status))
        }
    }

    /// Runs every size; `progress(done, total)` is called as iterations finish.
    pub fn run(&self, cfg: &PerfConfig, progress: &dyn Fn(u64, u64)) -> Result<Report> {
        cfg.validate()?;
        let total = cfg.iters * cfg.sizes.len() as u64;
        let clock = Clock::new(cfg.clock);
        let mut results = Vec::new();
        for (k, &size) in cfg.sizes.iter().enumerate() {
            let base = k as u64 * cfg.iters;
            let r = match cfg.mode {
                PerfMode::Lat => self.latency(cfg, &clock, size, &|i| progress(base + i, total))?,
                PerfMode::Bw => self.bandwidth(cfg, size, &|i| progress(base + i, total))?,
            };
            results.push(r);
        }
        let dev = self.ctx.device();
        Ok(Report {
            provider: dev.provider.to_string(),
            device: dev.name,
            op: cfg.op,
            mode: cfg.mode,
            busy_poll: cfg.busy_poll,
            tx_depth: cfg.tx_depth,
            clock: clock.kind(),
            tsc_mhz: clock.tsc_mhz(),
            results,
            verified: None,
        })
    }

    fn latency(
        &self,
        cfg: &PerfConfig,
        clock: &Clock,
        size: usize,
        progress: &dyn Fn(u64),
    ) -> Result<SizeResult> {
        let sge = [self.local.sge(0, size)?];
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
            .expect("valid histogram bounds");
        for i in 0..cfg.warmup + cfg.iters {
            let t0 = clock.now();
            self.qp.post_send(&[self.wr(cfg.op, i, &sge)])?;
            let c = self.cq.wait_one(None)?;
            let ns = clock.nanos(t0, clock.now());
            Self::check(&c)?;
            if i >= cfg.warmup {
                hist.saturating_record(ns.max(1));
                if (i - cfg.warmup).is_multiple_of(1024) {
                    progress(i - cfg.warmup);
                }
            }
        }
        progress(cfg.iters);
        let us = |ns: u64| ns as f64 / 1000.0;
        Ok(SizeResult {
            bytes: size,
            iters: cfg.iters,
            lat: Some(LatStats {
                min_us: us(hist.min()),
                max_us: us(hist.max()),
                typical_us: us(hist.value_at_quantile(0.5)),
                avg_us: hist.mean() / 1000.0,
                stdev_us: hist.stdev() / 1000.0,
                p50_us: us(hist.value_at_quantile(0.5)),
                p99_us: us(hist.value_at_quantile(0.99)),
                p999_us: us(hist.value_at_quantile(0.999)),
                cdf: CDF_QUANTILES
                    .iter()
                    .map(|&q| [us(hist.value_at_quantile(q)), q])
                    .collect(),
            }),
            bw: None,
        })
    }

    fn bandwidth(
        &self,
        cfg: &PerfConfig,
        size: usize,
        progress: &dyn Fn(u64),
    ) -> Result<SizeResult> {
        // One slot per message-sized piece of the span (one slot: the same buffer each time).
        let slots = (cfg.span / size).max(1);
        let sges = (0..slots)
            .map(|i| Ok([self.local.sge(i * size, size)?]))
            .collect::<Result<Vec<_>>>()?;
        let depth = u64::from(cfg.tx_depth);
        // A window of `depth` requests always holds a signaled one, so the run cannot stall.
        let cq_mod = u64::from(cfg.cq_mod.clamp(1, cfg.tx_depth));
        let mut wcs = vec![Completion::default(); 64];
        let mut run = |n: u64, report: bool| -> Result<Duration> {
            let (mut posted, mut done) = (0u64, 0u64);
            let t0 = Instant::now();
            while done < n {
                // Keep the window full; post what fits in one chain.
                let room = (depth - (posted - done)).min(n - posted).min(32);
                if room > 0 {
                    let chain: Vec<_> = (posted..posted + room)
                        .map(|id| {
                            let slot = (id % slots as u64) as usize;
                            let at = (slot * size) as u64;
                            let w = self.wr_at(cfg.op, id, &sges[slot], at);
                            if (id + 1) % cq_mod == 0 || id + 1 == n {
                                w
                            } else {
                                w.unsignaled()
                            }
                        })
                        .collect();
                    self.qp.post_send(&chain)?;
                    posted += room;
                }
                let got = if posted - done >= depth || posted == n {
                    self.cq.wait(&mut wcs, None)?
                } else {
                    self.cq.poll(&mut wcs)?
                };
                for c in &wcs[..got] {
                    Self::check(c)?;
                    // Requests complete in order: this one retires every unsignaled one before it.
                    done = done.max(c.wr_id + 1);
                }
                if report && got > 0 {
                    progress(done);
                }
            }
            Ok(t0.elapsed())
        };
        run(cfg.warmup.min(cfg.iters), false)?;
        let elapsed = run(cfg.iters, true)?;
        progress(cfg.iters);
        let bytes = size as f64 * cfg.iters as f64;
        let secs = elapsed.as_secs_f64();
        Ok(SizeResult {
            bytes: size,
            iters: cfg.iters,
            lat: None,
            bw: Some(BwStats {
                bytes_per_sec: bytes / secs,
                mib_per_sec: bytes / secs / 1_048_576.0,
                gbit_per_sec: bytes * 8.0 / secs / 1e9,
                msg_rate_mpps: cfg.iters as f64 / secs / 1e6,
            }),
        })
    }

    /// Checks data end to end after a run: a pattern written with WRITE must come back with READ
    /// (every size of the run), and consecutive fetch-and-adds must return consecutive values.
    /// Assumes no other client uses the server's buffer meanwhile.
    pub fn verify(&self, cfg: &PerfConfig) -> Result<()> {
        let max = cfg.sizes.iter().copied().max().unwrap_or(8).max(8);
        let back = self.pd.alloc_mr(max, Access::LOCAL_WRITE)?;
        for (k, &size) in cfg
            .sizes
            .iter()
            .enumerate()
            .filter(|_| cfg.op != PerfOp::Atomic)
        {
            let data = pattern(k as u64 + 1, size);
            self.local.write_at(0, &data)?;
            let s = [self.local.sge(0, size)?];
            self.qp
                .post_send(&[SendWr::write(1, &s, self.remote.at(0))])?;
            Self::check(&self.cq.wait_one(Some(Duration::from_secs(30)))?)?;
            back.fill(0, size, 0)?;
            let b = [back.sge(0, size)?];
            self.qp
                .post_send(&[SendWr::read(2, &b, self.remote.at(0))])?;
            Self::check(&self.cq.wait_one(Some(Duration::from_secs(30)))?)?;
            let mut got = vec![0u8; size];
            back.read_at(0, &mut got)?;
            if let Some(i) = got.iter().zip(&data).position(|(a, b)| a != b) {
                return Err(PerfError::Verify(format!(
                    "{size}-byte READ returned a different byte at offset {i} than WRITE stored"
                )));
            }
        }
        if cfg.op == PerfOp::Atomic {
            let r = [back.sge(0, 8)?];
            let mut last = None;
            for i in 0..64 {
                self.qp
                    .post_send(&[SendWr::fetch_add(i, &r, self.remote.at(0), 1)])?;
                Self::check(&self.cq.wait_one(Some(Duration::from_secs(30)))?)?;
                let v = back.load_u64(0)?;
                if let Some(prev) = last {
                    if v != prev + 1 {
                        return Err(PerfError::Verify(format!(
                            "fetch-and-add returned {v} after {prev}"
                        )));
                    }
                }
                last = Some(v);
            }
        }
        Ok(())
    }

    /// Tells the server this client is done (so it can take the next one).
    pub fn finish(self) -> Result<()> {
        let s = [self.local.sge(0, 8)?];
        self.qp.post_send(&[SendWr::send(u64::MAX, &s)])?;
        let c = self.cq.wait_one(Some(Duration::from_secs(5)))?;
        Self::check(&c)
    }
}

/// Deterministic bytes for a seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    rmem_transport::conformance::pattern(seed, len)
}

/// Renders a report as perftest-style text.
pub fn render_table(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let rule = "-".repeat(100);
    let _ = writeln!(s, "{rule}");
    let _ = writeln!(
        s,
        " rmem perf  op: {:?}  mode: {:?}  provider: {}  device: {}  busy-poll: {}  tx-depth: {}  clock: {:?}",
        r.op, r.mode, r.provider, r.device, r.busy_poll, r.tx_depth, r.clock
    );
    let _ = writeln!(s, " latency = post to completion (one round trip)");
    let _ = writeln!(s, "{rule}");
    match r.mode {
        PerfMode::Lat => {
            let _ = writeln!(
                s,
                " {:>8} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "#bytes",
                "#iterations",
                "t_min[us]",
                "t_max[us]",
                "t_typ[us]",
                "t_avg[us]",
                "t_stdev",
                "99%[us]",
                "99.9%[us]"
            );
            for x in &r.results {
                if let Some(l) = &x.lat {
                    let _ = writeln!(
                        s,
                        " {:>8} {:>11} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                        x.bytes, x.iters, l.min_us, l.max_us, l.typical_us, l.avg_us, l.stdev_us,
                        l.p99_us, l.p999_us
                    );
                }
            }
        }
        PerfMode::Bw => {
            let _ = writeln!(
                s,
                " {:>8} {:>11} {:>16} {:>12} {:>14}",
                "#bytes", "#iterations", "BW avg[MiB/sec]", "BW [Gb/sec]", "MsgRate[Mpps]"
            );
            for x in &r.results {
                if let Some(b) = &x.bw {
                    let _ = writeln!(
                        s,
                        " {:>8} {:>11} {:>16.2} {:>12.3} {:>14.6}",
                        x.bytes, x.iters, b.mib_per_sec, b.gbit_per_sec, b.msg_rate_mpps
                    );
                }
            }
        }
    }
    let _ = write!(s, "{rule}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmem_transport::{OpenOptions, Provider};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_span_spreads_requests_over_all_of_it_and_must_fit_the_server() {
        let ctx = rmem_transport::open(&OpenOptions::new(Provider::Tcp)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (sctx, s2) = (ctx.clone(), stop.clone());
        let server = std::thread::spawn(move || {
            serve(
                &sctx,
                "127.0.0.1:0".parse().unwrap(),
                1 << 20,
                false,
                None,
                |a| tx.send(a).unwrap(),
                || s2.load(Ordering::Relaxed),
            )
        });
        let addr = rx.recv().unwrap();
        let mut cfg = PerfConfig {
            op: PerfOp::Read,
            mode: PerfMode::Bw,
            sizes: vec![64 << 10],
            iters: 16,
            warmup: 0,
            tx_depth: 4,
            busy_poll: false,
            clock: ClockKind::default(),
            cq_mod: 1,
            span: 2 << 20,
            op_timeout: None,
        };
        match Client::connect(&ctx, addr, &cfg) {
            Err(PerfError::TooLarge { size, .. }) => assert_eq!(size, 2 << 20),
            Err(e) => panic!("expected TooLarge, got {e}"),
            Ok(_) => panic!("a span past the server's buffer was accepted"),
        }
        cfg.span = 1 << 20;
        let c = Client::connect(&ctx, addr, &cfg).unwrap();
        // The client's span starts as ones; 16 READs of 64 KiB from the server's zeros cover
        // all of it only if each request went to its own slot.
        assert!(!c.local.is_zero(0, 1 << 20).unwrap());
        c.run(&cfg, &|_, _| {}).unwrap();
        assert!(
            c.local.is_zero(0, 1 << 20).unwrap(),
            "a slot was never read"
        );
        drop(c);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap().unwrap();
    }
}
