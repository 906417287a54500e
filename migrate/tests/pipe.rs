//! The relay pipe over the tcp provider on loopback: control messages of any size, streams in
//! both directions with their bytes intact and in order, a slow reader holding the writer back
//! (not failing it), and a vanished peer reported as an error, not a hang.

use std::time::{Duration, Instant};

use rmem_migrate::pipe::{
    PipeError, PipeMemory, BULK_PIECE, CHUNK, MAX_CONTROL, MAX_STREAMS, SLOTS,
};
use rmem_migrate::Pipe;
use rmem_transport::{open, Context, OpenOptions, Provider, QpConfig, RemoteBuf};

const T: Duration = Duration::from_secs(20);

/// Two connected pipe ends (with their contexts, which must outlive them).
fn pair(stall: Duration) -> ((Pipe, Context), (Pipe, Context)) {
    let actx = open(&OpenOptions::new(Provider::Tcp)).unwrap();
    let apd = actx.alloc_pd().unwrap();
    let (asq, arq) = (actx.create_cq(256).unwrap(), actx.create_cq(256).unwrap());
    let amem = PipeMemory::new(&apd).unwrap();
    let l = actx.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr();
    let apriv = serde_json::to_vec(&amem.credit_word()).unwrap();
    let accepted = std::thread::spawn(move || {
        let cfg = QpConfig::new(&apd, &asq).recv_cq(&arq);
        let inc = l.incoming(Some(T)).unwrap();
        let peer: RemoteBuf = serde_json::from_slice(inc.private()).unwrap();
        let qp = inc.accept(&cfg, &apriv).unwrap();
        let pipe = amem.start(qp, asq, arq, peer, stall).unwrap();
        (pipe, actx)
    });
    let bctx = open(&OpenOptions::new(Provider::Tcp)).unwrap();
    let bpd = bctx.alloc_pd().unwrap();
    let (bsq, brq) = (bctx.create_cq(256).unwrap(), bctx.create_cq(256).unwrap());
    let bmem = PipeMemory::new(&bpd).unwrap();
    let cfg = QpConfig::new(&bpd, &bsq).recv_cq(&brq);
    let conn = bctx
        .connect(
            addr,
            &cfg,
            &serde_json::to_vec(&bmem.credit_word()).unwrap(),
        )
        .unwrap();
    let peer: RemoteBuf = serde_json::from_slice(&conn.private).unwrap();
    let b = bmem.start(conn.qp, bsq, brq, peer, stall).unwrap();
    (accepted.join().unwrap(), (b, bctx))
}

fn read_all(st: &rmem_migrate::Stream) -> Vec<u8> {
    let mut got = Vec::new();
    while let Some(d) = st.read(T).unwrap() {
        got.extend_from_slice(&d);
    }
    got
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 13) as u8)
        .collect()
}

#[test]
fn control_messages_arrive_whole_and_in_order() {
    let ((a, _ac), (b, _bc)) = pair(T);
    let big = pattern(3 * CHUNK + 17, 7);
    a.send_msg(b"hello").unwrap();
    a.send_msg(&[]).unwrap();
    a.send_msg(&big).unwrap();
    assert_eq!(b.recv_msg(T).unwrap(), b"hello");
    assert!(b.recv_msg(T).unwrap().is_empty());
    assert_eq!(b.recv_msg(T).unwrap(), big);
    // More messages than receives posted (and than the receiver queues): credit must come
    // back as the reader takes them.
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..(4 * SLOTS) {
                b.send_msg(format!("m{i}").as_bytes()).unwrap();
            }
        });
        for i in 0..(4 * SLOTS) {
            assert_eq!(a.recv_msg(T).unwrap(), format!("m{i}").as_bytes());
        }
    });
    assert!(matches!(
        a.recv_msg(Duration::from_millis(50)),
        Err(PipeError::Timeout(_))
    ));
}

#[test]
fn streams_carry_bytes_both_ways_while_control_flows() {
    let ((a, _ac), (b, _bc)) = pair(T);
    let up = pattern(5 << 20, 1);
    let down = pattern(3 << 20, 2);
    let sa = a.open_stream(false).unwrap();
    let sb = b.accept_stream(T).unwrap();
    let sa2 = a.open_stream(false).unwrap();
    let sb2 = b.accept_stream(T).unwrap();
    assert_eq!((sa.id(), sa2.id()), (sb.id(), sb2.id()));
    std::thread::scope(|s| {
        s.spawn(|| {
            sa.write_all(&up).unwrap();
            sa.finish().unwrap();
        });
        s.spawn(|| {
            sb.write_all(&down).unwrap();
            sb.finish().unwrap();
        });
        s.spawn(|| {
            sa2.write_all(b"second stream").unwrap();
            sa2.finish().unwrap();
            a.send_msg(b"control in between").unwrap();
        });
        let got_up = s.spawn(|| read_all(&sb));
        let got_down = read_all(&sa);
        assert_eq!(got_down, down);
        assert_eq!(got_up.join().unwrap(), up);
        assert_eq!(read_all(&sb2), b"second stream");
        assert_eq!(b.recv_msg(T).unwrap(), b"control in between");
    });
}

#[test]
fn a_slow_reader_holds_the_writer_back_without_failing_it() {
    let ((a, _ac), (b, _bc)) = pair(T);
    let sa = a.open_stream(true).unwrap();
    let sb = b.accept_stream(T).unwrap();
    // Far more than the receives and the stream backlog together.
    let data = pattern(40 << 20, 3);
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            sa.write_all(&data).unwrap();
            sa.finish().unwrap();
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !w.is_finished(),
            "the writer ran ahead of a reader that read nothing"
        );
        let got = read_all(&sb);
        assert!(got == data, "bytes differ after backpressure");
    });
    assert!(a.failure().is_none() && b.failure().is_none());
}

#[test]
fn a_vanished_peer_is_an_error_not_a_hang() {
    let ((a, actx), (b, bctx)) = pair(Duration::from_secs(3));
    let sa = a.open_stream(false).unwrap();
    let _sb = b.accept_stream(T).unwrap();
    drop(b);
    drop(bctx);
    let t = Instant::now();
    let err = loop {
        match sa.write_all(&pattern(1 << 20, 4)) {
            Ok(()) => assert!(t.elapsed() < T, "writes to a vanished peer kept succeeding"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            err,
            PipeError::Failed(_) | PipeError::Stalled(_) | PipeError::Transport(_)
        ),
        "{err}"
    );
    let e = a.recv_msg(T).unwrap_err();
    assert!(matches!(e, PipeError::Failed(_) | PipeError::Closed), "{e}");
    drop(actx);
}

#[test]
fn streams_are_bounded_and_the_pipe_survives_the_refusal() {
    let ((a, _ac), (b, _bc)) = pair(T);
    let mut open = Vec::new();
    for _ in 0..MAX_STREAMS {
        open.push(a.open_stream(false).unwrap());
        b.accept_stream(T).unwrap();
    }
    assert!(matches!(
        a.open_stream(false),
        Err(PipeError::TooManyStreams(n)) if n == MAX_STREAMS
    ));
    // Control messages still flow.
    a.send_msg(b"still here").unwrap();
    assert_eq!(b.recv_msg(T).unwrap(), b"still here");
}

#[test]
fn bulk_data_larger_than_a_control_message_arrives_whole() {
    let ((a, _ac), (b, _bc)) = pair(T);
    // Past the control limit: page hashes of a guest over 4 GiB.
    let big = pattern(MAX_CONTROL + BULK_PIECE / 2 + 5, 3);
    std::thread::scope(|s| {
        s.spawn(|| a.send_bulk(&big).unwrap());
        assert_eq!(b.recv_bulk(big.len(), T).unwrap(), big);
    });
    // Nothing at all for no bytes; a message after it is the next one.
    a.send_bulk(&[]).unwrap();
    a.send_msg(b"after").unwrap();
    assert!(b.recv_bulk(0, T).unwrap().is_empty());
    assert_eq!(b.recv_msg(T).unwrap(), b"after");
    // More than the receiver expects is refused, not appended.
    a.send_bulk(&pattern(100, 1)).unwrap();
    match b.recv_bulk(60, T) {
        Err(PipeError::Malformed(_)) => {}
        other => panic!("expected Malformed, got {other:?}"),
    }
}
