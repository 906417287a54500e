//! A donor process killed in the middle of a run: the client must fail promptly with the
//! "peer" exit status, not hang or report success.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

#[test]
fn client_fails_promptly_when_the_server_process_is_killed() {
    // -v: the server logs "client connected" once a client's queue pair is up.
    let mut server = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args(["perf", "server", "--listen", "127.0.0.1:0", "--json", "-v"])
        .env("RMEM_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).expect("listening line");
    let addr = v["listening"].as_str().unwrap().to_string();

    // Far more iterations than can finish before the kill.
    let client = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "perf",
            "client",
            &addr,
            "--op",
            "read",
            "-s",
            "64K",
            "--bw",
            "-n",
            "100000000",
            "--json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client");
    // Killed only once the client is connected and running, however slow the host.
    support::wait_for_line(
        server.stderr.take().unwrap(),
        "client connected",
        "the client connected to the perf server",
        Duration::from_secs(30),
    );
    server.kill().unwrap();
    server.wait().unwrap();
    let killed = Instant::now();
    let out = client.wait_with_output().unwrap();
    let took = killed.elapsed();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(10),
        "client took {took:?} to notice"
    );
}
