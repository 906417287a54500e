//! The `tcp` provider against hostile or broken peers speaking the raw wire protocol: bad input
//! must end in error completions and counters, never a crash, a hang or a stray memory access.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rmem_transport::exchange::{Hello, Kind, HEADER_LEN, REJECT_PROVIDER, REJECT_VERSION, VERSION};
use rmem_transport::tcp::wire::{
    parse_payload, payload, request_hello, NakCode, ReqOp, Request, RespKind, Response, Role,
    REQUEST_LEN, RESPONSE_LEN,
};
use rmem_transport::{
    open, Access, Context, OpenOptions, Provider, Qp, QpConfig, SendWr, WcStatus,
};

fn ctx() -> Context {
    open(&OpenOptions::new(Provider::Tcp)).unwrap()
}

fn hello(role: Role, id: [u8; 16]) -> Vec<u8> {
    request_hello(&id, role, b"")
}

/// Sends `bytes` as the first thing on a new connection and reads the answer.
fn answer_to(addr: SocketAddr, bytes: &[u8]) -> Hello {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Hello::read_from(&mut s).unwrap()
}

/// A target context with one region, accepting in the background.
struct Target {
    ctx: Context,
    mr: rmem_transport::Mr,
    addr: SocketAddr,
    accepted: std::thread::JoinHandle<Option<Qp>>,
}

fn target() -> Target {
    target_with(Duration::from_secs(4))
}

fn target_with(op_timeout: Duration) -> Target {
    let ctx = ctx();
    let pd = ctx.alloc_pd().unwrap();
    let cq = ctx.create_cq(64).unwrap();
    let mr = pd.alloc_mr(4096, Access::all_remote()).unwrap();
    let listener = ctx.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let accepted = std::thread::spawn(move || {
        listener
            .accept(
                &QpConfig::new(&pd, &cq).op_timeout(op_timeout),
                b"",
                Some(Duration::from_secs(10)),
            )
            .ok()
            .map(|c| c.qp)
    });
    Target {
        ctx,
        mr,
        addr,
        accepted,
    }
}

/// Opens a queue pair by hand; returns the primary socket (our requests go out on it).
fn raw_connect(addr: SocketAddr) -> (TcpStream, TcpStream) {
    let id = [0x42; 16];
    let mut p = TcpStream::connect(addr).unwrap();
    p.write_all(&hello(Role::Primary, id)).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello(Role::Secondary, id)).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let answer = Hello::read_from(&mut p).unwrap();
    assert_eq!(answer.kind, Kind::Accept);
    assert_eq!(parse_payload(&answer.payload), Some((id, None)));
    (p, s)
}

/// A request for `len` bytes at the start of `mr` (the target's region).
fn to_region(mr: &rmem_transport::Mr, op: ReqOp, len: u32, seq: u32) -> Request {
    Request {
        op,
        len,
        seq,
        rkey: mr.rkey(),
        addr: mr.remote().addr,
        arg0: 0,
        arg1: 0,
    }
}

fn read_response(p: &mut TcpStream) -> Response {
    let mut b = [0u8; RESPONSE_LEN];
    p.read_exact(&mut b).unwrap();
    Response::decode(&b).unwrap()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn garbage_hello_is_counted_and_the_listener_keeps_serving() {
    let t = target();
    let mut junk = TcpStream::connect(t.addr).unwrap();
    junk.write_all(&[0xee; HEADER_LEN]).unwrap();
    let mut short = TcpStream::connect(t.addr).unwrap();
    short.write_all(b"RMEX").unwrap();
    drop(short);
    // The listener reads every hello as it comes, while it waits for a good one.
    wait_until("both bad hellos counted", || {
        t.ctx.stats().protocol_errors >= 2
    });
    // A well-behaved peer still gets through.
    let (mut p, _s) = raw_connect(t.addr);
    let qp = t.accepted.join().unwrap().expect("accepted after garbage");
    let req = to_region(&t.mr, ReqOp::Read, 4, 0);
    t.mr.write_at(0, b"live").unwrap();
    p.write_all(&req.encode()).unwrap();
    let r = read_response(&mut p);
    assert_eq!((r.kind, r.len), (RespKind::ReadData, 4));
    let mut d = [0u8; 4];
    p.read_exact(&mut d).unwrap();
    assert_eq!(&d, b"live");
    drop(qp);
}

#[test]
fn another_protocol_version_is_rejected_with_a_reason() {
    let t = target();
    let mut b = hello(Role::Primary, [1; 16]);
    b[4] = 2;
    let h = answer_to(t.addr, &b);
    // The refusal carries the listener's own version, so the peer can say which it needs.
    assert_eq!(
        (h.kind, h.reason, h.version),
        (Kind::Reject, REJECT_VERSION, VERSION)
    );
}

#[test]
fn a_request_for_another_provider_is_rejected_with_a_reason() {
    let t = target();
    let verbs = Hello::request(Provider::Verbs, &[1; 28], b"");
    let h = answer_to(t.addr, &verbs.encode());
    assert_eq!((h.kind, h.reason), (Kind::Reject, REJECT_PROVIDER));
    assert_eq!(h.provider, Provider::Tcp);
}

#[test]
fn malformed_request_gets_a_nak_and_is_counted() {
    let t = target();
    let (mut p, _s) = raw_connect(t.addr);
    let qp = t.accepted.join().unwrap().unwrap();
    let mut bad = [0u8; REQUEST_LEN];
    bad[0] = 0x7f; // no such opcode
    p.write_all(&bad).unwrap();
    let r = read_response(&mut p);
    assert_eq!(
        (r.kind, r.nak),
        (RespKind::Nak, Some(NakCode::InvalidRequest))
    );
    wait_until("the target's queue pair to fail", || qp.is_error());
    assert_eq!(t.ctx.stats().protocol_errors, 1);
}

#[test]
fn out_of_sequence_request_is_a_protocol_error() {
    let t = target();
    let (mut p, _s) = raw_connect(t.addr);
    let qp = t.accepted.join().unwrap().unwrap();
    let req = to_region(&t.mr, ReqOp::Read, 8, 5);
    p.write_all(&req.encode()).unwrap();
    assert_eq!(read_response(&mut p).nak, Some(NakCode::InvalidRequest));
    wait_until("the target's queue pair to fail", || qp.is_error());
}

#[test]
fn truncated_header_and_payload_are_counted() {
    for cut in ["header", "payload"] {
        let t = target();
        let (mut p, s) = raw_connect(t.addr);
        let qp = t.accepted.join().unwrap().unwrap();
        let req = to_region(&t.mr, ReqOp::Write, 1000, 0);
        if cut == "header" {
            p.write_all(&req.encode()[..10]).unwrap();
        } else {
            p.write_all(&req.encode()).unwrap();
            p.write_all(&[7u8; 100]).unwrap();
        }
        drop((p, s));
        wait_until("the truncation to be counted", || {
            t.ctx.stats().protocol_errors == 1
        });
        wait_until("the target's queue pair to fail", || qp.is_error());
    }
}

#[test]
fn requests_outside_the_region_touch_nothing() {
    let t = target();
    let (mut p, _s) = raw_connect(t.addr);
    let _qp = t.accepted.join().unwrap().unwrap();
    let base = t.mr.remote().addr;
    // Each must be refused: below, straddling the end, far away, wrapping around.
    let probes = [
        (base.wrapping_sub(1), 2u32),
        (base + 4090, 16),
        (base + (1 << 40), 8),
        (u64::MAX - 3, 8),
    ];
    for (seq, (addr, len)) in probes.iter().enumerate() {
        let req = Request {
            op: ReqOp::Read,
            len: *len,
            seq: seq as u32,
            rkey: t.mr.rkey(),
            addr: *addr,
            arg0: 0,
            arg1: 0,
        };
        p.write_all(&req.encode()).unwrap();
        let r = read_response(&mut p);
        assert_eq!(r.nak, Some(NakCode::RemoteAccess), "probe {addr:#x}+{len}");
    }
    assert_eq!(t.ctx.stats().access_errors, probes.len() as u64);
}

/// A fake target: accepts the handshake, then hands the primary socket to `behave`.
fn fake_target(behave: impl FnOnce(TcpStream) + Send + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut p, _) = l.accept().unwrap();
        let (mut s, _) = l.accept().unwrap();
        let first = Hello::read_from(&mut p).unwrap();
        let (id, _) = parse_payload(&first.payload).unwrap();
        Hello::read_from(&mut s).unwrap();
        let accept = Hello::accept(Provider::Tcp, &payload(&id, None), b"");
        p.write_all(&accept.encode()).unwrap();
        behave(p);
        drop(s);
    });
    addr
}

fn initiator(
    addr: SocketAddr,
    timeout: Duration,
) -> (Context, rmem_transport::Cq, Qp, rmem_transport::Mr) {
    let ctx = ctx();
    let pd = ctx.alloc_pd().unwrap();
    let cq = ctx.create_cq(64).unwrap();
    let qp = ctx
        .connect(addr, &QpConfig::new(&pd, &cq).op_timeout(timeout), b"")
        .unwrap()
        .qp;
    let mr = pd.alloc_mr(8192, Access::all_remote()).unwrap();
    (ctx, cq, qp, mr)
}

#[test]
fn silent_peer_times_out_and_flushes_the_rest() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let addr = fake_target(move |p| {
        // Read requests, answer nothing, stay connected until the test ends.
        let _ = rx.recv_timeout(Duration::from_secs(20));
        drop(p);
    });
    let (_ctx, cq, qp, mr) = initiator(addr, Duration::from_millis(300));
    let s = [mr.sge(0, 64).unwrap()];
    let remote = rmem_transport::RemoteAddr {
        addr: 1 << 44,
        rkey: 1,
    };
    let start = Instant::now();
    qp.post_send(&[SendWr::read(1, &s, remote), SendWr::read(2, &s, remote)])
        .unwrap();
    let a = cq.wait_one(Some(Duration::from_secs(10))).unwrap();
    let b = cq.wait_one(Some(Duration::from_secs(10))).unwrap();
    let took = start.elapsed();
    assert_eq!((a.wr_id, a.status), (1, WcStatus::RetryExcErr));
    assert_eq!((b.wr_id, b.status), (2, WcStatus::WrFlushErr));
    assert!(
        took >= Duration::from_millis(250),
        "timed out too early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "timeout not bounded: {took:?}"
    );
    drop(tx);
}

#[test]
fn truncated_read_response_is_an_error_not_data() {
    let addr = fake_target(|mut p| {
        let mut b = [0u8; REQUEST_LEN];
        p.read_exact(&mut b).unwrap();
        let req = Request::decode(&b).unwrap();
        let resp = Response {
            kind: RespKind::ReadData,
            nak: None,
            len: req.len,
            seq: req.seq,
            value: 0,
        };
        p.write_all(&resp.encode()).unwrap();
        p.write_all(&[0xab; 100]).unwrap();
        // Close before the promised 4096 bytes.
    });
    let (_ctx, cq, qp, mr) = initiator(addr, Duration::from_secs(5));
    let s = [mr.sge(0, 4096).unwrap()];
    qp.post_send(&[SendWr::read(
        1,
        &s,
        rmem_transport::RemoteAddr {
            addr: 4096,
            rkey: 1,
        },
    )])
    .unwrap();
    let c = cq.wait_one(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(c.wr_id, 1);
    assert_ne!(c.status, WcStatus::Success);
    assert!(qp.is_error());
}

#[test]
fn response_for_another_request_is_a_bad_response() {
    let addr = fake_target(|mut p| {
        let mut b = [0u8; REQUEST_LEN];
        p.read_exact(&mut b).unwrap();
        let req = Request::decode(&b).unwrap();
        p.write_all(&Response::ack(req.seq + 7).encode()).unwrap();
        // Keeps the connection open a while, so the initiator fails on the response, not on EOF.
        std::thread::sleep(Duration::from_millis(500));
    });
    let (_ctx, cq, qp, mr) = initiator(addr, Duration::from_secs(5));
    let s = [mr.sge(0, 8).unwrap()];
    qp.post_send(&[SendWr::write(
        1,
        &s,
        rmem_transport::RemoteAddr {
            addr: 4096,
            rkey: 1,
        },
    )])
    .unwrap();
    let c = cq.wait_one(Some(Duration::from_secs(10))).unwrap();
    assert_eq!((c.wr_id, c.status), (1, WcStatus::BadRespErr));
}

#[test]
fn peer_process_exit_flushes_outstanding_work() {
    // The peer reads one request and exits without answering: its socket closes.
    let addr = fake_target(|mut p| {
        let mut b = [0u8; REQUEST_LEN];
        p.read_exact(&mut b).unwrap();
    });
    let (_ctx, cq, qp, mr) = initiator(addr, Duration::from_secs(30));
    let s = [mr.sge(0, 8).unwrap()];
    let r = rmem_transport::RemoteAddr {
        addr: 4096,
        rkey: 1,
    };
    let start = Instant::now();
    qp.post_send(&[SendWr::read(1, &s, r), SendWr::read(2, &s, r)])
        .unwrap();
    let a = cq.wait_one(Some(Duration::from_secs(10))).unwrap();
    let b = cq.wait_one(Some(Duration::from_secs(10))).unwrap();
    assert_eq!((a.wr_id, a.status), (1, WcStatus::RetryExcErr));
    assert_eq!((b.wr_id, b.status), (2, WcStatus::WrFlushErr));
    // Noticed from the closed socket, long before the 30 s operation timeout.
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn sender_sees_success_even_if_the_receiver_closes_at_its_completion() {
    for round in 0..50 {
        let t_ctx = ctx();
        let pd = t_ctx.alloc_pd().unwrap();
        let cq = t_ctx.create_cq(16).unwrap();
        let listener = t_ctx.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let receiver = std::thread::spawn(move || {
            let c = listener
                .accept(&QpConfig::new(&pd, &cq), b"", Some(Duration::from_secs(10)))
                .unwrap();
            let buf = pd.alloc_mr(64, Access::LOCAL_WRITE).unwrap();
            let s = [buf.sge(0, 64).unwrap()];
            c.qp.post_recv(&[rmem_transport::RecvWr::new(1, &s)])
                .unwrap();
            let wc = cq.wait_one(Some(Duration::from_secs(10))).unwrap();
            assert!(wc.is_ok());
            drop(c.qp); // tear down the moment the message is in
        });
        let (_c, cq, qp, mr) = initiator(addr, Duration::from_secs(5));
        let s = [mr.sge(0, 8).unwrap()];
        qp.post_send(&[SendWr::send(7, &s)]).unwrap();
        let wc = cq.wait_one(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(
            (wc.wr_id, wc.status),
            (7, WcStatus::Success),
            "round {round}"
        );
        receiver.join().unwrap();
    }
}

#[test]
fn a_payload_slower_to_send_than_the_timeout_is_not_a_late_answer() {
    // 32 MiB read by the peer 256 KiB every 10 ms (about 1.3 s): far more than the socket
    // buffers hold, so sending it takes several times the 300 ms timeout. The peer answers the
    // moment the last byte is in: it is not late, and the request must succeed.
    const LEN: usize = 32 << 20;
    let addr = fake_target(|mut p| {
        let mut h = [0u8; REQUEST_LEN];
        p.read_exact(&mut h).unwrap();
        let req = Request::decode(&h).unwrap();
        let mut left = req.len as usize;
        let mut buf = vec![0u8; 256 << 10];
        while left > 0 {
            let n = left.min(buf.len());
            p.read_exact(&mut buf[..n]).unwrap();
            left -= n;
            std::thread::sleep(Duration::from_millis(10));
        }
        let resp = Response {
            kind: RespKind::Ack,
            nak: None,
            len: 0,
            seq: req.seq,
            value: 0,
        };
        p.write_all(&resp.encode()).unwrap();
        // Stay connected until the initiator is done.
        std::thread::sleep(Duration::from_secs(3));
    });
    let ctx = ctx();
    let pd = ctx.alloc_pd().unwrap();
    let cq = ctx.create_cq(8).unwrap();
    let qp = ctx
        .connect(
            addr,
            &QpConfig::new(&pd, &cq).op_timeout(Duration::from_millis(300)),
            b"",
        )
        .unwrap()
        .qp;
    let mr = pd.alloc_mr(LEN, Access::all_remote()).unwrap();
    let s = [mr.sge(0, LEN).unwrap()];
    let remote = rmem_transport::RemoteAddr { addr: 0, rkey: 1 };
    let start = Instant::now();
    qp.post_send(&[SendWr::write(1, &s, remote)]).unwrap();
    let c = cq.wait_one(Some(Duration::from_secs(20))).unwrap();
    let took = start.elapsed();
    assert_eq!(
        (c.wr_id, c.status),
        (1, WcStatus::Success),
        "after {took:?}"
    );
    assert!(
        took > Duration::from_millis(600),
        "the payload went too fast to test anything: {took:?}"
    );
}

#[test]
fn a_payload_that_pauses_longer_than_the_timeout_still_lands() {
    // The target's operation timeout is 300 ms; the sender pauses 1 s in the middle of a
    // WRITE's payload (as a borrower held up in reclaim does), then sends the rest.
    let t = target_with(Duration::from_millis(300));
    let (mut p, _s) = raw_connect(t.addr);
    let qp = t.accepted.join().unwrap().unwrap();
    let req = to_region(&t.mr, ReqOp::Write, 1000, 0);
    p.write_all(&req.encode()).unwrap();
    p.write_all(&[7u8; 500]).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    p.write_all(&[9u8; 500]).unwrap();
    let resp = read_response(&mut p);
    assert_eq!((resp.kind, resp.seq, resp.nak), (RespKind::Ack, 0, None));
    assert!(!qp.is_error());
    let mut got = [0u8; 1000];
    t.mr.read_at(0, &mut got).unwrap();
    assert!(got[..500].iter().all(|&b| b == 7) && got[500..].iter().all(|&b| b == 9));
}
