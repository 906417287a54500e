//! Conformance cases about errors: remote access errors, local checks, a dead peer.

use super::*;

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
