//! Commands against a peer that accepts the TCP connection and then never says a word: each
//! gives up within its deadline with exit status 5 and says it timed out.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Accepts connections and holds them open, silent, for the life of the test process.
fn silent_peer() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    addr
}

/// Runs rmem; kills it and fails if it is still running after `limit` (a hang is the bug).
fn rmem_within(args: &[&str], limit: Duration) -> (Output, Duration) {
    let t = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args(args)
        .env("RMEM_SECRET", "a shared secret for tests")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => (out.unwrap(), t.elapsed()),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("rmem {args:?} still running after {limit:?}");
        }
    }
}

fn assert_timed_out(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains(what), "{err}");
}

#[test]
fn swap_up_gives_up_on_a_silent_donor() {
    let addr = silent_peer().to_string();
    let dir = std::env::temp_dir().join(format!("rmem-peer-swap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let args = [
        "swap",
        "up",
        "--size",
        "64M",
        "--no-mlock",
        "--donor",
        &addr,
        "--connect-timeout",
        "1",
        "--run-dir",
        dir.to_str().unwrap(),
    ];
    let (out, took) = rmem_within(&args, Duration::from_secs(20));
    assert_timed_out(&out, &addr);
    assert_timed_out(&out, "check that the donor runs");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn perf_alloc_gives_up_on_a_silent_donor() {
    let addr = silent_peer().to_string();
    let args = ["perf", "alloc", &addr, "--connect-timeout", "1"];
    let (out, took) = rmem_within(&args, Duration::from_secs(20));
    assert_timed_out(&out, &addr);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// The transport's hello wait (10 s) is not configurable from here; the exit status and the
/// message are what this checks.
#[test]
fn perf_client_gives_up_on_a_silent_server() {
    let addr = silent_peer().to_string();
    let args = ["perf", "client", &addr, "--iters", "10", "--warmup", "0"];
    let (out, _) = rmem_within(&args, Duration::from_secs(40));
    assert_timed_out(&out, "receive connection hello");
}
