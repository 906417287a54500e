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

mod connection;

pub use connection::refused_connection;

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

/// READ and WRITE move exact bytes for sizes from 1 B to 16 MiB (or the device's largest
/// message, if smaller) at odd offsets on both sides.
pub fn read_write_integrity(setup: &Setup) {
    let l = link(setup, plain);
    // rxe on Linux 6.1 advertises (and enforces) 8 MiB messages.
    let device_max = usize::try_from(l.a.ctx.device().max_msg).unwrap_or(usize::MAX);
    let max = (16 << 20).min(device_max);
    let local = l.a.pd.alloc_mr(max + 64, rw()).expect("local mr");
    let back = l.a.pd.alloc_mr(max + 64, rw()).expect("readback mr");
    let remote_mr = l.b.pd.alloc_mr(max + 64, rw()).expect("remote mr");
    let remote = remote_mr.remote();
    let sizes = [
        1usize,
        2,
        3,
        7,
        8,
        63,
        64,
        4095,
        4096,
        4097,
        65_549,
        (1 << 20) - 1,
        max,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        let (loff, roff) = (1 + i % 7, 3 + 2 * (i % 5));
        let data = pattern(i as u64 + 1, size);
        local.write_at(loff, &data).expect("fill");
        let sge = [local.sge(loff, size).expect("sge")];
        let id = 100 + i as u64;
        l.a.qp
            .post_send(&[SendWr::write(id, &sge, remote.at(roff as u64))])
            .expect("post write");
        wait_ok(&l.a.cq, id);
        assert!(
            read_mr(&remote_mr, roff, size) == data,
            "WRITE of {size} B corrupted data"
        );

        back.fill(0, max + 64, 0).expect("clear");
        let sge = [back.sge(loff + 1, size).expect("sge")];
        l.a.qp
            .post_send(&[SendWr::read(id, &sge, remote.at(roff as u64))])
            .expect("post read");
        let c = wait_ok(&l.a.cq, id);
        assert_eq!(c.opcode, WcOpcode::Read);
        assert!(
            read_mr(&back, loff + 1, size) == data,
            "READ of {size} B corrupted data"
        );
        assert_eq!(
            read_mr(&back, loff, 1),
            [0],
            "READ of {size} B wrote before its buffer"
        );
        assert_eq!(
            read_mr(&back, loff + 1 + size, 1),
            [0],
            "READ of {size} B overran"
        );
    }
}

/// Gather on WRITE and scatter on READ across several regions and offsets.
pub fn scatter_gather(setup: &Setup) {
    let l = link(setup, plain);
    let m1 = l.a.pd.alloc_mr(8192, rw()).expect("mr");
    let m2 = l.a.pd.alloc_mr(8192, rw()).expect("mr");
    let remote_mr = l.b.pd.alloc_mr(1 << 16, rw()).expect("mr");
    let parts = [(&m1, 5usize, 100usize), (&m2, 77, 3000), (&m1, 4000, 1)];
    let mut expect = Vec::new();
    for (k, (m, off, len)) in parts.iter().enumerate() {
        let d = pattern(50 + k as u64, *len);
        m.write_at(*off, &d).expect("fill");
        expect.extend_from_slice(&d);
    }
    let sgl: Vec<_> = parts
        .iter()
        .map(|(m, off, len)| m.sge(*off, *len).expect("sge"))
        .collect();
    l.a.qp
        .post_send(&[SendWr::write(1, &sgl, remote_mr.remote().at(11))])
        .expect("post");
    wait_ok(&l.a.cq, 1);
    assert!(
        read_mr(&remote_mr, 11, expect.len()) == expect,
        "gathered WRITE mismatch"
    );

    let d1 = l.a.pd.alloc_mr(4096, rw()).expect("mr");
    let cuts = [(0usize, 1usize), (9, 1500), (2000, 1599), (4000, 1)];
    let sgl: Vec<_> = cuts
        .iter()
        .map(|(o, n)| d1.sge(*o, *n).expect("sge"))
        .collect();
    l.a.qp
        .post_send(&[SendWr::read(2, &sgl, remote_mr.remote().at(11))])
        .expect("post");
    wait_ok(&l.a.cq, 2);
    let mut got = Vec::new();
    for (o, n) in cuts {
        got.extend(read_mr(&d1, o, n));
    }
    assert!(got == expect, "scattered READ mismatch");
}

/// A chain posted in one call, only its last request signaled, yields one completion and all
/// the data.
pub fn chain_unsignaled(setup: &Setup) {
    let l = link(setup, plain);
    let src = l.a.pd.alloc_mr(16 * 512, rw()).expect("mr");
    let dst = l.b.pd.alloc_mr(16 * 512, rw()).expect("mr");
    let data = pattern(9, 16 * 512);
    src.write_at(0, &data).expect("fill");
    let sges: Vec<_> = (0..16)
        .map(|i| [src.sge(i * 512, 512).expect("sge")])
        .collect();
    let wrs: Vec<_> = sges
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let w = SendWr::write(i as u64, s, dst.remote().at(i as u64 * 512));
            if i == 15 {
                w
            } else {
                w.unsignaled()
            }
        })
        .collect();
    l.a.qp.post_send(&wrs).expect("post chain");
    wait_ok(&l.a.cq, 15);
    let mut extra = [Completion::default(); 4];
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        l.a.cq.poll(&mut extra).expect("poll"),
        0,
        "unsignaled requests completed"
    );
    assert!(read_mr(&dst, 0, data.len()) == data, "chain data mismatch");
}

/// WRITE_WITH_IMM and SEND consume receives in order; data written before a notice is visible
/// when the notice completes.
pub fn write_imm_and_send_ordering(setup: &Setup) {
    let l = link(setup, plain);
    let n = 20u64;
    let src = l.a.pd.alloc_mr(64 * 1024, rw()).expect("mr");
    let dst = l.b.pd.alloc_mr(64 * 1024, rw()).expect("mr");
    let rbuf = l.b.pd.alloc_mr(n as usize * 64, rw()).expect("mr");
    let rsges: Vec<_> = (0..n)
        .map(|i| [rbuf.sge(i as usize * 64, 64).expect("sge")])
        .collect();
    let rwrs: Vec<_> = rsges
        .iter()
        .enumerate()
        .map(|(i, s)| RecvWr::new(1000 + i as u64, s))
        .collect();
    l.b.qp.post_recv(&rwrs).expect("post recv");
    for i in 0..n {
        let block = pattern(i, 1024);
        src.write_at(i as usize * 1024, &block).expect("fill");
        let s = [src.sge(i as usize * 1024, 1024).expect("sge")];
        let msg = [src.sge(i as usize * 1024, 10 + i as usize).expect("sge")];
        let wr = if i % 2 == 0 {
            SendWr::write_imm(i, &s, dst.remote().at(i * 1024), 0xA000 + i as u32)
        } else {
            SendWr::new(i, crate::Op::SendImm(0xB000 + i as u32), &msg)
        };
        l.a.qp.post_send(&[wr.unsignaled()]).expect("post");
    }
    for i in 0..n {
        let c = wait(&l.b.cq);
        assert_eq!(c.status, WcStatus::Success, "{c:?}");
        assert_eq!(c.wr_id, 1000 + i, "receives consumed out of order");
        if i % 2 == 0 {
            assert_eq!(c.opcode, WcOpcode::RecvWithImm);
            assert_eq!(c.imm, Some(0xA000 + i as u32));
            assert_eq!(c.byte_len, 1024);
            assert!(
                read_mr(&dst, i as usize * 1024, 1024) == pattern(i, 1024),
                "WRITE data not visible at its notice"
            );
        } else {
            assert_eq!(c.opcode, WcOpcode::Recv);
            assert_eq!(c.imm, Some(0xB000 + i as u32));
            assert_eq!(c.byte_len, 10 + i as u32);
            assert!(
                read_mr(&rbuf, i as usize * 64, 10 + i as usize) == pattern(i, 10 + i as usize)
            );
        }
    }
}

/// SEND into a receive of several SGEs; a SEND larger than the receive fails on both sides.
pub fn send_recv(setup: &Setup) {
    let l = link(setup, plain);
    let src = l.a.pd.alloc_mr(4096, rw()).expect("mr");
    let r1 = l.b.pd.alloc_mr(4096, rw()).expect("mr");
    let data = pattern(3, 300);
    src.write_at(0, &data).expect("fill");
    let rs = [
        r1.sge(0, 100).expect("sge"),
        r1.sge(1000, 250).expect("sge"),
    ];
    l.b.qp.post_recv(&[RecvWr::new(7, &rs)]).expect("post recv");
    let s = [src.sge(0, 300).expect("sge")];
    l.a.qp.post_send(&[SendWr::send(8, &s)]).expect("post send");
    wait_ok(&l.a.cq, 8);
    let c = wait_ok(&l.b.cq, 7);
    assert_eq!((c.opcode, c.byte_len, c.imm), (WcOpcode::Recv, 300, None));
    assert!(read_mr(&r1, 0, 100) == data[..100]);
    assert!(read_mr(&r1, 1000, 200) == data[100..]);

    r1.fill(0, 4096, 0xee).expect("fill");
    let small = [r1.sge(0, 10).expect("sge")];
    l.b.qp
        .post_recv(&[RecvWr::new(9, &small)])
        .expect("post recv");
    l.a.qp
        .post_send(&[SendWr::send(10, &s)])
        .expect("post send");
    // The verbs specification says REM_INV_REQ at the sender and LOC_LEN at the receiver; rxe
    // (Linux 6.1 and later) reports REM_OP and LOC_QP_OP for the same overrun. Either way both
    // sides fail and nothing lands past the receive buffer.
    let c = wait(&l.a.cq);
    assert_eq!(c.wr_id, 10);
    assert!(
        matches!(c.status, WcStatus::RemInvReqErr | WcStatus::RemOpErr),
        "sender of an oversized SEND: {c:?}"
    );
    let c = wait(&l.b.cq);
    assert_eq!(c.wr_id, 9);
    assert!(
        matches!(c.status, WcStatus::LocLenErr | WcStatus::LocQpOpErr),
        "receiver of an oversized SEND: {c:?}"
    );
    assert!(
        read_mr(&r1, 10, 4086).iter().all(|b| *b == 0xee),
        "an oversized SEND wrote past its receive buffer"
    );
}

/// A SEND with no receive posted fails with RNR_RETRY_EXC_ERR once the RNR timeout passes.
pub fn receiver_not_ready(setup: &Setup) {
    let l = link(setup, |c| c.rnr_timeout(Duration::from_millis(200)));
    let src = l.a.pd.alloc_mr(64, rw()).expect("mr");
    let s = [src.sge(0, 8).expect("sge")];
    l.a.qp.post_send(&[SendWr::send(1, &s)]).expect("post");
    let c = wait(&l.a.cq);
    assert_eq!((c.wr_id, c.status), (1, WcStatus::RnrRetryExcErr), "{c:?}");
}

/// Compare-and-swap and fetch-and-add return the old value and change the word exactly.
pub fn atomics(setup: &Setup) {
    let l = link(setup, plain);
    let word = l.b.pd.alloc_mr(64, rw()).expect("mr");
    let res = l.a.pd.alloc_mr(64, rw()).expect("mr");
    word.store_u64(8, 40).expect("store");
    let r = [res.sge(0, 8).expect("sge")];
    let at = word.remote().at(8);
    l.a.qp
        .post_send(&[SendWr::fetch_add(1, &r, at, 2)])
        .expect("post");
    wait_ok(&l.a.cq, 1);
    assert_eq!(res.load_u64(0).expect("load"), 40);
    assert_eq!(word.load_u64(8).expect("load"), 42);
    l.a.qp
        .post_send(&[SendWr::compare_swap(2, &r, at, 41, 7)])
        .expect("post");
    wait_ok(&l.a.cq, 2);
    assert_eq!(
        res.load_u64(0).expect("load"),
        42,
        "failed CAS returns the current value"
    );
    assert_eq!(
        word.load_u64(8).expect("load"),
        42,
        "failed CAS must not write"
    );
    l.a.qp
        .post_send(&[SendWr::compare_swap(3, &r, at, 42, 7)])
        .expect("post");
    wait_ok(&l.a.cq, 3);
    assert_eq!(res.load_u64(0).expect("load"), 42);
    assert_eq!(word.load_u64(8).expect("load"), 7);
}

/// N initiators on their own queue pairs doing fetch-and-add on one word end at exactly the sum,
/// and every old value they saw is distinct.
pub fn atomics_concurrent(setup: &Setup) {
    const N: usize = 4;
    const K: u64 = 300;
    let target = setup.ctx();
    let pd = target.alloc_pd().expect("pd");
    let cq = target.create_cq(1024).expect("cq");
    let word = pd.alloc_mr(4096, rw()).expect("mr");
    let remote = word.remote();
    let listener = target.listen(setup.listen).expect("listen");
    let addr = listener.local_addr();
    let start = Arc::new(Barrier::new(N));
    let workers: Vec<_> = (0..N)
        .map(|_| {
            let (setup, start) = (setup.clone(), start.clone());
            std::thread::spawn(move || {
                let ctx = setup.ctx();
                let pd = ctx.alloc_pd().expect("pd");
                let cq = ctx.create_cq(64).expect("cq");
                let c = ctx
                    .connect(addr, &QpConfig::new(&pd, &cq), b"")
                    .expect("connect");
                let res = pd.alloc_mr(8, rw()).expect("mr");
                let r = [res.sge(0, 8).expect("sge")];
                start.wait();
                let mut seen = Vec::with_capacity(K as usize);
                for i in 0..K {
                    c.qp.post_send(&[SendWr::fetch_add(i, &r, remote.at(0), 1)])
                        .expect("post");
                    wait_ok(&cq, i);
                    seen.push(res.load_u64(0).expect("load"));
                }
                seen
            })
        })
        .collect();
    let mut qps = Vec::new();
    for _ in 0..N {
        qps.push(
            listener
                .accept(&QpConfig::new(&pd, &cq), b"", WAIT)
                .expect("accept")
                .qp,
        );
    }
    let mut all: Vec<u64> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    assert_eq!(
        word.load_u64(0).expect("load"),
        N as u64 * K,
        "lost or doubled adds"
    );
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), N * K as usize, "two adds saw the same old value");
}

fn expect_remote_error(l: &Link, wr: SendWr<'_>, what: &str) {
    let before = l.b.ctx.stats().access_errors;
    l.a.qp.post_send(&[wr]).expect("post");
    let c = wait(&l.a.cq);
    assert_eq!(c.status, WcStatus::RemAccessErr, "{what}: {c:?}");
    assert_eq!(c.wr_id, wr.wr_id);
    if l.b.ctx.provider() == Provider::Tcp {
        assert_eq!(
            l.b.ctx.stats().access_errors,
            before + 1,
            "{what}: target did not count it"
        );
    }
    // The queue pair is now in error: later work never succeeds.
    let after = l.a.qp.post_send(&[SendWr { wr_id: 99, ..wr }]);
    if after.is_ok() {
        let c = wait(&l.a.cq);
        assert_eq!(
            (c.wr_id, c.status),
            (99, WcStatus::WrFlushErr),
            "{what}: after error"
        );
    }
}

/// Unknown key, out of bounds, missing rights, deregistered memory: each a remote access error.
pub fn access_errors(setup: &Setup) {
    type Case = (&'static str, Access, fn(RemoteBuf) -> (RemoteBuf, u64), u8);
    let cases: [Case; 8] = [
        (
            "unknown rkey",
            rw(),
            |r| {
                (
                    RemoteBuf {
                        rkey: r.rkey ^ 0x5a5a_5a5a,
                        ..r
                    },
                    0,
                )
            },
            0,
        ),
        (
            "address below region",
            rw(),
            |r| {
                (
                    RemoteBuf {
                        addr: r.addr - 4096,
                        ..r
                    },
                    0,
                )
            },
            0,
        ),
        ("range past end", rw(), |r| (r, r.len - 8), 0),
        (
            "WRITE without REMOTE_WRITE",
            Access::REMOTE_READ,
            |r| (r, 0),
            0,
        ),
        (
            "READ without REMOTE_READ",
            Access::REMOTE_WRITE,
            |r| (r, 0),
            1,
        ),
        (
            "atomic without REMOTE_ATOMIC",
            Access::REMOTE_READ | Access::REMOTE_WRITE,
            |r| (r, 0),
            2,
        ),
        ("atomic past end", rw(), |r| (r, r.len), 2),
        ("deregistered region", rw(), |r| (r, 0), 3),
    ];
    for (what, access, shape, kind) in cases {
        let l = link(setup, plain);
        let local = l.a.pd.alloc_mr(8192, rw()).expect("mr");
        let mut target = Some(l.b.pd.alloc_mr(4096, access).expect("mr"));
        let (remote, off) = shape(target.as_ref().expect("mr").remote());
        if kind == 3 {
            target = None;
        }
        let s16 = [local.sge(0, 16).expect("sge")];
        let s8 = [local.sge(0, 8).expect("sge")];
        let wr = match kind {
            0 | 3 => SendWr::write(1, &s16, remote.at(off)),
            1 => SendWr::read(1, &s16, remote.at(off)),
            _ => SendWr::fetch_add(1, &s8, remote.at(off), 1),
        };
        expect_remote_error(&l, wr, what);
        drop(target);
    }
}

/// Local checks made before posting: rights, foreign protection domains, SGE limits, alignment.
pub fn local_errors(setup: &Setup) {
    let l = link(setup, |c| c.max_sge(2));
    let remote_mr = l.b.pd.alloc_mr(4096, rw()).expect("mr");
    let remote = remote_mr.remote();
    let ro = l.a.pd.alloc_mr(4096, Access::empty()).expect("mr");
    let s = [ro.sge(0, 8).expect("sge")];
    let e =
        l.a.qp
            .post_send(&[SendWr::read(1, &s, remote.at(0))])
            .unwrap_err();
    assert!(
        matches!(&e, Error::Rejected { index: 0, source } if matches!(**source, Error::LocalProtection(_))),
        "READ into a region without LOCAL_WRITE: {e:?}"
    );
    let foreign_pd = l.a.ctx.alloc_pd().expect("pd");
    let foreign = foreign_pd.alloc_mr(4096, rw()).expect("mr");
    let s = [foreign.sge(0, 8).expect("sge")];
    assert!(
        l.a.qp
            .post_send(&[SendWr::write(2, &s, remote.at(0))])
            .is_err(),
        "foreign PD"
    );
    let ok = l.a.pd.alloc_mr(4096, rw()).expect("mr");
    let three = [
        ok.sge(0, 1).expect("sge"),
        ok.sge(1, 1).expect("sge"),
        ok.sge(2, 1).expect("sge"),
    ];
    let e =
        l.a.qp
            .post_send(&[SendWr::write(3, &three, remote.at(0))])
            .unwrap_err();
    assert!(
        matches!(e, Error::Rejected { index: 0, .. }),
        "too many SGEs: {e:?}"
    );
    let s8 = [ok.sge(0, 8).expect("sge")];
    assert!(
        l.a.qp
            .post_send(&[SendWr::fetch_add(4, &s8, remote.at(4), 1)])
            .is_err(),
        "misaligned atomic"
    );
    assert!(ok.sge(4090, 7).is_err(), "SGE past the end of its region");
    // The queue pair is still healthy after rejected posts.
    let s = [ok.sge(0, 8).expect("sge")];
    l.a.qp
        .post_send(&[SendWr::write(5, &s, remote.at(0))])
        .expect("post");
    wait_ok(&l.a.cq, 5);
}

/// When the peer goes away, outstanding and later work completes with errors, promptly.
pub fn peer_death(setup: &Setup) {
    let l = link(setup, |c| c.op_timeout(Duration::from_millis(500)));
    let local = l.a.pd.alloc_mr(1 << 20, rw()).expect("mr");
    let remote_mr = l.b.pd.alloc_mr(1 << 20, rw()).expect("mr");
    let remote = remote_mr.remote();
    let s = [local.sge(0, 4096).expect("sge")];
    l.a.qp
        .post_send(&[SendWr::read(1, &s, remote.at(0))])
        .expect("post");
    wait_ok(&l.a.cq, 1);
    let Link { a, b } = l;
    drop(b);
    let start = Instant::now();
    let wrs: Vec<_> = (10..14)
        .map(|i| SendWr::read(i, &s, remote.at(0)))
        .collect();
    let posted = a.qp.post_send(&wrs);
    if posted.is_ok() {
        for i in 10..14 {
            let c =
                a.cq.wait_one(Some(Duration::from_secs(30)))
                    .expect("completion after peer death");
            assert_eq!(c.wr_id, i);
            assert_ne!(
                c.status,
                WcStatus::Success,
                "work succeeded against a dead peer"
            );
        }
    }
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(
        a.qp.is_error(),
        "queue pair still healthy after its peer died"
    );
}

/// 64 queue pairs at once, all completing into one CQ, each moving its own data.
pub fn many_qps(setup: &Setup) {
    const N: usize = 64;
    let actx = setup.ctx();
    let bctx = setup.ctx();
    let bpd = bctx.alloc_pd().expect("pd");
    let bcq = bctx.create_cq(4096).expect("cq");
    let target = bpd.alloc_mr(N * 8192, rw()).expect("mr");
    let remote = target.remote();
    let listener = bctx.listen(setup.listen).expect("listen");
    let addr = listener.local_addr();
    let server = std::thread::spawn(move || {
        (0..N)
            .map(|_| {
                listener
                    .accept(&QpConfig::new(&bpd, &bcq), b"", WAIT)
                    .expect("accept")
                    .qp
            })
            .collect::<Vec<_>>()
    });
    let apd = actx.alloc_pd().expect("pd");
    let acq = actx.create_cq(4096).expect("cq");
    let qps: Vec<_> = (0..N)
        .map(|_| {
            actx.connect(addr, &QpConfig::new(&apd, &acq), b"")
                .expect("connect")
                .qp
        })
        .collect();
    let _server_qps = server.join().expect("server");
    let src = apd.alloc_mr(N * 8192, rw()).expect("mr");
    let dst = apd.alloc_mr(N * 8192, rw()).expect("mr");
    for (i, qp) in qps.iter().enumerate() {
        src.write_at(i * 8192, &pattern(i as u64, 8192))
            .expect("fill");
        let s = [src.sge(i * 8192, 8192).expect("sge")];
        qp.post_send(&[SendWr::write(i as u64, &s, remote.at(i as u64 * 8192))])
            .expect("post");
    }
    let mut done = [false; N];
    for _ in 0..N {
        let c = wait(&acq);
        assert!(c.is_ok(), "{c:?}");
        done[c.wr_id as usize] = true;
    }
    assert!(done.iter().all(|d| *d));
    for (i, qp) in qps.iter().enumerate() {
        let s = [dst.sge(i * 8192, 8192).expect("sge")];
        qp.post_send(&[SendWr::read(
            1000 + i as u64,
            &s,
            remote.at(i as u64 * 8192),
        )])
        .expect("post");
    }
    for _ in 0..N {
        assert!(wait(&acq).is_ok());
    }
    for i in 0..N {
        assert!(
            read_mr(&dst, i * 8192, 8192) == pattern(i as u64, 8192),
            "QP {i} data"
        );
    }
}

/// Deep queues: many outstanding requests of mixed sizes complete in order.
pub fn deep_queue(setup: &Setup) {
    let l = link(setup, |c| c.max_send_wr(128));
    let src = l.a.pd.alloc_mr(128 * 70_000, rw()).expect("mr");
    let dst = l.b.pd.alloc_mr(128 * 70_000, rw()).expect("mr");
    let data = pattern(77, 128 * 70_000);
    src.write_at(0, &data).expect("fill");
    let sges: Vec<_> = (0..128)
        .map(|i| [src.sge(i * 70_000, 1 + (i * 547) % 70_000).expect("sge")])
        .collect();
    let wrs: Vec<_> = sges
        .iter()
        .enumerate()
        .map(|(i, s)| SendWr::write(i as u64, s, dst.remote().at(i as u64 * 70_000)))
        .collect();
    l.a.qp.post_send(&wrs).expect("post");
    let over = [src.sge(0, 1).expect("sge")];
    let e =
        l.a.qp
            .post_send(&[SendWr::write(999, &over, dst.remote().at(0))]);
    if let Err(e) = e {
        assert!(e.is_transient(), "a full queue is a transient error: {e:?}");
    } else {
        // The provider freed a slot already; its completion comes after the 128.
    }
    for i in 0..128 {
        wait_ok(&l.a.cq, i);
    }
    for i in 0..128 {
        let n = 1 + (i * 547) % 70_000;
        assert!(
            read_mr(&dst, i * 70_000, n) == data[i * 70_000..i * 70_000 + n],
            "request {i} data"
        );
    }
}

/// Completions are awaitable from tokio, and a sleeping waiter (blocking mode) is woken.
pub fn async_and_blocking_wait(setup: &Setup) {
    let l = link(setup, plain);
    let local = l.a.pd.alloc_mr(4096, rw()).expect("mr");
    let remote_mr = l.b.pd.alloc_mr(4096, rw()).expect("mr");
    remote_mr.write_at(0, b"awaited").expect("fill");
    let s = [local.sge(0, 7).expect("sge")];
    #[cfg(feature = "tokio")]
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        l.a.qp
            .post_send(&[SendWr::read(1, &s, remote_mr.remote().at(0))])
            .expect("post");
        let mut out = [Completion::default(); 4];
        let n = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(20), l.a.cq.next(&mut out)).await
            })
            .expect("awaited in time")
            .expect("next");
        assert_eq!(n, 1);
        assert!(out[0].is_ok());
        assert_eq!(read_mr(&local, 0, 7), b"awaited");
    }
    let mut cq = l.a.cq.clone();
    cq.set_poll_mode(crate::PollMode::Blocking);
    remote_mr.write_at(0, b"blocked").expect("fill");
    // Post from another thread after the waiter has gone to sleep.
    let qp = &l.a.qp;
    std::thread::scope(|sc| {
        sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            qp.post_send(&[SendWr::read(2, &s, remote_mr.remote().at(0))])
                .expect("post");
        });
        let c = cq.wait_one(WAIT).expect("woken");
        assert_eq!((c.wr_id, c.status), (2, WcStatus::Success));
    });
    assert_eq!(read_mr(&local, 0, 7), b"blocked");
}

/// Several threads post on one queue pair while another polls its CQ: nothing is lost,
/// duplicated or stuck (verbs allows concurrent posting).
pub fn concurrent_posters(setup: &Setup) {
    const THREADS: u64 = 3;
    const PER: u64 = 1500;
    let l = link(setup, |c| c.max_send_wr(64));
    let local = l.a.pd.alloc_mr(THREADS as usize * 4096, rw()).expect("mr");
    let remote_mr = l.b.pd.alloc_mr(THREADS as usize * 4096, rw()).expect("mr");
    let remote = remote_mr.remote();
    let (qp, cq) = (&l.a.qp, &l.a.cq);
    let seen = std::thread::scope(|sc| {
        for t in 0..THREADS {
            let local = &local;
            sc.spawn(move || {
                let off = t as usize * 4096;
                let s = [local.sge(off, 512).expect("sge")];
                let mut i = 0;
                while i < PER {
                    let id = t * PER + i;
                    let wr = if i % 2 == 0 {
                        SendWr::write(id, &s, remote.at(off as u64))
                    } else {
                        SendWr::read(id, &s, remote.at(off as u64))
                    };
                    match qp.post_send(&[wr]) {
                        Ok(()) => i += 1,
                        Err(e) if e.is_transient() => std::thread::yield_now(),
                        Err(e) => panic!("post: {e}"),
                    }
                }
            });
        }
        let mut seen = vec![false; (THREADS * PER) as usize];
        let mut out = [Completion::default(); 32];
        let mut n = 0;
        while n < seen.len() {
            let got = cq.wait(&mut out, WAIT).expect("completions keep coming");
            for c in &out[..got] {
                assert!(c.is_ok(), "{c:?}");
                assert!(!seen[c.wr_id as usize], "completion {} twice", c.wr_id);
                seen[c.wr_id as usize] = true;
            }
            n += got;
        }
        seen
    });
    assert!(seen.iter().all(|s| *s));
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
];

/// Expands to one `#[test]` per conformance case for the given [`Setup`] expression.
#[macro_export]
macro_rules! conformance_tests {
    ($setup:expr) => {
        $crate::conformance_tests!(@cases $setup;
            read_write_integrity scatter_gather chain_unsignaled write_imm_and_send_ordering
            send_recv receiver_not_ready atomics atomics_concurrent access_errors local_errors
            peer_death many_qps deep_queue async_and_blocking_wait concurrent_posters
            refused_connection);
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
