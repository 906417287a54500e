//! Store channels: one thread, many requests in flight, completions in any order, over real
//! donors (tcp provider, loopback, in this process).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use rmem_memserver::ByteSize;
use rmem_swapclient::{IoOp, IoReq, Store, StoreConfig, StoreError};
use rmem_transport::{Buffer, HugePages};

mod common;
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
    let addrs: Vec<_> = donors.iter().map(|d| d.addr).collect();
    common::store_config("channel-test", size, replicas, 1, &addrs, SECRET)
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
async fn large_requests_stay_within_the_bytes_in_flight_and_all_complete() {
    let a = donor(16, MIB).await;
    let store = Store::create(&config(16 * MIB, 1, &[&a])).await.unwrap();
    let s = store.clone();
    blocking(move || {
        let len = 512 << 10;
        let n = 16;
        let buf = Buffer::alloc(n * len, HugePages::Never).unwrap();
        for i in 0..n {
            buf.write_at(i * len, &vec![i as u8 + 1; len]).unwrap();
        }
        let rt = tokio::runtime::Handle::current();
        let mut ch = rt.block_on(s.open_channel(buf.clone(), n)).unwrap();
        let mut done = Vec::new();
        let mut most = 0;
        for i in 0..n {
            let req = IoReq {
                tag: i as u64,
                op: IoOp::Write,
                off: (i * len) as u64,
                len,
                at: i * len,
            };
            // Nothing is reaped here: only the budget makes a submit wait for completions.
            ch.submit(req).unwrap();
            most = most.max(ch.in_flight());
        }
        while done.len() < n {
            ch.reap(&mut done, true).unwrap();
        }
        let budget = rmem_swapclient::StoreChannel::BYTES_IN_FLIGHT / len;
        assert_eq!(most, budget, "requests of {len} bytes in flight at once");
        assert!(done.iter().all(|(_, r)| r.is_ok()), "{done:?}");
        for i in 0..n {
            let mut back = vec![0u8; len];
            s.read((i * len) as u64, &mut back).unwrap();
            assert!(
                back.iter().all(|&b| b == i as u8 + 1),
                "request {i} reads back wrong"
            );
        }
    })
    .await;
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

mod nbd {
    //! The NBD server on a store channel, driven over a socket pair as the kernel drives it.

    use super::*;
    use rmem_swapclient::blockio::IoCounters;
    use rmem_swapclient::nbd_channel;
    use rmem_wire::nbd::{Reply, Request, CMD_DISC, CMD_READ, CMD_TRIM, CMD_WRITE, EINVAL};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    const MAX: usize = 64 << 10;
    const SLOTS: usize = 16;

    fn request(cmd: u16, cookie: u64, off: u64, len: u32) -> [u8; 28] {
        Request::new(cmd, cookie, off, len).encode()
    }

    /// A reply: (cookie, error, data of `read_len(cookie)` bytes when it succeeded).
    fn reply(c: &mut UnixStream, read_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).unwrap();
        let Reply { error: err, cookie } = Reply::decode(&h).expect("a simple reply");
        let mut data = vec![0u8; if err == 0 { read_len(cookie) } else { 0 }];
        c.read_exact(&mut data).unwrap();
        (cookie, err, data)
    }

    type Served = tokio::task::JoinHandle<std::io::Result<()>>;

    /// Serves one end of a socket pair from `store` on a blocking thread; returns the other
    /// and the server's counters.
    fn serve(store: &Arc<Store>) -> (UnixStream, Served, Arc<IoCounters>) {
        let (client, server) = UnixStream::pair().unwrap();
        let s = store.clone();
        let io = Arc::new(IoCounters::default());
        let counters = io.clone();
        let srv = tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Handle::current();
            let buf = Buffer::alloc(SLOTS * MAX, HugePages::Never).unwrap();
            let ch = rt.block_on(s.open_channel(buf, SLOTS)).unwrap();
            nbd_channel::serve(server, ch, &s, &io, SLOTS, MAX)
        });
        (client, srv, counters)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_in_flight_are_answered_once_by_cookie_with_the_right_data() {
        let (a, b, c) = three_donors(MIB, 16).await;
        let store = Store::create(&config(8 * MIB, 2, &[&a, &b, &c]))
            .await
            .unwrap();
        let (client, srv, io) = serve(&store);
        blocking(move || {
            let mut reader = client.try_clone().unwrap();
            let mut client = client;
            // 200 writes of distinct 4 KiB blocks sent without waiting, then 200 reads.
            let w = std::thread::spawn(move || {
                for i in 0..200u64 {
                    client
                        .write_all(&request(CMD_WRITE, 1000 + i, i * 8192, 4096))
                        .unwrap();
                    client.write_all(&block(i)).unwrap();
                }
                for i in 0..200u64 {
                    client
                        .write_all(&request(CMD_READ, 2000 + i, i * 8192, 4096))
                        .unwrap();
                }
                client
            });
            let mut seen = std::collections::HashSet::new();
            for _ in 0..400 {
                let (c, e, d) = reply(&mut reader, |c| if c >= 2000 { 4096 } else { 0 });
                assert_eq!(e, 0, "request {c}");
                assert!(seen.insert(c), "cookie {c} answered twice");
                if c >= 2000 {
                    assert!(d == block(c - 2000), "read {c} returned other data");
                }
            }
            let mut client = w.join().unwrap();
            // A read past the device and an unknown command: errors, and the loop goes on.
            client
                .write_all(&request(CMD_READ, 7, 8 * MIB, 4096))
                .unwrap();
            assert_ne!(reply(&mut reader, |_| 4096).1, 0);
            client
                .write_all(&request(CMD_READ, 8, 0, MAX as u32 + 1))
                .unwrap();
            assert_eq!(reply(&mut reader, |_| 0).1, EINVAL);
            client.write_all(&request(CMD_TRIM, 9, 0, 8192)).unwrap();
            assert_eq!(reply(&mut reader, |_| 0).1, 0);
            client.write_all(&request(CMD_READ, 10, 0, 4096)).unwrap();
            assert_eq!(reply(&mut reader, |_| 4096), (10, 0, vec![0u8; 4096]));
            client.write_all(&request(CMD_DISC, 11, 0, 0)).unwrap();
        })
        .await;
        srv.await.unwrap().unwrap();
        let n = |c: &AtomicU64| c.load(SeqCst);
        assert_eq!((n(&io.reads), n(&io.writes)), (201, 200));
        assert_eq!(n(&io.bytes_written), 200 * 4096);
        // 400 requests sent without waiting: the server kept more than one in flight.
        assert!(
            n(&io.peak_in_flight) > 1,
            "requests were served one at a time"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_donor_dying_with_requests_in_flight_fails_none_and_the_data_is_whole() {
        let (a, b, c) = three_donors(MIB, 16).await;
        let store = Store::create(&config(8 * MIB, 2, &[&a, &b, &c]))
            .await
            .unwrap();
        let (client, srv, _) = serve(&store);
        let mut reader = client.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        // Rounds of 512 writes (blocks 0..512 with the round in them) sent without waiting.
        let w = std::thread::spawn(move || {
            let mut client = client;
            let mut round = 0u64;
            while !st.load(SeqCst) {
                round += 1;
                for i in 0..512u64 {
                    client
                        .write_all(&request(CMD_WRITE, round << 20 | i, i * 4096, 4096))
                        .unwrap();
                    client.write_all(&block(round << 20 | i)).unwrap();
                }
            }
            (client, round)
        });
        let replies = Arc::new(AtomicU64::new(0));
        let r = replies.clone();
        let rd = std::thread::spawn(move || loop {
            let (c, e, _) = reply(&mut reader, |_| 0);
            assert_eq!(e, 0, "write {c:#x} failed: a copy is left for every chunk");
            r.fetch_add(1, SeqCst);
            if c == u64::MAX {
                return reader;
            }
        });
        let seen = |n: u64| {
            let r = replies.clone();
            move || std::future::ready(r.load(SeqCst) > n)
        };
        support::wait_until("writes answered", Duration::from_secs(30), seen(2000)).await;
        a.kill().await;
        let at = replies.load(SeqCst);
        support::wait_until(
            "writes past the death",
            Duration::from_secs(60),
            seen(at + 2000),
        )
        .await;
        stop.store(true, SeqCst);
        let (mut client, rounds) = w.join().unwrap();
        // A marker read: answered after every write before it was.
        client
            .write_all(&request(CMD_READ, u64::MAX, 0, 4096))
            .unwrap();
        let mut reader = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || rd.join().unwrap()),
        )
        .await
        .expect("requests hung after a donor died")
        .unwrap();
        let mut d = vec![0u8; 4096];
        reader.read_exact(&mut d).unwrap();
        client.write_all(&request(CMD_DISC, 0, 0, 0)).unwrap();
        srv.await.unwrap().unwrap();
        // Every block holds the last round's data.
        let s = store.clone();
        blocking(move || {
            let shadow: Vec<Option<Vec<u8>>> =
                (0..512u64).map(|i| Some(block(rounds << 20 | i))).collect();
            check(&s, &shadow);
        })
        .await;
        assert!(!store.status().donors[0].healthy);
    }
}

/// Reads `len` bytes at `off` through `ch` (its buffer's start), alone, and returns them.
fn read_one(ch: &mut rmem_swapclient::StoreChannel<'_>, off: u64, len: usize) -> Vec<u8> {
    ch.submit(IoReq {
        tag: off,
        op: IoOp::Read,
        off,
        len,
        at: 0,
    })
    .unwrap();
    let mut out = Vec::new();
    while out.is_empty() {
        ch.reap(&mut out, true).unwrap();
    }
    let (tag, r) = out.pop().unwrap();
    assert_eq!(tag, off);
    r.unwrap();
    let mut back = vec![0u8; len];
    ch.buffer().read_at(0, &mut back).unwrap();
    back
}

/// Writes `data` at the start of the store (blocking path) and opens a channel with `depth`
/// slots of 32 KiB.
fn filled<'s>(s: &'s Store, data: &[u8], depth: usize) -> rmem_swapclient::StoreChannel<'s> {
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        s.write((i * piece.len()) as u64, piece).unwrap();
    }
    let buf = Buffer::alloc(depth * (32 << 10), HugePages::Never).unwrap();
    tokio::runtime::Handle::current()
        .block_on(s.open_channel(buf, depth))
        .unwrap()
}

/// `n` bytes of a pattern that differs with `seed` and with the position.
fn pattern(seed: u64, n: usize) -> Vec<u8> {
    (0..n / BLOCK)
        .flat_map(|i| block(seed.wrapping_mul(1000).wrapping_add(i as u64)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_reads_is_served_from_read_ahead_and_reads_back_right() {
    let a = donor(16, MIB).await;
    let store = Store::create(&config(8 * MIB, 1, &[&a])).await.unwrap();
    let s = store.clone();
    blocking(move || {
        let data = pattern(1, 4 << 20);
        let mut ch = filled(&s, &data, 4);
        // Swap-in's shape: one 32 KiB cluster at a time, each after the one before.
        let len = 32 << 10;
        for off in (0..data.len()).step_by(len) {
            let back = read_one(&mut ch, off as u64, len);
            assert!(back == data[off..off + len], "read at {off} differs");
        }
        let st = s.status();
        assert!(
            st.readahead_served_bytes >= 3 << 20,
            "most of a 4 MiB stream comes from read-ahead: {} bytes did",
            st.readahead_served_bytes
        );
        assert!(
            st.readahead_fetched_bytes <= (4 << 20) + (512 << 10),
            "read-ahead runs at most two windows past the stream: {} bytes",
            st.readahead_fetched_bytes
        );
        // A stream of large reads has its own bytes in flight: nothing is read twice.
        drop(ch);
        let fetched = s.status().readahead_fetched_bytes;
        let buf = Buffer::alloc(1 << 20, HugePages::Never).unwrap();
        let mut ch = tokio::runtime::Handle::current()
            .block_on(s.open_channel(buf, 1))
            .unwrap();
        for off in (0..data.len()).step_by(1 << 20) {
            let back = read_one(&mut ch, off as u64, 1 << 20);
            assert!(back == data[off..off + (1 << 20)], "read at {off} differs");
        }
        assert_eq!(
            s.status().readahead_fetched_bytes,
            fetched,
            "1 MiB reads were read ahead"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_written_after_it_was_read_ahead_reads_back_new() {
    let a = donor(16, MIB).await;
    let store = Store::create(&config(8 * MIB, 1, &[&a])).await.unwrap();
    let s = store.clone();
    blocking(move || {
        let data = pattern(2, 2 << 20);
        let mut ch = filled(&s, &data, 2);
        let len = 32 << 10;
        for off in [0, len, 2 * len] {
            read_one(&mut ch, off as u64, len);
        }
        // Both windows (96 KiB to 608 KiB) land.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.status().readahead_fetched_bytes < 512 << 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "read-ahead never landed"
            );
            ch.reap(&mut Vec::new(), false).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let served = s.status().readahead_served_bytes;
        let back = read_one(&mut ch, (3 * len) as u64, len);
        assert!(back == data[3 * len..4 * len]);
        assert!(
            s.status().readahead_served_bytes > served,
            "a window served it"
        );
        // Another writer (the blocking path) changes a block inside the second window...
        let fresh = block(77);
        s.write(400 << 10, &fresh).unwrap();
        assert!(
            read_one(&mut ch, 400 << 10, BLOCK) == fresh,
            "a read-ahead window served data older than a completed write"
        );
        // ... and so does the channel itself, inside the first.
        let own = block(78);
        ch.buffer().write_at(BLOCK, &own).unwrap();
        ch.submit(IoReq {
            tag: 1,
            op: IoOp::Write,
            off: 200 << 10,
            len: BLOCK,
            at: BLOCK,
        })
        .unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ch.reap(&mut out, true).unwrap();
        }
        out.pop().unwrap().1.unwrap();
        assert!(read_one(&mut ch, 200 << 10, BLOCK) == own);
        // Untouched blocks of the windows still read as written.
        assert!(read_one(&mut ch, 500 << 10, BLOCK) == data[500 << 10..(500 << 10) + BLOCK]);
    })
    .await;
}
