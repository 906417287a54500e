//! Moving a process's memory where no hypervisor runs: a writer process keeps rewriting and
//! checking pages of a shared file on tmpfs; the agents move the file to another one, pausing
//! the process with SIGSTOP for the last pass. With rmem's preload library in the writer, the
//! written pages are found exactly. The two files must hash equal with the writer stopped.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rmem_migrate::pages::file_holes;
use rmem_migrate::{
    send, Dest, Mode, Policy, Progress, Receiver, RecvOptions, SendOptions, Source, Timeouts, PAGE,
};
use rmem_transport::Provider;
use support::{hash_file, image, preload_library};

const SECRET: &[u8] = b"process-migration-secret";

/// The writer, its file, its preload socket; killed and cleaned up when dropped.
struct Writer {
    child: Child,
    file: PathBuf,
    sock: PathBuf,
    ticks: std::sync::mpsc::Receiver<String>,
}

impl Writer {
    fn start(name: &str) -> Writer {
        Writer::start_as(name, None)
    }

    /// The writer as user and group `user` (the tests run as root).
    fn start_as(name: &str, user: Option<u32>) -> Writer {
        use std::os::unix::process::CommandExt;
        let id = std::process::id();
        let file = PathBuf::from(format!("/dev/shm/rmem-proc-{name}-{id}"));
        let sock = std::env::temp_dir().join(format!("rmem-proc-{name}-{id}.sock"));
        let _ = std::fs::remove_file(&file);
        let mut cmd = Command::new(&image().writer);
        if let Some(u) = user {
            cmd.uid(u).gid(u);
        }
        let mut child = cmd
            .arg("--file")
            .arg(&file)
            .env("LD_PRELOAD", preload_library())
            .env("RMEM_PRELOAD_SOCKET", &sock)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, ticks) = std::sync::mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let w = Writer {
            child,
            file,
            sock,
            ticks,
        };
        // Ready, a first tick, and the preload socket there.
        let t = Instant::now();
        let mut ticked = false;
        while !ticked || !w.sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the writer did not start"
            );
            if let Ok(l) = w.ticks.recv_timeout(Duration::from_millis(100)) {
                assert!(!l.contains("bad=") || l.ends_with("bad=0"), "{l}");
                ticked |= l.starts_with("tick ");
            }
        }
        w
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn move_file(w: &Writer, mode: Mode, preload: bool) -> (rmem_migrate::Report, PathBuf) {
    move_file_seeing(w, mode, preload, &mut |_| {})
}

/// `move_file`, `progress` called with the sender's progress as it goes.
fn move_file_seeing(
    w: &Writer,
    mode: Mode,
    preload: bool,
    progress: &mut dyn FnMut(Progress),
) -> (rmem_migrate::Report, PathBuf) {
    let dest = PathBuf::from(format!("{}.moved", w.file.display()));
    let rx = Receiver::bind(RecvOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dest: Dest::File(dest.clone()),
        secret: SECRET.to_vec(),
        provider: Provider::Tcp,
        run_dir: std::env::temp_dir(),
        accept: Duration::from_secs(30),
        preload: None,
        background_rate: None,
        dedup_from: Vec::new(),
        timeouts: Timeouts::default(),
    })
    .unwrap();
    let to = rx.local_addr();
    let recv = std::thread::spawn(move || rx.run(&mut |_| {}));
    let opts = SendOptions {
        source: Source::Process {
            pid: w.child.id(),
            file: w.file.clone(),
        },
        to,
        mode,
        secret: SECRET.to_vec(),
        provider: Provider::Tcp,
        policy: Policy {
            downtime_target: Duration::from_millis(50),
            max_rounds: 5,
            post_copy: false,
        },
        verify: true,
        bandwidth: None,
        run_dir: std::env::temp_dir(),
        preload: preload.then(|| w.sock.clone()),
        dedup: false,
        suspend: false,
        qemu_capabilities: Vec::new(),
        timeouts: Timeouts::default(),
    };
    let report = send(&opts, &AtomicBool::new(false), progress).expect("send");
    let got = recv.join().unwrap().expect("recv");
    assert_eq!(got.status, "received");
    (report, dest)
}

#[test]
fn a_running_writers_file_moves_with_exact_dirty_pages_and_arrives_whole() {
    let w = Writer::start("wp");
    let (r, dest) = move_file(&w, Mode::Precopy, true);
    assert!(
        r.dirty_log.as_deref().unwrap().contains("write-protect"),
        "{r:?}"
    );
    assert_eq!(r.verified, Some(true));
    assert!(!r.rounds.is_empty());
    assert!(r.status.starts_with("source paused"), "{r:?}");
    // Stopped for good: the two files are the same, page for page.
    assert_eq!(hash_file(&w.file), hash_file(&dest));
    let _ = std::fs::remove_file(&dest);
}

#[test]
fn stop_copy_of_a_writer_without_the_preload_library() {
    let w = Writer::start("sc");
    let (r, dest) = move_file(&w, Mode::StopCopy, false);
    assert_eq!(r.verified, Some(true));
    assert_eq!(hash_file(&w.file), hash_file(&dest));
    let _ = std::fs::remove_file(&dest);
}

/// A page the process touches for the first time just before the pause (a hole of its file
/// when the sender mapped it) arrives: the holes are asked for again once it is paused.
#[test]
fn a_hole_filled_just_before_the_pause_arrives() {
    use std::os::unix::fs::FileExt;
    let w = Writer::start("hole");
    let page = vec![0x5au8; PAGE];
    let mut filled = None;
    let (r, dest) = move_file_seeing(&w, Mode::StopCopy, false, &mut |p| {
        if matches!(&p, Progress::Phase { phase } if phase == "stop-and-copy") {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&w.file)
                .unwrap();
            let hole = file_holes(&f).unwrap().iter().last().expect("a hole left");
            f.write_all_at(&page, (hole * PAGE) as u64).unwrap();
            filled = Some(hole);
        }
    });
    let hole = filled.expect("the stop-and-copy phase was reported");
    assert_eq!(r.verified, Some(true));
    let mut got = vec![0u8; PAGE];
    std::fs::File::open(&dest)
        .unwrap()
        .read_exact_at(&mut got, (hole * PAGE) as u64)
        .unwrap();
    assert_eq!(got, page, "page {hole}, a hole until just before the pause");
    assert_eq!(hash_file(&w.file), hash_file(&dest));
    let _ = std::fs::remove_file(&dest);
}

/// QEMU under libvirt runs as its own user with no capabilities, where unprivileged
/// userfaultfds are off by default: the preload library still hands out one for exact dirty
/// pages (see migrate/preload: user-mode-only suffices for asynchronous write-protect).
#[test]
#[ignore = "needs root: runs the writer as user nobody (scripts/test.sh runs it as root)"]
fn a_writer_without_privileges_still_hands_out_exact_dirty_pages() {
    let w = Writer::start_as("nobody", Some(65534));
    let (r, dest) = move_file(&w, Mode::Precopy, true);
    assert!(
        r.dirty_log.as_deref().unwrap().contains("write-protect"),
        "{r:?}"
    );
    assert_eq!(r.verified, Some(true));
    assert_eq!(hash_file(&w.file), hash_file(&dest));
    let _ = std::fs::remove_file(&dest);
}
