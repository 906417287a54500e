//! The test guest under QEMU TCG (support/guest.rs): it boots with its RAM in a /dev/shm file
//! and checks its memory; damage written into that file is counted; QEMU's own migration over a
//! unix socket carries it on with nothing found wrong. The baseline every rmem migration test
//! stands on.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::NamedTempFile;

use rmem_migrate::Qmp;

mod support;

use support::{find_cold_pages, hash_file, sock, Guest, GuestOpts, COLD_PAGES};

/// Boot to `rmem-guest ready` under TCG on a busy 2-core host.
const BOOT: Duration = Duration::from_secs(120);
/// Ticks come about 3 a second; this bounds a handful of them with room to spare.
const TICKS: Duration = Duration::from_secs(60);
const MIGRATION: Duration = Duration::from_secs(120);

/// A 128 MiB RAM file on /dev/shm, removed when dropped.
fn ram_file(name: &str) -> NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix(&format!("rmem-guest-{name}-"))
        .tempfile_in("/dev/shm")
        .unwrap();
    f.as_file().set_len(128 << 20).unwrap();
    f
}

#[test]
fn a_guest_boots_on_a_ram_file_and_finds_its_memory_intact() {
    let ram = ram_file("boot");
    let t0 = Instant::now();
    let mut g = Guest::start("boot", &GuestOpts::new(ram.path()));
    g.wait_ready(BOOT);
    let booted = t0.elapsed();
    let first = g.wait_ticks(1, TICKS);
    let t1 = Instant::now();
    let last = g.wait_ticks(5, TICKS);
    let rate = (last.n - first.n) as f64 / t1.elapsed().as_secs_f64();
    eprintln!("boot to ready {booted:?}; {rate:.1} rounds/s; {last:?}");
    assert_eq!(last.bad, 0, "{:?}", g.ticks());

    // The guest's RAM is the file: its hot set changes the file between ticks.
    let before = hash_file(ram.path());
    g.wait_ticks(1, TICKS);
    assert_ne!(hash_file(ram.path()), before);
}

#[test]
fn cold_pages_damaged_in_the_ram_file_are_counted_bad() {
    let ram = ram_file("damage");
    let mut g = Guest::start("damage", &GuestOpts::new(ram.path()));
    g.wait_ready(BOOT);
    let before = g.wait_ticks(1, TICKS);
    assert_eq!(before.bad, 0);

    // Every cold page is in the file once, found by its content.
    let pages = find_cold_pages(ram.path());
    assert_eq!(pages.len() as u64, COLD_PAGES);
    const DAMAGED: u64 = 4;
    for &off in pages.iter().step_by(pages.len() / DAMAGED as usize) {
        ram.as_file().write_all_at(&[0xa5; 8], off + 64).unwrap();
    }

    // The guest checks its cold set every 10 rounds, a tick every 3: 5 ticks cover a check.
    let after = g.wait_ticks(5, TICKS);
    eprintln!(
        "{DAMAGED} cold pages damaged at tick {}: {after:?}",
        before.n
    );
    assert!(after.bad > 0, "{:?}", g.ticks());
    assert_eq!(after.bad % DAMAGED, 0, "{:?}", g.ticks());
}

/// Polls `query-migrate` until the migration ends; its last answer.
fn wait_migration(q: &mut Qmp) -> Value {
    let deadline = Instant::now() + MIGRATION;
    loop {
        let r = q.execute("query-migrate", None).unwrap();
        match r["status"].as_str() {
            Some("completed") => return r,
            Some("failed" | "cancelled") => panic!("migration ended: {r}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "migration unfinished: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn qmp(path: &Path) -> Qmp {
    Qmp::connect(path, Duration::from_secs(10)).unwrap()
}

#[test]
fn qemu_migration_over_a_unix_socket_keeps_the_guest_checking_clean() {
    let (sram, dram) = (ram_file("src"), ram_file("dst"));
    let mut src = Guest::start("src", &GuestOpts::new(sram.path()));
    let incoming = GuestOpts {
        incoming: true,
        ..GuestOpts::new(dram.path())
    };
    let mut dst = Guest::start("dst", &incoming);
    src.wait_ready(BOOT);
    src.wait_ticks(2, TICKS);

    let channel = sock("guest-migration");
    let uri = format!("unix:{}", channel.display());
    let (mut sq, mut dq) = (qmp(src.qmp_path()), qmp(dst.qmp_path()));
    dq.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .unwrap();
    sq.execute("migrate", Some(json!({ "uri": uri }))).unwrap();
    let r = wait_migration(&mut sq);
    let _ = std::fs::remove_file(&channel);
    eprintln!(
        "migrated: total {} ms, downtime {} ms, {} bytes",
        r["total-time"], r["downtime"], r["ram"]["transferred"]
    );

    let last_src = *src.ticks().last().unwrap();
    let t = dst.wait_ticks(12, TICKS);
    let ticks = dst.ticks();
    assert!(ticks[0].n > last_src.n, "{last_src:?} then {ticks:?}");
    assert_eq!(t.bad, 0, "{ticks:?}");
}
