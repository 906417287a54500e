//! The source agent (`rmem migrate send`): beside the running QEMU, it checks the guest can be
//! moved, connects to the destination agent, moves RAM one-sided (stop-copy, pre-copy) or
//! relays QEMU's own stream, and hands over at the switch-over. Until it sends
//! [`Msg::Start`], any failure puts the source back as it was (running, or paused if it was
//! paused); after it, the source never resumes.

use std::fs::OpenOptions as FileOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_transport::{
    open, Access, Buffer, Context, Cq, Mr, OpenOptions, Pd, Provider, Qp, QpConfig, RemoteBuf,
};
use rmem_wire::auth;
use serde_json::{json, Value};

use crate::agent::{
    Hello, MigrateError, Mode, Msg, PageHello, Progress, RamDesc, Report, RoundReport, Timeouts,
    Welcome, PROTOCOL, VERSION,
};
use crate::control::{Control, Source};
use crate::converge::{Decision, Policy, Round};
use crate::dedup::{self, DedupKey};
use crate::dirty::{page_hashes, DirtyLog, Mapped, PageHashLog};
use crate::mover::{Link, Mover};
use crate::pages::{file_holes, is_zero, PageSet, PAGE};
use crate::phase::{Event, Phase, Phases};
use crate::pipe::{Pipe, PipeError, PipeMemory};
use crate::ram::GuestRam;
use crate::relay::Relay;
use crate::uffd::{attach, Handoff, Register, WrittenLog};

/// What `rmem migrate send` was asked to do.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The QEMU (or process) whose memory moves.
    pub source: Source,
    pub to: SocketAddr,
    pub mode: Mode,
    pub secret: Vec<u8>,
    pub provider: Provider,
    pub policy: Policy,
    /// Hash both RAMs with the source paused and fail on any difference (stop-copy; pre-copy
    /// always compares).
    pub verify: bool,
    /// Stream mode: QEMU's `max-bandwidth`, bytes/s.
    pub bandwidth: Option<u64>,
    /// Where the relay's unix socket goes.
    pub run_dir: PathBuf,
    /// The preload library's socket in the source QEMU (`RMEM_PRELOAD_SOCKET`): exact dirty
    /// pages for pre-copy. Without it, pages are found by hashing.
    pub preload: Option<PathBuf>,
    /// Offer page hashes first: the destination fills pages it already holds itself.
    pub dedup: bool,
    /// Stream mode: QEMU migration capabilities turned on at both ends (`postcopy-ram`: QEMU's
    /// own post-copy, started at once; `multifd`: several connections, each relayed).
    pub qemu_capabilities: Vec<String>,
    /// Leave the guest paused on the destination (`virsh migrate --suspend`): the caller
    /// resumes it (QMP `cont`) when it is ready, say after moving the network.
    pub suspend: bool,
    pub timeouts: Timeouts,
}

/// The source's RAM, mapped and registered.
struct Region {
    buf: Buffer,
    mr: Mr,
    /// Pages that were holes in the file when it was mapped: zero, never read.
    holes: PageSet,
}

/// The connection to the destination agent.
struct Peer {
    /// Keys this connection's page hashes (`--dedup`).
    key: DedupKey,
    _ctx: Context,
    _pd: Pd,
    pipe: Arc<Pipe>,
    pages: Option<(Qp, Cq, Vec<RemoteBuf>)>,
}

impl Peer {
    fn send(&self, m: &Msg) -> Result<(), MigrateError> {
        Ok(self.pipe.send_msg(&m.encode())?)
    }

    /// Fails if the destination gave up (between rounds nothing else is expected).
    fn poll_abort(&self) -> Result<(), MigrateError> {
        match self.pipe.recv_msg(Duration::ZERO) {
            Ok(m) => match Msg::decode(&m)? {
                Msg::Abort { why } => Err(MigrateError::Aborted(why)),
                m => Err(unexpected("nothing during pre-copy", &m)),
            },
            Err(crate::pipe::PipeError::Timeout(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn recv(&self, timeout: Duration) -> Result<Msg, MigrateError> {
        let m = Msg::decode(&self.pipe.recv_msg(timeout)?)?;
        match m {
            Msg::Refused { why } => Err(MigrateError::Refused(format!(
                "the destination refused: {why}"
            ))),
            Msg::Abort { why } => Err(MigrateError::Aborted(why)),
            m => Ok(m),
        }
    }
}

/// What the source did to QEMU, to undo it on failure.
#[derive(Default)]
struct Undo {
    was_running: bool,
    paused_by_us: bool,
    migrating: bool,
    /// Where the migration is; only moves the phase table allows.
    phases: Phases,
    /// QEMU's settings before rmem changed them: x-ignore-shared, downtime-limit and
    /// max-bandwidth (a later migration by someone else must not inherit rmem's).
    saved: Option<(Vec<(String, bool)>, Value)>,
}

impl Undo {
    /// Takes `event`; an illegal move is this agent's bug, reported as such.
    fn take(&mut self, event: Event) -> Result<(), MigrateError> {
        self.phases
            .take(event)
            .map(|_| ())
            .map_err(|e| MigrateError::Protocol(e.to_string()))
    }
}

/// Runs the source side of a migration. `cancel` stops it at the next step (before the
/// switch-over); `progress` hears each step.
pub fn send(
    opts: &SendOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, MigrateError> {
    let t0 = Instant::now();
    let mut q = Control::source(&opts.source, opts.timeouts.reply)?;
    let status = run_status(&mut q)?;
    if !matches!(status.as_str(), "running" | "paused") {
        return Err(MigrateError::Refused(format!(
            "the source guest is {status}, not running or paused: nothing to migrate"
        )));
    }
    let mig = q.execute("query-migrate", None)?;
    if let Some(s) = mig.get("status").and_then(Value::as_str) {
        if matches!(s, "active" | "setup" | "postcopy-active" | "device") {
            return Err(MigrateError::Refused(format!(
                "the source QEMU is already migrating ({s})"
            )));
        }
    }
    if matches!(q, Control::Process(_)) && !opts.mode.moves_pages() {
        return Err(MigrateError::Refused(
            "a process has no migration stream of its own: use stop-copy or precopy".into(),
        ));
    }
    if matches!(q, Control::Process(_)) && opts.mode.postcopy() {
        return Err(MigrateError::Refused(
            "post-copy needs a QEMU on the destination to fault pages in".into(),
        ));
    }
    let rams = if opts.mode.moves_pages() {
        q.ram(&[])?
    } else {
        Vec::new()
    };
    // The preload library is asked before the destination is: a QEMU without it is refused
    // with nothing changed anywhere.
    let mut handoffs = Vec::new();
    if let (Some(sock), true) = (&opts.preload, opts.mode.precopy()) {
        for ram in &rams {
            let h = attach(sock, Register::WriteProtect, &ram.path, opts.timeouts.reply)?;
            if h.len != ram.size {
                return Err(MigrateError::Refused(format!(
                    "QEMU maps {} bytes of {}, its backend is {}",
                    h.len,
                    ram.path.display(),
                    ram.size
                )));
            }
            handoffs.push(h);
        }
    }
    let peer = connect(opts, &rams, progress)?;
    let mut undo = Undo {
        was_running: status == "running",
        ..Undo::default()
    };
    let mut result = run(
        opts, &mut q, &peer, &rams, handoffs, &mut undo, cancel, progress, t0,
    );
    if let Err(e) = &result {
        let lost = matches!(
            e,
            MigrateError::Peer(_) | MigrateError::Move(_) | MigrateError::Transport(_)
        );
        let event = if lost { Event::PeerLost } else { Event::Abort };
        // Before the switch-over the source still owns the guest: put it back. After it, the
        // source stays paused whatever happens.
        if undo.phases.take(event) == Ok(Phase::Aborted) {
            let _ = peer.send(&Msg::Abort { why: e.detail() });
            restore(&mut q, &undo);
        }
    }
    if let Ok(r) = &mut result {
        r.phase = undo.phases.now().name().into();
    }
    progress(Progress::Phase {
        phase: undo.phases.now().name().into(),
    });
    result
}

/// The capabilities rmem turns on or off (`names`) and the parameters it sets, as they are now.
fn saved_settings(
    q: &mut Control,
    names: &[String],
) -> Result<(Vec<(String, bool)>, Value), MigrateError> {
    let caps = q.execute("query-migrate-capabilities", None)?;
    let state = |name: &str| {
        caps.as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c.get("capability").and_then(Value::as_str) == Some(name))
            })
            .and_then(|c| c.get("state").and_then(Value::as_bool))
            .unwrap_or(false)
    };
    let caps = names.iter().map(|n| (n.clone(), state(n))).collect();
    let p = q.execute("query-migrate-parameters", None)?;
    let mut params = json!({});
    for k in ["downtime-limit", "max-bandwidth"] {
        if let Some(v) = p.get(k) {
            params[k] = v.clone();
        }
    }
    Ok((caps, params))
}

/// Puts the source back as it was before the migration.
fn restore(q: &mut Control, undo: &Undo) {
    if let Some((caps, params)) = &undo.saved {
        for (name, on) in caps {
            let _ = set_capability(q, name, *on);
        }
        let _ = q.execute("migrate-set-parameters", Some(params.clone()));
    }
    if undo.migrating {
        let _ = q.execute("migrate_cancel", None);
        // Cancelling settles asynchronously; resume only once QEMU left the migration.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            match q.execute("query-migrate", None) {
                Ok(v) if v.get("status").and_then(Value::as_str) == Some("cancelling") => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break,
            }
        }
    }
    if undo.was_running {
        // Cancelling a QEMU-driven pre-copy resumes the guest by itself; `cont` on a running
        // guest is harmless.
        if let Ok(s) = run_status(q) {
            if s != "running" {
                if let Err(e) = q.execute("cont", None) {
                    tracing::error!(error = %e, "could not resume the source guest");
                }
            }
        }
    }
}

fn run_status(q: &mut Control) -> Result<String, MigrateError> {
    let s = q.execute("query-status", None)?;
    Ok(s.get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string())
}

/// Connects and authenticates both ways; sends the plan and waits for the destination.
fn connect(
    opts: &SendOptions,
    rams: &[GuestRam],
    progress: &mut dyn FnMut(Progress),
) -> Result<Peer, MigrateError> {
    let ctx = open(&OpenOptions::new(opts.provider))?;
    let pd = ctx.alloc_pd()?;
    let (sq, rq) = (ctx.create_cq(256)?, ctx.create_cq(256)?);
    let mem = PipeMemory::new(&pd)?;
    let nonce_c = auth::nonce();
    let hello = Hello {
        protocol: PROTOCOL.into(),
        version: VERSION,
        nonce: nonce_c.clone(),
        credit: mem.credit_word(),
    };
    let cfg = QpConfig::new(&pd, &sq)
        .recv_cq(&rq)
        .connect_timeout(opts.timeouts.reply);
    let hello = serde_json::to_vec(&hello).unwrap_or_default();
    let conn = ctx.connect(opts.to, &cfg, &hello)?;
    let welcome: Welcome = serde_json::from_slice(&conn.private).map_err(|e| {
        MigrateError::Protocol(format!(
            "{} did not answer as an rmem migrate agent ({e})",
            opts.to
        ))
    })?;
    if let Some(why) = welcome.refused {
        return Err(MigrateError::Refused(format!(
            "the destination refused: {why}"
        )));
    }
    if !auth::verify_server(&opts.secret, &nonce_c, &welcome.nonce, &welcome.proof) {
        return Err(MigrateError::Refused(
            "the destination does not know the shared secret (wrong --secret-file on one side)"
                .into(),
        ));
    }
    let pipe = Arc::new(mem.start(conn.qp, sq, rq, welcome.credit, opts.timeouts.reply)?);
    progress(Progress::Connected {
        peer: opts.to.to_string(),
    });
    let mut peer = Peer {
        key: DedupKey::derive(&opts.secret, &nonce_c, &welcome.nonce),
        _ctx: ctx,
        _pd: pd,
        pipe,
        pages: None,
    };
    let proof = auth::client_proof(&opts.secret, &welcome.nonce, &nonce_c, "source");
    peer.send(&Msg::Auth { proof })?;
    peer.send(&Msg::Plan {
        mode: opts.mode,
        ram: rams
            .iter()
            .map(|r| RamDesc {
                id: r.id.clone(),
                size: r.size,
            })
            .collect(),
        capabilities: opts.qemu_capabilities.clone(),
        dedup: opts.dedup && opts.mode.moves_pages(),
    })?;
    let (regions, token) = match peer.recv(opts.timeouts.reply)? {
        Msg::Ready { regions, token } => (regions, token),
        m => return Err(unexpected("ready", &m)),
    };
    if opts.mode.moves_pages() {
        if regions.len() != rams.len() || regions.iter().zip(rams).any(|(r, g)| r.len != g.size) {
            return Err(MigrateError::Protocol(
                "the destination's RAM regions do not match the plan".into(),
            ));
        }
        let cq = peer._ctx.create_cq(256)?;
        let cfg = QpConfig::new(&peer._pd, &cq).connect_timeout(opts.timeouts.reply);
        let private = serde_json::to_vec(&PageHello { token }).unwrap_or_default();
        let conn = peer._ctx.connect(opts.to, &cfg, &private)?;
        peer.pages = Some((conn.qp, cq, regions));
    }
    Ok(peer)
}

fn unexpected(want: &str, got: &Msg) -> MigrateError {
    MigrateError::Protocol(format!("expected {want}, got {got:?}"))
}

/// The source's RAM files, mapped and registered (for the destination's READs too in
/// post-copy).
fn map_regions(pd: &Pd, rams: &[GuestRam], readable: bool) -> Result<Vec<Region>, MigrateError> {
    let access = if readable {
        Access::LOCAL_WRITE | Access::REMOTE_READ
    } else {
        Access::LOCAL_WRITE
    };
    rams.iter()
        .map(|ram| {
            let f = FileOptions::new()
                .read(true)
                .write(true)
                .open(&ram.path)
                .map_err(|e| MigrateError::io(format!("open {}", ram.path.display()), e))?;
            let holes = file_holes(&f)
                .map_err(|e| MigrateError::io(format!("holes of {}", ram.path.display()), e))?;
            let buf = Buffer::map_file(&f)?;
            let mr = pd.register_buffer(&buf, 0, buf.len(), access)?;
            Ok(Region { buf, mr, holes })
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn run(
    opts: &SendOptions,
    q: &mut Control,
    peer: &Peer,
    rams: &[GuestRam],
    handoffs: Vec<Handoff>,
    undo: &mut Undo,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
    t0: Instant,
) -> Result<Report, MigrateError> {
    let check_cancel = || {
        if cancel.load(Ordering::Acquire) {
            Err(MigrateError::Cancelled)
        } else {
            Ok(())
        }
    };
    let mut report = Report {
        mode: opts.mode.name().into(),
        ..Report::default()
    };
    let moves = opts.mode.moves_pages();
    let mut touched = vec!["x-ignore-shared".to_string()];
    touched.extend(opts.qemu_capabilities.iter().cloned());
    undo.saved = Some(saved_settings(q, &touched)?);
    set_capability(q, "x-ignore-shared", moves)?;
    for c in &opts.qemu_capabilities {
        set_capability(q, c, true)?;
    }
    let mut params = json!({"downtime-limit": opts.policy.downtime_target.as_millis() as u64});
    if !moves {
        // QEMU's default of 128 MiB/s would make the relay look slow; the caller may cap it.
        params["max-bandwidth"] = json!(opts.bandwidth.unwrap_or(10 << 30));
    }
    q.execute("migrate-set-parameters", Some(params))?;

    let mut paused_at = None;
    // Kept to the end: in post-copy the destination READs from it after the switch-over.
    let regions = if moves {
        map_regions(&peer._pd, rams, opts.mode.postcopy())?
    } else {
        Vec::new()
    };
    if opts.mode.postcopy() {
        peer.send(&Msg::SourceRam {
            regions: regions.iter().map(|r| r.mr.remote()).collect(),
        })?;
    }
    if moves {
        let (qp, cq, remotes) = peer
            .pages
            .as_ref()
            .ok_or_else(|| MigrateError::Protocol("no page connection".into()))?;
        let mover = Mover {
            timeout: opts.timeouts.reply,
            ..Mover::default()
        };
        // The destination punched its RAM files: every page reads as zero there.
        let mut dest_zero: Vec<PageSet> = regions
            .iter()
            .map(|r| PageSet::full(r.buf.len() / PAGE))
            .collect();
        let links: Vec<Link<'_>> = regions
            .iter()
            .zip(remotes)
            .map(|(r, remote)| Link {
                qp,
                cq,
                local: &r.mr,
                remote,
            })
            .collect();
        // Pages the destination fills from RAM it already holds: never sent in the first pass.
        let have = if opts.dedup {
            let have = dedup_offer(peer, &regions, opts.timeouts.total)?;
            for (dz, h) in dest_zero.iter_mut().zip(&have) {
                for p in h.iter() {
                    dz.remove(p);
                }
            }
            let n: usize = have.iter().map(PageSet::count).sum();
            report.dedup_pages = Some(n);
            report.dedup_bytes_saved = Some((n * PAGE) as u64);
            Some(have)
        } else {
            None
        };
        // The first pass leaves out what the destination filled itself and the source's
        // holes (zero there too: its file was punched). A hole written later is reported
        // by the dirty log, or found by the final comparison, like any page.
        let holes_skipped: usize = regions.iter().map(|r| r.holes.count()).sum();
        let without_have = |mut sets: Vec<PageSet>| {
            for (s, r) in sets.iter_mut().zip(&regions) {
                for p in r.holes.iter() {
                    s.remove(p);
                }
            }
            if let Some(have) = &have {
                for (s, h) in sets.iter_mut().zip(have) {
                    for p in h.iter() {
                        s.remove(p);
                    }
                }
            }
            sets
        };
        report.zero_pages_skipped += holes_skipped;
        // Pages written since the last round and not yet sent, when a round ran.
        let mut unsent: Option<Vec<PageSet>> = None;
        let mut logs: Vec<Box<dyn DirtyLog>> = Vec::new();
        if opts.mode.precopy() && undo.was_running {
            logs = dirty_logs(handoffs, &regions)?;
            report.dirty_log = logs.first().map(|l| format!("{} ({})", l.kind(), l.cost()));
            progress(Progress::Phase {
                phase: "precopy".into(),
            });
            let mut dirty = without_have(collect(&regions, &mut logs)?);
            let exact = logs.first().is_some_and(|l| l.is_exact());
            undo.take(Event::Start)?;
            let mut number = 1;
            loop {
                check_cancel()?;
                peer.poll_abort()?;
                let t = Instant::now();
                let (mut pages, mut zeros) = (0, 0);
                for ((link, set), dz) in links.iter().zip(&dirty).zip(&mut dest_zero) {
                    let m = mover.write(*link, set, dz)?;
                    pages += m.pages;
                    report.requests += m.requests;
                    zeros += m.zero_pages;
                }
                let sent = t.elapsed();
                let scanning = Instant::now();
                dirty = collect(&regions, &mut logs)?;
                let scan = scanning.elapsed();
                let dirtied: usize = dirty.iter().map(PageSet::count).sum();
                let r = RoundReport {
                    round: number,
                    pages,
                    zero_pages: zeros,
                    ms: sent.as_secs_f64() * 1e3,
                    dirtied,
                };
                report.pages_sent += pages;
                report.zero_pages_skipped += zeros;
                progress(Progress::Round(r.clone()));
                report.rounds.push(r);
                let round = Round {
                    number,
                    sent_bytes: (pages * PAGE) as u64,
                    elapsed: t.elapsed(),
                    dirty_pages: dirtied,
                    // A hash log ends with every page hashed on both sides (in parallel),
                    // about what one scan of this side took.
                    final_cost: if exact { Duration::ZERO } else { scan },
                };
                match opts.policy.decide(&round) {
                    Decision::AnotherRound => {
                        undo.take(Event::RoundDone)?;
                        number += 1;
                    }
                    Decision::StopAndCopy { .. } | Decision::PostCopy => break,
                }
            }
            unsent = Some(dirty);
        }
        check_cancel()?;
        progress(Progress::Phase {
            phase: if opts.mode.postcopy() {
                "postcopy"
            } else {
                "stop-and-copy"
            }
            .into(),
        });
        paused_at = Some(pause(q, undo)?);
        let last_pass = Instant::now();
        if !opts.mode.postcopy() {
            undo.take(Event::Stop)?;
        }
        let exact = logs.first().is_some_and(|l| l.is_exact());
        if opts.mode.postcopy() {
            let needed: Vec<PageSet> = match unsent {
                None => without_have(
                    regions
                        .iter()
                        .map(|r| PageSet::full(r.buf.len() / PAGE))
                        .collect(),
                ),
                Some(mut last) if exact => {
                    for (set, more) in last.iter_mut().zip(collect(&regions, &mut logs)?) {
                        set.union_with(&more);
                    }
                    last
                }
                Some(_) => differing(peer, &regions, opts.timeouts.reply)?,
            };
            report.final_pages = Some(needed.iter().map(PageSet::count).sum());
            peer.send(&Msg::Needed {
                bitmaps: needed.iter().map(|s| hex::encode(s.to_bytes())).collect(),
            })?;
            // The zero pages among them, found while device state travels (the source is
            // paused for good: what is zero now stays zero).
            let bufs: Vec<Buffer> = regions.iter().map(|r| r.buf.clone()).collect();
            let pipe = peer.pipe.clone();
            let known_zero = dest_zero.clone();
            std::thread::spawn(move || {
                let bitmaps = bufs
                    .iter()
                    .zip(&needed)
                    .zip(&known_zero)
                    .map(|((b, need), dz)| {
                        let mut z = PageSet::new(need.len());
                        let mut page = vec![0u8; PAGE];
                        for p in need.iter().filter(|&p| dz.contains(p)) {
                            if b.read_at(p * PAGE, &mut page).is_ok() && is_zero(&page) {
                                z.insert(p);
                            }
                        }
                        hex::encode(z.to_bytes())
                    })
                    .collect();
                let _ = pipe.send_msg(&Msg::ZeroPages { bitmaps }.encode());
            });
        } else {
            match unsent {
                None => {
                    let all: Vec<PageSet> = without_have(
                        regions
                            .iter()
                            .map(|r| PageSet::full(r.buf.len() / PAGE))
                            .collect(),
                    );
                    send_all(&mover, &links, &all, &mut dest_zero, &mut report)?;
                }
                Some(mut last) if exact => {
                    // The source is paused: what the log reports now is all that is left.
                    for (set, more) in last.iter_mut().zip(collect(&regions, &mut logs)?) {
                        set.union_with(&more);
                    }
                    report.final_pages = Some(last.iter().map(PageSet::count).sum());
                    send_all(&mover, &links, &last, &mut dest_zero, &mut report)?;
                }
                Some(_) => {
                    // A hash log can miss a page written and written back while it was sent: with
                    // the source paused, the pages whose hashes differ are exactly those still to
                    // send. Nothing is assumed zero.
                    let differ = differing(peer, &regions, opts.timeouts.reply)?;
                    report.final_pages = Some(differ.iter().map(PageSet::count).sum());
                    let mut none: Vec<PageSet> = regions
                        .iter()
                        .map(|r| PageSet::new(r.buf.len() / PAGE))
                        .collect();
                    send_all(&mover, &links, &differ, &mut none, &mut report)?;
                }
            }
        }
        if opts.verify && !opts.mode.postcopy() {
            let left: usize = differing(peer, &regions, opts.timeouts.reply)?
                .iter()
                .map(PageSet::count)
                .sum();
            if left != 0 {
                return Err(MigrateError::Verify(left));
            }
            report.verified = Some(true);
        }
        report.page_bytes = (report.pages_sent * PAGE) as u64;
        report.last_pass_ms = Some(last_pass.elapsed().as_secs_f64() * 1e3);
    }
    check_cancel()?;
    progress(Progress::Phase {
        phase: if moves { "device-state" } else { "stream" }.into(),
    });
    let sock = opts.run_dir.join(format!(
        "rmem-migrate-{}-{}.sock",
        std::process::id(),
        &auth::nonce()[..8]
    ));
    if moves {
        peer.send(&Msg::PagesDone)?;
    }
    let device_state = Instant::now();
    let relay = Relay::source(peer.pipe.clone(), &sock)
        .map_err(|e| MigrateError::io(format!("relay socket {}", sock.display()), e))?;
    q.execute(
        "migrate",
        Some(json!({"uri": format!("unix:{}", sock.display())})),
    )?;
    undo.migrating = true;
    if !moves {
        undo.take(Event::Start)?;
        if opts.qemu_capabilities.iter().any(|c| c == "postcopy-ram") {
            // QEMU's own post-copy, at once: its destination runs from the switch.
            q.execute("migrate-start-postcopy", None)?;
        }
    }
    let done = wait_migrated(q, opts, cancel, &relay, &peer.pipe, progress)?;
    report.qemu_downtime_ms = done.get("downtime").and_then(Value::as_u64);
    if !moves {
        // QEMU paused the guest itself for its last pass, `downtime` ago, and the destination
        // QEMU resumes it by itself once loaded: the switch-over is now, whatever the other
        // agent says next.
        let qemu = Duration::from_millis(report.qemu_downtime_ms.unwrap_or(0));
        paused_at = Some(
            Instant::now()
                .checked_sub(qemu)
                .unwrap_or_else(Instant::now),
        );
        undo.take(Event::Stop)?;
        undo.take(Event::AllSent)?;
    }
    let loaded = peer.recv(opts.timeouts.total)?;
    let Msg::Loaded { .. } = loaded else {
        return Err(unexpected("loaded", &loaded));
    };
    report.device_state_ms = Some(device_state.elapsed().as_secs_f64() * 1e3);
    report.stream_bytes = relay.close();
    // The switch-over: from here the source stays paused whatever happens.
    if moves {
        undo.take(if opts.mode.postcopy() {
            Event::SwitchToPostCopy
        } else {
            Event::AllSent
        })?;
    }
    peer.send(&Msg::Start {
        run: undo.was_running && !opts.suspend,
    })?;
    let started = peer.recv(opts.timeouts.reply)?;
    let Msg::Started { status } = started else {
        return Err(unexpected("started", &started));
    };
    if let Some(p) = paused_at {
        report.downtime_ms = Some(p.elapsed().as_secs_f64() * 1e3);
    }
    if opts.mode.postcopy() {
        // The destination runs on this side's RAM until it has every page.
        progress(Progress::Phase {
            phase: "background".into(),
        });
        match peer.recv(opts.timeouts.total)? {
            Msg::AllPages { pulled } => {
                report.postcopy = Some(pulled);
                undo.take(Event::AllSent)?;
            }
            m => return Err(unexpected("all pages", &m)),
        }
        report.page_bytes = (pulled_pages(&report) * PAGE) as u64;
        drop(regions);
    }
    report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    report.status = format!("source {}, destination {status}", run_status(q)?);
    Ok(report)
}

fn pulled_pages(r: &Report) -> usize {
    r.pages_sent + r.postcopy.map_or(0, |p| p.pages)
}

fn set_capability(q: &mut Control, name: &str, on: bool) -> Result<(), MigrateError> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": name, "state": on}]})),
    )?;
    Ok(())
}

/// Pauses the source (if it runs); returns when.
fn pause(q: &mut Control, undo: &mut Undo) -> Result<Instant, MigrateError> {
    let at = Instant::now();
    if undo.was_running {
        q.execute("stop", None)?;
        undo.paused_by_us = true;
    }
    Ok(at)
}

/// The dirty logs for pre-copy: exact through the preload library when QEMU has it, else page
/// hashes.
fn dirty_logs(
    handoffs: Vec<Handoff>,
    regions: &[Region],
) -> Result<Vec<Box<dyn DirtyLog>>, MigrateError> {
    if handoffs.is_empty() {
        return Ok(regions
            .iter()
            .map(|r| Box::new(PageHashLog::new(r.buf.len() / PAGE)) as Box<dyn DirtyLog>)
            .collect());
    }
    handoffs
        .into_iter()
        .map(|h| Ok(Box::new(WrittenLog::new(h)?) as Box<dyn DirtyLog>))
        .collect()
}

fn collect(
    regions: &[Region],
    logs: &mut [Box<dyn DirtyLog>],
) -> Result<Vec<PageSet>, MigrateError> {
    regions
        .iter()
        .zip(logs)
        .map(|(r, log)| {
            let mut set = PageSet::new(r.buf.len() / PAGE);
            log.collect(&Mapped(&r.buf), &mut set)?;
            Ok(set)
        })
        .collect()
}

fn send_all(
    mover: &Mover,
    links: &[Link<'_>],
    sets: &[PageSet],
    dest_zero: &mut [PageSet],
    report: &mut Report,
) -> Result<(), MigrateError> {
    for ((link, set), dz) in links.iter().zip(sets).zip(dest_zero) {
        let m = mover.write(*link, set, dz)?;
        report.pages_sent += m.pages;
        report.requests += m.requests;
        report.zero_pages_skipped += m.zero_pages;
    }
    Ok(())
}

/// Offers a keyed hash of every page; returns the pages the destination filled itself.
fn dedup_offer(
    peer: &Peer,
    regions: &[Region],
    timeout: Duration,
) -> Result<Vec<PageSet>, MigrateError> {
    let hashes: Vec<Vec<u128>> = regions
        .iter()
        .map(|r| dedup::offer(&peer.key, &Mapped(&r.buf), &r.holes))
        .collect();
    let total: usize = hashes.iter().map(Vec::len).sum();
    peer.send(&Msg::DedupOffer {
        pages: total as u64,
    })?;
    let raw: Vec<u8> = hashes
        .iter()
        .flatten()
        .flat_map(|h| h.to_le_bytes())
        .collect();
    peer.pipe.send_msg(&raw)?;
    match peer.recv(timeout)? {
        Msg::DedupHave { bitmaps } if bitmaps.len() == regions.len() => bitmaps
            .iter()
            .zip(regions)
            .map(|(b, r)| {
                hex::decode(b)
                    .ok()
                    .and_then(|bytes| PageSet::from_bytes(r.buf.len() / PAGE, &bytes))
                    .ok_or_else(|| MigrateError::Protocol("a malformed page bitmap".into()))
            })
            .collect(),
        m => Err(unexpected("the pages the destination holds", &m)),
    }
}

/// The pages whose hashes differ between the two sides, per region.
fn differing(
    peer: &Peer,
    regions: &[Region],
    timeout: Duration,
) -> Result<Vec<PageSet>, MigrateError> {
    peer.send(&Msg::HashRequest)?;
    // Hash this side while the destination hashes its own.
    let ours: Vec<Vec<u128>> = regions
        .iter()
        .map(|r| page_hashes(&Mapped(&r.buf)))
        .collect();
    let total: usize = ours.iter().map(Vec::len).sum();
    match peer.recv(timeout)? {
        Msg::Hashes { pages } if pages == total as u64 => {}
        m => return Err(unexpected("hashes of every page", &m)),
    }
    let raw = peer.pipe.recv_msg(timeout)?;
    if raw.len() != total * 16 {
        return Err(MigrateError::Protocol(format!(
            "{} bytes of hashes for {total} pages",
            raw.len()
        )));
    }
    let mut theirs = raw
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().unwrap_or_default()));
    Ok(ours
        .iter()
        .map(|hs| {
            let mut set = PageSet::new(hs.len());
            for (p, h) in hs.iter().enumerate() {
                if theirs.next() != Some(*h) {
                    set.insert(p);
                }
            }
            set
        })
        .collect())
}

/// Waits for QEMU's side of the migration to finish, relaying meanwhile.
fn wait_migrated(
    q: &mut Control,
    opts: &SendOptions,
    cancel: &AtomicBool,
    relay: &Relay,
    pipe: &Pipe,
    progress: &mut dyn FnMut(Progress),
) -> Result<Value, MigrateError> {
    let t = Instant::now();
    let mut shown = 0;
    loop {
        if cancel.load(Ordering::Acquire) {
            return Err(MigrateError::Cancelled);
        }
        if let Some(why) = pipe.failure() {
            return Err(PipeError::Failed(why).into());
        }
        let v = q.execute("query-migrate", None)?;
        match v.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => return Ok(v),
            "failed" | "cancelled" => {
                let why = v
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(MigrateError::Qemu(why.to_string()));
            }
            _ => {}
        }
        if t.elapsed() > opts.timeouts.total {
            return Err(MigrateError::Qemu(format!(
                "not finished after {:?}",
                opts.timeouts.total
            )));
        }
        let b = relay.bytes();
        if b >= shown + (8 << 20) {
            shown = b;
            progress(Progress::Stream { bytes: b });
        }
        // The guest is paused while QEMU finishes: poll often (a QMP round trip is cheap).
        std::thread::sleep(Duration::from_millis(2));
    }
}
