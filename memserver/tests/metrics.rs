//! The donor's `/metrics` after a known history, against the exposition recorded in
//! `fixtures/donor_metrics.prom` from the hand-written renderer: every family keeps its HELP
//! and TYPE, every sample its name, labels and value. Guest scripts and dashboards read these
//! lines, so any difference fails here first.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod support;

use support::client;
use support::exposition::{assert_same, Exposition};

/// Status line and headers, then the body, of a bare HTTP/1.1 GET.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: rmem\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("headers end");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (head.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_matches_the_recorded_exposition() {
    let d = support::donor_with(8, |c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = d.admin.expect("admin endpoint");

    // A history that leaves most figures at a distinct known value: 3 lent, 1 given back,
    // 2 retired; 4 KiB written, 8 KiB read; one refused request and one bad admin signature.
    let c = Arc::new(client(d.addr, "alice").await);
    let slabs = c.alloc(3).await.unwrap();
    let (c2, s) = (c.clone(), slabs.clone());
    tokio::task::spawn_blocking(move || {
        c2.write(&s[0], 0, &[7u8; 4096]).unwrap();
        let mut back = vec![0u8; 8192];
        c2.read(&s[1], 0, &mut back).unwrap();
    })
    .await
    .unwrap();
    c.free(&[slabs[2].slab]).await.unwrap();
    assert!(c.free(&[9999]).await.is_err(), "freeing a slab not held");
    assert_eq!(d.control.shrink(2).retired, 2);
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let body = br#"{"slabs":1}"#;
    let req = format!(
        "POST /shrink HTTP/1.1\r\nHost: rmem\r\nAuthorization: nonsense\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");

    let (head, text) = get(admin, "/metrics").await;
    // Prometheus' text format 0.0.4, as before; only the charset is now said.
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    let recorded = Exposition::parse(include_str!("fixtures/donor_metrics.prom"));
    assert_same(&recorded, &Exposition::parse(&text));
}
