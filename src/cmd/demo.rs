//! `rmem demo`: a donor and a borrower in one process; data moved one-sided and verified.

use std::time::{Duration, Instant};

use clap::Args;
use rmem_bench::{Client, PerfConfig, PerfMode, PerfOp};
use rmem_transport::{open, Access, Context, QpConfig, RemoteBuf, SendWr};
use serde::Serialize;

use super::{parse_size, ProviderArgs};
use crate::exit::{Code, Failed};

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    provider: ProviderArgs,
    /// Memory the donor lends and the borrower fills, reads back and verifies.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    size: usize,
    /// Spin instead of sleeping while waiting (lower latency, busier cores).
    #[arg(long)]
    busy_poll: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct DemoReport {
    provider: String,
    bytes: usize,
    write_mib_per_sec: f64,
    read_mib_per_sec: f64,
    verified: bool,
    fetch_add_final: u64,
    read_4k_p50_us: f64,
    read_4k_p99_us: f64,
    write_64k_mib_per_sec: f64,
    donor_requests_served: u64,
    donor_access_errors: u64,
}

const CHUNK: usize = 1 << 20;

pub fn run(a: DemoArgs) -> Result<(), Failed> {
    if a.size == 0 || !a.size.is_multiple_of(8) {
        return Err(Failed::new(
            Code::Usage,
            "--size must be a non-zero multiple of 8",
        ));
    }
    let opts = a.provider.open_options();
    let donor = open(&opts)?;
    let borrower = open(&opts)?;
    let say = |s: String| {
        if !a.json {
            println!("{s}");
        }
    };
    say(format!(
        "rmem demo: donor and borrower in one process, {} provider, {} MiB lent",
        donor.provider(),
        a.size >> 20
    ));

    // The donor registers memory and hands out its descriptor; its threads never touch the data.
    let dpd = donor.alloc_pd()?;
    let dcq = donor.create_cq(16)?;
    let lent = dpd.alloc_mr(a.size, Access::all_remote())?;
    let listener = donor.listen("127.0.0.1:0".parse().expect("literal address"))?;
    let addr = listener.local_addr();
    let desc = serde_json::to_vec(&lent.remote()).expect("descriptor serialises");
    let accept = std::thread::spawn(move || {
        listener.accept(
            &QpConfig::new(&dpd, &dcq),
            &desc,
            Some(Duration::from_secs(10)),
        )
    });

    let bpd = borrower.alloc_pd()?;
    let bcq = borrower.create_cq(256)?;
    let conn = borrower.connect(addr, &QpConfig::new(&bpd, &bcq), b"")?;
    let _donor_side = accept
        .join()
        .map_err(|_| Failed::new(Code::Failure, "accept thread panicked"))??;
    let remote: RemoteBuf = serde_json::from_slice(&conn.private)
        .map_err(|e| Failed::new(Code::Peer, format!("bad descriptor from donor: {e}")))?;

    let src = bpd.alloc_mr(a.size, Access::LOCAL_WRITE)?;
    let back = bpd.alloc_mr(a.size, Access::LOCAL_WRITE)?;
    let data = rmem_transport::conformance::pattern(0x5eed, a.size);
    src.write_at(0, &data)?;

    let write_secs = stream(&conn.qp, &bcq, &src, remote, a.size, true)?;
    let read_secs = stream(&conn.qp, &bcq, &back, remote, a.size, false)?;
    let mut readback = vec![0u8; a.size];
    back.read_at(0, &mut readback)?;
    let verified = readback == data;
    let mib = a.size as f64 / 1_048_576.0;
    say(format!(
        "  WRITE {mib:.0} MiB in 1 MiB requests: {:.0} MiB/s; READ back: {:.0} MiB/s; contents {}",
        mib / write_secs,
        mib / read_secs,
        if verified { "verified" } else { "MISMATCH" }
    ));

    // Fetch-and-add on a word of lent memory.
    lent.store_u64(0, 0)?;
    let res = bpd.alloc_mr(8, Access::LOCAL_WRITE)?;
    let r = [res.sge(0, 8)?];
    for i in 0..1000 {
        conn.qp
            .post_send(&[SendWr::fetch_add(i, &r, remote.at(0), 3)])?;
        check(bcq.wait_one(Some(Duration::from_secs(10)))?)?;
    }
    let faa = lent.load_u64(0)?;
    say(format!(
        "  1000 fetch-and-add of 3 on a lent word: {faa} (expected 3000)"
    ));

    let (p50, p99) = latency(&borrower, &donor, a.busy_poll)?;
    let bw = bandwidth(&borrower, &donor, a.busy_poll)?;
    let stats = donor.stats();
    say(format!(
        "  4 KiB READ latency: p50 {p50:.1} us, p99 {p99:.1} us"
    ));
    say(format!("  64 KiB WRITE bandwidth: {bw:.0} MiB/s"));
    say(format!(
        "  donor served {} requests on its target side ({} access errors); its application saw none",
        stats.requests, stats.access_errors
    ));
    if a.json {
        let rep = DemoReport {
            provider: donor.provider().to_string(),
            bytes: a.size,
            write_mib_per_sec: mib / write_secs,
            read_mib_per_sec: mib / read_secs,
            verified,
            fetch_add_final: faa,
            read_4k_p50_us: p50,
            read_4k_p99_us: p99,
            write_64k_mib_per_sec: bw,
            donor_requests_served: stats.requests,
            donor_access_errors: stats.access_errors,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&rep).expect("report serialises")
        );
    }
    if !verified || faa != 3000 {
        return Err(Failed::new(
            Code::Verify,
            "data read back differs from data written",
        ));
    }
    Ok(())
}

fn check(c: rmem_transport::Completion) -> Result<(), Failed> {
    if c.is_ok() {
        Ok(())
    } else {
        Err(Failed::new(
            Code::Peer,
            format!("work request failed: {}", c.status),
        ))
    }
}

/// Moves `size` bytes between `local` and the remote buffer in 1 MiB requests, 16 in flight.
fn stream(
    qp: &rmem_transport::Qp,
    cq: &rmem_transport::Cq,
    local: &rmem_transport::Mr,
    remote: RemoteBuf,
    size: usize,
    write: bool,
) -> Result<f64, Failed> {
    let t = Instant::now();
    let chunks = size.div_ceil(CHUNK);
    let (mut posted, mut done) = (0usize, 0usize);
    while done < chunks {
        while posted < chunks && posted - done < 16 {
            let off = posted * CHUNK;
            let len = CHUNK.min(size - off);
            let s = [local.sge(off, len)?];
            let at = remote.at(off as u64);
            let wr = if write {
                SendWr::write(posted as u64, &s, at)
            } else {
                SendWr::read(posted as u64, &s, at)
            };
            qp.post_send(&[wr])?;
            posted += 1;
        }
        check(cq.wait_one(Some(Duration::from_secs(20)))?)?;
        done += 1;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn perf_pair(
    borrower: &Context,
    donor: &Context,
    cfg: &PerfConfig,
) -> Result<rmem_bench::Report, Failed> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (d, s2, busy) = (donor.clone(), stop.clone(), cfg.busy_poll);
    let server = std::thread::spawn(move || {
        rmem_bench::serve(
            &d,
            "127.0.0.1:0".parse().expect("literal address"),
            1 << 20,
            busy,
            None,
            |a| {
                let _ = tx.send(a);
            },
            || s2.load(std::sync::atomic::Ordering::Relaxed),
        )
    });
    let addr = rx
        .recv()
        .map_err(|_| Failed::new(Code::Failure, "perf server did not start"))?;
    let c = Client::connect(borrower, addr, cfg)?;
    let r = c.run(cfg, &|_, _| {});
    c.finish()?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    Ok(r?)
}

fn latency(borrower: &Context, donor: &Context, busy: bool) -> Result<(f64, f64), Failed> {
    let cfg = PerfConfig {
        op: PerfOp::Read,
        mode: PerfMode::Lat,
        sizes: vec![4096],
        iters: 2000,
        warmup: 200,
        tx_depth: 1,
        busy_poll: busy,
        clock: rmem_bench::ClockKind::default(),
        cq_mod: 32,
        span: 0,
        op_timeout: None,
    };
    let r = perf_pair(borrower, donor, &cfg)?;
    let l = r.results[0].lat.as_ref().expect("latency run has latency");
    Ok((l.p50_us, l.p99_us))
}

fn bandwidth(borrower: &Context, donor: &Context, busy: bool) -> Result<f64, Failed> {
    let cfg = PerfConfig {
        op: PerfOp::Write,
        mode: PerfMode::Bw,
        sizes: vec![65536],
        iters: 4096,
        warmup: 256,
        tx_depth: 64,
        busy_poll: busy,
        clock: rmem_bench::ClockKind::default(),
        cq_mod: 32,
        span: 0,
        op_timeout: None,
    };
    let r = perf_pair(borrower, donor, &cfg)?;
    Ok(r.results[0]
        .bw
        .as_ref()
        .expect("bandwidth run has bandwidth")
        .mib_per_sec)
}
