//! A soak of the donor under attack. Legitimate clients allocate, write, read back, verify and
//! free in a loop for three phases: before, during and after an attack by hostile peers (idle
//! sockets and slow hellos on every port, garbage, an authenticated `reconnect` flood, NBD
//! clients that queue 2 GiB of READs and never read). It reports the legitimate clients' p50 and
//! p99 per phase and the donor's RSS and descriptors, and checks that every legitimate operation
//! succeeded with the right data and that the donor's RSS and descriptors came back.
//!
//! The test command runs a short form (RMEM_SOAK_SECS per phase, default 4);
//! `benches/soak.sh` runs a long one in release and keeps the table.

mod hostile;
#[path = "../support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rmem_swapclient::{Client, ClientConfig};

const SECRET: &str = "soak test secret, long enough";

/// The donor under test: 192 slabs of 1 MiB and a 64 MiB NBD export.
fn donor() -> support::Donor {
    support::donor(
        SECRET,
        &[
            "--size",
            "192M",
            "--slab-size",
            "1M",
            "--no-admin",
            "--nbd-listen",
            "127.0.0.1:0",
            "--export",
            "soak=64M",
        ],
    )
}

/// (RSS bytes, open descriptors) of a process.
fn footprint(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (kb << 10, fds)
}

const PHASES: [&str; 3] = ["before", "during", "after"];
const OPS: [&str; 4] = ["alloc", "write 4K", "read 4K", "free"];

/// Latency histograms, one per (phase, op).
struct Record {
    phase: AtomicUsize,
    hist: Mutex<Vec<Vec<Histogram<u64>>>>,
    errors: AtomicU64,
    cycles: AtomicU64,
}

impl Record {
    fn new() -> Record {
        let h = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        Record {
            phase: AtomicUsize::new(0),
            hist: Mutex::new((0..3).map(|_| (0..4).map(|_| h()).collect()).collect()),
            errors: AtomicU64::new(0),
            cycles: AtomicU64::new(0),
        }
    }
}

/// One legitimate client's loop: its own runtime, its own session.
fn legit(addr: SocketAddr, n: usize, rec: Arc<Record>, stop: Arc<AtomicBool>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = ClientConfig::new(addr, SECRET.as_bytes().to_vec());
    cfg.name = format!("legit-{n}");
    let c = rt
        .block_on(Client::connect(cfg))
        .expect("a legitimate client connects");
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ n as u64;
    let mut data = vec![0u8; 4096];
    let mut back = vec![0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let phase = rec.phase.load(Ordering::Relaxed);
        let mut lat = [0u64; 4];
        let mut t = Instant::now();
        let mut lap = |i: usize, t: &mut Instant| {
            lat[i] = t.elapsed().as_micros().max(1) as u64;
            *t = Instant::now();
        };
        let slab = match rt.block_on(c.alloc(1)) {
            Ok(s) => s[0],
            Err(e) => {
                eprintln!("legit-{n}: alloc: {e}");
                rec.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        lap(0, &mut t);
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let off = (x % ((1 << 20) / 4096)) * 4096;
        let ok = c.write(&slab, off, &data).is_ok();
        lap(1, &mut t);
        let ok = ok && c.read(&slab, off, &mut back).is_ok() && back == data;
        lap(2, &mut t);
        let ok = rt.block_on(c.free(&[slab.slab])).is_ok() && ok;
        lap(3, &mut t);
        if !ok {
            eprintln!("legit-{n}: a cycle failed or read wrong data");
            rec.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        rec.cycles.fetch_add(1, Ordering::Relaxed);
        let mut h = rec.hist.lock().unwrap();
        for (i, v) in lat.iter().enumerate() {
            let _ = h[phase][i].record(*v);
        }
    }
}

fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn donor_serves_legitimate_clients_through_an_attack_and_recovers() {
    let phase_secs = env_u64("RMEM_SOAK_SECS", 4);
    let clients = env_u64("RMEM_SOAK_CLIENTS", 4) as usize;
    let d = donor();
    let pid = d.child.id();
    let (control, nbd) = (d.addr("listening"), d.addr("nbd"));
    let rec = Arc::new(Record::new());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..clients)
        .map(|n| {
            let (r, s) = (rec.clone(), stop.clone());
            let addr = control;
            std::thread::spawn(move || legit(addr, n, r, s))
        })
        .collect();
    // The data listener's address, as a client learns it.
    let data = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = rt
            .block_on(Client::connect(ClientConfig::new(
                control,
                SECRET.as_bytes().to_vec(),
            )))
            .unwrap();
        c.data_addr()
    };
    // Three phases of fixed length (pacing, not waits): clients alone, under attack, after it.
    let phase = Duration::from_secs(phase_secs);
    std::thread::sleep(phase);
    let start = footprint(pid);
    rec.phase.store(1, Ordering::Relaxed);
    let attack = hostile::start(control, data, nbd, SECRET.as_bytes());
    let mut peak = start;
    let t = Instant::now();
    while t.elapsed() < phase {
        std::thread::sleep(Duration::from_millis(200));
        let f = footprint(pid);
        peak = (peak.0.max(f.0), peak.1.max(f.1));
    }
    let tally = attack.stop();
    rec.phase.store(2, Ordering::Relaxed);
    std::thread::sleep(phase);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    // Hellos, handshakes and tokens age out within seconds; wait for the descriptors.
    let t = Instant::now();
    let mut end = footprint(pid);
    while end.1 > start.1 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(250));
        end = footprint(pid);
    }
    let h = rec.hist.lock().unwrap();
    println!(
        "soak: {clients} legitimate clients, {phase_secs} s per phase; attack: {} connections, {} reconnects, {} NBD READs of 32 MiB queued unread",
        tally.connections.load(Ordering::Relaxed),
        tally.reconnects.load(Ordering::Relaxed),
        tally.nbd_reads_queued.load(Ordering::Relaxed)
    );
    println!(
        "| op | before p50/p99 us | during p50/p99 us | after p50/p99 us | p99 during/before |"
    );
    println!("|---|---|---|---|---|");
    for (i, op) in OPS.iter().enumerate() {
        let cell = |p: usize| {
            let x = &h[p][i];
            format!(
                "{}/{} ({} ops)",
                x.value_at_quantile(0.5),
                x.value_at_quantile(0.99),
                x.len()
            )
        };
        let ratio =
            h[1][i].value_at_quantile(0.99) as f64 / h[0][i].value_at_quantile(0.99).max(1) as f64;
        println!(
            "| {op} | {} | {} | {} | {ratio:.2} |",
            cell(0),
            cell(1),
            cell(2)
        );
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "donor RSS MiB start {:.1}, peak {:.1}, end {:.1}; fds start {}, peak {}, end {}",
        mib(start.0),
        mib(peak.0),
        mib(end.0),
        start.1,
        peak.1,
        end.1
    );
    assert_eq!(
        rec.errors.load(Ordering::Relaxed),
        0,
        "legitimate operations failed"
    );
    for p in 0..3 {
        assert!(
            !h[p][0].is_empty(),
            "no legitimate cycle completed {}",
            PHASES[p]
        );
    }
    assert!(
        end.1 <= start.1,
        "descriptors did not come back: {} at start, {} at the end",
        start.1,
        end.1
    );
    assert!(
        end.0 <= start.0 + (32 << 20),
        "RSS did not come back: {:.1} MiB at start, {:.1} MiB at the end",
        mib(start.0),
        mib(end.0)
    );
    assert!(d.child.id() == pid, "the donor is the same process");
}
