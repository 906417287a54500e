//! Measuring a path: an 8-byte READ for the round trip and a short burst of WRITEs for the
//! rate, against any rmem transport peer that hands out a registered buffer on connect (an
//! `rmem perf server`).
//!
//! The probe is rate-capped (it never sends faster than `max_rate`, so probing a busy link
//! cannot swamp it) and bounded (`burst` bytes), and may start after a random delay of up to
//! `jitter` so hosts probing on a schedule do not all probe at once. The rate is taken between
//! the first and the last completion, so the time to fill the pipe does not count against it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rmem_transport::rate::TokenBucket;
use rmem_transport::{Access, Context, QpConfig, RemoteBuf, SendWr, WcStatus};
use serde::Serialize;

/// How hard and how long to probe.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// Bytes written in the burst.
    pub burst: u64,
    /// Bytes per WRITE.
    pub piece: usize,
    /// WRITEs in flight.
    pub depth: usize,
    /// The probe's own ceiling, bytes per second.
    pub max_rate: f64,
    /// Longest random delay before starting.
    pub jitter: Duration,
    pub timeout: Duration,
}

impl Default for ProbeConfig {
    fn default() -> ProbeConfig {
        ProbeConfig {
            burst: 8 << 20,
            piece: 256 << 10,
            depth: 4,
            max_rate: 10e9 / 8.0,
            jitter: Duration::ZERO,
            timeout: Duration::from_secs(30),
        }
    }
}

/// What a probe measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Probe {
    /// The fastest of five 8-byte READs, microseconds.
    pub rtt_us: f64,
    pub bytes_per_sec: f64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Transport(#[from] rmem_transport::Error),
    #[error("the peer sent no usable buffer descriptor (is it an `rmem perf server`?)")]
    Descriptor,
    #[error("a probe operation failed: {0}")]
    Completion(WcStatus),
    #[error("invalid probe settings: {0}")]
    Invalid(&'static str),
}

/// Probes the path to `target`.
pub fn probe(ctx: &Context, target: SocketAddr, cfg: &ProbeConfig) -> Result<Probe, ProbeError> {
    if cfg.piece == 0 || cfg.depth == 0 || cfg.burst < cfg.piece as u64 * 2 || cfg.max_rate <= 0.0 {
        return Err(ProbeError::Invalid(
            "burst must be at least two pieces; piece, depth and rate more than 0",
        ));
    }
    if !cfg.jitter.is_zero() {
        let ms = rand::rng().random_range(0..=cfg.jitter.as_millis() as u64);
        std::thread::sleep(Duration::from_millis(ms));
    }
    let pd = ctx.alloc_pd()?;
    let cq = ctx.create_cq(cfg.depth * 2 + 8)?;
    let qcfg = QpConfig::new(&pd, &cq)
        .max_send_wr(cfg.depth as u32 + 2)
        .max_recv_wr(2)
        .op_timeout(cfg.timeout)
        .connect_timeout(cfg.timeout);
    let mut conn = ctx.connect(target, &qcfg, b"")?;
    let remote: RemoteBuf =
        serde_json::from_slice(&conn.private).map_err(|_| ProbeError::Descriptor)?;
    let piece = cfg.piece.min(remote.len as usize);
    if piece < 8 {
        return Err(ProbeError::Descriptor);
    }
    let local = pd.alloc_mr(piece, Access::all_remote())?;
    local.fill(0, piece, 0x5a)?;
    let wait = |want: u64| -> Result<(), ProbeError> {
        let c = cq.wait_one(Some(cfg.timeout))?;
        if c.status != WcStatus::Success {
            return Err(ProbeError::Completion(c.status));
        }
        debug_assert_eq!(c.wr_id, want);
        Ok(())
    };
    let mut rtt = f64::INFINITY;
    let small = [local.sge(0, 8)?];
    for i in 0..5 {
        let t = Instant::now();
        conn.qp
            .post_send(&[SendWr::read(i, &small, remote.at(0))])?;
        wait(i)?;
        rtt = rtt.min(t.elapsed().as_secs_f64() * 1e6);
    }
    conn.qp
        .set_rate_limit(Some(Arc::new(TokenBucket::new(cfg.max_rate, piece as u64))));
    let sge = [local.sge(0, piece)?];
    let pieces = cfg.burst.div_ceil(piece as u64);
    let (mut posted, mut done) = (0u64, 0u64);
    let mut first: Option<Instant> = None;
    while done < pieces {
        while posted < pieces && posted - done < cfg.depth as u64 {
            conn.qp
                .post_send(&[SendWr::write(100 + posted, &sge, remote.at(0))])?;
            posted += 1;
        }
        wait(100 + done)?;
        done += 1;
        first.get_or_insert_with(Instant::now);
    }
    let seconds = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let measured = (pieces - 1) * piece as u64;
    Ok(Probe {
        rtt_us: rtt,
        bytes_per_sec: if seconds > 0.0 {
            measured as f64 / seconds
        } else {
            0.0
        },
        bytes: pieces * piece as u64,
        seconds,
    })
}
