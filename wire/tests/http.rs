//! The serve loop's bounds: slow or silent clients are closed at the header deadline, and
//! connections beyond the limit wait until one ends, while well-behaved clients are served.

use std::time::{Duration, Instant};

use axum::routing::get;
use rmem_wire::http::{serve_with, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GET: &[u8] = b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n";

async fn start(limits: Limits) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = axum::Router::new().route("/hello", get(|| async { "hi" }));
    tokio::spawn(serve_with(l, app, limits));
    addr
}

/// Reads until the server closes; how long that took. Panics after `limit`.
async fn closed_after(c: &mut TcpStream, limit: Duration) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, c.read(&mut buf)).await {
            Err(_) => panic!("still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return t.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// One request on a fresh connection; the response's text.
async fn hello(addr: std::net::SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(GET).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with("hi") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before the response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

fn limits(connections: usize, header_read_ms: u64) -> Limits {
    Limits {
        connections,
        header_read: Duration::from_millis(header_read_ms),
    }
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_closed_at_the_deadline() {
    let addr = start(limits(16, 300)).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    // A byte every 100 ms: each arrives well within any per-read timeout, the headers never end.
    let trickle = async {
        for b in b"GET /hello HTTP/1.1\r\nhost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" {
            if c.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), trickle).await;
    let took = closed_after(&mut c, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(hello(addr).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let addr = start(limits(16, 300)).await;
    // Connected, nothing sent.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    closed_after(&mut silent, Duration::from_secs(10)).await;
    // Served once, then idle on keep-alive.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(GET).await.unwrap();
    closed_after(&mut idle, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_one() {
    let addr = start(limits(2, 1000)).await;
    let _a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    // Both slots are held by silent clients: the third is answered only once one of them is
    // closed at the header deadline, never before.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), hello(addr))
        .await
        .expect("the waiting client was never served");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "served past the limit after {:?}",
        t.elapsed()
    );
}
