//! What the donor's integration tests share: an in-process donor on loopback and a client.
#![allow(dead_code)] // each test file uses what it needs

use std::net::SocketAddr;
use std::time::Duration;

use rmem_memserver::{ByteSize, Control, Server, ServerConfig};
use rmem_swapclient::{Client, ClientConfig};
use rmem_transport::HugePages;

pub mod exposition;

mod wait;

/// For readiness, never a fixed sleep.
#[allow(unused_imports)] // each test file uses what it needs
pub use wait::wait_until_async as wait_until;

pub const SECRET: &[u8] = b"a shared secret for tests";

/// A running donor; it stops when `stop` is dropped or sent.
pub struct TestDonor {
    pub addr: SocketAddr,
    pub nbd: Option<SocketAddr>,
    /// The HTTP admin endpoint, when `tune` set `admin_listen`.
    pub admin: Option<SocketAddr>,
    pub control: Control,
    pub stop: tokio::sync::oneshot::Sender<()>,
    /// The task serving it: done once every session has ended.
    pub task: tokio::task::JoinHandle<()>,
}

impl TestDonor {
    /// Stops the donor and returns once it has stopped: every session ended, its queue pair
    /// shut down and its slabs deregistered. With `shutdown_grace_secs = 0` that is a dead host
    /// as far as a borrower can tell.
    pub async fn kill(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the donor did not stop within 30 s")
            .expect("the donor's task");
    }
}

/// A donor of `slabs` 1 MiB slabs, lease 30 s; pressure reclaim off (the test host's own
/// pressure must not shrink it) unless `tune` turns it on.
pub async fn donor_with(slabs: u64, tune: impl FnOnce(&mut ServerConfig)) -> TestDonor {
    let mut cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        size: ByteSize(slabs << 20),
        slab_size: ByteSize(1 << 20),
        lease_secs: 30,
        hugepages: HugePages::Never,
        ..Default::default()
    };
    cfg.reclaim.pressure = false;
    tune(&mut cfg);
    let server = Server::bind(cfg, SECRET.to_vec()).await.unwrap();
    let (addr, nbd, admin, control) = (
        server.local_addr(),
        server.nbd_addr(),
        server.admin_addr(),
        server.control(),
    );
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    TestDonor {
        addr,
        nbd,
        admin,
        control,
        stop,
        task,
    }
}

pub async fn client(addr: SocketAddr, name: &str) -> Client {
    let mut c = ClientConfig::new(addr, SECRET.to_vec());
    c.name = name.into();
    Client::connect(c).await.unwrap()
}

/// A donor with `lease_secs` leases: its address and its stop handle.
pub async fn donor_leased(
    slabs: u64,
    lease_secs: u64,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let d = donor_with(slabs, |c| c.lease_secs = lease_secs).await;
    (d.addr, d.stop)
}

/// [`donor_with`] as a tuple: address, stop handle, control handle.
pub async fn donor_parts(
    slabs: u64,
    tune: impl FnOnce(&mut ServerConfig),
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, Control) {
    let d = donor_with(slabs, tune).await;
    (d.addr, d.stop, d.control)
}

/// Runs blocking data-path calls off the runtime's threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}
