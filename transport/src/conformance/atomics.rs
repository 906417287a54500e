//! Conformance cases about atomics.

use super::*;

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
