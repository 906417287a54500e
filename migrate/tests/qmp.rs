//! The QMP client against a real QEMU (no guest: `-machine none`) and against sockets that are
//! not QEMU.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use rmem_migrate::{Qmp, QmpError};

mod support;

use support::{sock, Qemu};

#[test]
fn drives_a_real_qemu() {
    let path = sock("real");
    let _qemu = Qemu::start(&path, &[]);
    let mut q = Qmp::connect(&path, Duration::from_secs(10)).unwrap();
    assert!(q.version().0 >= 5, "{:?}", q.version());
    let st = q.execute("query-status", None).unwrap();
    assert!(st.get("status").and_then(|s| s.as_str()).is_some(), "{st}");
    match q.execute("no-such-command", None) {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("{other:?}"),
    }
    // Still usable after a refused command; arguments are passed through.
    let caps = q
        .execute(
            "migrate-set-capabilities",
            Some(serde_json::json!({"capabilities": [
                {"capability": "x-ignore-shared", "state": true}
            ]})),
        )
        .unwrap();
    assert_eq!(caps, serde_json::json!({}));
    let got = q.execute("query-migrate-capabilities", None).unwrap();
    assert!(
        got.as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == "x-ignore-shared" && c["state"] == true),
        "{got}"
    );
    q.execute("quit", None).unwrap();
    assert!(matches!(
        q.execute("query-status", None),
        Err(QmpError::Closed)
    ));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_socket_that_is_not_qemu_is_named_as_such() {
    for (name, greeting) in [
        ("ssh", &b"SSH-2.0-OpenSSH_9.2\r\n"[..]),
        ("json", &b"{\"hello\": 1}\n"[..]),
        ("silent", &b""[..]),
    ] {
        let path = sock(name);
        let l = UnixListener::bind(&path).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(greeting).unwrap();
            // Stay connected past the client's deadline.
            std::thread::sleep(Duration::from_millis(600));
        });
        let t = Instant::now();
        match Qmp::connect(&path, Duration::from_millis(300)) {
            Err(QmpError::NotQemu(p)) if name != "silent" => {
                assert!(p.contains("rmem-qmp"), "{p}")
            }
            Err(e @ QmpError::NoGreeting { .. }) if name == "silent" => {
                assert!(e.to_string().contains("one client at a time"), "{e}")
            }
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name}: accepted as QEMU"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{name}: {:?}",
            t.elapsed()
        );
        peer.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn no_socket_says_which() {
    let e = Qmp::connect(Path::new("/nonexistent/qmp.sock"), Duration::from_secs(1))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/qmp.sock"), "{e}");
}

/// A fake monitor: greets, answers `qmp_capabilities`, then runs `script` on the connection.
fn fake_monitor(
    name: &str,
    script: impl FnOnce(&mut std::os::unix::net::UnixStream) + Send + 'static,
) -> (std::path::PathBuf, std::thread::JoinHandle<()>) {
    use std::io::{BufRead, BufReader};
    let path = sock(name);
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(
            b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}}}}\n",
        )
        .unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("qmp_capabilities"), "{line}");
        s.write_all(b"{\"return\": {}, \"id\": 1}\n").unwrap();
        script(&mut s);
    });
    (path, t)
}

#[test]
fn wait_event_sees_an_event_split_across_reads_and_keeps_the_others() {
    let (path, peer) = fake_monitor("events", |s| {
        s.write_all(
            b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n",
        )
        .unwrap();
        // The wanted event arrives in two pieces, the second after the client's first wait
        // has run out: nothing of the first piece may be lost.
        s.write_all(b"{\"event\": \"MIGRATION\", \"data\": {\"sta")
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(b"tus\": \"pre-switchover\"}}\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
    let pre = |m: &serde_json::Value| m["data"]["status"] == "pre-switchover";
    let t = Instant::now();
    assert_eq!(q.wait_event(pre, Duration::from_millis(100)).unwrap(), None);
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    let got = q.wait_event(pre, Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(got["event"], "MIGRATION");
    // The STOP that came first is still there, and a second wait does not see the taken one.
    let stop = q
        .wait_event(|m| m["event"] == "STOP", Duration::ZERO)
        .unwrap()
        .unwrap();
    assert_eq!(stop["timestamp"]["microseconds"], 2);
    assert_eq!(q.wait_event(pre, Duration::from_millis(50)).unwrap(), None);
    peer.join().unwrap();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn wait_event_reports_a_monitor_that_closes() {
    let (path, peer) = fake_monitor("closes", |s| {
        s.write_all(b"{\"event\": \"MIGRA").unwrap();
    });
    let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
    peer.join().unwrap();
    match q.wait_event(|_| true, Duration::from_secs(5)) {
        Err(QmpError::Closed) => {}
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_file(&path);
}
