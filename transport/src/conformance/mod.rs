//! The provider conformance suite: the same cases for every provider.
//!
//! Each case takes a [`Setup`] naming the provider and how to open it, builds its own connected
//! queue pairs, and panics (with a message) on the first wrong result. Instantiate the whole
//! suite as `#[test]`s with [`conformance_tests!`](crate::conformance_tests):
//!
//! ```ignore
//! rmem_transport::conformance_tests!(rmem_transport::conformance::Setup::tcp());
//! ```
//! The `rmem conformance` command runs the same cases on a real device.

mod atomics;
mod connection;
mod data;
mod errors;
mod scale;

pub use atomics::{atomics, atomics_concurrent};
pub use connection::refused_connection;
pub use data::{
    chain_unsignaled, read_write_integrity, receiver_not_ready, scatter_gather, send_recv,
    traffic_and_pacing, write_imm_and_send_ordering,
};
pub use errors::{access_errors, local_errors, peer_death};
pub use scale::{async_and_blocking_wait, concurrent_posters, deep_queue, many_qps};

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::{
    open, Access, Completion, Context, Cq, Error, Mr, OpenOptions, Pd, Provider, Qp, QpConfig,
    RecvWr, RemoteBuf, SendWr, WcOpcode, WcStatus,
};

/// How to open the provider under test.
#[derive(Debug, Clone)]
pub struct Setup {
    pub open: OpenOptions,
    /// Where listeners bind (port 0 picks a free one).
    pub listen: SocketAddr,
}

impl Setup {
    pub fn tcp() -> Setup {
        Setup {
            open: OpenOptions::new(Provider::Tcp),
            listen: "127.0.0.1:0".parse().expect("literal address"),
        }
    }

    /// `verbs` on the device and address given by `RMEM_VERBS_DEVICE` and `RMEM_VERBS_IP`
    /// (defaults: the first device, and 127.0.0.1 for the out-of-band exchange).
    pub fn verbs_from_env() -> Setup {
        let mut open = OpenOptions::new(Provider::Verbs);
        open.device = std::env::var("RMEM_VERBS_DEVICE").ok();
        let ip = std::env::var("RMEM_VERBS_IP").unwrap_or_else(|_| "127.0.0.1".into());
        let ip: std::net::IpAddr = ip.parse().expect("RMEM_VERBS_IP must be an IP address");
        if ip != std::net::IpAddr::from([127, 0, 0, 1]) {
            open.local_ip = Some(ip);
        }
        Setup {
            open,
            listen: SocketAddr::new(ip, 0),
        }
    }

    fn ctx(&self) -> Context {
        open(&self.open).unwrap_or_else(|e| panic!("open {:?}: {e}", self.open.provider))
    }
}

/// One side of a connection.
pub struct End {
    pub ctx: Context,
    pub pd: Pd,
    pub cq: Cq,
    pub qp: Qp,
}

/// Two connected ends: `a` connected to `b`'s listener.
pub struct Link {
    pub a: End,
    pub b: End,
}

/// Connects two fresh contexts, applying `tune` to both queue-pair configs.
pub fn link(setup: &Setup, tune: impl Fn(QpConfig) -> QpConfig + Send + Sync + 'static) -> Link {
    let tune = Arc::new(tune);
    let (actx, bctx) = (setup.ctx(), setup.ctx());
    let listener = bctx.listen(setup.listen).expect("listen");
    let addr = listener.local_addr();
    let t2 = tune.clone();
    let server = std::thread::spawn(move || {
        let pd = bctx.alloc_pd().expect("pd");
        let cq = bctx.create_cq(1024).expect("cq");
        let cfg = t2(QpConfig::new(&pd, &cq));
        let c = listener
            .accept(&cfg, b"", Some(Duration::from_secs(20)))
            .expect("accept");
        End {
            ctx: bctx,
            pd,
            cq,
            qp: c.qp,
        }
    });
    let pd = actx.alloc_pd().expect("pd");
    let cq = actx.create_cq(1024).expect("cq");
    let cfg = tune(QpConfig::new(&pd, &cq));
    let c = actx.connect(addr, &cfg, b"").expect("connect");
    let b = server.join().expect("accept thread");
    Link {
        a: End {
            ctx: actx,
            pd,
            cq,
            qp: c.qp,
        },
        b,
    }
}

fn plain(c: QpConfig) -> QpConfig {
    c
}

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

fn wait(cq: &Cq) -> Completion {
    cq.wait_one(WAIT).expect("completion within 20 s")
}

fn wait_ok(cq: &Cq, wr_id: u64) -> Completion {
    let c = wait(cq);
    assert_eq!(c.status, WcStatus::Success, "work request {wr_id}: {c:?}");
    assert_eq!(c.wr_id, wr_id, "completions out of order: {c:?}");
    c
}

/// Deterministic bytes for a seed, so failures are reproducible.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn read_mr(mr: &Mr, off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mr.read_at(off, &mut v).expect("read_at");
    v
}

fn rw() -> Access {
    Access::all_remote()
}

/// A named conformance case.
pub type Case = (&'static str, fn(&Setup));

/// Every case, by name.
pub const CASES: &[Case] = &[
    ("read_write_integrity", read_write_integrity),
    ("scatter_gather", scatter_gather),
    ("chain_unsignaled", chain_unsignaled),
    ("write_imm_and_send_ordering", write_imm_and_send_ordering),
    ("send_recv", send_recv),
    ("receiver_not_ready", receiver_not_ready),
    ("atomics", atomics),
    ("atomics_concurrent", atomics_concurrent),
    ("access_errors", access_errors),
    ("local_errors", local_errors),
    ("peer_death", peer_death),
    ("many_qps", many_qps),
    ("deep_queue", deep_queue),
    ("async_and_blocking_wait", async_and_blocking_wait),
    ("concurrent_posters", concurrent_posters),
    ("refused_connection", refused_connection),
    ("traffic_and_pacing", traffic_and_pacing),
];

/// Expands to one `#[test]` per conformance case for the given [`Setup`] expression.
#[macro_export]
macro_rules! conformance_tests {
    ($setup:expr) => {
        $crate::conformance_tests!(@cases $setup;
            read_write_integrity scatter_gather chain_unsignaled write_imm_and_send_ordering
            send_recv receiver_not_ready atomics atomics_concurrent access_errors local_errors
            peer_death many_qps deep_queue async_and_blocking_wait concurrent_posters
            refused_connection traffic_and_pacing);
    };
    (@cases $setup:expr; $($case:ident)*) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::$case(&$setup);
            }
        )*
    };
}
