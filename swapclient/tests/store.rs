//! The replicated store over real donors (tcp provider, loopback, in this process).

use std::sync::Arc;
use std::time::Duration;

use rmem_memserver::ByteSize;
use rmem_swapclient::{Store, StoreConfig, StoreError};

mod common;
// The donor's own test support: an in-process donor on loopback.
#[path = "../../memserver/tests/support/mod.rs"]
mod support;

use support::{TestDonor, SECRET};

const MIB: u64 = 1 << 20;

async fn donor(slabs: u64) -> TestDonor {
    donor_of(slabs, MIB).await
}

/// A donor of `slabs` slabs of `slab_size`, reclaim deadline 2 s. `kill` makes it a dead host
/// as far as the borrower can tell: no shutdown grace, sessions end, slabs are deregistered.
async fn donor_of(slabs: u64, slab_size: u64) -> TestDonor {
    support::donor_with(slabs, |c| {
        c.size = ByteSize(slabs * slab_size);
        c.slab_size = ByteSize(slab_size);
        c.reclaim.grace_secs = 2;
        c.reclaim.shutdown_grace_secs = 0;
    })
    .await
}

fn config(size: u64, replicas: usize, donors: &[&TestDonor]) -> StoreConfig {
    // Two lanes: writers from several threads take a donor's lanes at once.
    let addrs: Vec<_> = donors.iter().map(|d| d.addr).collect();
    common::store_config("store-test", size, replicas, 2, &addrs, SECRET)
}

/// Three donors of 16 MiB and an 8 MiB store with two replicas on them.
async fn two_replicas_on_three() -> (TestDonor, TestDonor, TestDonor, Arc<Store>) {
    let (a, b, c) = (donor(16).await, donor(16).await, donor(16).await);
    let store = Store::create(&config(8 * MIB, 2, &[&a, &b, &c]))
        .await
        .unwrap();
    (a, b, c, store)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Writes the pattern over the whole store in uneven pieces that cross chunk boundaries.
async fn fill(store: &Arc<Store>, seed: u8) -> Vec<u8> {
    let data = pattern(store.size() as usize, seed);
    let (s, d) = (store.clone(), data.clone());
    blocking(move || {
        let mut off = 0;
        while off < d.len() {
            let n = (300 * 1024).min(d.len() - off);
            s.write(off as u64, &d[off..off + n]).unwrap();
            off += n;
        }
    })
    .await;
    data
}

async fn read_all(store: &Arc<Store>) -> Result<Vec<u8>, StoreError> {
    let s = store.clone();
    blocking(move || {
        let mut out = vec![0u8; s.size() as usize];
        for (k, piece) in out.chunks_mut(700 * 1024).enumerate() {
            s.read((k * 700 * 1024) as u64, piece)?;
        }
        Ok(out)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_rebuild_reach_the_new_copy() {
    // 4 MiB chunks: each is rebuilt in four 1 MiB pieces, with writes let in between them.
    let a = donor_of(8, 4 * MIB).await;
    let b = donor_of(8, 4 * MIB).await;
    let c = donor_of(8, 4 * MIB).await;
    let store = Store::create(&config(8 * MIB, 2, &[&a, &b, &c]))
        .await
        .unwrap();
    fill(&store, 1).await;
    a.kill().await;

    // A writer rewrites 64 KiB blocks in a scattered order until the rebuild is over, and keeps
    // what it wrote last: the writes made during the copy are never written again.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    let done = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (s, done, writes) = (store.clone(), done.clone(), writes.clone());
        tokio::task::spawn_blocking(move || {
            const BLOCK: usize = 64 << 10;
            let mut shadow = pattern(s.size() as usize, 1);
            let blocks = shadow.len() / BLOCK;
            let mut x = 12345u64;
            while !done.load(SeqCst) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (x >> 33) as usize % blocks * BLOCK;
                let piece = pattern(BLOCK, (x >> 20) as u8);
                s.write(off as u64, &piece).unwrap();
                shadow[off..off + BLOCK].copy_from_slice(&piece);
                writes.fetch_add(1, SeqCst);
            }
            shadow
        })
    };
    support::wait_until("the writer's first write", Duration::from_secs(10), || {
        std::future::ready(writes.load(SeqCst) > 0)
    })
    .await;
    let before = writes.load(SeqCst);
    assert_eq!(store.repair().await, 0);
    let after = writes.load(SeqCst);
    done.store(true, SeqCst);
    let data = writer.await.unwrap();
    assert!(after > before, "writes went on during the rebuild");
    let st = store.status();
    assert_eq!((st.degraded, st.lost), (0, 0), "{st:?}");

    // Only c and the rebuilt copies are left: every write made during the copy is in them.
    b.kill().await;
    assert!(read_all(&store).await.unwrap() == data);
    assert_eq!(store.status().lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_survive_donor_deaths_and_are_rebuilt() {
    let (a, b, _c, store) = two_replicas_on_three().await;
    let st = store.status();
    assert_eq!((st.chunks, st.degraded, st.lost), (8, 0, 0));
    assert_eq!(st.donors.iter().map(|d| d.slabs).sum::<usize>(), 16);
    assert!(
        st.donors.iter().all(|d| d.slabs > 0),
        "spread over every donor: {st:?}"
    );
    let data = fill(&store, 1).await;

    a.kill().await;
    assert!(
        read_all(&store).await.unwrap() == data,
        "served from replicas"
    );
    let st = store.status();
    assert!(!st.donors[0].healthy);
    assert_eq!(store.repair().await, 0, "every chunk found a new home");
    let st = store.status();
    assert_eq!((st.degraded, st.lost), (0, 0), "{st:?}");
    assert!(st.rebuilt > 0);
    assert_eq!(st.donors[0].slabs, 0);

    // Writes after the rebuild reach both copies: losing another donor loses nothing.
    let data = fill(&store, 2).await;
    b.kill().await;
    assert!(read_all(&store).await.unwrap() == data);
    assert_eq!(store.status().lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_copies_only_what_was_written() {
    // 8 chunks of 1 MiB; three pieces written, the rest never touched.
    let (a, b, _c, store) = two_replicas_on_three().await;
    let pieces = [
        (100 * 1024, 8 * 1024),
        (3 * MIB - 4096, 12 * 1024),
        (7 * MIB + 4096, 4096),
    ];
    let mut want = vec![0u8; 8 * MIB as usize];
    for (k, &(off, len)) in pieces.iter().enumerate() {
        let piece = pattern(len, k as u8 + 1);
        want[off as usize..off as usize + len].copy_from_slice(&piece);
        let s = store.clone();
        blocking(move || s.write(off, &piece).unwrap()).await;
    }
    a.kill().await;
    // As the daemon does once a's control connection closes.
    store.mark_failed(0, "killed");
    assert_eq!(store.repair().await, 0);
    let st = store.status();
    assert_eq!((st.degraded, st.lost), (0, 0), "{st:?}");
    assert!(st.rebuilt > 0);
    // Parts of 1 MiB / 64 = 16 KiB: the written pieces touch at most 2 + 2 + 1 of them, and a
    // rebuilt chunk the pieces missed copies nothing at all.
    assert!(st.copied_bytes > 0, "{st:?}");
    assert!(
        st.copied_bytes <= 5 * 16 * 1024,
        "copied {} bytes",
        st.copied_bytes
    );

    // With b gone too, some chunks live only on rebuilt copies: written bytes and zeros intact.
    b.kill().await;
    assert!(read_all(&store).await.unwrap() == want);
    assert_eq!(store.status().lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicas_a_dead_donor_means_errors_not_wrong_data() {
    let a = donor(8).await;
    let store = Store::create(&config(4 * MIB, 1, &[&a])).await.unwrap();
    fill(&store, 3).await;
    a.kill().await;
    assert!(matches!(
        read_all(&store).await,
        Err(StoreError::Lost { .. })
    ));
    let s = store.clone();
    let w = blocking(move || s.write(0, &[1u8; 4096])).await;
    assert!(matches!(w, Err(StoreError::Lost { .. })));
    assert_eq!(store.status().lost, 4);
    assert_eq!(
        store.repair().await,
        4,
        "nothing to rebuild from: short until a donor returns"
    );
    assert!(!store.revive().await, "a dead donor does not come back");
    assert_eq!(store.status().lost, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_donor_back_from_a_stall_serves_its_only_copy_again() {
    let a = donor(8).await;
    let store = Store::create(&config(4 * MIB, 1, &[&a])).await.unwrap();
    let mut data = fill(&store, 5).await;
    // What an error completion does (a stalled link exceeding its retries): the donor is
    // failed, but its process and our session with it are alive.
    store.mark_failed(0, "test: link stalled");
    assert!(matches!(
        read_all(&store).await,
        Err(StoreError::Lost { .. })
    ));
    let s = store.clone();
    let w = blocking(move || s.write(0, &[9u8; 4096])).await;
    assert!(matches!(w, Err(StoreError::Lost { .. })), "{w:?}");
    assert_eq!(store.status().lost, 4);
    assert_eq!(store.repair().await, 4);

    assert!(
        store.revive().await,
        "a new data connection to the same donor"
    );
    assert_eq!(store.status().lost, 0);
    assert!(read_all(&store).await.unwrap() == data, "every copy kept");
    let s = store.clone();
    blocking(move || s.write(0, &[9u8; 4096])).await.unwrap();
    data[..4096].fill(9);
    assert!(read_all(&store).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaimed_slabs_are_moved_before_the_deadline() {
    let a = donor(8).await;
    let b = donor(8).await;
    let store = Store::create(&config(4 * MIB, 1, &[&a, &b])).await.unwrap();
    let data = fill(&store, 4).await;
    let on_a = store.status().donors[0].slabs as u32;
    assert!(on_a > 0);
    let mut notices = store.notices();
    // Everything on A is asked back (its free slabs go first).
    let r = a.control.shrink(8);
    assert_eq!(r.reclaiming, on_a);
    let (i, rx) = notices.iter_mut().find(|(i, _)| *i == 0).unwrap();
    let deadline = match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(rmem_swapclient::Notice::Reclaim { slabs, deadline })) => {
            store.mark_leaving(*i, &slabs);
            deadline
        }
        other => panic!("expected a reclaim notice, got {other:?}"),
    };
    assert_eq!(store.repair().await, 0);
    let st = store.status();
    assert_eq!((st.donors[0].slabs, st.moved as u32), (0, on_a), "{st:?}");
    assert!(read_all(&store).await.unwrap() == data);
    // A gets its memory back as the moved slabs are freed, before its deadline would take them.
    support::wait_until(
        "A's slabs back before the reclaim deadline",
        deadline.saturating_duration_since(std::time::Instant::now()),
        || {
            let ds = a.control.stats();
            std::future::ready((ds.slabs_retired, ds.slabs_reclaiming) == (8, 0))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_impossible_layouts_and_out_of_range_io() {
    let a = donor(4).await;
    let b = donor(4).await;
    let mut cfg = config(4 * MIB, 2, &[&a, &b]);
    cfg.donors[1].domain = "d0".into();
    assert!(
        matches!(Store::create(&cfg).await, Err(StoreError::Config(_))),
        "one domain, two replicas"
    );
    let cfg = config(8 * MIB, 2, &[&a, &b]);
    assert!(matches!(
        Store::create(&cfg).await,
        Err(StoreError::Full(_))
    ));
    let store = Store::create(&config(2 * MIB, 2, &[&a, &b])).await.unwrap();
    let s = store.clone();
    let e = blocking(move || s.read(2 * MIB - 10, &mut [0u8; 20])).await;
    assert!(matches!(e, Err(StoreError::OutOfRange { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_plan_is_followed_and_a_bad_one_refused() {
    let (a, b, c) = (donor(4).await, donor(4).await, donor(4).await);
    // Chunks 0-2 on a and c, chunk 3 on b and c: b gets one slab, though a scan would split evenly.
    let mut cfg = config(4 * MIB, 2, &[&a, &b, &c]);
    cfg.plan = Some(vec![vec![0, 2], vec![0, 2], vec![0, 2], vec![1, 2]]);
    let store = Store::create(&cfg).await.unwrap();
    let slabs: Vec<usize> = store.status().donors.iter().map(|d| d.slabs).collect();
    assert_eq!(slabs, [3, 1, 4]);
    let data = fill(&store, 7).await;
    assert_eq!(read_all(&store).await.unwrap(), data);
    store.release().await;
    for (plan, why) in [
        (vec![vec![0, 2]; 3], "three chunks for a four-chunk device"),
        (vec![vec![0, 0]; 4], "two replicas on one donor's domain"),
        (vec![vec![0, 7]; 4], "a donor that is not there"),
        (vec![vec![0]; 4], "one replica where two were asked"),
    ] {
        let mut cfg = config(4 * MIB, 2, &[&a, &b, &c]);
        cfg.plan = Some(plan);
        assert!(
            matches!(Store::create(&cfg).await, Err(StoreError::Config(_))),
            "{why}"
        );
    }
    // More than a donor has free.
    let mut cfg = config(8 * MIB, 1, &[&a, &b, &c]);
    cfg.plan = Some(vec![vec![0]; 8]);
    assert!(matches!(
        Store::create(&cfg).await,
        Err(StoreError::Full(_))
    ));
}

/// A request as the ublk driver describes it.
fn iod(op: u32, sector: u64, sectors: u32) -> libublk::sys::ublksrv_io_desc {
    libublk::sys::ublksrv_io_desc {
        op_flags: op,
        nr_sectors: sectors,
        start_sector: sector,
        addr: 0,
    }
}

/// The ublk queue's request handler against a real store: everything but the kernel (which
/// the VM test supplies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ublk_requests_read_write_discard_and_fail_cleanly() {
    use libublk::sys::{
        UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE,
        UBLK_IO_OP_WRITE_ZEROES,
    };
    use rmem_swapclient::blockio::IoCounters;
    use rmem_swapclient::ublk_serve::serve_request;
    use std::sync::atomic::Ordering::Relaxed;

    let a = donor(8).await;
    let store = Store::create(&config(4 * MIB, 1, &[&a])).await.unwrap();
    let s = store.clone();
    let io = blocking(move || {
        let io = IoCounters::default();
        let (mut buf, mut scratch) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
        let data = pattern(12 << 10, 9);
        // 12 KiB across the first chunk boundary, read back.
        let sector = (MIB - 4096) / 512;
        buf[..data.len()].copy_from_slice(&data);
        let w = iod(UBLK_IO_OP_WRITE, sector, 24);
        assert_eq!(serve_request(&s, &io, &w, &mut buf, &mut scratch), 12 << 10);
        buf.fill(0);
        let r = iod(UBLK_IO_OP_READ, sector, 24);
        assert_eq!(serve_request(&s, &io, &r, &mut buf, &mut scratch), 12 << 10);
        assert_eq!(&buf[..data.len()], &data[..]);
        // Discard and write-zeroes leave zeros.
        let d = iod(UBLK_IO_OP_DISCARD, sector, 8);
        assert_eq!(serve_request(&s, &io, &d, &mut buf, &mut scratch), 0);
        let z = iod(UBLK_IO_OP_WRITE_ZEROES, sector + 16, 8);
        assert_eq!(serve_request(&s, &io, &z, &mut buf, &mut scratch), 0);
        assert_eq!(serve_request(&s, &io, &r, &mut buf, &mut scratch), 12 << 10);
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert_eq!(&buf[4096..8192], &data[4096..8192]);
        assert!(buf[8192..12288].iter().all(|&b| b == 0));
        assert_eq!(
            serve_request(
                &s,
                &io,
                &iod(UBLK_IO_OP_FLUSH, 0, 0),
                &mut buf,
                &mut scratch
            ),
            0
        );
        assert_eq!(io.errors.load(Relaxed), 0);
        // Past the end, larger than the tag's buffer, an unknown op: errors, nothing written.
        let end = 4 * MIB / 512;
        let past = iod(UBLK_IO_OP_READ, end - 4, 8);
        assert_eq!(
            serve_request(&s, &io, &past, &mut buf, &mut scratch),
            -libc::EINVAL
        );
        let past = iod(UBLK_IO_OP_WRITE, end - 4, 8);
        assert_eq!(
            serve_request(&s, &io, &past, &mut buf, &mut scratch),
            -libc::ENOSPC
        );
        let big = iod(UBLK_IO_OP_WRITE, 0, (buf.len() / 512 + 8) as u32);
        assert_eq!(
            serve_request(&s, &io, &big, &mut buf, &mut scratch),
            -libc::EINVAL
        );
        let odd = iod(42, 0, 8);
        assert_eq!(
            serve_request(&s, &io, &odd, &mut buf, &mut scratch),
            -libc::EOPNOTSUPP
        );
        assert_eq!(serve_request(&s, &io, &r, &mut buf, &mut scratch), 12 << 10);
        assert_eq!(&buf[4096..8192], &data[4096..8192]);
        assert_eq!(io.errors.load(Relaxed), 2, "store errors are counted");
        assert_eq!(io.bytes_written.load(Relaxed), 12 << 10);
        io
    })
    .await;
    // With its only donor dead a read is an I/O error, not zeros.
    a.kill().await;
    let s = store.clone();
    blocking(move || {
        let (mut buf, mut scratch) = (vec![0u8; 8192], vec![0u8; 8192]);
        let r = iod(UBLK_IO_OP_READ, 0, 8);
        assert_eq!(
            serve_request(&s, &io, &r, &mut buf, &mut scratch),
            -libc::EIO
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_writes_from_many_threads_survive_a_donor_dying_mid_run() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (_a, b, _c, store) = two_replicas_on_three().await;
    let mut data = fill(&store, 1).await;
    // Four writers, 2 MiB each, rewrite their part in 64 KiB pieces (every replica's WRITE
    // posted before any is reaped) until told to stop; a donor dies while they write.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (s, stop) = (store.clone(), stop.clone());
            tokio::task::spawn_blocking(move || {
                let base = w * 2 * MIB;
                let (mut round, mut last) = (0u8, Vec::new());
                while !stop.load(Ordering::Acquire) || round < 2 {
                    round = round.wrapping_add(1);
                    let piece = pattern(2 * MIB as usize, round ^ (w as u8 * 16));
                    for (k, p) in piece.chunks(64 << 10).enumerate() {
                        s.write(base + (k << 16) as u64, p)
                            .expect("a copy is left for every chunk: the write must succeed");
                    }
                    last = piece;
                }
                (w as usize, last)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    for w in writers {
        // Writers taking several donors' data paths at once must never wait on each other.
        let (w, last) = tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("writers stuck: replica writes deadlocked")
            .unwrap();
        let at = w * 2 * MIB as usize;
        data[at..at + last.len()].copy_from_slice(&last);
    }
    let st = store.status();
    assert!(!st.donors[1].healthy, "the dead donor is marked failed");
    assert_eq!(st.lost, 0);
    assert!(read_all(&store).await.unwrap() == data, "every write kept");
    assert_eq!(store.repair().await, 0, "rebuilt on the donors left");
    assert!(read_all(&store).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_donor_dying_with_64_requests_in_flight_fails_none_and_loses_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (a, _b, _c, store) = two_replicas_on_three().await;
    let data = fill(&store, 3).await;
    // 64 threads, each owning every 64th 4 KiB block: each writes a block then reads back one
    // of its own, in turn, until told to stop. Two lanes a donor: most of them wait for one.
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..64u64)
        .map(|t| {
            let (s, stop, ops) = (store.clone(), stop.clone(), ops.clone());
            let mut mine: Vec<(u64, Vec<u8>)> = (0..(8 * MIB / 4096 / 64))
                .map(|k| {
                    let off = (k * 64 + t) * 4096;
                    (off, data[off as usize..off as usize + 4096].to_vec())
                })
                .collect();
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::Acquire) {
                    let i = n % mine.len();
                    let block = pattern(4096, (t as u8) ^ (n as u8));
                    s.write(mine[i].0, &block)
                        .expect("a copy is left for every chunk: the write must succeed");
                    mine[i].1 = block;
                    let j = (n * 7 + 3) % mine.len();
                    let mut back = vec![0u8; 4096];
                    s.read(mine[j].0, &mut back).expect("reads succeed");
                    assert!(back == mine[j].1, "thread {t}: block {} wrong", mine[j].0);
                    n += 1;
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                mine
            })
        })
        .collect();
    support::wait_until("requests flowing", Duration::from_secs(10), || {
        std::future::ready(ops.load(Ordering::Relaxed) > 200)
    })
    .await;
    a.kill().await;
    let at_kill = ops.load(Ordering::Relaxed);
    support::wait_until(
        "requests flowing past the death",
        Duration::from_secs(30),
        || std::future::ready(ops.load(Ordering::Relaxed) > at_kill + 500),
    )
    .await;
    stop.store(true, Ordering::Release);
    let mut want = data.clone();
    let joined = blocking(move || {
        threads
            .into_iter()
            .map(|t| t.join().expect("no thread panicked"))
            .collect::<Vec<_>>()
    });
    // None hangs: every thread's request in flight ends within the operation timeout.
    for mine in tokio::time::timeout(Duration::from_secs(60), joined)
        .await
        .expect("requests hung after a donor died")
    {
        for (off, block) in mine {
            want[off as usize..off as usize + 4096].copy_from_slice(&block);
        }
    }
    let st = store.status();
    assert!(!st.donors[0].healthy, "the dead donor is marked failed");
    assert_eq!(st.lost, 0);
    assert!(read_all(&store).await.unwrap() == want, "every write kept");
}
