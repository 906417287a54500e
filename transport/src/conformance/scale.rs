//! Conformance cases about scale and concurrency: many queue pairs, deep queues, waiting styles, concurrent posters.

use super::*;

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
