//! A reservation's grant, enforced by the transport's token bucket: a 64 MiB copy under a
//! 100 Mbit/s grant takes 64 MiB / rate (within 10%), over the tcp provider on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_placement::registry::InProcess;
use rmem_placement::service::{unix_ms, ReserveRequest, Service, ServiceConfig};
use rmem_transport::rate::TokenBucket;
use rmem_transport::{open, Access, OpenOptions, Provider, QpConfig, SendWr, WcStatus};

#[test]
fn a_copy_under_a_grant_takes_its_bytes_over_the_granted_rate() {
    let svc = Service::new(
        InProcess::new(1 << 20),
        b"reserve-pacing-secret-0123456789".to_vec(),
        ServiceConfig::default(),
    );
    // A 100 Mbit/s path.
    svc.set_capacity("src", "dst", 100e6 / 8.0);
    let bytes = 64u64 << 20;
    let g = svc
        .reserve(ReserveRequest {
            from: "src".into(),
            to: "dst".into(),
            bytes,
            earliest_ms: 0,
            deadline_ms: unix_ms() + 60_000,
        })
        .map_err(|r| r.message)
        .unwrap();
    assert!((g.rate - 12.5e6).abs() < 12.5e6 * 0.01, "{g:?}");

    let opts = OpenOptions::new(Provider::Tcp);
    let (a, b) = (open(&opts).unwrap(), open(&opts).unwrap());
    let listener = b.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let target = std::thread::spawn(move || {
        let pd = b.alloc_pd().unwrap();
        let cq = b.create_cq(16).unwrap();
        let mr = pd.alloc_mr(1 << 20, Access::all_remote()).unwrap();
        let c = listener
            .accept(
                &QpConfig::new(&pd, &cq),
                &serde_json::to_vec(&mr.remote()).unwrap(),
                None,
            )
            .unwrap();
        (c, mr, pd, cq)
    });
    let pd = a.alloc_pd().unwrap();
    let cq = a.create_cq(16).unwrap();
    let local = pd.alloc_mr(1 << 20, Access::all_remote()).unwrap();
    let mut c = a.connect(addr, &QpConfig::new(&pd, &cq), b"").unwrap();
    let (_keep, _mr, _pd, _cq) = target.join().unwrap();
    let remote: rmem_transport::RemoteBuf = serde_json::from_slice(&c.private).unwrap();
    c.qp.set_rate_limit(Some(Arc::new(TokenBucket::new(g.rate, 256 << 10))));

    let piece = 1usize << 20;
    let sge = [local.sge(0, piece).unwrap()];
    let start = Instant::now();
    for i in 0..bytes / piece as u64 {
        c.qp.post_send(&[SendWr::write(i, &sge, remote.at(0))])
            .unwrap();
        let done = cq.wait_one(Some(Duration::from_secs(20))).unwrap();
        assert_eq!(done.status, WcStatus::Success);
    }
    let took = start.elapsed().as_secs_f64();
    let expect = bytes as f64 / g.rate;
    eprintln!(
        "64 MiB under a {:.1} Mbit/s grant: {took:.2} s (expected {expect:.2} s)",
        g.rate * 8e-6
    );
    assert!(
        (took - expect).abs() <= expect * 0.10,
        "{took:.2} s, expected {expect:.2} s within 10%"
    );
}
