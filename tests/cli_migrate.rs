//! `rmem migrate send` and `recv` as a hypervisor script runs them: a running TCG guest moved
//! stop-copy between two QEMUs on this host, progress and result as JSON lines, exit codes.

#[path = "../migrate/tests/support/mod.rs"]
mod guest_support;

use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use guest_support::{Guest, GuestOpts};
use serde_json::Value;

const SECRET: &str = "cli-migration-secret-0123456789";

/// A file holding the secret, removed when dropped.
struct SecretFile(std::path::PathBuf);

impl SecretFile {
    fn new(tag: &str) -> SecretFile {
        let p =
            std::env::temp_dir().join(format!("rmem-cli-mig-{tag}-{}.secret", std::process::id()));
        std::fs::write(&p, SECRET).unwrap();
        SecretFile(p)
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A source guest booted and ticking, a destination waiting with -incoming defer, both with
/// rmem's preload library when asked; their RAM files and sockets removed when dropped.
struct Pair {
    src: Guest,
    dst: Guest,
    files: Vec<PathBuf>,
}

impl Pair {
    fn start(tag: &str, preload: bool) -> Pair {
        let id = std::process::id();
        let path = |side: &str, ext: &str| {
            let dir = if ext == "ram" {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            dir.join(format!("rmem-cli-{tag}-{side}-{id}.{ext}"))
        };
        let files = vec![
            path("src", "ram"),
            path("dst", "ram"),
            path("src", "sock"),
            path("dst", "sock"),
        ];
        let sock = |i: usize| preload.then(|| files[i].clone());
        let mut src = Guest::start(
            &format!("cli-{tag}-src"),
            &GuestOpts {
                preload: sock(2),
                ..GuestOpts::new(&files[0])
            },
        );
        let dst = Guest::start(
            &format!("cli-{tag}-dst"),
            &GuestOpts {
                incoming: true,
                preload: sock(3),
                ..GuestOpts::new(&files[1])
            },
        );
        src.wait_ready(Duration::from_secs(180));
        src.wait_ticks(3, Duration::from_secs(120));
        Pair { src, dst, files }
    }

    /// The destination's preload socket.
    fn dst_sock(&self) -> &PathBuf {
        &self.files[3]
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// `rmem migrate recv --json` for the pair's destination, with `extra` arguments: the process,
/// its address (from its first line) and the rest of its output.
fn recv(
    p: &Pair,
    secret: &SecretFile,
    extra: &[&str],
) -> (Child, String, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "migrate",
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--json",
            "--qmp",
        ])
        .arg(p.dst.qmp_path())
        .arg("--secret-file")
        .arg(&secret.0)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "listening", "{first}");
    let addr = first["addr"].as_str().unwrap().to_string();
    (child, addr, lines)
}

#[test]
fn send_and_recv_move_a_running_guest_and_report_in_json() {
    let secret = SecretFile::new("move");
    let mut p = Pair::start("move", false);
    let (mut recv, addr, lines) = recv(&p, &secret, &[]);

    let out = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "migrate",
            "send",
            "--mode",
            "stop-copy",
            "--json",
            "--to",
            &addr,
            "--qmp",
        ])
        .arg(p.src.qmp_path())
        .arg("--secret-file")
        .arg(&secret.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "send: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let result = events.last().unwrap();
    assert_eq!(result["event"], "result");
    assert_eq!(result["mode"], "stop-copy");
    assert!(result["pages_sent"].as_u64().unwrap() > 0);
    assert!(
        result["status"]
            .as_str()
            .unwrap()
            .contains("destination running"),
        "{result}"
    );
    assert!(events.iter().any(|e| e["phase"] == "device-state"));

    let rest: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert!(recv.wait().unwrap().success());
    assert_eq!(rest.last().unwrap()["status"], "running");

    let last = p.src.ticks().last().copied().unwrap();
    let t = p.dst.wait_ticks(12, Duration::from_secs(120));
    assert!(t.n > last.n, "{last:?} then {t:?}");
    assert!(
        p.dst.ticks().iter().all(|t| t.bad == 0),
        "{:?}",
        p.dst.ticks()
    );
}

#[test]
fn refusals_and_missing_secrets_have_their_own_exit_codes() {
    let secret = SecretFile::new("refuse");
    let run = |args: &[&str], with_secret: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_rmem"));
        c.args(args).env_remove("RMEM_SECRET");
        if with_secret {
            c.arg("--secret-file").arg(&secret.0);
        }
        c.output().unwrap()
    };
    let send = [
        "migrate",
        "send",
        "--qmp",
        "/nonexistent.qmp",
        "--to",
        "127.0.0.1:1",
    ];
    // No secret: usage.
    let o = run(&send, false);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("secret"));
    // No QEMU behind the socket: refused, nothing touched.
    let o = run(&send, true);
    assert_eq!(o.status.code(), Some(6), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.qmp"));
    let o = run(
        &[
            "migrate",
            "recv",
            "--qmp",
            "/nonexistent.qmp",
            "--listen",
            "127.0.0.1:0",
        ],
        true,
    );
    assert_eq!(o.status.code(), Some(6), "{o:?}");
    // A bandwidth cap too small to be meant: usage, before anything is asked of QEMU.
    let o = run(&[&send[..], &["--bandwidth", "100K"]].concat(), true);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 1M"));
}

#[test]
fn a_source_lost_during_postcopy_stops_the_destination_guest_before_a_wrong_page_runs() {
    let secret = SecretFile::new("lost");
    let mut p = Pair::start("lost", true);
    // A slow background pass: the source is killed while most pages are still there.
    let sock = p.dst_sock().display().to_string();
    let (mut recv, addr, _lines) = recv(
        &p,
        &secret,
        &[
            "--background-rate",
            "4M",
            "--reply-timeout",
            "5",
            "--preload-socket",
            &sock,
        ],
    );
    let mut send = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "migrate", "send", "--mode", "postcopy", "--json", "--to", &addr, "--qmp",
        ])
        .arg(p.src.qmp_path())
        .arg("--secret-file")
        .arg(&secret.0)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let send_out = BufReader::new(send.stdout.take().unwrap());
    let mut in_background = false;
    for l in send_out.lines() {
        let v: Value = serde_json::from_str(&l.unwrap()).unwrap();
        if v["phase"] == "background" {
            in_background = true;
            break;
        }
    }
    assert!(in_background, "the source never reached post-copy");
    send.kill().unwrap();
    let _ = send.wait();

    let status = recv.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut recv.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(5), "recv: {status}\n{err}");
    assert!(err.contains("post-copy"), "{err}");
    // Stopped or gone, and it never counted a bad page.
    let stopped = p.dst.wait_exit(Duration::from_millis(100)) || {
        let mut q = rmem_migrate::Qmp::connect(p.dst.qmp_path(), Duration::from_secs(10)).unwrap();
        q.execute("query-status", None).unwrap()["status"] != "running"
    };
    assert!(
        stopped,
        "the destination guest still runs without its source"
    );
    assert!(
        p.dst.ticks().iter().all(|t| t.bad == 0),
        "{:?}",
        p.dst.ticks()
    );
}

#[test]
fn status_and_cancel_reach_a_running_migration_and_cancel_puts_the_source_back() {
    let secret = SecretFile::new("cancel");
    let control = std::env::temp_dir().join(format!("rmem-cli-cancel-{}.ctl", std::process::id()));
    let mut p = Pair::start("cancel", false);
    let (mut recv, addr, _lines) = recv(&p, &secret, &[]);
    // QEMU's own stream, slowed to 8 MiB/s: a 128 MiB guest takes long enough to cancel.
    let mut send = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "migrate",
            "send",
            "--mode",
            "stream",
            "--bandwidth",
            "8M",
            "--to",
            &addr,
        ])
        .arg("--control")
        .arg(&control)
        .arg("--qmp")
        .arg(p.src.qmp_path())
        .arg("--secret-file")
        .arg(&secret.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ask = |what: &str| {
        Command::new(env!("CARGO_BIN_EXE_rmem"))
            .args(["migrate", what, "--json", "--control"])
            .arg(&control)
            .output()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let o = ask("status");
        if o.status.success() {
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            if v["phase"] == "stream" {
                assert_eq!(v["cancelling"], false);
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never saw the stream phase"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = ask("cancel");
    assert!(o.status.success(), "{o:?}");
    let s = send.wait().unwrap();
    assert_eq!(s.code(), Some(7), "send after cancel: {s}");
    assert!(!control.exists(), "the control socket is removed");
    assert_eq!(recv.wait().unwrap().code(), Some(7), "recv after the abort");
    assert!(
        p.dst.wait_exit(Duration::from_secs(30)),
        "the destination QEMU quits"
    );
    // The source runs on, checking its memory clean.
    let t = p.src.wait_ticks(6, Duration::from_secs(120));
    assert!(p.src.ticks().iter().all(|t| t.bad == 0), "{t:?}");
    // Nothing answers once it is over.
    assert_eq!(ask("status").status.code(), Some(5));
}

#[test]
fn a_connection_cut_before_the_switch_over_leaves_the_source_running() {
    let secret = SecretFile::new("cut");
    let mut p = Pair::start("cut", false);
    let (mut recv, addr, _lines) = recv(&p, &secret, &[]);
    // A slow stream (8 MiB/s), so the cut lands before QEMU completes.
    let mut send = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "migrate",
            "send",
            "--mode",
            "stream",
            "--bandwidth",
            "8M",
            "--json",
        ])
        .args(["--reply-timeout", "5", "--to", &addr, "--qmp"])
        .arg(p.src.qmp_path())
        .arg("--secret-file")
        .arg(&secret.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(send.stdout.take().unwrap()).lines();
    let mut streaming = false;
    for l in out.by_ref() {
        let v: Value = serde_json::from_str(&l.unwrap()).unwrap();
        if v["phase"] == "stream" {
            streaming = true;
            break;
        }
    }
    assert!(streaming, "never reached the stream phase");
    std::thread::sleep(Duration::from_millis(500));
    recv.kill().unwrap();
    let _ = recv.wait();
    let rest: Vec<Value> = out
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert!(
        rest.iter().any(|v| v["phase"] == "aborted"),
        "send reports the abort: {rest:?}"
    );
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut send.stderr.take().unwrap(), &mut err);
    let code = send.wait().unwrap().code();
    assert_eq!(
        code,
        Some(5),
        "the other agent gone: exit 5; stderr:\n{err}"
    );
    // The source runs on, its memory intact.
    let mut q = rmem_migrate::Qmp::connect(p.src.qmp_path(), Duration::from_secs(10)).unwrap();
    let t = std::time::Instant::now();
    while q.execute("query-status", None).unwrap()["status"] != "running" {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the source stays stopped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(q);
    p.src.wait_ticks(6, Duration::from_secs(120));
    assert!(
        p.src.ticks().iter().all(|t| t.bad == 0),
        "{:?}",
        p.src.ticks()
    );
}
