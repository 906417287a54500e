//! The placement service over HTTP: a real server on loopback, the blocking client, and every
//! kind of bad input answered with its own code and nothing changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_placement::bloom::{Bloom, BloomParams};
use rmem_placement::client::{ClientError, PlaceClient};
use rmem_placement::http::serve;
use rmem_placement::registry::{DonorReport, Heartbeat, InProcess};
use rmem_placement::service::{
    unix_ms, Fingerprint, PlaceRequest, RankRequest, ReserveRequest, Service, ServiceConfig,
};

const SECRET: &[u8] = b"placement-test-secret-0123456789";
const SLAB: u64 = 1 << 20;

/// A service on a free port, run on its own runtime thread for the life of the test.
fn start(cfg: ServiceConfig) -> (PlaceClient, Arc<Service<InProcess>>) {
    let svc = Arc::new(Service::new(
        InProcess::new(cfg.slab_bytes),
        SECRET.to_vec(),
        cfg,
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    let s = svc.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            serve(l, s).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    (
        PlaceClient::new(&addr.to_string(), SECRET.to_vec(), Duration::from_secs(10)),
        svc,
    )
}

fn cfg() -> ServiceConfig {
    ServiceConfig {
        slab_bytes: SLAB,
        ..ServiceConfig::default()
    }
}

fn donor(id: &str, domain: &str, slabs: u32) -> DonorReport {
    DonorReport {
        id: id.into(),
        addr: format!("{id}:7470"),
        domain: domain.into(),
        slab_bytes: SLAB,
        total_slabs: slabs,
        free_slabs: slabs,
        link_bps: 10_000_000_000,
        labels: BTreeMap::new(),
    }
}

fn refused(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Refused { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn three_donors(c: &PlaceClient) {
    for (id, dom) in [("d1", "r1"), ("d2", "r2"), ("d3", "r3")] {
        c.register(donor(id, dom, 10), Duration::from_secs(30))
            .unwrap();
    }
}

#[test]
fn placements_spread_replicas_over_domains_and_charge_the_donors() {
    let (c, _) = start(cfg());
    three_donors(&c);
    let p = c
        .place(&PlaceRequest {
            client: "b1".into(),
            bytes: 5 * SLAB - 1,
            replicas: 2,
        })
        .unwrap();
    assert_eq!(p.chunks.len(), 5);
    assert!(!p.stale);
    for chunk in &p.chunks {
        assert_eq!(chunk.len(), 2);
        assert_ne!(chunk[0].domain, chunk[1].domain);
        assert_eq!(chunk[0].addr, format!("{}:7470", chunk[0].id));
    }
    let (donors, _) = c.donors().unwrap();
    let free: u32 = donors.iter().map(|d| d.free_slabs).sum();
    assert_eq!(free, 30 - 10, "ten slabs granted");
    // A heartbeat brings the donor's own count (which now includes the grant) back in.
    let d1 = donors.iter().find(|d| d.id == "d1").unwrap();
    c.heartbeat(&Heartbeat {
        id: "d1".into(),
        seq: 1,
        free_slabs: d1.free_slabs,
        total_slabs: 10,
        traffic: vec![],
    })
    .unwrap();
    let (after, _) = c.donors().unwrap();
    let d1_after = after.iter().find(|d| d.id == "d1").unwrap();
    assert_eq!(
        (d1_after.free_slabs, d1_after.pending_slabs),
        (d1.free_slabs, 0)
    );
}

#[test]
fn bad_requests_get_their_own_codes_and_change_nothing() {
    let (c, _) = start(cfg());
    three_donors(&c);
    let before = c.donors().unwrap().0;
    let free = |c: &PlaceClient| {
        c.donors()
            .unwrap()
            .0
            .iter()
            .map(|d| d.free_slabs)
            .sum::<u32>()
    };
    let hb = |id: &str, seq| Heartbeat {
        id: id.into(),
        seq,
        free_slabs: 10,
        total_slabs: 10,
        traffic: vec![],
    };
    // Unknown donor.
    assert_eq!(
        refused(c.heartbeat(&hb("nobody", 1))),
        (404, "unknown_donor".into())
    );
    // A sequence number going back.
    c.heartbeat(&hb("d1", 5)).unwrap();
    assert_eq!(
        refused(c.heartbeat(&hb("d1", 5))),
        (409, "sequence_back".into())
    );
    assert_eq!(
        refused(c.heartbeat(&hb("d1", 4))),
        (409, "sequence_back".into())
    );
    // More replicas than failure domains.
    let place = |bytes, replicas| PlaceRequest {
        client: "b".into(),
        bytes,
        replicas,
    };
    assert_eq!(refused(c.place(&place(SLAB, 4))), (422, "domains".into()));
    // More bytes than free.
    assert_eq!(refused(c.place(&place(31 * SLAB, 1))), (507, "full".into()));
    assert_eq!(refused(c.place(&place(0, 1))), (422, "invalid".into()));
    assert_eq!(free(&c), 30, "refused placements granted nothing");
    // A deadline already past.
    let r = c.reserve(&ReserveRequest {
        from: "d1".into(),
        to: "d2".into(),
        bytes: 1,
        earliest_ms: 0,
        deadline_ms: unix_ms() - 1000,
    });
    assert_eq!(refused(r), (422, "deadline_past".into()));
    // An unknown path.
    let r = c.reserve(&ReserveRequest {
        from: "x".into(),
        to: "y".into(),
        bytes: 1,
        earliest_ms: 0,
        deadline_ms: unix_ms() + 1000,
    });
    assert_eq!(refused(r), (404, "unknown_path".into()));
    // A Bloom filter of another layout.
    let other = BloomParams::for_pages(1000, 8, 1);
    let f = Bloom::new(other).unwrap();
    let r: Result<serde_json::Value, _> = c.post(
        "/fingerprint",
        &Fingerprint {
            host: "d1".into(),
            params: other,
            filter: hex::encode(f.to_bytes()),
        },
    );
    assert_eq!(refused(r), (422, "filter".into()));
    // A report no donor could make, and a slab size not the cluster's.
    let mut bad = donor("d9", "r9", 10);
    bad.free_slabs = 11;
    assert_eq!(
        refused(c.register(bad, Duration::from_secs(30))),
        (422, "invalid".into())
    );
    let mut bad = donor("d9", "r9", 10);
    bad.slab_bytes = 4096;
    assert_eq!(
        refused(c.register(bad, Duration::from_secs(30))),
        (422, "invalid".into())
    );
    // Malformed JSON, unknown fields.
    let r: Result<serde_json::Value, _> = c.post("/place", &serde_json::json!({"bytes": 1}));
    assert_eq!(refused(r), (400, "malformed".into()));
    // The wrong secret.
    let wrong = PlaceClient::new(
        c.url(),
        b"another-secret-entirely-000000".to_vec(),
        Duration::from_secs(5),
    );
    assert_eq!(
        refused(wrong.place(&place(SLAB, 1))),
        (401, "unauthorized".into())
    );
    assert_eq!(free(&c), 30);
    let after = c.donors().unwrap().0;
    assert_eq!(before.len(), after.len());
    // The refusals were counted.
    let agent = ureq::Agent::new_with_defaults();
    let text = agent
        .get(format!("{}/metrics", c.url()))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        text.contains("rmem_place_refusals_total{result=\"domains\"} 1"),
        "{text}"
    );
    assert!(text.contains("rmem_place_donors 3"), "{text}");
}

#[test]
fn a_signed_placement_is_carried_out_once() {
    let (c, _) = start(cfg());
    three_donors(&c);
    let body = serde_json::to_vec(&PlaceRequest {
        client: "b".into(),
        bytes: SLAB,
        replicas: 1,
    })
    .unwrap();
    let auth = rmem_wire::auth::admin_authorization(SECRET, "POST", "/place", &body);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let send = || {
        agent
            .post(format!("{}/place", c.url()))
            .header("Authorization", &auth)
            .send(&body[..])
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(send(), 200);
    assert_eq!(send(), 409, "the replay is refused");
    let free: u32 = c.donors().unwrap().0.iter().map(|d| d.free_slabs).sum();
    assert_eq!(free, 29);
}

#[test]
fn a_donor_whose_lease_lapses_leaves_the_candidates() {
    let (c, _) = start(cfg());
    c.register(donor("short", "r1", 10), Duration::from_secs(1))
        .unwrap();
    c.register(donor("long", "r2", 10), Duration::from_secs(30))
        .unwrap();
    let registered = Instant::now();
    // Wait on the event itself: the donor gone from the list.
    loop {
        let (d, _) = c.donors().unwrap();
        if d.iter().all(|d| d.id != "short") {
            break;
        }
        assert!(
            registered.elapsed() < Duration::from_secs(5),
            "never expired"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Gone within one sweep (250 ms) of the lease's end.
    assert!(registered.elapsed() < Duration::from_millis(1000 + 250 + 250));
    let p = c
        .place(&PlaceRequest {
            client: "b".into(),
            bytes: 10 * SLAB,
            replicas: 1,
        })
        .unwrap();
    assert!(p.chunks.iter().all(|ch| ch[0].id == "long"));
    let r = c.heartbeat(&Heartbeat {
        id: "short".into(),
        seq: 1,
        free_slabs: 10,
        total_slabs: 10,
        traffic: vec![],
    });
    assert_eq!(refused(r), (404, "unknown_donor".into()));
}

#[test]
fn reservations_are_admitted_moved_or_refused_with_a_deadline_that_fits() {
    let (c, svc) = start(cfg());
    // 100 MB/s between a and b.
    svc.set_capacity("a", "b", 1e8);
    let now = unix_ms() + 500;
    let want = |deadline| ReserveRequest {
        from: "a".into(),
        to: "b".into(),
        bytes: 100_000_000,
        earliest_ms: now,
        deadline_ms: now + deadline,
    };
    let g = c.reserve(&want(1500)).unwrap();
    assert_eq!((g.start_ms, g.end_ms), (now, now + 1000));
    let moved = c.reserve(&want(2500)).unwrap();
    assert_eq!(moved.start_ms, now + 1000, "moved within its laxity");
    match c.reserve(&want(2500)) {
        Err(ClientError::Refused { status, body, .. }) => {
            assert_eq!(status, 409);
            assert_eq!(body["code"], "no_fit");
            assert_eq!(body["earliest_deadline_ms"], now + 3000);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn destinations_rank_by_the_pages_they_already_hold() {
    let (c, _) = start(cfg());
    let params = BloomParams::default_cluster();
    let page = |i: u64| i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut vm = Bloom::new(params).unwrap();
    (0..50_000).for_each(|i| vm.insert(page(i)));
    // h1 holds 30% of the VM's pages, h2 5%, h3 none; all have room.
    for (host, shared) in [("h1", 15_000u64), ("h2", 2_500), ("h3", 0)] {
        c.register(donor(host, host, 1000), Duration::from_secs(30))
            .unwrap();
        let mut f = Bloom::new(params).unwrap();
        (0..shared).for_each(|i| f.insert(page(i)));
        (0..100_000).for_each(|i| f.insert(page(1 << 40 | i)));
        let _: serde_json::Value = c
            .post(
                "/fingerprint",
                &Fingerprint {
                    host: host.into(),
                    params,
                    filter: hex::encode(f.to_bytes()),
                },
            )
            .unwrap();
    }
    let ranked = c
        .rank(&RankRequest {
            source: "src".into(),
            params,
            filter: hex::encode(vm.to_bytes()),
            bytes: 200 * SLAB,
        })
        .unwrap();
    let order: Vec<&str> = ranked.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(order, ["h1", "h2", "h3"]);
    assert!(
        (ranked[0].shared_pages as i64 - 15_000).abs() < 500,
        "{ranked:?}"
    );
}

#[test]
fn a_client_that_never_sends_its_body_is_cut_off_and_others_are_served() {
    let (c, _) = start(ServiceConfig {
        request_timeout_ms: 300,
        ..cfg()
    });
    three_donors(&c);
    let addr = c.url().trim_start_matches("http://").to_owned();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::{Read, Write};
    // Headers promising 100 bytes of body, then nothing.
    write!(
        slow,
        "POST /place HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    )
    .unwrap();
    let t = Instant::now();
    // Meanwhile another client is served.
    assert_eq!(c.donors().unwrap().0.len(), 3);
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("\"timeout\""), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn requests_beyond_the_in_flight_bound_are_refused_not_queued() {
    let (c, _) = start(ServiceConfig {
        max_in_flight: 1,
        request_timeout_ms: 4000,
        ..cfg()
    });
    let addr = c.url().trim_start_matches("http://").to_owned();
    // One request holds the only slot (its body never comes)...
    let mut hold = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::Write;
    write!(
        hold,
        "POST /place HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
    )
    .unwrap();
    // ...so the next is refused at once with 503 busy, until the first times out.
    let t = Instant::now();
    let mut busy = false;
    while t.elapsed() < Duration::from_secs(3) {
        match c.donors() {
            Err(ClientError::Refused {
                status: 503, code, ..
            }) => {
                assert_eq!(code, "busy");
                busy = true;
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert!(busy, "no 503 while the slot was held");
    // The slot comes back when the held request times out.
    let t = Instant::now();
    while c.donors().is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the slot never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
