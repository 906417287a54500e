//! Conformance cases about moving data: READ, WRITE, scatter-gather, chains, immediates, SEND/RECV.

use super::*;

/// READ and WRITE move exact bytes for sizes from 1 B to 16 MiB (or the device's largest
/// message, if smaller) at odd offsets on both sides.
pub fn read_write_integrity(setup: &Setup) {
    let l = link(setup, plain);
    // rxe on Linux 6.1 advertises (and enforces) 8 MiB messages.
    let device_max = usize::try_from(l.a.ctx.device().max_msg).unwrap_or(usize::MAX);
    let max = (16 << 20).min(device_max);
    let local = l.a.pd.alloc_mr(max + 64, rw()).expect("local mr");
    let back = l.a.pd.alloc_mr(max + 64, rw()).expect("readback mr");
    let remote_mr = l.b.pd.alloc_mr(max + 64, rw()).expect("remote mr");
    let remote = remote_mr.remote();
    let sizes = [
        1usize,
        2,
        3,
        7,
        8,
        63,
        64,
        4095,
        4096,
        4097,
        65_549,
        (1 << 20) - 1,
        max,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        let (loff, roff) = (1 + i % 7, 3 + 2 * (i % 5));
        let data = pattern(i as u64 + 1, size);
        local.write_at(loff, &data).expect("fill");
        let sge = [local.sge(loff, size).expect("sge")];
        let id = 100 + i as u64;
        l.a.qp
            .post_send(&[SendWr::write(id, &sge, remote.at(roff as u64))])
            .expect("post write");
        wait_ok(&l.a.cq, id);
        assert!(
            read_mr(&remote_mr, roff, size) == data,
            "WRITE of {size} B corrupted data"
        );

        back.fill(0, max + 64, 0).expect("clear");
        let sge = [back.sge(loff + 1, size).expect("sge")];
        l.a.qp
            .post_send(&[SendWr::read(id, &sge, remote.at(roff as u64))])
            .expect("post read");
        let c = wait_ok(&l.a.cq, id);
        assert_eq!(c.opcode, WcOpcode::Read);
        assert!(
            read_mr(&back, loff + 1, size) == data,
            "READ of {size} B corrupted data"
        );
        assert_eq!(
            read_mr(&back, loff, 1),
            [0],
            "READ of {size} B wrote before its buffer"
        );
        assert_eq!(
            read_mr(&back, loff + 1 + size, 1),
            [0],
            "READ of {size} B overran"
        );
    }
}

/// Gather on WRITE and scatter on READ across several regions and offsets.
pub fn scatter_gather(setup: &Setup) {
    let l = link(setup, plain);
    let m1 = l.a.pd.alloc_mr(8192, rw()).expect("mr");
    let m2 = l.a.pd.alloc_mr(8192, rw()).expect("mr");
    let remote_mr = l.b.pd.alloc_mr(1 << 16, rw()).expect("mr");
    let parts = [(&m1, 5usize, 100usize), (&m2, 77, 3000), (&m1, 4000, 1)];
    let mut expect = Vec::new();
    for (k, (m, off, len)) in parts.iter().enumerate() {
        let d = pattern(50 + k as u64, *len);
        m.write_at(*off, &d).expect("fill");
        expect.extend_from_slice(&d);
    }
    let sgl: Vec<_> = parts
        .iter()
        .map(|(m, off, len)| m.sge(*off, *len).expect("sge"))
        .collect();
    l.a.qp
        .post_send(&[SendWr::write(1, &sgl, remote_mr.remote().at(11))])
        .expect("post");
    wait_ok(&l.a.cq, 1);
    assert!(
        read_mr(&remote_mr, 11, expect.len()) == expect,
        "gathered WRITE mismatch"
    );

    let d1 = l.a.pd.alloc_mr(4096, rw()).expect("mr");
    let cuts = [(0usize, 1usize), (9, 1500), (2000, 1599), (4000, 1)];
    let sgl: Vec<_> = cuts
        .iter()
        .map(|(o, n)| d1.sge(*o, *n).expect("sge"))
        .collect();
    l.a.qp
        .post_send(&[SendWr::read(2, &sgl, remote_mr.remote().at(11))])
        .expect("post");
    wait_ok(&l.a.cq, 2);
    let mut got = Vec::new();
    for (o, n) in cuts {
        got.extend(read_mr(&d1, o, n));
    }
    assert!(got == expect, "scattered READ mismatch");
}

/// A chain posted in one call, only its last request signaled, yields one completion and all
/// the data.
pub fn chain_unsignaled(setup: &Setup) {
    let l = link(setup, plain);
    let src = l.a.pd.alloc_mr(16 * 512, rw()).expect("mr");
    let dst = l.b.pd.alloc_mr(16 * 512, rw()).expect("mr");
    let data = pattern(9, 16 * 512);
    src.write_at(0, &data).expect("fill");
    let sges: Vec<_> = (0..16)
        .map(|i| [src.sge(i * 512, 512).expect("sge")])
        .collect();
    let wrs: Vec<_> = sges
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let w = SendWr::write(i as u64, s, dst.remote().at(i as u64 * 512));
            if i == 15 {
                w
            } else {
                w.unsignaled()
            }
        })
        .collect();
    l.a.qp.post_send(&wrs).expect("post chain");
    wait_ok(&l.a.cq, 15);
    let mut extra = [Completion::default(); 4];
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        l.a.cq.poll(&mut extra).expect("poll"),
        0,
        "unsignaled requests completed"
    );
    assert!(read_mr(&dst, 0, data.len()) == data, "chain data mismatch");
}

/// WRITE_WITH_IMM and SEND consume receives in order; data written before a notice is visible
/// when the notice completes.
pub fn write_imm_and_send_ordering(setup: &Setup) {
    let l = link(setup, plain);
    let n = 20u64;
    let src = l.a.pd.alloc_mr(64 * 1024, rw()).expect("mr");
    let dst = l.b.pd.alloc_mr(64 * 1024, rw()).expect("mr");
    let rbuf = l.b.pd.alloc_mr(n as usize * 64, rw()).expect("mr");
    let rsges: Vec<_> = (0..n)
        .map(|i| [rbuf.sge(i as usize * 64, 64).expect("sge")])
        .collect();
    let rwrs: Vec<_> = rsges
        .iter()
        .enumerate()
        .map(|(i, s)| RecvWr::new(1000 + i as u64, s))
        .collect();
    l.b.qp.post_recv(&rwrs).expect("post recv");
    for i in 0..n {
        let block = pattern(i, 1024);
        src.write_at(i as usize * 1024, &block).expect("fill");
        let s = [src.sge(i as usize * 1024, 1024).expect("sge")];
        let msg = [src.sge(i as usize * 1024, 10 + i as usize).expect("sge")];
        let wr = if i % 2 == 0 {
            SendWr::write_imm(i, &s, dst.remote().at(i * 1024), 0xA000 + i as u32)
        } else {
            SendWr::new(i, crate::Op::SendImm(0xB000 + i as u32), &msg)
        };
        l.a.qp.post_send(&[wr.unsignaled()]).expect("post");
    }
    for i in 0..n {
        let c = wait(&l.b.cq);
        assert_eq!(c.status, WcStatus::Success, "{c:?}");
        assert_eq!(c.wr_id, 1000 + i, "receives consumed out of order");
        if i % 2 == 0 {
            assert_eq!(c.opcode, WcOpcode::RecvWithImm);
            assert_eq!(c.imm, Some(0xA000 + i as u32));
            assert_eq!(c.byte_len, 1024);
            assert!(
                read_mr(&dst, i as usize * 1024, 1024) == pattern(i, 1024),
                "WRITE data not visible at its notice"
            );
        } else {
            assert_eq!(c.opcode, WcOpcode::Recv);
            assert_eq!(c.imm, Some(0xB000 + i as u32));
            assert_eq!(c.byte_len, 10 + i as u32);
            assert!(
                read_mr(&rbuf, i as usize * 64, 10 + i as usize) == pattern(i, 10 + i as usize)
            );
        }
    }
}

/// SEND into a receive of several SGEs; a SEND larger than the receive fails on both sides.
pub fn send_recv(setup: &Setup) {
    let l = link(setup, plain);
    let src = l.a.pd.alloc_mr(4096, rw()).expect("mr");
    let r1 = l.b.pd.alloc_mr(4096, rw()).expect("mr");
    let data = pattern(3, 300);
    src.write_at(0, &data).expect("fill");
    let rs = [
        r1.sge(0, 100).expect("sge"),
        r1.sge(1000, 250).expect("sge"),
    ];
    l.b.qp.post_recv(&[RecvWr::new(7, &rs)]).expect("post recv");
    let s = [src.sge(0, 300).expect("sge")];
    l.a.qp.post_send(&[SendWr::send(8, &s)]).expect("post send");
    wait_ok(&l.a.cq, 8);
    let c = wait_ok(&l.b.cq, 7);
    assert_eq!((c.opcode, c.byte_len, c.imm), (WcOpcode::Recv, 300, None));
    assert!(read_mr(&r1, 0, 100) == data[..100]);
    assert!(read_mr(&r1, 1000, 200) == data[100..]);

    r1.fill(0, 4096, 0xee).expect("fill");
    let small = [r1.sge(0, 10).expect("sge")];
    l.b.qp
        .post_recv(&[RecvWr::new(9, &small)])
        .expect("post recv");
    l.a.qp
        .post_send(&[SendWr::send(10, &s)])
        .expect("post send");
    // The verbs specification says REM_INV_REQ at the sender and LOC_LEN at the receiver; rxe
    // (Linux 6.1 and later) reports REM_OP and LOC_QP_OP for the same overrun. Either way both
    // sides fail and nothing lands past the receive buffer.
    let c = wait(&l.a.cq);
    assert_eq!(c.wr_id, 10);
    assert!(
        matches!(c.status, WcStatus::RemInvReqErr | WcStatus::RemOpErr),
        "sender of an oversized SEND: {c:?}"
    );
    let c = wait(&l.b.cq);
    assert_eq!(c.wr_id, 9);
    assert!(
        matches!(c.status, WcStatus::LocLenErr | WcStatus::LocQpOpErr),
        "receiver of an oversized SEND: {c:?}"
    );
    assert!(
        read_mr(&r1, 10, 4086).iter().all(|b| *b == 0xee),
        "an oversized SEND wrote past its receive buffer"
    );
}

/// A SEND with no receive posted fails with RNR_RETRY_EXC_ERR once the RNR timeout passes.
pub fn receiver_not_ready(setup: &Setup) {
    let l = link(setup, |c| c.rnr_timeout(Duration::from_millis(200)));
    let src = l.a.pd.alloc_mr(64, rw()).expect("mr");
    let s = [src.sge(0, 8).expect("sge")];
    l.a.qp.post_send(&[SendWr::send(1, &s)]).expect("post");
    let c = wait(&l.a.cq);
    assert_eq!((c.wr_id, c.status), (1, WcStatus::RnrRetryExcErr), "{c:?}");
}

/// Each queue pair counts what it moves per peer host (WRITE out, READ in), and a rate limit
/// paces its posts to the bucket's rate.
pub fn traffic_and_pacing(setup: &Setup) {
    let mut l = link(setup, plain);
    let local = l.a.pd.alloc_mr(1 << 20, rw()).expect("local mr");
    let remote_mr = l.b.pd.alloc_mr(1 << 20, rw()).expect("remote mr");
    let remote = remote_mr.remote();
    let before = l.a.ctx.peer_traffic();
    let base = |p: std::net::IpAddr| {
        before
            .iter()
            .find(|b| b.peer == p)
            .map_or((0, 0), |b| (b.tx_bytes, b.rx_bytes))
    };
    let peer = setup.listen.ip();
    let sge = [local.sge(0, 100_000).expect("sge")];
    l.a.qp
        .post_send(&[SendWr::write(1, &sge, remote.at(0))])
        .expect("post write");
    wait_ok(&l.a.cq, 1);
    let sge = [local.sge(0, 50_000).expect("sge")];
    l.a.qp
        .post_send(&[SendWr::read(2, &sge, remote.at(0))])
        .expect("post read");
    wait_ok(&l.a.cq, 2);
    let after = l.a.ctx.peer_traffic();
    let now = after
        .iter()
        .find(|b| b.peer == peer)
        .unwrap_or_else(|| panic!("no counter for peer {peer}: {after:?}"));
    let (tx0, rx0) = base(peer);
    assert_eq!(
        (now.tx_bytes - tx0, now.rx_bytes - rx0),
        (100_000, 50_000),
        "bytes counted for {peer}"
    );

    // 2 MB at 20 MB/s in 256 KiB WRITEs: at least 100 ms less one burst.
    let bucket = Arc::new(crate::rate::TokenBucket::new(20e6, 256 << 10));
    l.a.qp.set_rate_limit(Some(bucket));
    let start = Instant::now();
    let sge = [local.sge(0, 256 << 10).expect("sge")];
    let pieces = 2_000_000u64.div_ceil(256 << 10);
    for i in 0..pieces {
        l.a.qp
            .post_send(&[SendWr::write(10 + i, &sge, remote.at(0))])
            .expect("post paced write");
        wait_ok(&l.a.cq, 10 + i);
    }
    let took = start.elapsed().as_secs_f64();
    let floor = ((pieces - 1) * (256 << 10)) as f64 / 20e6;
    assert!(
        took >= floor * 0.98,
        "{took} s: faster than the limit ({floor} s)"
    );
    l.a.qp.set_rate_limit(None);
}
