//! Measurements of the service itself: `place()` latency over HTTP with concurrent clients, and
//! the registry's timings (registration to visible, lease end to removal, grants per second)
//! for the in-process and etcd backends side by side.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::PlaceClient;
use crate::registry::{DonorReport, Registry};
use crate::service::{PlaceRequest, Service, ServiceConfig};

/// `place()` latency as clients see it.
#[derive(Debug, Clone, Serialize)]
pub struct HttpFigures {
    pub registry: String,
    pub donors: usize,
    pub clients: usize,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub per_sec: f64,
}

/// A registry's timings.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryFigures {
    pub registry: String,
    /// From a registration's answer until a second handle (a second service, for etcd) sees it.
    pub register_to_visible_us: f64,
    /// From a 2 s lease's end until the donor is gone from the second handle's view.
    pub expiry_to_removal_ms: f64,
    /// Sequential grants of one slab from one donor.
    pub grants_per_sec: f64,
}

fn report(id: &str, domain: &str, slab_bytes: u64, slabs: u32) -> DonorReport {
    DonorReport {
        id: id.to_owned(),
        addr: format!("{id}:7470"),
        domain: domain.to_owned(),
        slab_bytes,
        total_slabs: slabs,
        free_slabs: slabs,
        link_bps: 0,
        labels: BTreeMap::new(),
    }
}

/// Runs `clients` threads each sending `requests` signed `/place` requests (one slab, two
/// replicas) to a service on loopback with `donors` donors over `racks` domains, then the same
/// load of `GET /health` as the floor of the HTTP path itself.
pub async fn http_place<R: Registry>(
    registry: R,
    name: &str,
    donors: usize,
    racks: usize,
    clients: usize,
    requests: u64,
) -> std::io::Result<Vec<HttpFigures>> {
    let secret = b"rmem-place-bench-secret-0123456".to_vec();
    let cfg = ServiceConfig::default();
    let slab = cfg.slab_bytes;
    let svc = Arc::new(Service::new(registry, secret.clone(), cfg));
    for i in 0..donors {
        svc.registry
            .register(
                report(
                    &format!("bench-d{i}"),
                    &format!("r{}", i % racks.max(2)),
                    slab,
                    1 << 30,
                ),
                Duration::from_secs(300),
            )
            .await
            .map_err(std::io::Error::other)?;
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let server = tokio::spawn(crate::http::serve(l, svc));
    let url = format!("http://{addr}");
    let place = run_clients(url.clone(), secret.clone(), clients, requests, slab, false).await?;
    let floor = run_clients(url, secret, clients, requests, slab, true).await?;
    server.abort();
    let figures = |(hist, errors, secs): (Histogram<u64>, u64, f64), what: String| HttpFigures {
        registry: what,
        donors,
        clients,
        requests: hist.len(),
        errors,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        per_sec: hist.len() as f64 / secs,
    };
    Ok(vec![
        figures(place, format!("{name}: POST /place")),
        figures(floor, format!("{name}: GET /health (the HTTP floor)")),
    ])
}

/// `clients` threads sending `requests` each: signed `/place` requests (one slab, two
/// replicas), or with `floor` plain `GET /health`, the same HTTP path without the service's
/// work. Returns the latency histogram in microseconds, the errors and the seconds taken.
async fn run_clients(
    url: String,
    secret: Vec<u8>,
    clients: usize,
    requests: u64,
    slab: u64,
    floor: bool,
) -> std::io::Result<(Histogram<u64>, u64, f64)> {
    let started = Instant::now();
    let results = tokio::task::spawn_blocking(move || {
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let client = PlaceClient::new(&url, secret.clone(), Duration::from_secs(10));
                std::thread::spawn(move || {
                    let mut h = Histogram::<u64>::new(3).expect("valid precision");
                    let mut errors = 0u64;
                    let req = PlaceRequest {
                        client: format!("bench-client-{c}"),
                        bytes: slab,
                        replicas: 2,
                    };
                    for _ in 0..requests {
                        let t = Instant::now();
                        let r = if floor {
                            client.get::<serde_json::Value>("/health").map(|_| ())
                        } else {
                            client.place(&req).map(|_| ())
                        };
                        match r {
                            Ok(()) => {
                                let _ = h.record(t.elapsed().as_micros() as u64);
                            }
                            Err(_) => errors += 1,
                        }
                    }
                    (h, errors)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("bench client thread"))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(std::io::Error::other)?;
    let secs = started.elapsed().as_secs_f64();
    let mut all = Histogram::<u64>::new(3).expect("valid precision");
    let mut errors = 0;
    for (h, e) in &results {
        let _ = all.add(h);
        errors += e;
    }
    Ok((all, errors, secs))
}

/// Times registration visibility, lease expiry and grants on two handles of one registry
/// (`a` registers and grants, `b` watches; for in-process they are the same registry).
pub async fn registry<R: Registry>(
    a: &R,
    b: &R,
    name: &str,
    slab_bytes: u64,
    grants: u32,
) -> Result<RegistryFigures, crate::registry::RegistryError> {
    let seen = |r: &R, id: &str| r.table().is_ok_and(|t| t.get(id).is_some());
    // Registration to visible, averaged over 20.
    let mut total = Duration::ZERO;
    for i in 0..20 {
        let id = format!("bench-vis-{i}");
        a.register(report(&id, "r1", slab_bytes, 8), Duration::from_secs(60))
            .await?;
        let t = Instant::now();
        while !seen(b, &id) {
            tokio::time::sleep(Duration::from_micros(200)).await;
            if t.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        total += t.elapsed();
    }
    // Lease end to removal.
    a.register(
        report("bench-exp", "r2", slab_bytes, 8),
        Duration::from_secs(2),
    )
    .await?;
    let registered = Instant::now();
    while seen(b, "bench-exp") && registered.elapsed() < Duration::from_secs(15) {
        b.sweep();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let expiry = registered.elapsed().saturating_sub(Duration::from_secs(2));
    // Grants.
    a.register(
        report("bench-grant", "r3", slab_bytes, grants),
        Duration::from_secs(60),
    )
    .await?;
    let t = Instant::now();
    for _ in 0..grants {
        a.grant("bench-grant", 1).await?;
    }
    let per_sec = f64::from(grants) / t.elapsed().as_secs_f64();
    Ok(RegistryFigures {
        registry: name.to_owned(),
        register_to_visible_us: total.as_secs_f64() * 1e6 / 20.0,
        expiry_to_removal_ms: expiry.as_secs_f64() * 1e3,
        grants_per_sec: per_sec,
    })
}
