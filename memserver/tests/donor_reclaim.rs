//! The donor taking memory back over the tcp provider on loopback: reclaim with a deadline,
//! shrinking above its floor, shutdown with a grace period, and memory pressure.

use std::sync::Arc;
use std::time::Duration;

use rmem_memserver::ByteSize;
use rmem_swapclient::{ClientError, Notice};
use rmem_transport::WcStatus;

mod support;

use support::{blocking, client, donor_leased as donor, donor_parts as donor_with};

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
    // Written aside and renamed, as procfs would never show a half-written file.
    let write = |avg10: &str| {
        let tmp = dir.join("memory.new");
        std::fs::write(
            &tmp,
            format!("some avg10={avg10} avg60=0.00 avg300=0.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"),
        )
        .unwrap();
        std::fs::rename(&tmp, &psi).unwrap();
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
    // A reading without `some avg10` (a file caught mid-rewrite) is skipped, not fatal.
    std::fs::write(&psi, "").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
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
