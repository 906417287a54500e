//! Measures the userfaultfd region against an in-process donor (tcp provider, loopback):
//! 4 KiB fault service latency next to one bare 4 KiB READ, and scan throughput with and
//! without prefetch.
//!
//! `cargo run --release -p rmem-swapclient --example region_bench [pages]`

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rmem_memserver::{ByteSize, Server, ServerConfig};
use rmem_swapclient::region::PAGE;
use rmem_swapclient::{Client, ClientConfig};
use rmem_swapclient::{PollMode, Region, RegionConfig};
use rmem_transport::HugePages;

const SECRET: &[u8] = b"region bench secret";
const WORDS: usize = PAGE / 8;

fn row(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<44} {:>8.1} {:>8.1} {:>8.1} {:>8}",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.mean() / 1000.0,
        h.len()
    );
}

fn busy() -> PollMode {
    PollMode::Busy {
        spin: Duration::from_micros(50),
    }
}

/// Latency of accesses that took a MISSING fault, over random pages of a region whose pages
/// were all written (so every fault is a remote READ), budget a quarter of the region.
fn fault_latency(r: &Region, samples: usize) -> Histogram<u64> {
    let pages = r.len() / PAGE;
    let a = r.atomics();
    for p in 0..pages {
        a[p * WORDS].store(p as u64, Ordering::Relaxed);
    }
    let mut h = Histogram::<u64>::new(3).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    while (h.len() as usize) < samples {
        let p = rng.random_range(0..pages);
        let before = r.stats().faults;
        let t = Instant::now();
        let v = a[p * WORDS].load(Ordering::Relaxed);
        let dt = t.elapsed();
        assert_eq!(v, p as u64);
        if r.stats().faults != before {
            h.record(dt.as_nanos() as u64).unwrap();
        }
    }
    h
}

/// Latency of first touches (zero fills: userfaultfd round trip without a READ).
fn zero_latency(r: &Region) -> Histogram<u64> {
    let a = r.atomics();
    let mut h = Histogram::<u64>::new(3).unwrap();
    for p in 0..r.len() / PAGE {
        let t = Instant::now();
        black_box(a[p * WORDS].load(Ordering::Relaxed));
        h.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    h
}

/// Reads every word of every page in `order`; returns (MiB/s, faults).
fn scan(r: &Region, order: &[usize]) -> (f64, u64) {
    let a = r.atomics();
    let before = r.stats().faults;
    let t = Instant::now();
    let mut sum = 0u64;
    for &p in order {
        for w in 0..WORDS {
            sum = sum.wrapping_add(a[p * WORDS + w].load(Ordering::Relaxed));
        }
    }
    black_box(sum);
    let secs = t.elapsed().as_secs_f64();
    (
        (order.len() * PAGE) as f64 / secs / (1 << 20) as f64,
        r.stats().faults - before,
    )
}

fn main() {
    let pages: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4096);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let slabs = ((pages * PAGE) >> 20) as u64 + 2;
    let (addr, _stop) = rt.block_on(async {
        let mut cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            size: ByteSize((4 * slabs) << 20),
            slab_size: ByteSize(1 << 20),
            hugepages: HugePages::Never,
            ..Default::default()
        };
        cfg.reclaim.pressure = false;
        let server = Server::bind(cfg, SECRET.to_vec()).await.unwrap();
        let addr = server.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        (addr, tx)
    });
    let client = Arc::new(
        rt.block_on(Client::connect(ClientConfig::new(addr, SECRET.to_vec())))
            .unwrap(),
    );
    let region = |budget: usize, prefetch: usize, poll: PollMode| {
        let mut cfg = RegionConfig::new(pages * PAGE);
        cfg.budget_pages = budget;
        cfg.prefetch = prefetch;
        cfg.poll = poll;
        rt.block_on(Region::borrow(client.clone(), cfg)).unwrap()
    };

    println!(
        "pages={pages} ({} MiB), budget={} pages",
        (pages * PAGE) >> 20,
        pages / 4
    );
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>8}",
        "latency (us)", "p50", "p99", "mean", "n"
    );
    // Baseline: one bare 4 KiB READ through the same client.
    let grant = rt.block_on(client.alloc(1)).unwrap()[0];
    let mut buf = vec![0u8; PAGE];
    let mut h = Histogram::<u64>::new(3).unwrap();
    for i in 0..5000u64 {
        let t = Instant::now();
        client
            .read_remote(grant.remote, (i % 256) * PAGE as u64, &mut buf)
            .unwrap();
        h.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    row("transport READ 4 KiB (client.read_remote)", &h);
    rt.block_on(client.free(&[grant.slab])).unwrap();

    for (name, poll) in [("busy-poll", busy()), ("poll()", PollMode::Blocking)] {
        let r = region(pages / 4, 0, poll);
        row(
            &format!("region zero fill (no READ), {name}"),
            &zero_latency(&r),
        );
        row(
            &format!("region fault (READ+COPY), {name}"),
            &fault_latency(&r, 5000),
        );
        let st = r.stats();
        println!("    stats: {st:?}");
        rt.block_on(r.release()).unwrap();
    }

    println!();
    println!(
        "{:<44} {:>8} {:>8} {:>10}",
        "scan (read all words), budget pages/4", "MiB/s", "faults", "prefetched"
    );
    let seq: Vec<usize> = (0..pages).collect();
    let mut rnd = seq.clone();
    let mut rng = StdRng::seed_from_u64(7);
    for i in (1..rnd.len()).rev() {
        rnd.swap(i, rng.random_range(0..=i));
    }
    for prefetch in [0usize, 8] {
        let r = region(pages / 4, prefetch, busy());
        // Write every page: all but the last quarter are then remote, written back.
        let a = r.atomics();
        for p in 0..pages {
            for w in 0..WORDS {
                a[p * WORDS + w].store((p * WORDS + w) as u64, Ordering::Relaxed);
            }
        }
        for (name, order) in [("sequential", &seq), ("random", &rnd)] {
            let before = r.stats().prefetched;
            let (mibs, faults) = scan(&r, order);
            println!(
                "{:<44} {:>8.1} {:>8} {:>10}",
                format!("{name}, prefetch {prefetch}"),
                mibs,
                faults,
                r.stats().prefetched - before
            );
        }
        rt.block_on(r.release()).unwrap();
    }
}
