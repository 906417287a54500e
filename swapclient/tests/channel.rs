//! Store channels: one thread, many requests in flight, completions in any order, over real
//! donors (tcp provider, loopback, in this process).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use rmem_memserver::ByteSize;
use rmem_swapclient::{DonorSpec, IoOp, IoReq, Store, StoreConfig, StoreError};
use rmem_transport::{Buffer, HugePages, Provider};

#[path = "../../memserver/tests/support/mod.rs"]
mod support;

use support::{TestDonor, SECRET};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

async fn donor(slabs: u64, slab_size: u64) -> TestDonor {
    support::donor_with(slabs, |c| {
        c.size = ByteSize(slabs * slab_size);
        c.slab_size = ByteSize(slab_size);
        c.reclaim.grace_secs = 2;
        c.reclaim.shutdown_grace_secs = 0;
    })
    .await
}

fn config(size: u64, replicas: usize, donors: &[&TestDonor]) -> StoreConfig {
    StoreConfig {
        size,
        replicas,
        donors: donors
            .iter()
            .enumerate()
            .map(|(i, d)| DonorSpec {
                addr: d.addr,
                domain: format!("d{i}"),
            })
            .collect(),
        secret: SECRET.to_vec(),
        provider: Provider::Tcp,
        device: None,
        name: "channel-test".into(),
        op_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(10),
        lanes: 1,
        bounce: 1 << 20,
        plan: None,
    }
}

fn block(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What a driving thread saw.
#[derive(Debug, Default)]
struct Run {
    requests: u64,
    failed: u64,
    most_in_flight: usize,
    out_of_order: u64,
    shadow: Vec<Option<Vec<u8>>>,
}

/// Drives `depth` requests in flight from this thread over the first `blocks` 4 KiB blocks
/// until `stop` (then drains): random blocks, half writes (new contents, kept in a shadow
/// copy when they succeed), half reads (checked against the shadow). A block is never in two
/// requests at once. `expect_ok` makes any failure a panic.
fn drive(
    store: &Store,
    depth: usize,
    blocks: usize,
    stop: &AtomicBool,
    done: &AtomicU64,
    expect_ok: bool,
) -> Run {
    let handle = tokio::runtime::Handle::current();
    let buf = Buffer::alloc(depth * BLOCK, HugePages::Never).unwrap();
    let mut ch = handle.block_on(store.open_channel(buf, depth)).unwrap();
    let mut run = Run {
        shadow: vec![None; blocks],
        ..Run::default()
    };
    // tag -> (slot in the buffer, block, write contents)
    let mut live: HashMap<u64, (usize, usize, Option<Vec<u8>>)> = HashMap::new();
    let mut busy = vec![false; blocks];
    let mut free: Vec<usize> = (0..depth).collect();
    let (mut tag, mut x) = (0u64, 0x5eed_u64);
    let mut out = Vec::new();
    loop {
        let stopping = stop.load(SeqCst);
        while !stopping && !free.is_empty() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = (x >> 33) as usize % blocks;
            if busy[b] {
                continue;
            }
            let slot = free.pop().unwrap();
            let write = (x >> 20) & 1 == 0 || run.shadow[b].is_none();
            let contents = write.then(|| block(x));
            if let Some(c) = &contents {
                ch.buffer().write_at(slot * BLOCK, c).unwrap();
            }
            tag += 1;
            ch.submit(IoReq {
                tag,
                op: if write { IoOp::Write } else { IoOp::Read },
                off: (b * BLOCK) as u64,
                len: BLOCK,
                at: slot * BLOCK,
            })
            .unwrap();
            busy[b] = true;
            live.insert(tag, (slot, b, contents));
            run.most_in_flight = run.most_in_flight.max(ch.in_flight());
        }
        if live.is_empty() {
            break;
        }
        out.clear();
        ch.reap(&mut out, true).unwrap();
        let oldest = live.keys().min().copied().unwrap_or(0);
        for (t, res) in out.drain(..) {
            let (slot, b, contents) = live.remove(&t).expect("a tag we sent, once");
            if t != oldest {
                run.out_of_order += 1;
            }
            run.requests += 1;
            done.fetch_add(1, SeqCst);
            match (res, contents) {
                (Ok(()), Some(c)) => run.shadow[b] = Some(c),
                (Ok(()), None) => {
                    let mut back = vec![0u8; BLOCK];
                    ch.buffer().read_at(slot * BLOCK, &mut back).unwrap();
                    assert!(
                        Some(&back) == run.shadow[b].as_ref(),
                        "block {b} read back wrong"
                    );
                }
                (Err(e), _) => {
                    assert!(!expect_ok, "request on block {b} failed: {e}");
                    assert!(matches!(e, StoreError::Lost { .. }), "{e}");
                    run.failed += 1;
                    // A failed write leaves the block unknown: never checked again.
                    run.shadow[b] = None;
                }
            }
            busy[b] = false;
            free.push(slot);
        }
    }
    run
}

/// The store's contents, read back through the ordinary path.
fn check(store: &Store, shadow: &[Option<Vec<u8>>]) {
    let mut back = vec![0u8; BLOCK];
    for (b, want) in shadow.iter().enumerate() {
        if let Some(w) = want {
            store.read((b * BLOCK) as u64, &mut back).unwrap();
            assert!(&back == w, "block {b} differs after the run");
        }
    }
}

/// A driving thread (see [`drive`]) started on `store`; stop it with the flag.
struct Driver {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    run: tokio::task::JoinHandle<Run>,
}

fn start(store: &Arc<Store>, depth: usize, blocks: usize, expect_ok: bool) -> Driver {
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let (s, st, d) = (store.clone(), stop.clone(), done.clone());
    let run = tokio::task::spawn_blocking(move || drive(&s, depth, blocks, &st, &d, expect_ok));
    Driver { stop, done, run }
}

impl Driver {
    /// Waits until more than `n` requests have completed.
    async fn past(&self, what: &str, n: u64) {
        let done = &self.done;
        support::wait_until(what, Duration::from_secs(30), || {
            std::future::ready(done.load(SeqCst) > n)
        })
        .await;
    }

    fn count(&self) -> u64 {
        self.done.load(SeqCst)
    }

    /// Stops it; every request in flight must end within a minute (none hangs).
    async fn finish(self) -> Run {
        self.stop.store(true, SeqCst);
        tokio::time::timeout(Duration::from_secs(60), self.run)
            .await
            .expect("requests hung")
            .unwrap()
    }
}

async fn three_donors(slab_size: u64, slabs: u64) -> (TestDonor, TestDonor, TestDonor) {
    (
        donor(slabs, slab_size).await,
        donor(slabs, slab_size).await,
        donor(slabs, slab_size).await,
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thread_keeps_64_requests_in_flight_and_they_complete_out_of_order() {
    let (a, b, c) = three_donors(MIB, 16).await;
    let store = Store::create(&config(8 * MIB, 2, &[&a, &b, &c]))
        .await
        .unwrap();
    let d = start(&store, 64, 2048, true);
    d.past("4000 requests", 4000).await;
    let run = d.finish().await;
    assert_eq!(run.most_in_flight, 64, "{run:?}");
    assert!(
        run.out_of_order > 0,
        "completions came only in order: {run:?}"
    );
    let s = store.clone();
    blocking(move || check(&s, &run.shadow)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_donor_dying_under_a_full_channel_fails_no_request_and_loses_nothing() {
    let (a, b, c) = three_donors(MIB, 16).await;
    let store = Store::create(&config(8 * MIB, 2, &[&a, &b, &c]))
        .await
        .unwrap();
    let d = start(&store, 64, 2048, true);
    d.past("requests flowing", 500).await;
    a.kill().await;
    d.past("requests flowing past the death", d.count() + 1000)
        .await;
    let run = d.finish().await;
    let st = store.status();
    assert!(!st.donors[0].healthy, "the dead donor is marked failed");
    assert_eq!(st.lost, 0);
    let s = store.clone();
    blocking(move || check(&s, &run.shadow)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicas_a_dead_donor_fails_requests_and_hangs_none() {
    let (a, b) = (donor(16, MIB).await, donor(16, MIB).await);
    let store = Store::create(&config(8 * MIB, 1, &[&a, &b])).await.unwrap();
    let d = start(&store, 64, 2048, false);
    d.past("requests flowing", 500).await;
    a.kill().await;
    d.past("requests after the death", d.count() + 500).await;
    let run = d.finish().await;
    // Half the chunks were on the dead donor: their requests fail (checked to be `Lost` in
    // `drive`), the others go on, and no read returned wrong data.
    assert!(run.failed > 0, "{run:?}");
    assert!(run.requests > run.failed, "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_writes_during_a_rebuild_reach_the_new_copy() {
    // 4 MiB chunks, rebuilt in 1 MiB pieces; the channel's requests wait out each piece.
    // 32 MiB: the rebuild copies 32 pieces, long enough for requests to run between them.
    let (a, b, c) = three_donors(4 * MIB, 16).await;
    let store = Store::create(&config(32 * MIB, 2, &[&a, &b, &c]))
        .await
        .unwrap();
    let d = start(&store, 64, 8192, true);
    d.past("requests flowing", 10000).await;
    a.kill().await;
    support::wait_until("the dead donor noticed", Duration::from_secs(30), || {
        std::future::ready(!store.status().donors[0].healthy)
    })
    .await;
    // The requests keep going while the rebuild copies (whether any completes inside its
    // window depends on the scheduler: only what they leave behind is asserted).
    assert_eq!(store.repair().await, 0);
    let run = d.finish().await;
    let st = store.status();
    assert!(st.rebuilt > 0 && st.degraded == 0, "{st:?}");
    // Only c and the rebuilt copies are left: every write made during the copy is in them.
    b.kill().await;
    assert_eq!(store.status().lost, 0);
    let s = store.clone();
    blocking(move || check(&s, &run.shadow)).await;
}
