//! The donor and its client library end to end over the tcp provider on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rmem_memserver::protocol::{read_frame, write_msg, ClientMsg, ServerMsg};
use rmem_memserver::{
    ByteSize, Client, ClientConfig, ClientError, Control, ErrorCode, Notice, ServerConfig,
};
use rmem_transport::WcStatus;
use tokio::io::AsyncWriteExt;

mod support;

use support::{client, SECRET};

async fn donor(slabs: u64, lease_secs: u64) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (addr, stop, _) = donor_with(slabs, |c| c.lease_secs = lease_secs).await;
    (addr, stop)
}

async fn donor_with(
    slabs: u64,
    tune: impl FnOnce(&mut ServerConfig),
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, Control) {
    let d = support::donor_with(slabs, tune).await;
    (d.addr, d.stop, d.control)
}

/// Runs blocking data-path calls off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrow_write_read_and_give_back() {
    let (addr, _stop) = donor(4, 30).await;
    let c = Arc::new(client(addr, "alice").await);
    let slabs = c.alloc(2).await.unwrap();
    assert_eq!(slabs.len(), 2);
    assert_ne!(slabs[0].remote.rkey, slabs[1].remote.rkey);
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7) as u8).collect();
    let (c2, s0, d2) = (c.clone(), slabs[1], data.clone());
    let back = blocking(move || {
        c2.write(&s0, 0, &d2).unwrap();
        let mut back = vec![0u8; d2.len()];
        c2.read(&s0, 0, &mut back).unwrap();
        back
    })
    .await;
    assert!(back == data);
    let st = c.stats().await.unwrap();
    assert_eq!(
        (st.slabs_total, st.slabs_free, st.slabs_held, st.clients),
        (4, 2, 2, 1)
    );
    c.free(&[slabs[0].slab, slabs[1].slab]).await.unwrap();
    assert_eq!(c.stats().await.unwrap().slabs_free, 4);
    // Out of bounds is refused locally, before anything is sent.
    let (c3, s1) = (c.clone(), slabs[0]);
    let e = blocking(move || c3.write(&s1, (1 << 20) - 2, b"abc"))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::OutOfBounds { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_and_the_donor_keeps_serving() {
    let (addr, _stop) = donor(2, 30).await;
    let mut bad = ClientConfig::new(addr, b"not the secret at all".to_vec());
    bad.name = "mallory".into();
    match Client::connect(bad).await {
        Err(ClientError::Auth(_)) => {}
        Err(e) => panic!("expected an authentication error, got {e}"),
        Ok(_) => panic!("a wrong secret was accepted"),
    }
    let good = client(addr, "alice").await;
    assert_eq!(good.alloc(1).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_reach_another_clients_slab_and_freed_slabs_are_zeroed() {
    let (addr, _stop) = donor(1, 30).await;
    let a = Arc::new(client(addr, "alice").await);
    let b = Arc::new(client(addr, "bob").await);
    let sa = a.alloc(1).await.unwrap()[0];
    let a2 = a.clone();
    blocking(move || a2.write(&sa, 100, &[0xab; 4096]).unwrap()).await;

    // Bob uses Alice's exact descriptor: his queue pair is in another protection domain.
    let b2 = b.clone();
    let e = blocking(move || {
        let mut out = [0u8; 16];
        b2.read_remote(sa.remote, 100, &mut out)
    })
    .await
    .unwrap_err();
    assert!(
        matches!(e, ClientError::Completion(WcStatus::RemAccessErr)),
        "{e}"
    );
    // Like any RC queue pair, Bob's failed after the access error; he gets a new one.
    b.reconnect().await.unwrap();

    // Bob cannot free it either; the pool is empty for him.
    let e = b.free(&[sa.slab]).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: ErrorCode::NotOwner,
                ..
            }
        ),
        "{e}"
    );
    let e = Client::connect(ClientConfig::new(addr, SECRET.to_vec()))
        .await
        .unwrap()
        .alloc(1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: ErrorCode::PoolExhausted,
                ..
            }
        ),
        "{e}"
    );

    // Alice gives it back; her old descriptor is dead, and Bob gets the slab zeroed.
    a.free(&[sa.slab]).await.unwrap();
    let a3 = a.clone();
    let e = blocking(move || {
        let mut out = [0u8; 16];
        a3.read_remote(sa.remote, 100, &mut out)
    })
    .await
    .unwrap_err();
    assert!(matches!(e, ClientError::Completion(_)), "{e}");
    let sb = b.alloc(1).await.unwrap()[0];
    assert_eq!(sb.slab, sa.slab, "the only slab is handed out again");
    let b3 = b.clone();
    let seen = blocking(move || {
        let mut out = vec![0xffu8; 1 << 20];
        b3.read(&sb, 0, &mut out).unwrap();
        out
    })
    .await;
    assert!(
        seen.iter().all(|x| *x == 0),
        "a reused slab still held the previous client's data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_unless_renewed() {
    let (addr, _stop) = donor(2, 1).await;
    let lazy = Arc::new(client(addr, "lazy").await);
    let keen = Arc::new(client(addr, "keen").await);
    let renewal = keen.spawn_renewal();
    let sl = lazy.alloc(1).await.unwrap()[0];
    keen.alloc(1).await.unwrap();
    // Not a wait for readiness: the span under test, two and a half leases (lease_secs = 1),
    // which the renewing client's slab must outlive.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let st = keen.stats().await.unwrap();
    assert_eq!(st.slabs_held, 1, "a renewing client keeps its slab");
    assert_eq!(st.slabs_free, 1, "the lazy client's slab came back");
    assert_eq!(st.clients, 1);
    let l2 = lazy.clone();
    let e = blocking(move || {
        let mut out = [0u8; 8];
        l2.read(&sl, 0, &mut out)
    })
    .await;
    assert!(e.is_err(), "an expired lease still reached memory");
    assert!(
        lazy.stats().await.is_err(),
        "an expired session still answers"
    );
    renewal.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_lose_nothing() {
    let (addr, _stop) = donor(2, 30).await;
    let c = client(addr, "alice").await;
    let held = c.alloc(1).await.unwrap()[0];
    for (slabs, code) in [
        (vec![held.slab, held.slab], ErrorCode::BadRequest),
        (vec![99], ErrorCode::UnknownSlab),
        (vec![], ErrorCode::TooMany),
    ] {
        let e = c.free(&slabs).await.unwrap_err();
        assert!(
            matches!(e, ClientError::Refused { code: got, .. } if got == code),
            "{slabs:?}: {e}"
        );
    }
    let e = c.alloc(5).await.unwrap_err();
    assert!(matches!(
        e,
        ClientError::Refused {
            code: ErrorCode::PoolExhausted,
            ..
        }
    ));
    assert_eq!(
        c.stats().await.unwrap().slabs_held,
        1,
        "failed requests changed nothing"
    );

    // Raw connections: garbage before and after authentication.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0, 0, 0, 3, b'{', b'{', b'{'])
        .await
        .unwrap();
    let body = read_frame(&mut raw).await.unwrap();
    let m: ServerMsg = serde_json::from_slice(&body).unwrap();
    assert!(
        matches!(
            m,
            ServerMsg::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{m:?}"
    );

    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    write_msg(
        &mut raw,
        &ClientMsg::Hello {
            version: 99,
            client: "x".into(),
            nonce: "00".repeat(32),
        },
    )
    .await
    .unwrap();
    let m: ServerMsg = serde_json::from_slice(&read_frame(&mut raw).await.unwrap()).unwrap();
    assert!(
        matches!(
            m,
            ServerMsg::Error {
                code: ErrorCode::Version,
                ..
            }
        ),
        "{m:?}"
    );

    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(
        read_frame(&mut raw).await.is_err(),
        "an over-long frame must close the connection"
    );

    // The authenticated client was never disturbed.
    assert_eq!(c.stats().await.unwrap().slabs_held, 1);
    assert_eq!(c.alloc(1).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_tells_the_client_which_moves_its_data_and_the_rest_is_taken_at_the_deadline() {
    let (a_addr, _a, a_ctl) = donor_with(4, |c| c.reclaim.grace_secs = 2).await;
    let (b_addr, _b) = donor(4, 30).await;
    let a = Arc::new(client(a_addr, "mover").await);
    let b = Arc::new(client(b_addr, "mover").await);
    let mut notices = a.notices().unwrap();
    assert!(a.notices().is_none(), "one queue");
    let held = a.alloc(3).await.unwrap();
    let (a2, h2) = (a.clone(), held.clone());
    blocking(move || {
        for (k, g) in h2.iter().enumerate() {
            a2.write(g, 0, &vec![k as u8 + 1; 1 << 20]).unwrap();
        }
    })
    .await;

    // One free slab retires at once, two lent ones are asked back.
    let r = a_ctl.shrink(3);
    assert_eq!(
        (r.retired, r.reclaiming, r.short, r.deadline_ms),
        (1, 2, 0, 2000)
    );
    let st = a.stats().await.unwrap();
    assert_eq!(
        (st.slabs_retired, st.slabs_reclaiming, st.slabs_free),
        (1, 2, 0)
    );
    let Some(Notice::Reclaim { slabs, deadline }) =
        tokio::time::timeout(Duration::from_secs(5), notices.recv())
            .await
            .unwrap()
    else {
        panic!("expected a reclaim notice");
    };
    assert_eq!(slabs.len(), 2);
    assert!(deadline > std::time::Instant::now());
    // Move the first one elsewhere and leave the second to be taken.
    let moved = a.move_slab(slabs[0], &b).await.unwrap();
    let k = held.iter().position(|g| g.slab == slabs[0].slab).unwrap();
    let b2 = b.clone();
    let back = blocking(move || {
        let mut v = vec![0u8; 1 << 20];
        b2.read(&moved, 0, &mut v).unwrap();
        v
    })
    .await;
    assert!(back.iter().all(|&x| x == k as u8 + 1), "data moved intact");
    assert!(!a.held().iter().any(|g| g.slab == slabs[0].slab));

    // The overdue slab is taken at the deadline (grace_secs = 2), on the reaper's next round.
    support::wait_until(
        "the overdue slab taken at the deadline",
        Duration::from_secs(10),
        || {
            let a = a.clone();
            async move { a.stats().await.unwrap().slabs_retired == 3 }
        },
    )
    .await;
    let st = a.stats().await.unwrap();
    assert_eq!(
        (st.slabs_retired, st.slabs_reclaiming, st.slabs_held),
        (3, 0, 1),
        "the moved slab and the overdue one are retired; the unasked one stays lent"
    );
    let (a3, late) = (a.clone(), slabs[1]);
    let e = blocking(move || {
        let mut v = [0u8; 8];
        a3.read(&late, 0, &mut v)
    })
    .await
    .unwrap_err();
    assert!(
        matches!(e, ClientError::Completion(WcStatus::RemAccessErr)),
        "a taken slab's descriptor is dead: {e:?}"
    );

    // Growing lends the retired slabs again, zeroed.
    assert_eq!(a_ctl.grow(10), 3);
    a.reconnect().await.unwrap();
    let again = a.alloc(3).await.unwrap();
    let a4 = a.clone();
    let dirty = blocking(move || {
        again.iter().any(|g| {
            let mut v = vec![0u8; 1 << 20];
            a4.read(g, 0, &mut v).unwrap();
            v.iter().any(|&x| x != 0)
        })
    })
    .await;
    assert!(!dirty, "retired slabs come back zeroed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrink_respects_the_floor_and_never_takes_export_slabs() {
    let (addr, _s, ctl) = donor_with(8, |c| {
        c.reclaim.min_size = ByteSize(3 << 20);
        c.nbd_listen = "127.0.0.1:0".parse().unwrap();
        c.exports = vec![rmem_memserver::ExportConfig {
            name: "e".into(),
            size: ByteSize(2 << 20),
        }];
    })
    .await;
    let c = client(addr, "small").await;
    c.alloc(2).await.unwrap();
    let r = ctl.shrink(100);
    // 8 slabs, 2 exported, 2 lent, 4 free; the floor keeps 3 lendable of the 8.
    assert_eq!(r.retired + r.reclaiming, 5, "{r:?}");
    assert_eq!(r.retired, 4);
    assert_eq!(r.short, 95);
    assert_eq!(ctl.shrink(1).short, 1, "nothing more above the floor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_clients_and_waits_for_them_to_leave() {
    let (addr, stop, _) = donor_with(4, |c| c.reclaim.shutdown_grace_secs = 10).await;
    let c = Arc::new(client(addr, "leaver").await);
    let mut notices = c.notices().unwrap();
    let g = c.alloc(1).await.unwrap();
    let t0 = std::time::Instant::now();
    stop.send(()).unwrap();
    let Some(Notice::Closing { reason, deadline }) =
        tokio::time::timeout(Duration::from_secs(5), notices.recv())
            .await
            .unwrap()
    else {
        panic!("expected a closing notice");
    };
    assert!(reason.contains("shutting down"), "{reason}");
    assert!(deadline > t0 + Duration::from_secs(5));
    // Still served during the grace period.
    c.free(&[g[0].slab]).await.unwrap();
    // Having nothing left, the session ends well before the grace period.
    let Some(Notice::Closing { reason, .. }) =
        tokio::time::timeout(Duration::from_secs(5), notices.recv())
            .await
            .unwrap()
    else {
        panic!("expected the connection to close");
    };
    assert!(reason.contains("lost"), "{reason}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(matches!(c.stats().await, Err(ClientError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pressure_shrinks_the_donor_and_calm_grows_it_back() {
    let dir = std::env::temp_dir().join(format!("rmem-psi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let psi = dir.join("memory");
    let write = |avg10: &str| {
        std::fs::write(
            &psi,
            format!("some avg10={avg10} avg60=0.00 avg300=0.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"),
        )
        .unwrap()
    };
    write("0.00");
    let (_, _s, ctl) = donor_with(8, |c| {
        c.reclaim.pressure = true;
        c.reclaim.pressure_file = psi.clone();
        c.reclaim.interval_ms = 20;
        c.reclaim.settle_secs = 1;
        c.reclaim.step = Some(ByteSize(2 << 20));
    })
    .await;
    // Not a wait for readiness: a window of ten readings (20 ms apart) in which nothing may
    // happen; there is no event to poll for.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ctl.stats().slabs_retired, 0, "no pressure, no shrink");
    write("42.00");
    let t0 = std::time::Instant::now();
    while ctl.stats().slabs_retired < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no shrink under pressure"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One step per settle period, not one per reading.
    assert_eq!(ctl.stats().slabs_retired, 2);
    support::wait_until(
        "a second step after settling (settle_secs = 1)",
        Duration::from_secs(10),
        || std::future::ready(ctl.stats().slabs_retired >= 4),
    )
    .await;
    assert_eq!(ctl.stats().slabs_retired, 4, "one step per settle period");
    write("0.10");
    while ctl.stats().slabs_retired > 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "never grew back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ctl.stats().slabs_free, 8);
    std::fs::remove_dir_all(&dir).unwrap();
}
