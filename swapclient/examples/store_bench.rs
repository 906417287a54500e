//! Measures the replicated store against in-process donors (tcp provider, loopback): 4 KiB
//! random reads and writes at queue depths 1, 16 and 64 (one blocking caller thread per
//! request in flight, as the NBD workers and ublk queues call it), and 1 MiB sequential
//! throughput. Compare with `rmem perf loopback --op read|write --bw -s 4096 --tx-depth N`
//! and `-s 1M`, run on the same host at the same time.
//!
//! Then the same rows through a [`StoreChannel`]: one thread keeping that many requests in
//! flight on a channel to every donor, reading into and writing from its own registered
//! buffer.
//!
//! `cargo run --release -p rmem-swapclient --example store_bench [replicas] [donors] [seconds]
//! [lanes]` (lanes: data queue pairs to each donor, default 1 as `rmem swap up`)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rmem_memserver::{ByteSize, Server, ServerConfig};
use rmem_swapclient::{DonorSpec, IoOp, IoReq, Store, StoreChannel, StoreConfig};
use rmem_transport::{Buffer, HugePages, Provider};

const SECRET: &[u8] = b"store bench secret";
const SIZE: u64 = 64 << 20;

/// Runs `depth` threads calling `op(thread, n)` for `secs`; returns operations per second.
fn run(depth: usize, secs: f64, op: impl Fn(usize, u64) + Sync) -> f64 {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..depth {
            let (stop, done, op) = (&stop, &done, &op);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    op(th, n);
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

/// Keeps `depth` requests of `len` bytes in flight on one channel for `secs`; `next(n)` gives
/// the n-th request's offset. Returns requests per second.
fn run_channel(
    ch: &mut StoreChannel<'_>,
    depth: usize,
    len: usize,
    op: IoOp,
    secs: f64,
    next: impl Fn(u64) -> u64,
) -> f64 {
    let t = Instant::now();
    let end = t + Duration::from_secs_f64(secs);
    let (mut sent, mut done) = (0u64, 0u64);
    let mut free: Vec<usize> = (0..depth).collect();
    let mut out = Vec::with_capacity(depth);
    loop {
        while Instant::now() < end && !free.is_empty() {
            // The slot names the request: unique among those in flight.
            let slot = free.pop().expect("a free slot");
            ch.submit(IoReq {
                tag: slot as u64,
                op,
                off: next(sent),
                len,
                at: slot * len,
            })
            .expect("submit");
            sent += 1;
        }
        if ch.in_flight() == 0 && Instant::now() >= end {
            break;
        }
        out.clear();
        ch.reap(&mut out, true).expect("reap");
        for (tag, r) in out.drain(..) {
            r.expect("request");
            done += 1;
            free.push(tag as usize);
        }
    }
    done as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: f64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let replicas = arg(1, 2.0) as usize;
    let donors = (arg(2, 2.0) as usize).max(replicas);
    let secs = arg(3, 2.0);
    let lanes = (arg(4, 1.0) as usize).clamp(1, 16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut stops = Vec::new();
    let mut specs = Vec::new();
    for i in 0..donors {
        let (addr, stop) = rt.block_on(async {
            let mut cfg = ServerConfig {
                listen: "127.0.0.1:0".parse().expect("address"),
                size: ByteSize(2 * SIZE),
                slab_size: ByteSize(4 << 20),
                hugepages: HugePages::Never,
                ..Default::default()
            };
            cfg.reclaim.pressure = false;
            let server = Server::bind(cfg, SECRET.to_vec()).await.expect("donor");
            let addr = server.local_addr();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(server.run(async {
                let _ = rx.await;
            }));
            (addr, tx)
        });
        stops.push(stop);
        specs.push(DonorSpec {
            addr,
            domain: format!("d{i}"),
        });
    }
    let cfg = StoreConfig {
        size: SIZE,
        replicas,
        donors: specs,
        secret: SECRET.to_vec(),
        provider: Provider::Tcp,
        device: None,
        name: "store-bench".into(),
        op_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
        lanes,
        bounce: 1 << 20,
        plan: None,
        readahead: true,
    };
    let store: Arc<Store> = rt.block_on(Store::create(&cfg)).expect("store");
    // Every block written once, so reads move data.
    let fill = vec![0x5au8; 1 << 20];
    for off in (0..SIZE).step_by(1 << 20) {
        store.write(off, &fill).expect("fill");
    }
    println!(
        "store of {} MiB, {replicas} replica(s) on {donors} donor(s), {lanes} lane(s) each, tcp provider on loopback, {secs} s a row",
        SIZE >> 20
    );
    println!("{:<28} {:>10} {:>12}", "row", "IOPS", "MiB/s");
    let blocks = SIZE / 4096;
    for depth in [1usize, 16, 64] {
        for write in [false, true] {
            let iops = run(depth, secs, |th, n| {
                let mut rng = StdRng::seed_from_u64((th as u64) << 32 | n);
                let off = rng.random_range(0..blocks) * 4096;
                let mut buf = [0u8; 4096];
                if write {
                    buf.fill(n as u8);
                    store.write(off, &buf).expect("write");
                } else {
                    store.read(off, &mut buf).expect("read");
                }
            });
            let name = format!(
                "4 KiB random {} qd {depth}",
                if write { "write" } else { "read" }
            );
            println!(
                "{name:<28} {iops:>10.0} {:>12.1}",
                iops * 4096.0 / 1048576.0
            );
        }
    }
    for write in [false, true] {
        let mbs = run(1, secs, |_, n| {
            let off = (n % (SIZE >> 20)) << 20;
            let mut buf = vec![0u8; 1 << 20];
            if write {
                store.write(off, &buf).expect("write");
            } else {
                store.read(off, &mut buf).expect("read");
            }
        });
        let name = format!("1 MiB sequential {}", if write { "write" } else { "read" });
        println!("{name:<28} {mbs:>10.0} {mbs:>12.1}");
    }
    // Through channels: one thread, many requests in flight.
    let depth_max = 64;
    let buf = Buffer::alloc(depth_max << 20, HugePages::Never).expect("buffer");
    let mut ch = rt
        .block_on(store.open_channel(buf, depth_max))
        .expect("channel");
    for depth in [1usize, 16, 64] {
        for op in [IoOp::Read, IoOp::Write] {
            let iops = run_channel(&mut ch, depth, 4096, op, secs, |n| {
                StdRng::seed_from_u64(n).random_range(0..blocks) * 4096
            });
            let name = format!(
                "channel 4 KiB random {} qd {depth}",
                if op == IoOp::Write { "write" } else { "read" }
            );
            println!(
                "{name:<34} {iops:>10.0} {:>12.1}",
                iops * 4096.0 / 1048576.0
            );
        }
    }
    for op in [IoOp::Read, IoOp::Write] {
        let mbs = run_channel(&mut ch, 16, 1 << 20, op, secs, |n| (n % (SIZE >> 20)) << 20);
        let name = format!(
            "channel 1 MiB sequential {} qd 16",
            if op == IoOp::Write { "write" } else { "read" }
        );
        println!("{name:<34} {mbs:>10.0} {mbs:>12.1}");
    }
    drop(ch);
    drop(stops);
}
