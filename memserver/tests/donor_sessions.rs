//! The donor's sessions end to end over the tcp provider on loopback: borrowing and giving
//! back, authentication, isolation between clients (freed slabs zeroed), leases, and bad
//! requests that get errors and lose nothing.

use std::sync::Arc;
use std::time::Duration;

use rmem_memserver::ErrorCode;
use rmem_swapclient::{Client, ClientConfig, ClientError};
use rmem_transport::WcStatus;
use rmem_wire::protocol::{read_frame, write_msg, ClientMsg, ServerMsg};
use tokio::io::AsyncWriteExt;

mod support;

use support::{blocking, client, donor_leased as donor, SECRET};

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
async fn lanes_serve_many_threads_at_once_and_reconnect_together() {
    let (addr, _stop) = donor(4, 30).await;
    for lanes in [0, 17] {
        let mut cfg = ClientConfig::new(addr, SECRET.to_vec());
        cfg.lanes = lanes;
        assert!(
            matches!(Client::connect(cfg).await, Err(ClientError::Protocol(_))),
            "{lanes} lanes accepted"
        );
    }
    let mut cfg = ClientConfig::new(addr, SECRET.to_vec());
    cfg.name = "lanes".into();
    cfg.lanes = 4;
    // Smaller than an operation: every one goes through its lane's buffer in pieces.
    cfg.bounce = 48 << 10;
    let c = Arc::new(Client::connect(cfg).await.unwrap());
    assert_eq!(c.lanes(), 4);
    let slab = c.alloc(1).await.unwrap()[0];
    let other = client(addr, "other").await.alloc(1).await.unwrap()[0];

    // Eight threads, each rewriting and checking its own 128 KiB, all at once.
    let round = move |c: Arc<Client>, seed: u8| {
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for n in 0..16u8 {
                        let data: Vec<u8> = (0..128 << 10)
                            .map(|i: usize| (i as u8) ^ (t as u8) ^ n.wrapping_add(seed))
                            .collect();
                        c.write(&slab, t * (128 << 10), &data).unwrap();
                        let mut back = vec![0u8; data.len()];
                        c.read(&slab, t * (128 << 10), &mut back).unwrap();
                        assert!(back == data, "thread {t} round {n}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    let c2 = c.clone();
    blocking(move || round(c2, 0)).await;

    // An access error breaks a lane (as on any RC queue pair); reconnect renews them all, and
    // every thread's lane works again.
    let c2 = c.clone();
    let e = blocking(move || c2.read_remote(other.remote, 0, &mut [0u8; 8]))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Completion(_)), "{e}");
    c.reconnect().await.unwrap();
    let c2 = c.clone();
    blocking(move || round(c2, 1)).await;
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
