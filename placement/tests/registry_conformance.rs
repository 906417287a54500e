//! One conformance suite for both registry backends: in-process, and etcd (a real `etcd` server
//! started for the test on free loopback ports with a temporary data directory).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_placement::etcd::Etcd;
use rmem_placement::registry::{DonorReport, Heartbeat, InProcess, Registry, RegistryError};

const SLAB: u64 = 1 << 20;

fn donor(id: &str, domain: &str, slabs: u32) -> DonorReport {
    DonorReport {
        id: id.into(),
        addr: format!("{id}:7470"),
        domain: domain.into(),
        slab_bytes: SLAB,
        total_slabs: slabs,
        free_slabs: slabs,
        link_bps: 0,
        labels: BTreeMap::new(),
    }
}

fn hb(id: &str, seq: u64, free: u32, total: u32) -> Heartbeat {
    Heartbeat {
        id: id.into(),
        seq,
        free_slabs: free,
        total_slabs: total,
        traffic: vec![],
    }
}

fn free_in<R: Registry>(r: &R, id: &str) -> Option<u32> {
    let t = r.table().unwrap();
    t.get(id)
        .map(|e| e.report.free_slabs.saturating_sub(e.pending))
}

/// Polls `cond` every 10 ms until it holds; returns how long that took.
async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.elapsed()
}

/// The suite: `a` and `b` are two handles on one registry (for etcd, two services).
async fn suite<R: Registry>(a: Arc<R>, b: Arc<R>) {
    // Registration reaches both views.
    a.register(donor("d1", "r1", 4), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(free_in(&*a, "d1"), Some(4));
    let visible = until("registration visible to b", Duration::from_secs(5), || {
        free_in(&*b, "d1") == Some(4)
    })
    .await;
    eprintln!("registration to visible: {visible:?}");

    // Heartbeats go forward only; unknown donors and impossible figures are refused.
    a.heartbeat(hb("d1", 1, 4, 4)).await.unwrap();
    for seq in [1, 0] {
        assert!(matches!(
            b.heartbeat(hb("d1", seq, 4, 4)).await,
            Err(RegistryError::SeqBack { .. })
        ));
    }
    assert!(matches!(
        a.heartbeat(hb("nobody", 1, 1, 1)).await,
        Err(RegistryError::Unknown(_))
    ));
    assert!(matches!(
        a.heartbeat(hb("d1", 9, 5, 4)).await,
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        a.register(donor("dx", "r1", 4), Duration::from_millis(500))
            .await,
        Err(RegistryError::Invalid(_))
    ));

    // Grants take from the free count and never go below it.
    a.grant("d1", 3).await.unwrap();
    assert!(matches!(
        b.grant("d1", 2).await,
        Err(RegistryError::Insufficient { free: 1, .. })
    ));
    b.release("d1", 1).await.unwrap();
    until("release visible", Duration::from_secs(5), || {
        free_in(&*a, "d1") == Some(2)
    })
    .await;
    assert!(matches!(
        a.grant("nobody", 1).await,
        Err(RegistryError::Unknown(_))
    ));

    // Two concurrent grants of the last slab: exactly one wins, whichever handle.
    for round in 0..5u64 {
        a.heartbeat(hb("d1", 2 + round, 1, 4)).await.unwrap();
        until("heartbeat visible", Duration::from_secs(5), || {
            free_in(&*b, "d1") == Some(1)
        })
        .await;
        let (ra, rb) = tokio::join!(a.grant("d1", 1), b.grant("d1", 1));
        let wins = usize::from(ra.is_ok()) + usize::from(rb.is_ok());
        assert_eq!(wins, 1, "round {round}: {ra:?} {rb:?}");
        for r in [ra, rb] {
            if let Err(e) = r {
                assert!(matches!(e, RegistryError::Insufficient { .. }), "{e}");
            }
        }
    }

    // A donor that stops heartbeating leaves at its lease's end.
    let start = Instant::now();
    a.register(donor("d2", "r2", 4), Duration::from_secs(2))
        .await
        .unwrap();
    // `b` must have seen it first: absent because not yet seen is not absent because lapsed.
    until("b sees d2", Duration::from_secs(2), || {
        free_in(&*b, "d2") == Some(4)
    })
    .await;
    until("lapsed donor removed", Duration::from_secs(6), || {
        b.sweep();
        free_in(&*b, "d2").is_none()
    })
    .await;
    let gone = start.elapsed();
    assert!(
        gone >= Duration::from_secs(2),
        "removed before its lease ended"
    );
    eprintln!("lease of 2 s to removal: {gone:?}");
    // The other handle learns it too (for etcd: the key deleted, the watch tells `a`).
    until("lapse seen by a", Duration::from_secs(3), || {
        free_in(&*a, "d2").is_none()
    })
    .await;
    assert!(matches!(
        b.heartbeat(hb("d2", 1, 4, 4)).await,
        Err(RegistryError::Unknown(_) | RegistryError::Expired(_))
    ));
    assert_eq!(free_in(&*b, "d1"), Some(0), "the live donor stayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_registry_conforms() {
    let r = Arc::new(InProcess::new(SLAB));
    suite(r.clone(), r).await;
}

/// A throwaway etcd on free loopback ports; killed and its directory removed on drop.
struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    client: u16,
    peer: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdServer {
    fn start() -> EtcdServer {
        let dir =
            std::env::temp_dir().join(format!("rmem-etcd-{}-{}", std::process::id(), free_port()));
        let mut s = EtcdServer {
            child: None,
            dir,
            client: free_port(),
            peer: free_port(),
        };
        s.launch();
        s
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    /// Starts (or restarts, on the same data and ports) and waits until it answers.
    fn launch(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("etcd (Debian etcd-server) must be installed: scripts/test.sh installs it");
        self.child = Some(child);
        let t = Instant::now();
        let health = format!("127.0.0.1:{}", self.client);
        loop {
            let ok = std::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &health, "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "etcd did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn etcd_registry(url: &str, stale_limit: Duration) -> Arc<Etcd> {
    Arc::new(
        Etcd::connect(&[url.to_owned()], "/rmem-test", SLAB, stale_limit)
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_conforms() {
    let etcd = EtcdServer::start();
    let a = etcd_registry(&etcd.url(), Duration::from_secs(30)).await;
    let b = etcd_registry(&etcd.url(), Duration::from_secs(30)).await;
    suite(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_is_survived_and_an_outage_is_refused_after_one_lease() {
    let mut etcd = EtcdServer::start();
    let a = etcd_registry(&etcd.url(), Duration::from_secs(3)).await;
    let b = etcd_registry(&etcd.url(), Duration::from_secs(3)).await;
    a.register(donor("d1", "r1", 8), Duration::from_secs(30))
        .await
        .unwrap();
    until("b sees d1", Duration::from_secs(5), || {
        free_in(&*b, "d1") == Some(8)
    })
    .await;

    etcd.kill();
    until("a notices etcd is gone", Duration::from_secs(10), || {
        a.stale()
    })
    .await;
    // Within one lease the cache still answers, marked stale.
    assert_eq!(free_in(&*a, "d1"), Some(8));
    assert!(matches!(
        a.grant("d1", 1).await,
        Err(RegistryError::Unavailable(_))
    ));

    etcd.launch();
    until("a resyncs", Duration::from_secs(15), || !a.stale()).await;
    until("b resyncs", Duration::from_secs(15), || !b.stale()).await;
    b.register(donor("d2", "r2", 8), Duration::from_secs(30))
        .await
        .unwrap();
    until(
        "a sees a donor registered after the restart",
        Duration::from_secs(5),
        || free_in(&*a, "d2") == Some(8),
    )
    .await;
    a.grant("d1", 2).await.unwrap();
    until("b sees the grant", Duration::from_secs(5), || {
        free_in(&*b, "d1") == Some(6)
    })
    .await;

    // An outage longer than the stale limit: answers are refused, not guessed.
    etcd.kill();
    until("a notices again", Duration::from_secs(10), || a.stale()).await;
    until("the cache stops answering", Duration::from_secs(10), || {
        matches!(a.table(), Err(RegistryError::Unavailable(_)))
    })
    .await;
}
