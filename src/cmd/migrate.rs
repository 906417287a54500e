//! `rmem migrate`: move a running QEMU guest to another host, driven by hypervisor scripts.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use rmem_migrate::{
    qmp::QmpError, MigrateError, Mode, Policy, Progress, Receiver, RecvOptions, Report,
    SendOptions, Timeouts,
};
use rmem_transport::Provider;

use crate::cmd::parse_size;
use crate::exit::{chain, Code, Failed};

#[derive(Subcommand, Debug)]
pub enum MigrateCmd {
    /// Move the guest of the QEMU behind --qmp to the `rmem migrate recv` at --to.
    ///
    /// The guest's RAM must be a memory-backend-file with share=on on tmpfs or hugetlbfs for
    /// the page modes (stop-copy, precopy); `stream` works with any guest. On failure before
    /// the switch-over the source is left as it was: running, or paused if it was paused.
    ///
    /// Example: rmem migrate send --qmp /run/vm1.qmp --to 10.0.0.2:7480 --mode precopy
    Send(SendArgs),
    /// Receive a guest into the QEMU behind --qmp (started with `-incoming defer` and the same
    /// RAM layout as the source).
    ///
    /// If the migration is abandoned before the switch-over, the destination QEMU is told to
    /// quit: a half-loaded guest never runs.
    ///
    /// Example: rmem migrate recv --listen 0.0.0.0:7480 --qmp /run/vm1-in.qmp
    Recv(RecvArgs),
    /// Where a running `rmem migrate send --control PATH` is: its last progress event and
    /// totals, as JSON with --json.
    Status(ControlArgs),
    /// Cancel a running `rmem migrate send --control PATH`: before the switch-over the source
    /// is put back as it was; after it, nothing changes (the guest lives on the destination).
    Cancel(ControlArgs),
}

#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The control socket given to `rmem migrate send --control`.
    #[arg(long)]
    control: PathBuf,
    /// Status as JSON.
    #[arg(long)]
    json: bool,
}

/// How RAM moves.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Pause, WRITE all RAM one-sided, then device state. Shortest total time.
    StopCopy,
    /// WRITE RAM in rounds while the guest runs (pages found by hashing), pause for the rest.
    Precopy,
    /// QEMU's own migration stream relayed over the transport; any guest configuration.
    Stream,
    /// Resume on the destination at once; it READs pages on first access and the rest in the
    /// background (needs the preload library in the destination QEMU).
    Postcopy,
    /// Pre-copy rounds, then post-copy for the rest instead of a pause to copy it.
    Hybrid,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::StopCopy => Mode::StopCopy,
            ModeArg::Precopy => Mode::Precopy,
            ModeArg::Stream => Mode::Stream,
            ModeArg::Postcopy => Mode::Postcopy,
            ModeArg::Hybrid => Mode::Hybrid,
        }
    }
}

/// Options both agents take.
#[derive(Args, Debug)]
pub struct Common {
    /// QEMU's QMP socket on this host (-qmp unix:PATH,server=on,wait=off).
    #[arg(long, required_unless_present = "file")]
    qmp: Option<PathBuf>,
    /// Without a hypervisor: the shared file (tmpfs or hugetlbfs) whose pages move. send: the
    /// file a process (--pid) writes; recv: the file to fill (created at the source's size).
    #[arg(long, conflicts_with = "qmp")]
    file: Option<PathBuf>,
    /// File with the shared secret both agents hold (else RMEM_SECRET; at least 16 bytes).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Transport provider: `tcp` (software) or `verbs` (RDMA NIC or rxe).
    #[arg(long, default_value = "tcp", env = "RMEM_PROVIDER")]
    provider: Provider,
    /// Directory for the unix socket QEMU's migration connects through.
    #[arg(long, default_value = "/tmp")]
    run_dir: PathBuf,
    /// Seconds to wait for an answer from the other agent or from QEMU.
    #[arg(long, default_value_t = 30)]
    reply_timeout: u64,
    /// Seconds the whole migration may take once connected.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Progress as JSON lines and the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

impl Common {
    fn timeouts(&self) -> Timeouts {
        Timeouts {
            reply: Duration::from_secs(self.reply_timeout.max(1)),
            total: Duration::from_secs(self.timeout.max(1)),
        }
    }

    fn secret(&self) -> Result<Vec<u8>, Failed> {
        rmem_wire::auth::load_secret(self.secret_file.as_deref())
            .map_err(|e| Failed::new(Code::Usage, chain(&e)))
    }
}

#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    common: Common,
    /// The destination agent (`rmem migrate recv --listen`).
    #[arg(long)]
    to: SocketAddr,
    /// With --file: the process writing it (paused with SIGSTOP for the last pass, and left
    /// stopped: its memory now lives at the destination).
    #[arg(long, requires = "file")]
    pid: Option<u32>,
    #[arg(long, value_enum, default_value = "precopy")]
    mode: ModeArg,
    /// Longest pause the guest should see: pre-copy stops when the rest fits in it (also QEMU's
    /// downtime-limit in stream mode).
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Pre-copy rounds at most before the guest is paused anyway.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Bytes/s at most while the guest runs (e.g. 100M): pre-copy rounds in the page modes
    /// (the last pass, with the guest paused, is not capped), QEMU's max-bandwidth in stream
    /// mode (default there 10G, no cap). Post-copy's background pass: `recv
    /// --background-rate`.
    #[arg(long, value_parser = bandwidth)]
    bandwidth: Option<usize>,
    /// Hash both RAMs with the source paused and fail on any difference (costs downtime).
    #[arg(long)]
    verify: bool,
    /// Offer a keyed hash of every page first: the destination copies the pages it already
    /// holds (`recv --dedup-from`) from its own RAM instead of receiving them.
    #[arg(long)]
    dedup: bool,
    /// Stream mode: a QEMU migration capability to turn on at both ends (repeatable), e.g.
    /// `postcopy-ram` (QEMU's own post-copy, started at once) or `multifd` (several
    /// connections, each relayed).
    #[arg(long = "qemu-capability", value_name = "NAME")]
    qemu_capabilities: Vec<String>,
    /// Leave the guest paused on the destination (like `virsh migrate --suspend`); resume it
    /// there with QMP `cont`. Page modes only: QEMU's own stream resumes it by itself.
    #[arg(long)]
    suspend: bool,
    /// A unix socket where `rmem migrate status` and `rmem migrate cancel` reach this
    /// migration.
    #[arg(long)]
    control: Option<PathBuf>,
    /// The socket of rmem's preload library in the source QEMU (started with
    /// LD_PRELOAD=librmem_preload.so RMEM_PRELOAD_SOCKET=PATH): exact dirty pages for pre-copy
    /// (kernel 6.7+). Without it pre-copy finds written pages by hashing.
    #[arg(long)]
    preload_socket: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RecvArgs {
    #[command(flatten)]
    common: Common,
    /// Address to wait for the source agent on.
    #[arg(long)]
    listen: SocketAddr,
    /// Seconds to wait for the source agent to connect.
    #[arg(long, default_value_t = 600)]
    accept_timeout: u64,
    /// The socket of rmem's preload library in the destination QEMU (started with
    /// LD_PRELOAD=librmem_preload.so RMEM_PRELOAD_SOCKET=PATH): needed for post-copy and
    /// hybrid (minor faults on shared memory: kernel 5.14+).
    #[arg(long)]
    preload_socket: Option<PathBuf>,
    /// RAM files of guests already on this host (repeatable): pages a `--dedup` source offers
    /// that are found in them are copied here instead of sent.
    #[arg(long)]
    dedup_from: Vec<PathBuf>,
    /// Post-copy: cap the background pass at this many bytes/s (e.g. 500M) so it leaves the
    /// link to the guest's faults; faults are never held back.
    #[arg(long, value_parser = parse_size)]
    background_rate: Option<usize>,
}

pub fn run(c: MigrateCmd) -> Result<(), Failed> {
    match c {
        MigrateCmd::Send(a) => send(a),
        MigrateCmd::Recv(a) => recv(a),
        MigrateCmd::Status(a) => control(&a, "status"),
        MigrateCmd::Cancel(a) => control(&a, "cancel"),
    }
}

/// Asks a running `send` through its control socket.
fn control(a: &ControlArgs, what: &str) -> Result<(), Failed> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&a.control).map_err(|e| {
        Failed::new(
            Code::Peer,
            format!(
                "no migration answers on {}: {e} (is `rmem migrate send --control` running?)",
                a.control.display()
            ),
        )
    })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    writeln!(s, "{what}").map_err(|e| Failed::new(Code::Peer, e))?;
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| Failed::new(Code::Peer, e))?;
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|e| Failed::new(Code::Failure, format!("malformed answer ({e}): {line}")))?;
    if a.json || what == "cancel" {
        println!("{v}");
    } else {
        println!(
            "phase {}, round {}, {} pages sent, {} MiB relayed, {:.1} s{}",
            v["phase"].as_str().unwrap_or("-"),
            v["round"].as_u64().unwrap_or(0),
            v["pages_sent"].as_u64().unwrap_or(0),
            v["stream_bytes"].as_u64().unwrap_or(0) >> 20,
            v["elapsed_s"].as_f64().unwrap_or(0.0),
            if v["cancelling"].as_bool() == Some(true) {
                " (cancelling)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// What `status` answers: the latest state of a running `send`.
#[derive(Default)]
struct Live {
    phase: String,
    round: u32,
    pages_sent: usize,
    stream_bytes: u64,
}

/// Serves `status` and `cancel` on `path` while the migration runs.
fn serve_control(
    path: &std::path::Path,
    live: Arc<std::sync::Mutex<Live>>,
    cancel: Arc<AtomicBool>,
) -> Result<(), Failed> {
    use std::io::{BufRead, Write};
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
        Failed::new(
            Code::Usage,
            format!("control socket {}: {e}", path.display()),
        )
    })?;
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            if std::io::BufReader::new(&conn).read_line(&mut line).is_err() {
                continue;
            }
            let answer = match line.trim() {
                "cancel" => {
                    cancel.store(true, Ordering::Release);
                    serde_json::json!({"cancelling": true})
                }
                "status" => {
                    let l = live.lock().unwrap_or_else(|e| e.into_inner());
                    serde_json::json!({
                        "phase": l.phase,
                        "round": l.round,
                        "pages_sent": l.pages_sent,
                        "stream_bytes": l.stream_bytes,
                        "elapsed_s": started.elapsed().as_secs_f64(),
                        "cancelling": cancel.load(Ordering::Acquire),
                    })
                }
                other => serde_json::json!({"error": format!("unknown request {other:?}")}),
            };
            let _ = writeln!(&conn, "{answer}");
        }
    });
    Ok(())
}

/// Sets the returned flag on SIGINT or SIGTERM, so a migration is cancelled, not cut.
fn cancel_on_signal() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        f.store(true, Ordering::Release);
        eprintln!("rmem migrate: cancelling (the source is put back as it was)");
    });
    flag
}

/// Progress as JSON lines (`--json`), a progress line on a terminal, or plain lines on stderr
/// otherwise; `live` keeps the latest state for `rmem migrate status`.
fn reporter(json: bool, live: Arc<std::sync::Mutex<Live>>) -> impl FnMut(Progress) {
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let t0 = std::time::Instant::now();
    move |p: Progress| {
        {
            let mut l = live.lock().unwrap_or_else(|e| e.into_inner());
            match &p {
                Progress::Phase { phase } => l.phase = phase.clone(),
                Progress::Round(r) => {
                    l.round = r.round;
                    l.pages_sent += r.pages;
                }
                Progress::Stream { bytes } => l.stream_bytes = *bytes,
                _ => {}
            }
        }
        if json {
            // Each line says when it happened (ms since the command started), for scripts that
            // time the phases.
            let mut v = serde_json::to_value(&p).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "at_ms".into(),
                    serde_json::json!(t0.elapsed().as_millis() as u64),
                );
            }
            println!("{v}");
            return;
        }
        let line = match &p {
            Progress::Listening { addr } => format!("listening on {addr}"),
            Progress::Connected { peer } => format!("connected to {peer}"),
            Progress::Phase { phase } => format!("phase: {phase}"),
            Progress::Round(r) => format!(
                "round {}: {} pages sent ({} zero left out) in {:.0} ms; {} written meanwhile",
                r.round, r.pages, r.zero_pages, r.ms, r.dirtied
            ),
            Progress::Stream { bytes } => format!("relayed {} MiB", bytes >> 20),
        };
        match &bar {
            Some(b) => {
                if matches!(p, Progress::Round(_) | Progress::Phase { .. }) {
                    b.println(&line);
                }
                b.set_message(line);
                if matches!(&p, Progress::Phase { phase } if phase == "done" || phase == "aborted" || phase == "failed")
                {
                    b.finish_and_clear();
                }
            }
            None if matches!(p, Progress::Stream { .. }) => {}
            None => eprintln!("{line}"),
        }
    }
}

fn finish(report: &Report, json: bool) {
    if json {
        let mut v = serde_json::to_value(report).unwrap_or_default();
        v["event"] = "result".into();
        println!("{v}");
        return;
    }
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |d| format!("{d:.0} ms"));
    println!(
        "migrated ({}): {:.0} ms total, downtime {} (QEMU: {}), {} pages sent ({} MiB), {} zero \
         pages left out, {} KiB of QEMU stream; {}",
        report.mode,
        report.total_ms,
        ms(report.downtime_ms),
        report
            .qemu_downtime_ms
            .map_or("-".to_string(), |d| format!("{d} ms")),
        report.pages_sent,
        report.page_bytes >> 20,
        report.zero_pages_skipped,
        report.stream_bytes >> 10,
        report.status
    );
    if let (Some(pages), Some(bytes)) = (report.dedup_pages, report.dedup_bytes_saved) {
        println!(
            "dedup: {pages} pages filled from the destination's own RAM, {} MiB not sent",
            bytes >> 20
        );
    }
    if let Some(log) = &report.dirty_log {
        println!("dirty pages found by: {log}");
    }
}

fn send(a: SendArgs) -> Result<(), Failed> {
    let source = match (&a.common.qmp, &a.common.file, a.pid) {
        (Some(q), None, None) => rmem_migrate::Source::Qemu(q.clone()),
        (None, Some(f), Some(pid)) => rmem_migrate::Source::Process {
            pid,
            file: f.clone(),
        },
        _ => {
            return Err(Failed::new(
                Code::Usage,
                "send needs --qmp SOCKET, or --file PATH with --pid PID",
            ))
        }
    };
    if !a.qemu_capabilities.is_empty() && !matches!(a.mode, ModeArg::Stream) {
        return Err(Failed::new(
            Code::Usage,
            "--qemu-capability is for --mode stream (the page modes use QEMU for device state only)",
        ));
    }
    let opts = SendOptions {
        source,
        to: a.to,
        mode: a.mode.into(),
        secret: a.common.secret()?,
        provider: a.common.provider,
        policy: Policy {
            downtime_target: Duration::from_millis(a.downtime_ms),
            max_rounds: a.max_rounds.max(1),
            post_copy: false,
        },
        verify: a.verify,
        bandwidth: a.bandwidth.map(|b| b as u64),
        run_dir: a.common.run_dir.clone(),
        preload: a.preload_socket.clone(),
        dedup: a.dedup,
        suspend: a.suspend,
        qemu_capabilities: a.qemu_capabilities.clone(),
        timeouts: a.common.timeouts(),
    };
    let cancel = cancel_on_signal();
    let live = Arc::new(std::sync::Mutex::new(Live::default()));
    if let Some(path) = &a.control {
        serve_control(path, live.clone(), cancel.clone())?;
    }
    let mut progress = reporter(a.common.json, live);
    let result = rmem_migrate::send(&opts, &cancel, &mut progress);
    if let Some(path) = &a.control {
        let _ = std::fs::remove_file(path);
    }
    let report = result.map_err(failed)?;
    finish(&report, a.common.json);
    Ok(())
}

fn recv(a: RecvArgs) -> Result<(), Failed> {
    let dest = match (&a.common.qmp, &a.common.file) {
        (Some(q), None) => rmem_migrate::Dest::Qemu(q.clone()),
        (None, Some(f)) => rmem_migrate::Dest::File(f.clone()),
        _ => {
            return Err(Failed::new(
                Code::Usage,
                "recv needs --qmp SOCKET or --file PATH",
            ))
        }
    };
    let opts = RecvOptions {
        listen: a.listen,
        dest,
        secret: a.common.secret()?,
        provider: a.common.provider,
        run_dir: a.common.run_dir.clone(),
        accept: Duration::from_secs(a.accept_timeout.max(1)),
        preload: a.preload_socket.clone(),
        background_rate: a.background_rate.map(|r| r as u64),
        dedup_from: a.dedup_from.clone(),
        timeouts: a.common.timeouts(),
    };
    let mut progress = reporter(a.common.json, Arc::default());
    let rx = Receiver::bind(opts).map_err(failed)?;
    let report = rx.run(&mut progress).map_err(failed)?;
    finish(&report, a.common.json);
    Ok(())
}

/// The exit code of a migration error (see `rmem migrate --help`).
fn failed(e: MigrateError) -> Failed {
    let code = match &e {
        e if e.is_refusal() => Code::Refused,
        MigrateError::Qmp(
            QmpError::Connect { .. } | QmpError::NotQemu(_) | QmpError::NoGreeting { .. },
        ) => Code::Refused,
        MigrateError::Peer(_)
        | MigrateError::Transport(_)
        | MigrateError::Move(_)
        | MigrateError::Pull(rmem_migrate::postcopy::PullError::Source(_)) => Code::Peer,
        MigrateError::Aborted(_) | MigrateError::NotStarted(_) | MigrateError::Cancelled => {
            Code::Aborted
        }
        MigrateError::Verify(_) => Code::Verify,
        _ => Code::Failure,
    };
    Failed::new(code, chain(&e))
}

/// A bandwidth cap of at least 1 MiB/s: below that a migration of any real guest would take
/// days, which is a typo rather than a wish.
fn bandwidth(s: &str) -> Result<usize, String> {
    match parse_size(s)? {
        n if n < 1 << 20 => Err(format!("{s}: a bandwidth cap is at least 1M (bytes/s)")),
        n => Ok(n),
    }
}
