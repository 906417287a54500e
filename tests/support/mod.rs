//! What the command's integration tests share: an `rmem server` process on loopback.
#![allow(dead_code)] // each test file uses what it needs

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args(["server", "--listen", "127.0.0.1:0", "--hugepages", "never"])
        .args(["--no-pressure", "--json"])
        .args(args)
        .env("RMEM_SECRET", secret)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info = serde_json::from_str(&line).expect("start-up line");
    Donor { child, info }
}
