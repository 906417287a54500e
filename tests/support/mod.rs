//! What the command's integration tests share: an `rmem server` process on loopback.
#![allow(dead_code)] // each test file uses what it needs

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant};

/// [`wait_until`] for a condition that is awaited (a request to a donor, say).
#[path = "../../memserver/tests/support/wait.rs"]
mod wait;
#[allow(unused_imports)] // each test file uses what it needs
pub use wait::wait_until_async;

/// A donor process, killed when dropped, with its JSON start-up line.
pub struct Donor {
    pub child: Child,
    pub info: serde_json::Value,
}

impl Donor {
    /// An address from the start-up line: "listening", "nbd" or "admin".
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.info[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} address in {}", self.info))
            .parse()
            .unwrap()
    }
}

impl Drop for Donor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `rmem server --listen 127.0.0.1:0 --hugepages never --no-pressure --json` plus `args`,
/// with `secret` in RMEM_SECRET; returns once it printed its start-up line.
pub fn donor(secret: &str, args: &[&str]) -> Donor {
    let (child, info) = spawn_json(
        Command::new(env!("CARGO_BIN_EXE_rmem"))
            .args(["server", "--listen", "127.0.0.1:0", "--hugepages", "never"])
            .args(["--no-pressure", "--json"])
            .args(args)
            .env("RMEM_SECRET", secret),
    );
    Donor { child, info }
}

/// Starts `cmd` with its stdout piped and returns it with its first line, a JSON start-up line
/// (a daemon's `--json` "listening" line).
pub fn spawn_json(cmd: &mut Command) -> (Child, serde_json::Value) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info = serde_json::from_str(&line)
        .unwrap_or_else(|_| panic!("{cmd:?}: no JSON start-up line but {line:?}"));
    (child, info)
}

/// Polls `ready` every 10 ms until it holds; panics naming `what` once `timeout` has passed.
/// For readiness (a process listening, a figure reached), never a fixed sleep.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < timeout,
            "not ready after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The first line of `from` (a child's stdout or stderr) that contains `needle`. A thread of its
/// own reads `from`, and keeps draining it afterwards so the child never blocks on a full pipe.
/// Panics naming `what` when no such line comes within `timeout`, or `from` ends first.
pub fn wait_for_line(
    from: impl Read + Send + 'static,
    needle: &str,
    what: &str,
    timeout: Duration,
) -> String {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            // Once the line was found nobody listens: the rest is read and dropped.
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => panic!("not ready after {timeout:?}: {what}"),
            Err(RecvTimeoutError::Disconnected) => panic!("not ready: {what} (the output ended)"),
        }
    }
}
