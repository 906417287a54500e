//! The `tcp` provider's listener against hostile peers speaking the raw wire protocol: nothing a
//! peer sends runs before the application accepts it, and slow or numerous peers cannot keep
//! others out.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rmem_transport::exchange::{Hello, Kind, REJECT_REFUSED};
use rmem_transport::tcp::wire::{request_hello, ReqOp, Request, Role, REQUEST_LEN};
use rmem_transport::{
    open, Access, Context, Error, Incoming, ListenLimits, Listener, Mr, OpenOptions, Pd, Provider,
    QpConfig,
};

fn ctx() -> Context {
    open(&OpenOptions::new(Provider::Tcp)).unwrap()
}

fn hello(role: Role, id: [u8; 16], private: &[u8]) -> Vec<u8> {
    request_hello(&id, role, private)
}

fn write_req(mr: &Mr, seq: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Request {
        op: ReqOp::Write,
        len: data.len() as u32,
        seq,
        rkey: mr.rkey(),
        addr: mr.remote().addr,
        arg0: 0,
        arg1: 0,
    }
    .encode()
    .to_vec();
    assert_eq!(v.len(), REQUEST_LEN);
    v.extend_from_slice(data);
    v
}

/// A hostile connection: its hello with `token`, then a WRITE of `data` into `mr` pipelined
/// behind it before any answer, then the secondary half. Returns the primary socket.
fn pipelined_write(addr: SocketAddr, token: &[u8], mr: &Mr, data: &[u8]) -> TcpStream {
    let id = [0x5a; 16];
    let mut p = TcpStream::connect(addr).unwrap();
    let mut bytes = hello(Role::Primary, id, token);
    bytes.extend(write_req(mr, 0, data));
    p.write_all(&bytes).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello(Role::Secondary, id, b"")).unwrap();
    // The secondary stays open for as long as the test runs.
    std::mem::forget(s);
    p.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    p
}

fn contents(mr: &Mr) -> Vec<u8> {
    let mut v = vec![0u8; mr.len()];
    mr.read_at(0, &mut v).unwrap();
    v
}

fn first_reply(p: &mut TcpStream) -> Hello {
    Hello::read_from(p).expect("a well-formed reply hello")
}

struct Side {
    ctx: Context,
    pd: Pd,
    mr: Mr,
    listener: Listener,
}

fn side(limits: ListenLimits) -> Side {
    let ctx = ctx();
    let pd = ctx.alloc_pd().unwrap();
    let mr = pd.alloc_mr(4096, Access::all_remote()).unwrap();
    let listener = ctx
        .listen_with("127.0.0.1:0".parse().unwrap(), limits)
        .unwrap();
    Side {
        ctx,
        pd,
        mr,
        listener,
    }
}

/// A peer connecting to `addr` with `private` from its own thread (5 s connect timeout); the
/// thread returns how long the connect took.
fn connect_in_thread(
    addr: SocketAddr,
    private: &'static [u8],
) -> std::thread::JoinHandle<Result<Duration, Error>> {
    std::thread::spawn(move || {
        let peer = ctx();
        let (ppd, pcq) = (peer.alloc_pd().unwrap(), peer.create_cq(16).unwrap());
        let cfg = QpConfig::new(&ppd, &pcq).connect_timeout(Duration::from_secs(5));
        let start = Instant::now();
        peer.connect(addr, &cfg, private).map(|_| start.elapsed())
    })
}

fn next(l: &Listener) -> Incoming {
    l.incoming(Some(Duration::from_secs(10)))
        .expect("a request")
}

#[test]
fn a_refused_request_never_runs_even_pipelined_behind_its_hello() {
    let t = side(ListenLimits::default());
    let mut p = pipelined_write(t.listener.local_addr(), b"wrong token", &t.mr, b"PWNED!!!");
    let req = next(&t.listener);
    assert_eq!(req.private(), b"wrong token");
    // Give a target thread, if one were running, ample time to execute the WRITE (not a wait
    // for readiness: a window in which nothing may happen).
    std::thread::sleep(Duration::from_millis(300));
    req.reject();
    let reply = first_reply(&mut p);
    assert_eq!((reply.kind, reply.reason), (Kind::Reject, REJECT_REFUSED));
    // Nothing follows the refusal: no response to the WRITE, just the end of the stream.
    let mut rest = Vec::new();
    let _ = p.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{} bytes after the refusal", rest.len());
    assert_eq!(contents(&t.mr), vec![0u8; 4096], "the WRITE landed");
    assert_eq!(t.ctx.stats().requests, 0, "a request was executed");
}

#[test]
fn pipelined_requests_wait_for_the_accept_and_the_answer_comes_first() {
    let t = side(ListenLimits::default());
    let mut p = pipelined_write(t.listener.local_addr(), b"good token", &t.mr, b"in order");
    let req = next(&t.listener);
    // A window in which the pipelined WRITE may not run (nothing to poll for).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(contents(&t.mr)[..8], [0u8; 8], "ran before the accept");
    let cq = t.ctx.create_cq(16).unwrap();
    let _qp = req.accept(&QpConfig::new(&t.pd, &cq), b"").unwrap();
    assert_eq!(first_reply(&mut p).kind, Kind::Accept);
    let start = Instant::now();
    while &contents(&t.mr)[..8] != b"in order" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the accepted WRITE never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_refused_connect_reports_the_refusal_and_the_listener_goes_on() {
    let t = side(ListenLimits::default());
    let addr = t.listener.local_addr();
    let peer = ctx();
    let (ppd, pcq) = (peer.alloc_pd().unwrap(), peer.create_cq(16).unwrap());
    let cfg = QpConfig::new(&ppd, &pcq);
    let c2 = cfg.clone();
    let p2 = peer.clone();
    let refused = std::thread::spawn(move || p2.connect(addr, &c2, b"wrong").err());
    let req = next(&t.listener);
    drop(req); // dropping refuses too
    match refused.join().unwrap() {
        Some(Error::Handshake(m)) => assert!(m.contains("refused"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let ok = std::thread::spawn(move || peer.connect(addr, &cfg, b"right").map(|c| c.private));
    let req = next(&t.listener);
    assert_eq!(req.private(), b"right");
    let cq = t.ctx.create_cq(16).unwrap();
    let _qp = req.accept(&QpConfig::new(&t.pd, &cq), b"welcome").unwrap();
    assert_eq!(ok.join().unwrap().unwrap(), b"welcome");
}

/// Connects (before it returns: a peer connected after it comes after it), then sends one byte
/// of a hello every `every` on a thread of its own, until the socket breaks.
fn trickler(addr: SocketAddr, every: Duration) -> std::thread::JoinHandle<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    std::thread::spawn(move || {
        let bytes = hello(Role::Primary, [7; 16], b"");
        for b in bytes.iter().cycle() {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(every);
            if start.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        start.elapsed()
    })
}

#[test]
fn slow_and_idle_peers_do_not_hold_up_a_legitimate_one() {
    let limits = ListenLimits {
        hello_timeout: Duration::from_millis(1500),
        ..ListenLimits::default()
    };
    let t = side(limits);
    let addr = t.listener.local_addr();
    let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let trickle: Vec<_> = (0..4)
        .map(|_| trickler(addr, Duration::from_millis(200)))
        .collect();
    let client = connect_in_thread(addr, b"legit");
    let cq = t.ctx.create_cq(16).unwrap();
    let accepted = t
        .listener
        .accept(
            &QpConfig::new(&t.pd, &cq),
            b"",
            Some(Duration::from_secs(10)),
        )
        .expect("the legitimate peer is accepted");
    assert_eq!(accepted.private, b"legit");
    let took = client.join().unwrap().expect("the legitimate connect");
    assert!(took < Duration::from_secs(5), "connect took {took:?}");
    // The listener keeps working while it is called, so the stalled hellos age out.
    let _ = t.listener.incoming(Some(Duration::from_millis(2500)));
    for th in trickle {
        let lasted = th.join().unwrap();
        assert!(
            lasted < Duration::from_secs(10),
            "a trickling hello was held {lasted:?}"
        );
    }
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "an idle connection was kept past its hello deadline"
        );
    }
}

#[test]
fn one_address_cannot_take_every_place() {
    let limits = ListenLimits {
        max_per_source: 4,
        ..ListenLimits::default()
    };
    let t = side(limits);
    let addr = t.listener.local_addr();
    let flood: Vec<TcpStream> = (0..12).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Let the listener take the flood off its backlog.
    let _ = t.listener.incoming(Some(Duration::from_millis(300)));
    let closed = flood
        .into_iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut b = [0u8; 1];
            matches!((&*s).read(&mut b), Ok(0))
        })
        .count();
    assert_eq!(
        closed, 8,
        "beyond 4 per address, connections are closed at once"
    );
    // Another address still gets in.
    let from = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    from.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    from.connect(&addr.into()).unwrap();
    let mut p: TcpStream = from.into();
    p.write_all(&hello(Role::Primary, [9; 16], b"other"))
        .unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.connect(&addr.into()).unwrap();
    let mut s: TcpStream = s.into();
    s.write_all(&hello(Role::Secondary, [9; 16], b"")).unwrap();
    let req = next(&t.listener);
    assert_eq!(req.private(), b"other");
    assert_eq!(req.peer_addr().ip().to_string(), "127.0.0.2");
}

#[test]
fn a_peer_that_dies_before_its_answer_fails_alone() {
    let t = side(ListenLimits::default());
    let addr = t.listener.local_addr();
    let id = [3; 16];
    let mut p = TcpStream::connect(addr).unwrap();
    p.write_all(&hello(Role::Primary, id, b"gone")).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello(Role::Secondary, id, b"")).unwrap();
    let req = next(&t.listener);
    // Reset both halves before the answer goes out.
    for sock in [p, s] {
        socket2::SockRef::from(&sock)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    // Makes it likely that the resets arrive before the answer; both orders are checked below,
    // so this is no readiness wait.
    std::thread::sleep(Duration::from_millis(100));
    let cq = t.ctx.create_cq(16).unwrap();
    let cfg = QpConfig::new(&t.pd, &cq);
    if let Ok(qp) = req.accept(&cfg, b"") {
        // The answer may fit in the socket before the reset is seen: then the queue pair fails.
        let start = Instant::now();
        while !qp.is_error() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "a dead peer's queue pair lives"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // The listener serves the next peer.
    let ok = connect_in_thread(addr, b"next");
    let c = t
        .listener
        .accept(&cfg, b"", Some(Duration::from_secs(10)))
        .expect("the next peer");
    assert_eq!(c.private, b"next");
    ok.join().unwrap().unwrap();
}

#[test]
fn a_stalling_peer_cannot_keep_a_prompt_one_from_its_own_address_out() {
    let limits = ListenLimits {
        max_per_source: 8,
        ..ListenLimits::default()
    };
    let t = side(limits);
    let addr = t.listener.local_addr();
    // Eight half-sent hellos from 127.0.0.1 fill that address's places...
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"RMEX").unwrap();
            s
        })
        .collect();
    let _ = t.listener.incoming(Some(Duration::from_millis(200)));
    // ...and a prompt peer from the same address still gets in, at the oldest one's expense.
    let client = connect_in_thread(addr, b"prompt");
    let cq = t.ctx.create_cq(16).unwrap();
    let c = t
        .listener
        .accept(
            &QpConfig::new(&t.pd, &cq),
            b"",
            Some(Duration::from_secs(5)),
        )
        .expect("the prompt peer is accepted");
    assert_eq!(c.private, b"prompt");
    client.join().unwrap().expect("the prompt peer's connect");
    let closed = stalled
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            matches!((&**s).read(&mut [0u8; 1]), Ok(0))
        })
        .count();
    assert_eq!(
        closed, 2,
        "the two oldest stalled hellos made room for the pair"
    );
}
