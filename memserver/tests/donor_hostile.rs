//! The donor's listeners against hostile peers: a data connection without its session's token
//! reaches nothing, a flood of `reconnect`s costs the donor no threads or descriptors, and idle
//! or numerous control connections are bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_memserver::{ByteSize, ErrorCode, ServerConfig};
use rmem_swapclient::ClientConfig;
use rmem_transport::exchange::{Hello, Kind};
use rmem_transport::tcp::wire::{request_hello, ReqOp, Request, Role};
use rmem_wire::protocol::{read_frame, write_msg, ClientMsg, ServerMsg, VERSION};

mod support;

use support::{client, SECRET};

async fn donor(slabs: u64) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    donor_with(slabs, |_| {}).await
}

async fn donor_with(
    slabs: u64,
    tune: impl FnOnce(&mut ServerConfig),
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let d = support::donor_with(slabs, tune).await;
    (d.addr, d.stop)
}

fn hello(role: Role, private: &[u8]) -> Vec<u8> {
    request_hello(&[0x77; 16], role, private)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_connection_with_a_wrong_token_reaches_nothing() {
    let (addr, _stop) = donor(2).await;
    let alice = Arc::new(client(addr, "alice").await);
    let slab = alice.alloc(1).await.unwrap()[0];
    let a = alice.clone();
    tokio::task::spawn_blocking(move || a.write(&slab, 0, b"alice's data").unwrap())
        .await
        .unwrap();
    let data_addr = alice.data_addr();
    // A peer that knows the data listener and alice's descriptor, but not a token: a WRITE
    // and a READ pipelined behind a hello with a made-up token.
    let reply = tokio::task::spawn_blocking(move || {
        let mut p = TcpStream::connect(data_addr).unwrap();
        let mut bytes = hello(Role::Primary, "00".repeat(16).as_bytes());
        for (seq, op, len) in [(0, ReqOp::Write, 12u32), (1, ReqOp::Read, 12)] {
            bytes.extend(
                Request {
                    op,
                    len,
                    seq,
                    rkey: slab.remote.rkey,
                    addr: slab.remote.addr,
                    arg0: 0,
                    arg1: 0,
                }
                .encode(),
            );
            if op == ReqOp::Write {
                bytes.extend_from_slice(b"overwritten!");
            }
        }
        p.write_all(&bytes).unwrap();
        let mut s = TcpStream::connect(data_addr).unwrap();
        s.write_all(&hello(Role::Secondary, b"")).unwrap();
        p.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = Vec::new();
        let _ = p.read_to_end(&mut all);
        all
    })
    .await
    .unwrap();
    let h = Hello::read_from(reply.as_slice()).expect("an answer");
    assert_eq!(h.kind, Kind::Reject);
    assert_eq!(reply.len(), h.encode().len(), "data followed the refusal");
    let a = alice.clone();
    let back = tokio::task::spawn_blocking(move || {
        let mut b = [0u8; 12];
        a.read(&slab, 0, &mut b).unwrap();
        b
    })
    .await
    .unwrap();
    assert_eq!(&back, b"alice's data");
}

fn threads_and_fds() -> (usize, usize) {
    let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    (threads, fds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_flood_costs_no_threads_descriptors_or_other_clients_time() {
    let (addr, _stop) = donor(8).await;
    let bob = client(addr, "bob").await;
    bob.alloc(1).await.unwrap();
    let before = threads_and_fds();
    // An authenticated session that asks for 600 data connections and makes none.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let nonce_c = rmem_wire::auth::nonce();
    write_msg(
        &mut s,
        &ClientMsg::Hello {
            version: VERSION,
            client: "flood".into(),
            nonce: nonce_c.clone(),
        },
    )
    .await
    .unwrap();
    let nonce_s = match serde_json::from_slice(&read_frame(&mut s).await.unwrap()).unwrap() {
        ServerMsg::Challenge { nonce, .. } => nonce,
        m => panic!("{m:?}"),
    };
    let mac = rmem_wire::auth::client_proof(SECRET, &nonce_s, &nonce_c, "flood");
    write_msg(&mut s, &ClientMsg::Auth { mac }).await.unwrap();
    let m: ServerMsg = serde_json::from_slice(&read_frame(&mut s).await.unwrap()).unwrap();
    assert!(matches!(m, ServerMsg::Welcome { .. }), "{m:?}");
    let mut tokens = Vec::new();
    for id in 0..600 {
        write_msg(&mut s, &ClientMsg::Reconnect { id, lane: 0 })
            .await
            .unwrap();
        match serde_json::from_slice(&read_frame(&mut s).await.unwrap()).unwrap() {
            ServerMsg::Reconnect { data_token, .. } => tokens.push(data_token),
            m => panic!("{m:?}"),
        }
    }
    // Lanes past the bound are refused, not given a token.
    write_msg(&mut s, &ClientMsg::Reconnect { id: 600, lane: 16 })
        .await
        .unwrap();
    match serde_json::from_slice(&read_frame(&mut s).await.unwrap()).unwrap() {
        ServerMsg::Error {
            code: ErrorCode::TooMany,
            ..
        } => {}
        m => panic!("lane 16 got {m:?}"),
    }
    let after = threads_and_fds();
    assert!(
        after.0 <= before.0 + 2 && after.1 <= before.1 + 4,
        "600 reconnects: threads and fds {before:?} -> {after:?}"
    );
    // Another client is served at once.
    let start = Instant::now();
    bob.alloc(1).await.unwrap();
    let carol = client(addr, "carol").await;
    carol.alloc(1).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "others waited {:?}",
        start.elapsed()
    );
    // Only the newest few tokens are live: an old one is refused.
    let cfg = ClientConfig::new(addr, SECRET.to_vec());
    let data_addr = carol.data_addr();
    let old = tokens[0].clone();
    let refused = tokio::task::spawn_blocking(move || {
        let ctx = rmem_transport::open(&rmem_transport::OpenOptions::new(cfg.provider)).unwrap();
        let pd = ctx.alloc_pd().unwrap();
        let cq = ctx.create_cq(4).unwrap();
        ctx.connect(
            data_addr,
            &rmem_transport::QpConfig::new(&pd, &cq),
            old.as_bytes(),
        )
        .err()
    })
    .await
    .unwrap();
    assert!(
        matches!(refused, Some(rmem_transport::Error::Handshake(ref m)) if m.contains("refused")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_connections_are_bounded_per_address_and_idle_ones_time_out() {
    let (addr, _stop) = donor_with(2, |c| {
        c.control.max_per_source = 4;
        c.control.handshake_timeout_ms = 2000;
    })
    .await;
    let start = Instant::now();
    let conns: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Each connection is watched by its own thread: when did the donor close it?
    let watchers: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
                let mut b = [0u8; 1];
                let _ = s.read(&mut b);
                start.elapsed()
            })
        })
        .collect();
    let ended = tokio::task::spawn_blocking(move || {
        watchers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let at_once = ended
        .iter()
        .filter(|t| **t < Duration::from_millis(1500))
        .count();
    assert_eq!(
        at_once, 6,
        "beyond 4 per address, closed at once: {ended:?}"
    );
    assert!(
        ended.iter().all(|t| *t < Duration::from_secs(6)),
        "idle connections outlived the handshake deadline: {ended:?}"
    );
    // The places are free again.
    let c = client(addr, "after").await;
    assert_eq!(c.alloc(1).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_donor_applies_its_nbd_limits_from_the_config() {
    let d = support::donor_with(4, |c| {
        c.nbd_listen = "127.0.0.1:0".parse().unwrap();
        c.exports = vec![rmem_memserver::ExportConfig {
            name: "x".into(),
            size: ByteSize(1 << 20),
        }];
        c.nbd.max_connections_per_ip = 1;
    })
    .await;
    let nbd = d.nbd.expect("an NBD listener");
    let greeted = |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 18];
        s.read_exact(&mut b).is_ok()
    };
    let first = TcpStream::connect(nbd).unwrap();
    let second = TcpStream::connect(nbd).unwrap();
    let (a, b) = tokio::task::spawn_blocking(move || {
        let keep = first.try_clone().unwrap();
        (greeted(first), greeted(second), keep)
    })
    .await
    .map(|(a, b, _keep)| (a, b))
    .unwrap();
    assert!(a, "the first connection is served");
    assert!(
        !b,
        "a second one from the same address is closed (nbd.max_connections_per_ip = 1)"
    );
}
