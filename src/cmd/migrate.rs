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
    #[arg(long)]
    qmp: PathBuf,
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
    #[arg(long, value_enum, default_value = "precopy")]
    mode: ModeArg,
    /// Longest pause the guest should see: pre-copy stops when the rest fits in it (also QEMU's
    /// downtime-limit in stream mode).
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Pre-copy rounds at most before the guest is paused anyway.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Stream mode: QEMU's max-bandwidth in bytes/s (e.g. 1G); default 10G (no cap).
    #[arg(long, value_parser = parse_size)]
    bandwidth: Option<usize>,
    /// Hash both RAMs with the source paused and fail on any difference (costs downtime).
    #[arg(long)]
    verify: bool,
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
    /// Post-copy: cap the background pass at this many bytes/s (e.g. 500M) so it leaves the
    /// link to the guest's faults; faults are never held back.
    #[arg(long, value_parser = parse_size)]
    background_rate: Option<usize>,
}

pub fn run(c: MigrateCmd) -> Result<(), Failed> {
    match c {
        MigrateCmd::Send(a) => send(a),
        MigrateCmd::Recv(a) => recv(a),
    }
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

/// Progress as JSON lines, or as lines on stderr for a person.
fn reporter(json: bool) -> impl FnMut(Progress) {
    let tty = std::io::stderr().is_terminal();
    move |p: Progress| {
        if json {
            println!("{}", serde_json::to_string(&p).unwrap_or_default());
            return;
        }
        match p {
            Progress::Listening { addr } => eprintln!("listening on {addr}"),
            Progress::Connected { peer } => eprintln!("connected to {peer}"),
            Progress::Phase { phase } => eprintln!("phase: {phase}"),
            Progress::Round(r) => eprintln!(
                "round {}: {} pages sent ({} zero left out) in {:.0} ms; {} written meanwhile",
                r.round, r.pages, r.zero_pages, r.ms, r.dirtied
            ),
            Progress::Stream { bytes } if tty => eprint!("\rrelayed {} MiB", bytes >> 20),
            Progress::Stream { .. } => {}
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
    if let Some(log) = &report.dirty_log {
        println!("dirty pages found by: {log}");
    }
}

fn send(a: SendArgs) -> Result<(), Failed> {
    let opts = SendOptions {
        qmp: a.common.qmp.clone(),
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
        timeouts: a.common.timeouts(),
    };
    let cancel = cancel_on_signal();
    let mut progress = reporter(a.common.json);
    let report = rmem_migrate::send(&opts, &cancel, &mut progress).map_err(failed)?;
    finish(&report, a.common.json);
    Ok(())
}

fn recv(a: RecvArgs) -> Result<(), Failed> {
    let opts = RecvOptions {
        listen: a.listen,
        qmp: a.common.qmp.clone(),
        secret: a.common.secret()?,
        provider: a.common.provider,
        run_dir: a.common.run_dir.clone(),
        accept: Duration::from_secs(a.accept_timeout.max(1)),
        preload: a.preload_socket.clone(),
        background_rate: a.background_rate.map(|r| r as u64),
        timeouts: a.common.timeouts(),
    };
    let mut progress = reporter(a.common.json);
    let rx = Receiver::bind(opts).map_err(failed)?;
    let report = rx.run(&mut progress).map_err(failed)?;
    finish(&report, a.common.json);
    Ok(())
}

/// The exit code of a migration error (see `rmem migrate --help`).
fn failed(e: MigrateError) -> Failed {
    let code = match &e {
        MigrateError::Refused(_)
        | MigrateError::Ram(_)
        | MigrateError::Qmp(
            QmpError::Connect { .. } | QmpError::NotQemu(_) | QmpError::NoGreeting { .. },
        ) => Code::Refused,
        MigrateError::Peer(_)
        | MigrateError::Transport(_)
        | MigrateError::Move(_)
        | MigrateError::Pull(rmem_migrate::postcopy::PullError::Source(_)) => Code::Peer,
        MigrateError::Aborted(_) | MigrateError::Cancelled => Code::Aborted,
        MigrateError::Verify(_) => Code::Verify,
        _ => Code::Failure,
    };
    Failed::new(code, chain(&e))
}
