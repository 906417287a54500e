//! Conformance cases about setting up connections.

use super::{read_mr, rw, wait_ok, Setup, WAIT};
use crate::{Error, QpConfig, RemoteBuf, SendWr};

/// A refused connection request gets a refusal, creates nothing on the listening side, and the
/// listener goes on to accept the next request.
pub fn refused_connection(setup: &Setup) {
    let (actx, bctx) = (setup.ctx(), setup.ctx());
    let listener = bctx.listen(setup.listen).expect("listen");
    let addr = listener.local_addr();
    let bpd = bctx.alloc_pd().expect("pd");
    let bcq = bctx.create_cq(16).expect("cq");
    let secret = bpd.alloc_mr(4096, rw()).expect("mr");
    secret.fill(0, 4096, 0x5e).expect("fill");
    let apd = actx.alloc_pd().expect("pd");
    let acq = actx.create_cq(16).expect("cq");
    let cfg = QpConfig::new(&apd, &acq);
    let (c1, a1) = (cfg.clone(), actx.clone());
    let refused = std::thread::spawn(move || a1.connect(addr, &c1, b"not the token").err());
    let req = listener.incoming(WAIT).expect("a request");
    assert_eq!(req.private(), b"not the token");
    req.reject();
    match refused.join().expect("connect thread") {
        Some(Error::Handshake(m)) => assert!(m.contains("refused"), "refusal said {m:?}"),
        other => panic!("a refused connect must fail with a refusal, got {other:?}"),
    }
    // The listener still works: the next request is accepted and carries data both ways.
    let a2 = actx.clone();
    let ok = std::thread::spawn(move || {
        let c = a2.connect(addr, &cfg, b"the token").expect("connect");
        (c.qp, c.private)
    });
    let req = listener.incoming(WAIT).expect("a request");
    assert_eq!(req.private(), b"the token");
    let desc = serde_json::to_vec(&secret.remote()).expect("descriptor");
    let _bqp = req
        .accept(&QpConfig::new(&bpd, &bcq), &desc)
        .expect("accept");
    let (qp, private) = ok.join().expect("connect thread");
    let remote: RemoteBuf = serde_json::from_slice(&private).expect("descriptor back");
    let local = apd.alloc_mr(64, rw()).expect("mr");
    let sge = [local.sge(0, 64).expect("sge")];
    qp.post_send(&[SendWr::read(1, &sge, remote.at(0))])
        .expect("post");
    wait_ok(&acq, 1);
    assert_eq!(read_mr(&local, 0, 64), vec![0x5e; 64]);
}
