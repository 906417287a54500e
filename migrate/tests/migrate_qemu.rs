//! Whole migrations of a real QEMU guest (TCG) between two QEMUs on this host, through the two
//! agents over the tcp provider. The guest rewrites a hot set and checks every page it wrote;
//! after the switch-over its ticks must go on, on the destination, with no bad page.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rmem_migrate::qmp::Qmp;
use rmem_migrate::{
    send, Dest, MigrateError, Mode, Policy, Receiver, RecvOptions, Report, SendOptions, Source,
    Timeouts,
};
use rmem_transport::Provider;
use support::{hash_file, Guest, GuestOpts, Tick};

const BOOT: Duration = Duration::from_secs(180);
const TICKS: Duration = Duration::from_secs(120);
const SECRET: &[u8] = b"migration-test-secret";

/// Two TCG guests at a time are all two cores can run well: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn ram_file(name: &str) -> PathBuf {
    let p = PathBuf::from(format!("/dev/shm/rmem-mig-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

struct Pair {
    src: Guest,
    dst: Guest,
    src_ram: PathBuf,
    dst_ram: PathBuf,
    /// The preload library's sockets in each QEMU, when loaded.
    src_preload: Option<PathBuf>,
    dst_preload: Option<PathBuf>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.src_ram);
        let _ = std::fs::remove_file(&self.dst_ram);
        for s in [&self.src_preload, &self.dst_preload].into_iter().flatten() {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// A booted source (ready, a few ticks in) and a destination waiting for it.
fn pair(name: &str, src: impl FnOnce(GuestOpts) -> GuestOpts, dst_mb: u64) -> Pair {
    pair_with(name, src, dst_mb, false)
}

/// The same, both QEMUs with rmem's preload library.
fn preload_pair(name: &str) -> Pair {
    pair_with(name, |o| o, 128, true)
}

fn pair_with(
    name: &str,
    src: impl FnOnce(GuestOpts) -> GuestOpts,
    dst_mb: u64,
    preload: bool,
) -> Pair {
    let (src_ram, dst_ram) = (
        ram_file(&format!("{name}-src")),
        ram_file(&format!("{name}-dst")),
    );
    let sock = |side: &str| {
        preload.then(|| {
            std::env::temp_dir().join(format!(
                "rmem-preload-{name}-{side}-{}.sock",
                std::process::id()
            ))
        })
    };
    let (src_preload, dst_preload) = (sock("src"), sock("dst"));
    let mut s = Guest::start(
        &format!("{name}-src"),
        &src(GuestOpts {
            preload: src_preload.clone(),
            ..GuestOpts::new(&src_ram)
        }),
    );
    let d = Guest::start(
        &format!("{name}-dst"),
        &GuestOpts {
            incoming: true,
            ram_mb: dst_mb,
            preload: dst_preload.clone(),
            ..GuestOpts::new(&dst_ram)
        },
    );
    s.wait_ready(BOOT);
    let t = s.wait_ticks(3, TICKS);
    assert_eq!(t.bad, 0, "the source guest is sound before the migration");
    Pair {
        src: s,
        dst: d,
        src_ram,
        dst_ram,
        src_preload,
        dst_preload,
    }
}

fn send_opts(p: &Pair, to: SocketAddr, mode: Mode) -> SendOptions {
    SendOptions {
        source: Source::Qemu(p.src.qmp_path().to_path_buf()),
        to,
        mode,
        secret: SECRET.to_vec(),
        provider: Provider::Tcp,
        policy: Policy {
            downtime_target: Duration::from_millis(100),
            max_rounds: 10,
            post_copy: false,
        },
        verify: false,
        bandwidth: None,
        run_dir: std::env::temp_dir(),
        preload: None,
        dedup: false,
        suspend: false,
        qemu_capabilities: Vec::new(),
        timeouts: Timeouts {
            reply: Duration::from_secs(30),
            total: Duration::from_secs(300),
        },
    }
}

fn receiver(p: &Pair) -> Receiver {
    Receiver::bind(RecvOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dest: Dest::Qemu(p.dst.qmp_path().to_path_buf()),
        secret: SECRET.to_vec(),
        provider: Provider::Tcp,
        run_dir: std::env::temp_dir(),
        accept: Duration::from_secs(60),
        preload: p.dst_preload.clone(),
        background_rate: None,
        dedup_from: Vec::new(),
        timeouts: Timeouts::default(),
    })
    .expect("the destination agent binds")
}

/// Runs both agents; returns the source's and the destination's results.
fn migrate(
    p: &Pair,
    opts: impl FnOnce(SendOptions) -> SendOptions,
    mode: Mode,
) -> (Result<Report, MigrateError>, Result<Report, MigrateError>) {
    let rx = receiver(p);
    let to = rx.local_addr();
    let dest = std::thread::spawn(move || rx.run(&mut |_| {}));
    let src = send(
        &opts(send_opts(p, to, mode)),
        &AtomicBool::new(false),
        &mut |_| {},
    );
    (src, dest.join().unwrap())
}

fn status(g: &Guest) -> String {
    let mut q = Qmp::connect(g.qmp_path(), Duration::from_secs(10)).unwrap();
    q.execute("query-status", None).unwrap()["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The source QEMU's migration capabilities are back as they were before rmem (all off in
/// these guests): a later migration must not inherit them, above all not
/// pause-before-switchover, which would hold it at the switch-over.
fn settings_put_back(g: &Guest) {
    let mut q = Qmp::connect(g.qmp_path(), Duration::from_secs(10)).unwrap();
    let caps = q.execute("query-migrate-capabilities", None).unwrap();
    for name in ["pause-before-switchover", "events", "x-ignore-shared"] {
        let on = caps
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["capability"] == name)
            .map(|c| c["state"] == true);
        assert_eq!(on, Some(false), "{name} left on: {caps}");
    }
}

/// The guest goes on, on the destination, past where it left the source, with no bad page.
fn runs_on(dst: &mut Guest, last_on_source: Tick) {
    let t = dst.wait_ticks(12, TICKS);
    assert!(
        t.n > last_on_source.n + 11,
        "ticks {:?} after {last_on_source:?}",
        dst.ticks()
    );
    assert!(
        dst.ticks().iter().all(|t| t.bad == 0),
        "bad pages on the destination: {:?}",
        dst.ticks()
    );
}

/// Both guests paused after the switch-over: their RAM files are the same; resumed on the
/// destination, the guest goes on there.
fn equal_at_the_stop_then_resumed(p: &mut Pair, last: Tick) {
    assert_eq!(status(&p.src), "postmigrate");
    assert_eq!(
        hash_file(&p.src_ram),
        hash_file(&p.dst_ram),
        "the RAM files differ at the stop"
    );
    let mut dq = Qmp::connect(p.dst.qmp_path(), Duration::from_secs(10)).unwrap();
    dq.execute("cont", None).unwrap();
    drop(dq);
    runs_on(&mut p.dst, last);
}

#[test]
fn stop_copy_of_a_paused_guest_leaves_both_rams_equal_and_it_resumes_on_the_destination() {
    let _one = serial();
    let mut p = pair("sc", |o| o, 128);
    let mut q = Qmp::connect(p.src.qmp_path(), Duration::from_secs(10)).unwrap();
    q.execute("stop", None).unwrap();
    // QMP serves one client at a time: the agent needs the monitor.
    drop(q);
    let last = *p.src.ticks().last().unwrap();
    let (src, dst) = migrate(&p, |o| SendOptions { verify: true, ..o }, Mode::StopCopy);
    let (src, dst) = (src.expect("source"), dst.expect("destination"));
    assert_eq!(src.verified, Some(true));
    assert!(src.zero_pages_skipped > 0 && src.pages_sent > 0, "{src:?}");
    assert_eq!(src.pages_sent + src.zero_pages_skipped, 128 << 8);
    assert!(src.stream_bytes > 0, "device state went through the relay");
    // A paused guest stays paused: both RAMs can be compared as they are.
    assert_eq!(dst.status, "paused");
    equal_at_the_stop_then_resumed(&mut p, last);
}

#[test]
fn precopy_moves_a_running_guest_in_rounds_and_both_rams_hash_equal_at_the_stop() {
    let _one = serial();
    let mut p = pair("pre", |o| o, 128);
    // --suspend: the guest stays paused on the destination, so both RAMs can be compared as
    // they were at the stop.
    let (src, dst) = migrate(
        &p,
        |o| SendOptions {
            verify: true,
            suspend: true,
            ..o
        },
        Mode::Precopy,
    );
    let (src, dst) = (src.expect("source"), dst.expect("destination"));
    assert!(!src.rounds.is_empty(), "{src:?}");
    assert!(
        src.final_pages.is_some() && src.verified == Some(true),
        "{src:?}"
    );
    assert!(
        src.dirty_log.as_deref().unwrap().starts_with("page hashes"),
        "{src:?}"
    );
    assert_eq!(dst.status, "paused");
    let last = *p.src.ticks().last().unwrap();
    equal_at_the_stop_then_resumed(&mut p, last);
}

#[test]
fn precopy_with_the_preload_library_tracks_written_pages_exactly() {
    let _one = serial();
    let mut p = preload_pair("wp");
    let sock = p.src_preload.clone();
    let (src, dst) = migrate(
        &p,
        |o| SendOptions {
            verify: true,
            preload: sock,
            ..o
        },
        Mode::Precopy,
    );
    let (src, dst) = (src.expect("source"), dst.expect("destination"));
    assert!(
        src.dirty_log.as_deref().unwrap().contains("write-protect"),
        "{src:?}"
    );
    assert_eq!(src.verified, Some(true), "the exact log missed no page");
    // The guest rewrites 2,048 hot pages a round: an exact log finds about that many, not the
    // whole RAM.
    assert!(
        src.rounds.iter().skip(1).all(|r| r.pages < 8192),
        "rounds after the first send only written pages: {:?}",
        src.rounds
    );
    assert_eq!(dst.status, "running");
    let last = *p.src.ticks().last().unwrap();
    runs_on(&mut p.dst, last);
    settings_put_back(&p.src);
}

#[test]
fn postcopy_resumes_at_once_and_pulls_every_page() {
    let _one = serial();
    let mut p = preload_pair("post");
    let (src, dst) = migrate(&p, |o| o, Mode::Postcopy);
    let (src, dst) = (src.expect("source"), dst.expect("destination"));
    let pulled = src.postcopy.expect("post-copy figures");
    assert_eq!(Some(pulled), dst.postcopy);
    assert!(
        pulled.faults > 0,
        "the guest ran before its RAM arrived: {pulled:?}"
    );
    assert!(
        pulled.local > 0,
        "zero pages were mapped without a READ: {pulled:?}"
    );
    assert_eq!(pulled.pages + pulled.local, 128 << 8, "{pulled:?}");
    assert_eq!(dst.status, "running");
    let last = *p.src.ticks().last().unwrap();
    runs_on(&mut p.dst, last);
    // The source paused for good, its RAM intact; the destination's now differs only where
    // the guest wrote since.
    assert_eq!(status(&p.src), "postmigrate");
    settings_put_back(&p.src);
}

#[test]
fn hybrid_precopies_then_pulls_only_what_was_written_since() {
    let _one = serial();
    let mut p = preload_pair("hyb");
    let sock = p.src_preload.clone();
    let (src, dst) = migrate(
        &p,
        |o| SendOptions {
            preload: sock,
            policy: Policy {
                max_rounds: 2,
                ..o.policy
            },
            ..o
        },
        Mode::Hybrid,
    );
    let (src, dst) = (src.expect("source"), dst.expect("destination"));
    assert!(!src.rounds.is_empty());
    let pulled = src.postcopy.expect("post-copy figures");
    assert!(
        pulled.pages < 8192,
        "only the pages written after the last round are READ: {pulled:?}"
    );
    assert_eq!(pulled.pages + pulled.local, 128 << 8, "{pulled:?}");
    assert_eq!(dst.status, "running");
    let last = *p.src.ticks().last().unwrap();
    runs_on(&mut p.dst, last);
}

#[test]
fn stream_mode_relays_qemus_own_migration_for_any_guest() {
    let _one = serial();
    // memfd RAM: rmem cannot map it, QEMU's stream carries it.
    let mut p = pair("stream", |o| GuestOpts { memfd: true, ..o }, 128);
    let (src, dst) = migrate(&p, |o| o, Mode::Stream);
    let (src, dst) = (src.expect("source"), dst.expect("destination"));
    assert_eq!(src.pages_sent, 0);
    assert!(
        src.stream_bytes > 8 << 20,
        "RAM went through QEMU's stream: {src:?}"
    );
    assert!(src.qemu_downtime_ms.is_some());
    assert_eq!(dst.status, "running");
    let last = *p.src.ticks().last().unwrap();
    runs_on(&mut p.dst, last);
}

#[test]
fn stream_mode_carries_qemus_own_post_copy_and_multifd() {
    let _one = serial();
    for caps in [vec!["postcopy-ram"], vec!["multifd"]] {
        let name = format!("stream-{}", caps[0]);
        let mut p = pair(&name, |o| o, 128);
        let (src, dst) = migrate(
            &p,
            |o| SendOptions {
                qemu_capabilities: caps.iter().map(|c| c.to_string()).collect(),
                ..o
            },
            Mode::Stream,
        );
        let (src, dst) = (src.expect("source"), dst.expect("destination"));
        assert!(src.stream_bytes > 8 << 20, "{caps:?}: {src:?}");
        assert_eq!(dst.status, "running", "{caps:?}");
        let last = *p.src.ticks().last().unwrap();
        runs_on(&mut p.dst, last);
    }
}

/// A refusal leaves the source running as it was.
fn still_running(src: &mut Guest) {
    assert_eq!(status(src), "running");
    let t = src.wait_ticks(3, TICKS);
    assert_eq!(t.bad, 0);
}

#[test]
fn unmovable_guests_wrong_secrets_and_other_layouts_are_refused_before_anything_pauses() {
    let _one = serial();
    // memfd RAM, page mode.
    let mut p = pair("bad", |o| GuestOpts { memfd: true, ..o }, 128);
    let rx = receiver(&p);
    let to = rx.local_addr();
    let e = send(
        &send_opts(&p, to, Mode::StopCopy),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.is_refusal() && e.to_string().contains("memfd"), "{e}");
    still_running(&mut p.src);
    drop(rx);

    // A shared-file guest, a destination of another size, a wrong secret.
    let mut p = pair("bad2", |o| o, 256);
    let rx = receiver(&p);
    let to = rx.local_addr();
    let dest = std::thread::spawn(move || rx.run(&mut |_| {}));
    // A preload socket with no library behind it: refused before anything pauses or
    // reaches the destination, QEMU's settings as they were.
    let mut no_lib = send_opts(&p, to, Mode::Precopy);
    no_lib.preload = Some(std::env::temp_dir().join("rmem-no-such-preload.sock"));
    let e = send(&no_lib, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
    assert!(
        e.to_string().contains("LD_PRELOAD") && e.is_refusal(),
        "{e}"
    );
    still_running(&mut p.src);
    let mut q = Qmp::connect(p.src.qmp_path(), Duration::from_secs(10)).unwrap();
    let caps = q.execute("query-migrate-capabilities", None).unwrap();
    let ignore = caps
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["capability"] == "x-ignore-shared")
        .unwrap();
    assert_eq!(ignore["state"], false, "x-ignore-shared is put back");
    drop(q);
    let mut wrong = send_opts(&p, to, Mode::StopCopy);
    wrong.secret = b"not-the-secret-at-all".to_vec();
    let e = send(&wrong, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
    assert!(e.is_refusal() && e.to_string().contains("secret"), "{e}");
    still_running(&mut p.src);
    // A source speaking another protocol version is refused at the first answer.
    {
        use rmem_migrate::agent::{Hello, Welcome};
        use rmem_transport::{open, OpenOptions, QpConfig};
        let ctx = open(&OpenOptions::new(Provider::Tcp)).unwrap();
        let pd = ctx.alloc_pd().unwrap();
        let cq = ctx.create_cq(16).unwrap();
        let mem = rmem_migrate::PipeMemory::new(&pd).unwrap();
        let hello = Hello {
            protocol: "rmem-migrate".into(),
            version: 99,
            nonce: "n".into(),
            credit: mem.credit_word(),
        };
        let conn = ctx
            .connect(
                to,
                &QpConfig::new(&pd, &cq),
                &serde_json::to_vec(&hello).unwrap(),
            )
            .unwrap();
        let w: Welcome = serde_json::from_slice(&conn.private).unwrap();
        let why = w.refused.expect("version 99 refused");
        assert!(
            why.contains("version 1") && why.contains("version 99"),
            "{why}"
        );
    }
    // The destination kept waiting: a source with the secret but other RAM is refused.
    let e = send(
        &send_opts(&p, to, Mode::StopCopy),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        e.is_refusal() && e.to_string().contains("RAM layouts differ"),
        "{e}"
    );
    still_running(&mut p.src);
    let d = dest.join().unwrap().unwrap_err();
    assert!(d.is_refusal(), "{d}");

    // A destination that is not waiting for a migration.
    let e = Receiver::bind(RecvOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dest: Dest::Qemu(p.src.qmp_path().to_path_buf()),
        secret: SECRET.to_vec(),
        provider: Provider::Tcp,
        run_dir: std::env::temp_dir(),
        accept: Duration::from_secs(5),
        preload: None,
        background_rate: None,
        dedup_from: Vec::new(),
        timeouts: Timeouts::default(),
    })
    .err()
    .expect("a running guest is no destination");
    assert!(e.to_string().contains("-incoming defer"), "{e}");
    still_running(&mut p.src);
}

#[test]
fn a_destination_killed_during_precopy_leaves_the_source_running_intact() {
    let _one = serial();
    let mut p = pair("kill", |o| o, 128);
    let rx = receiver(&p);
    let to = rx.local_addr();
    let dest = std::thread::spawn(move || rx.run(&mut |_| {}));
    let dst_pid = p.dst.pid();
    let mut killed = false;
    // Many short rounds, so the kill lands during pre-copy.
    let opts = SendOptions {
        policy: Policy {
            downtime_target: Duration::from_micros(1),
            max_rounds: 1000,
            post_copy: false,
        },
        ..send_opts(&p, to, Mode::Precopy)
    };
    let e = send(&opts, &AtomicBool::new(false), &mut |ev| {
        if let rmem_migrate::Progress::Round(r) = ev {
            if r.round == 2 && !killed {
                // SAFETY: a plain kill(2) of the destination QEMU this test started.
                unsafe { libc::kill(dst_pid as i32, libc::SIGKILL) };
                killed = true;
            }
        }
    })
    .unwrap_err();
    assert!(killed, "pre-copy ended before the kill: {e}");
    assert!(!e.is_refusal(), "{e}");
    still_running(&mut p.src);
    assert!(p.src.ticks().iter().all(|t| t.bad == 0));
    let _ = dest.join();
}

#[test]
fn cancel_during_precopy_leaves_the_source_running_and_the_destination_gone() {
    let _one = serial();
    let mut p = pair("cancel", |o| o, 128);
    let rx = receiver(&p);
    let to = rx.local_addr();
    let dest = std::thread::spawn(move || rx.run(&mut |_| {}));
    let cancel = AtomicBool::new(false);
    let opts = SendOptions {
        policy: Policy {
            downtime_target: Duration::from_micros(1),
            max_rounds: 1000,
            post_copy: false,
        },
        ..send_opts(&p, to, Mode::Precopy)
    };
    let e = send(&opts, &cancel, &mut |ev| {
        if matches!(ev, rmem_migrate::Progress::Round(ref r) if r.round == 2) {
            cancel.store(true, std::sync::atomic::Ordering::Release);
        }
    })
    .unwrap_err();
    assert!(matches!(e, MigrateError::Cancelled), "{e}");
    let d = dest.join().unwrap().unwrap_err();
    assert!(matches!(d, MigrateError::Aborted(_)), "{d}");
    still_running(&mut p.src);
    assert!(
        p.dst.wait_exit(Duration::from_secs(30)),
        "the destination QEMU still runs after the abort"
    );
}

#[test]
fn dedup_fills_pages_from_a_guest_already_on_the_destination() {
    let _one = serial();
    // A guest from the same kernel and image already runs where the source goes (paused
    // once ready: three TCG guests are too many for two cores).
    let donor_ram = ram_file("dedup-donor");
    let mut donor = Guest::start("dedup-donor", &GuestOpts::new(&donor_ram));
    donor.wait_ready(BOOT);
    let mut q = Qmp::connect(donor.qmp_path(), Duration::from_secs(10)).unwrap();
    q.execute("stop", None).unwrap();
    drop(q);
    let mut p = pair("dedup", |o| o, 128);
    let rx = Receiver::bind(RecvOptions {
        dedup_from: vec![donor_ram.clone()],
        listen: "127.0.0.1:0".parse().unwrap(),
        dest: Dest::Qemu(p.dst.qmp_path().to_path_buf()),
        secret: SECRET.to_vec(),
        provider: Provider::Tcp,
        run_dir: std::env::temp_dir(),
        accept: Duration::from_secs(60),
        preload: None,
        background_rate: None,
        timeouts: Timeouts::default(),
    })
    .unwrap();
    let to = rx.local_addr();
    let dest = std::thread::spawn(move || rx.run(&mut |_| {}));
    let opts = SendOptions {
        dedup: true,
        verify: true,
        ..send_opts(&p, to, Mode::StopCopy)
    };
    let src = send(&opts, &AtomicBool::new(false), &mut |_| {}).expect("source");
    dest.join().unwrap().expect("destination");
    eprintln!(
        "dedup: {} pages filled from the donor, {} bytes not sent, {} pages sent",
        src.dedup_pages.unwrap_or(0),
        src.dedup_bytes_saved.unwrap_or(0),
        src.pages_sent
    );
    let deduped = src.dedup_pages.unwrap();
    assert!(
        deduped > 256,
        "the shared kernel's pages came from the donor: {src:?}"
    );
    assert_eq!(src.dedup_bytes_saved, Some((deduped * 4096) as u64));
    assert_eq!(src.verified, Some(true), "pages filled locally are right");
    assert_eq!(
        src.pages_sent + src.zero_pages_skipped + deduped,
        128 << 8,
        "pages filled from the donor are not sent: {src:?}"
    );
    let last = *p.src.ticks().last().unwrap();
    runs_on(&mut p.dst, last);
    let _ = std::fs::remove_file(&donor_ram);
}

/// The destination QEMU cannot load the device state (the source has a device it lacks) and
/// exits. QEMU's own migration already stopped the guest and let the device state go, but the
/// destination never ran it and says so: the source takes it back, running and intact, in
/// the stopped copy and in post-copy alike.
#[test]
fn a_device_state_the_destination_cannot_load_leaves_the_source_running() {
    let _one = serial();
    let rng = |o: GuestOpts| GuestOpts {
        extra: vec!["-device".into(), "virtio-rng-pci".into()],
        ..o
    };
    for (name, mode, preload) in [
        ("ds-sc", Mode::StopCopy, false),
        ("ds-post", Mode::Postcopy, true),
    ] {
        let mut p = pair_with(name, rng, 128, preload);
        let (src, dst) = migrate(&p, |o| o, mode);
        let e = src.expect_err("a migration whose device state cannot load");
        assert!(matches!(e, MigrateError::NotStarted(_)), "{mode:?}: {e}");
        assert!(e.to_string().contains("did not start"), "{e}");
        let d = dst.expect_err("the destination failed");
        assert!(
            d.to_string().contains("exited while loading"),
            "{mode:?}: {d}"
        );
        assert!(
            e.to_string().contains("exited while loading"),
            "{mode:?}: {e}"
        );
        assert!(
            p.dst.wait_exit(Duration::from_secs(30)),
            "{mode:?}: the destination QEMU still runs"
        );
        still_running(&mut p.src);
        assert!(p.src.ticks().iter().all(|t| t.bad == 0), "{mode:?}");
        settings_put_back(&p.src);
    }
}
