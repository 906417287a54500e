//! The userfaultfd region paged to a real donor (tcp provider, loopback, in this process).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rmem_swapclient::region::PAGE;
use rmem_swapclient::{Client, ClientConfig};
use rmem_swapclient::{PollMode, Region, RegionConfig, RegionError};

// The donor's own test support: an in-process donor on loopback.
#[path = "../../memserver/tests/support/mod.rs"]
mod support;

use support::{TestDonor, SECRET};

const WORDS: usize = PAGE / 8;

/// A donor of `slabs` 1 MiB slabs. Killing it is like a dead host: no shutdown grace, sessions
/// end and slabs are deregistered at once.
async fn donor(slabs: u64) -> TestDonor {
    support::donor_with(slabs, |c| c.reclaim.shutdown_grace_secs = 0).await
}

struct Setup {
    region: Region,
    client: Arc<Client>,
    _donor: TestDonor,
}

/// A region of `pages` pages on a fresh donor, `budget` of them resident at most.
async fn setup(pages: usize, budget: usize, prefetch: usize, poll: PollMode) -> Setup {
    let d = donor(8).await;
    let mut c = ClientConfig::new(d.addr, SECRET.to_vec());
    c.name = "region-test".into();
    let client = Arc::new(Client::connect(c).await.unwrap());
    let mut cfg = RegionConfig::new(pages * PAGE);
    cfg.budget_pages = budget;
    cfg.prefetch = prefetch;
    cfg.poll = poll;
    let region = Region::borrow(client.clone(), cfg).await.unwrap();
    Setup {
        region,
        client,
        _donor: d,
    }
}

fn busy() -> PollMode {
    PollMode::Busy {
        spin: std::time::Duration::from_micros(50),
    }
}

fn pattern(pass: u64, page: usize, word: usize) -> u64 {
    (pass << 56) ^ ((page as u64) << 20) ^ (word as u64).wrapping_mul(0x9e37_79b9)
}

fn write_page(r: &Region, pass: u64, page: usize) {
    let a = r.atomics();
    for w in 0..WORDS {
        a[page * WORDS + w].store(pattern(pass, page, w), Ordering::Relaxed);
    }
}

fn check_page(r: &Region, pass: u64, page: usize) {
    let a = r.atomics();
    for w in 0..WORDS {
        let v = a[page * WORDS + w].load(Ordering::Relaxed);
        assert_eq!(
            v,
            pattern(pass, page, w),
            "page {page} word {w} pass {pass}"
        );
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_passes_at_four_times_the_budget_keep_every_page() {
    let (pages, budget) = (512, 128);
    let s = setup(pages, budget, 0, busy()).await;
    let region = blocking(move || {
        let r = s.region;
        for pass in 1..=2 {
            for p in 0..pages {
                write_page(&r, pass, p);
            }
            for p in 0..pages {
                check_page(&r, pass, p);
            }
        }
        r
    })
    .await;
    let st = region.stats();
    assert!(st.writebacks > 0, "{st:?}");
    assert!(st.faults >= 4 * pages as u64 - 2 * budget as u64, "{st:?}");
    // The last fault's pages may still be awaiting their eviction.
    assert!(st.resident <= budget as u64 + 1, "{st:?}");
    // Only the first touch of each page is zeros; everything after comes from the donor.
    assert_eq!(st.zero_fills, pages as u64, "{st:?}");
    assert!(st.fetched > 0, "{st:?}");
    assert_eq!(st.remote_errors, 0);
    region.release().await.unwrap();
    assert_eq!(s.client.stats().await.unwrap().slabs_held, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reads_and_writes_match_a_shadow_copy() {
    let (pages, budget) = (256, 64);
    let s = setup(pages, budget, 4, PollMode::Blocking).await;
    let r = blocking(move || {
        let r = s.region;
        let a = r.atomics();
        let mut shadow = vec![0u64; pages * WORDS];
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for _ in 0..30_000 {
            let i = rng.random_range(0..pages * WORDS);
            if rng.random_bool(0.5) {
                let v: u64 = rng.random();
                a[i].store(v, Ordering::Relaxed);
                shadow[i] = v;
            } else {
                assert_eq!(a[i].load(Ordering::Relaxed), shadow[i], "word {i}");
            }
        }
        for (i, want) in shadow.iter().enumerate() {
            assert_eq!(a[i].load(Ordering::Relaxed), *want, "word {i} at the end");
        }
        r
    })
    .await;
    let st = r.stats();
    assert!(st.writebacks > 0 && st.clean_drops > 0, "{st:?}");
    assert!(st.resident <= budget as u64 + 1 + 4, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_on_disjoint_and_shared_pages() {
    let (pages, budget, threads, rounds) = (256, 48, 4usize, 3u64);
    let s = setup(pages, budget, 4, busy()).await;
    let r = Arc::new(s.region);
    let mut hs = Vec::new();
    for t in 0..threads {
        let r = r.clone();
        hs.push(std::thread::spawn(move || {
            let a = r.atomics();
            let mut rng = StdRng::seed_from_u64(t as u64);
            for round in 1..=rounds {
                let mut order: Vec<usize> = (0..pages).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                for &p in &order {
                    // Own words: t, t + threads, ... below the last word of the page.
                    for w in (t..WORDS - 1).step_by(threads) {
                        a[p * WORDS + w].store(pattern(round, p, w), Ordering::Relaxed);
                    }
                    // Shared: the last word of every page counts every thread's visits.
                    a[p * WORDS + WORDS - 1].fetch_add(1, Ordering::Relaxed);
                }
                for &p in order.iter().rev() {
                    for w in (t..WORDS - 1).step_by(threads) {
                        let v = a[p * WORDS + w].load(Ordering::Relaxed);
                        assert_eq!(v, pattern(round, p, w), "thread {t} page {p} word {w}");
                    }
                }
            }
        }));
    }
    let r2 = r.clone();
    blocking(move || {
        for h in hs {
            h.join().unwrap();
        }
        let a = r2.atomics();
        for p in 0..pages {
            for w in 0..WORDS - 1 {
                let v = a[p * WORDS + w].load(Ordering::Relaxed);
                assert_eq!(v, pattern(rounds, p, w), "page {p} word {w}");
            }
            let n = a[p * WORDS + WORDS - 1].load(Ordering::Relaxed);
            assert_eq!(n, threads as u64 * rounds, "visits of page {p}");
        }
    })
    .await;
    let st = r.stats();
    assert!(st.writebacks > 0, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_pages_are_dropped_not_written_back() {
    let (pages, budget) = (512, 64);
    let s = setup(pages, budget, 0, busy()).await;
    let r = blocking(move || {
        let r = s.region;
        for p in 0..pages {
            write_page(&r, 1, p);
        }
        // The first read pass still evicts the dirty pages left resident by the writes.
        for p in 0..pages {
            check_page(&r, 1, p);
        }
        let before = r.stats();
        assert!(
            before.writebacks >= pages as u64 - budget as u64,
            "{before:?}"
        );
        for p in 0..pages {
            check_page(&r, 1, p);
        }
        let after = r.stats();
        assert_eq!(
            after.writebacks, before.writebacks,
            "{before:?} -> {after:?}"
        );
        assert!(
            after.clean_drops >= before.clean_drops + (pages - budget) as u64,
            "{before:?} -> {after:?}"
        );
        assert_eq!(after.wp_faults, before.wp_faults, "reads raise no WP fault");
        r
    })
    .await;
    drop(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_prefetch_saves_most_faults() {
    let (pages, budget) = (512, 64);
    let s = setup(pages, budget, 8, busy()).await;
    let r = blocking(move || {
        let r = s.region;
        for p in 0..pages {
            write_page(&r, 7, p);
        }
        let before = r.stats();
        for p in 0..pages {
            check_page(&r, 7, p);
        }
        let after = r.stats();
        let faults = after.faults - before.faults;
        assert!(
            faults < pages as u64 / 2,
            "{faults} faults for {pages} pages"
        );
        assert!(after.prefetched > before.prefetched, "{after:?}");
        assert!(after.prefetch_hits > before.prefetch_hits, "{after:?}");
        // Descending scans are a stride too.
        let before = r.stats();
        for p in (0..pages).rev() {
            check_page(&r, 7, p);
        }
        let faults = r.stats().faults - before.faults;
        assert!(faults < pages as u64 / 2, "{faults} faults descending");
        r
    })
    .await;
    drop(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_that_is_not_whole_pages_is_refused() {
    let d = donor(1).await;
    let client = Arc::new(
        Client::connect(ClientConfig::new(d.addr, SECRET.to_vec()))
            .await
            .unwrap(),
    );
    let e = Region::borrow(client.clone(), RegionConfig::new(PAGE + 1))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, RegionError::BadSize(_)), "{e}");
    // Larger than the donor can lend: refused by the donor, nothing left held.
    let e = Region::borrow(client.clone(), RegionConfig::new(4 << 20))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, RegionError::Remote(_)), "{e}");
    assert_eq!(client.stats().await.unwrap().slabs_held, 0);
}

async fn mortal_region(pages: usize, budget: usize) -> (Region, TestDonor) {
    let d = donor(8).await;
    let mut c = ClientConfig::new(d.addr, SECRET.to_vec());
    c.op_timeout = std::time::Duration::from_secs(2);
    let client = Arc::new(Client::connect(c).await.unwrap());
    let mut cfg = RegionConfig::new(pages * PAGE);
    cfg.budget_pages = budget;
    cfg.prefetch = 0;
    cfg.remote_deadline = std::time::Duration::from_millis(300);
    (Region::borrow(client, cfg).await.unwrap(), d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_back_keeps_the_page_resident_and_intact() {
    let (pages, budget) = (64, 8);
    let (r, d) = mortal_region(pages, budget).await;
    // Half the budget, all dirty: below where idle time evicts down to (the handler keeps
    // room for a fault and its prefetch, at most half the budget), so nothing has gone out.
    let r = blocking(move || {
        for p in 0..budget / 2 {
            write_page(&r, 1, p);
        }
        r
    })
    .await;
    assert_eq!(r.stats().writebacks, 0);
    d.kill().await;
    // New pages are zero-filled locally; evicting the old dirty ones now fails.
    let r = blocking(move || {
        for p in budget / 2..3 * budget {
            write_page(&r, 1, p);
        }
        for p in 0..3 * budget {
            check_page(&r, 1, p);
        }
        r
    })
    .await;
    let st = r.stats();
    assert!(st.writeback_failures >= 1, "{st:?}");
    assert_eq!(st.writebacks, 0, "{st:?}");
    assert_eq!(st.poisoned, 0, "{st:?}");
    assert_eq!(
        st.resident,
        3 * budget as u64,
        "over budget, nothing dropped: {st:?}"
    );
}

/// Run as a child by `a_page_lost_with_its_donor_raises_sigbus`: pages out, kills the donor,
/// touches a page that lives only on it. Exits 3 where the kernel has no UFFDIO_POISON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_touches_a_page_lost_with_its_donor() {
    if std::env::var_os("RMEM_REGION_CHILD").is_none() {
        return;
    }
    let (pages, budget) = (64, 8);
    let (r, d) = mortal_region(pages, budget).await;
    if !r.poisons_lost_pages() {
        std::process::exit(3);
    }
    let r = blocking(move || {
        for p in 0..pages {
            write_page(&r, 2, p);
        }
        check_page(&r, 2, 0);
        check_page(&r, 2, pages - 1);
        r
    })
    .await;
    assert!(r.stats().writebacks > 0);
    d.kill().await;
    // Page 1 went out with the first evictions and is not resident.
    println!("CHILD: touching a lost page");
    blocking(move || check_page(&r, 2, 1)).await;
    println!("CHILD: read a lost page without a fault");
}

#[test]
fn a_page_lost_with_its_donor_raises_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_touches_a_page_lost_with_its_donor",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RMEM_REGION_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.code() == Some(3) {
        eprintln!("this kernel has no UFFDIO_POISON: lost pages stall instead; not tested");
        return;
    }
    assert!(
        stdout.contains("CHILD: touching a lost page"),
        "the child did not get that far: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("without a fault"), "{stdout}");
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{:?}", out.status);
}
