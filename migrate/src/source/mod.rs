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
    decode_sets, encode_sets, Hello, MigrateError, Mode, Msg, PageHello, Progress, RamDesc, Report,
    RoundReport, Timeouts, Welcome, PROTOCOL, VERSION,
};
use crate::control::{Control, Source};
use crate::converge::{Decision, Policy, Round};
use crate::dedup::{self, DedupKey};
use crate::dirty::{page_hashes, DirtyLog, Mapped, PageHashLog};
use crate::mover::{Link, Mover};
use crate::pages::{data_runs, file_holes, PageSet, PAGE};
use crate::phase::{Event, Phase, Phases};
use crate::pipe::{Pipe, PipeError, PipeMemory};
use crate::ram::GuestRam;
use crate::relay::Relay;
use crate::uffd::{attach, Handoff, Register, WrittenLog};

mod hypervisor;
mod passes;
mod peer;

use hypervisor::{
    migrate_to_pause, pause, restore, restore_settings, saved_settings, set_capability,
    wait_loaded, wait_migrated,
};
use passes::{
    all_but_known, collect, dedup_offer, differing, dirty_logs, leave_out, map_regions, send_all,
    send_round, zero_scan_of,
};
use peer::{connect, unexpected, Peer};

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
    /// Bytes/s at most while the guest runs: pre-copy rounds (the pass with the guest paused
    /// is not capped: it is the downtime), and QEMU's `max-bandwidth` in stream mode.
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
    let status = q.status()?;
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
        let event = match e {
            MigrateError::NotStarted(_) => Event::NotStarted,
            _ if lost => Event::PeerLost,
            _ => Event::Abort,
        };
        // Before the switch-over the source still owns the guest: put it back. After it, the
        // source stays paused whatever happens.
        if undo.phases.take(event) == Ok(Phase::Aborted) {
            let _ = peer.send(&Msg::Abort { why: e.detail() });
            restore(&mut q, &undo);
        } else {
            // Paused for good, but QEMU's settings go back all the same: a migration the
            // operator starts next must not stop at a pre-switchover nobody continues.
            restore_settings(&mut q, &undo);
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
    // Page modes on QEMU: QEMU's own migration stops the guest, once set up, and waits for
    // rmem's last pass (see `migrate_to_pause`). Its destination then starts the guest as
    // soon as it has loaded the device state, so a guest to be left paused there (--suspend)
    // is stopped by rmem first instead, as is a process.
    let in_qemu = moves && matches!(q, Control::Qemu(_)) && !(opts.suspend && undo.was_running);
    // Post-copy with nothing to learn at the pause (no rounds, no dedup offers to check again)
    // names its pages before QEMU starts, and QEMU goes from stopping the guest straight on
    // to the device state, as its own post-copy does: no hold at pre-switchover.
    // (A paused guest has no STOP to wait for: it takes the hold.)
    let eager = in_qemu && opts.mode == Mode::Postcopy && !opts.dedup && undo.was_running;
    let mut touched = vec!["x-ignore-shared".to_string()];
    touched.extend(opts.qemu_capabilities.iter().cloned());
    let hold = ["pause-before-switchover", "events"];
    if in_qemu {
        touched.extend(hold.map(String::from));
    }
    undo.saved = Some(saved_settings(q, &touched)?);
    set_capability(q, "x-ignore-shared", moves)?;
    for c in &opts.qemu_capabilities {
        set_capability(q, c, true)?;
    }
    if in_qemu {
        set_capability(q, "events", true)?;
        // Off for plain post-copy, whatever an earlier migration left: nobody continues.
        set_capability(q, "pause-before-switchover", !eager)?;
    }
    let mut params = json!({"downtime-limit": opts.policy.downtime_target.as_millis() as u64});
    if !moves {
        // QEMU's default of 128 MiB/s would make the relay look slow; the caller may cap it.
        params["max-bandwidth"] = json!(opts.bandwidth.unwrap_or(10 << 30));
    }
    q.execute("migrate-set-parameters", Some(params))?;

    let mut paused_at = None;
    // QEMU's migration of the device state, once started: its relay and when it began.
    let mut device: Option<(Relay, Instant)> = None;
    // Post-copy: the scan for zero pages among those the destination still needs.
    let mut zero_scan: Option<Box<dyn FnOnce() + Send>> = None;
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
        // The source's holes: zero on the destination too (its file was punched). Asked
        // again once the dirty log is armed, or the guest paused (see `holes`).
        let mut holes = passes::holes(&regions)?;
        // Pages the destination fills from RAM it already holds: not sent, unless the guest
        // writes them after the offer (checked again at the pause).
        let mut have = if opts.dedup {
            let have = dedup_offer(peer, &regions, &holes, opts.timeouts.total)?;
            leave_out(&mut dest_zero, &have.pages);
            Some(have)
        } else {
            None
        };
        // Pages written since the last round and not yet sent, when a round ran.
        let mut unsent: Option<Vec<PageSet>> = None;
        let mut logs: Vec<Box<dyn DirtyLog>> = Vec::new();
        if opts.mode.precopy() && undo.was_running {
            logs = dirty_logs(handoffs, &regions)?;
            report.dirty_log = logs.first().map(|l| format!("{} ({})", l.kind(), l.cost()));
            progress(Progress::Phase {
                phase: "precopy".into(),
            });
            let mut dirty = collect(&regions, &mut logs)?;
            // Armed now: a hole the guest fills from here on is in the log.
            holes = passes::holes(&regions)?;
            leave_out(&mut dirty, &holes);
            if let Some(have) = &have {
                leave_out(&mut dirty, &have.pages);
            }
            report.zero_pages_skipped += holes.iter().map(PageSet::count).sum::<usize>();
            let exact = logs.first().is_some_and(|l| l.is_exact());
            let capped = Mover {
                rate: opts.bandwidth,
                ..mover
            };
            undo.take(Event::Start)?;
            let mut number = 1;
            loop {
                check_cancel()?;
                peer.poll_abort()?;
                let t = Instant::now();
                let moved = send_round(&capped, &links, &dirty, &mut dest_zero, &mut logs)?;
                let (pages, zeros) = (moved.pages, moved.zero_pages);
                report.requests += moved.requests;
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
                    deferred: moved.deferred,
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
        if eager {
            // Every page: the destination allocated its whole file, and the zero pages
            // (holes included) are named once it runs. Before QEMU starts, so the device
            // state finds them named.
            let needed = all_but_known(&regions, &[], None);
            report.final_pages = Some(needed.iter().map(PageSet::count).sum());
            peer.send(&Msg::Needed {
                bitmaps: encode_sets(&needed),
            })?;
            zero_scan = Some(zero_scan_of(&regions, needed, &dest_zero, &peer.pipe));
            peer.send(&Msg::PagesDone)?;
        }
        paused_at = Some(if in_qemu {
            let (relay, started, at) = migrate_to_pause(q, peer, opts, undo, cancel, !eager)?;
            device = Some((relay, started));
            at
        } else {
            pause(q, undo)?
        });
        tracing::debug!("switch-over: source paused");
        if eager {
            // QEMU goes on to the device state by itself: the destination may run from now.
            undo.take(Event::SwitchToPostCopy)?;
        }
        let last_pass = Instant::now();
        if !opts.mode.postcopy() {
            undo.take(Event::Stop)?;
        }
        let exact = logs.first().is_some_and(|l| l.is_exact());
        // With the source paused nothing changes: what was learnt while it ran is checked
        // now. Offered pages written since go after all.
        let stale = match &mut have {
            Some(have) => {
                let stale = have.take_changed(&peer.key, &regions);
                report.dedup_pages = Some(have.count());
                report.dedup_bytes_saved = Some((have.count() * PAGE) as u64);
                stale
            }
            None => Vec::new(),
        };
        if unsent.is_none() && !opts.mode.postcopy() {
            // No log ran: holes filled since the first look are data now. (Post-copy names
            // every page and finds the holes among them after the switch-over.)
            holes = passes::holes(&regions)?;
            report.zero_pages_skipped += holes.iter().map(PageSet::count).sum::<usize>();
        }
        // The exact log's last word: what it reports now, and the stale offers.
        let mut last_written = |mut last: Vec<PageSet>| -> Result<Vec<PageSet>, MigrateError> {
            for (set, more) in last.iter_mut().zip(collect(&regions, &mut logs)?) {
                set.union_with(&more);
            }
            for (set, more) in last.iter_mut().zip(&stale) {
                set.union_with(more);
            }
            Ok(last)
        };
        if eager {
            // Named before the pause.
        } else if opts.mode.postcopy() {
            let needed: Vec<PageSet> = match unsent {
                // Every page: the destination allocated its whole file, and the zero pages
                // (holes included) are named once it runs, off the pause.
                None => all_but_known(&regions, &[], have.as_ref()),
                Some(last) if exact => last_written(last)?,
                Some(_) => differing(peer, &regions, opts.timeouts.reply)?,
            };
            report.final_pages = Some(needed.iter().map(PageSet::count).sum());
            peer.send(&Msg::Needed {
                bitmaps: encode_sets(&needed),
            })?;
            // Device state (RAM left out) travels now. Loading it may read guest RAM (some
            // devices' post-load does): a page not there yet faults and is pulled. Stop-copy
            // and pre-copy send it only after their last pass, as QEMU orders its own stream.
            if device.is_none() {
                device = Some(start_device_state(q, peer, opts, undo)?);
            }
            zero_scan = Some(zero_scan_of(&regions, needed, &dest_zero, &peer.pipe));
        } else {
            match unsent {
                None => {
                    let all = all_but_known(&regions, &holes, have.as_ref());
                    send_all(&mover, &links, &all, &mut dest_zero, &mut report)?;
                }
                Some(last) if exact => {
                    // The source is paused: what the log reports now is all that is left.
                    let last = last_written(last)?;
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
    if moves && !eager {
        peer.send(&Msg::PagesDone)?;
    }
    let (relay, device_state) = match device.take() {
        Some(d) => d,
        None => start_device_state(q, peer, opts, undo)?,
    };
    if in_qemu && !eager {
        // From here the destination may run at any moment: the source stays paused
        // whatever happens next.
        undo.take(if opts.mode.postcopy() {
            Event::SwitchToPostCopy
        } else {
            Event::DeviceState
        })?;
        q.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))?;
        tracing::debug!("switch-over: QEMU sends the device state");
    }
    if !moves {
        undo.take(Event::Start)?;
        if opts.qemu_capabilities.iter().any(|c| c == "postcopy-ram") {
            // QEMU's own post-copy, at once: its destination runs from the switch.
            q.execute("migrate-start-postcopy", None)?;
        }
    }
    if !moves {
        let done = wait_migrated(q, opts, cancel, &relay, &peer.pipe, progress)?;
        report.qemu_downtime_ms = done.get("downtime").and_then(Value::as_u64);
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
    if moves {
        wait_loaded(q, opts, cancel, peer)?;
    } else {
        let loaded = peer.recv(opts.timeouts.total)?;
        let Msg::Loaded { .. } = loaded else {
            return Err(unexpected("loaded", &loaded));
        };
    }
    report.device_state_ms = Some(device_state.elapsed().as_secs_f64() * 1e3);
    tracing::debug!("switch-over: the destination loaded the device state");
    // The switch-over: from here the source stays paused whatever happens.
    if moves && !(in_qemu && opts.mode.postcopy()) {
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
    tracing::debug!(%status, "switch-over: the destination started");
    if let Some(scan) = zero_scan.take() {
        std::thread::spawn(scan);
    }
    if let Some(p) = paused_at {
        report.downtime_ms = Some(p.elapsed().as_secs_f64() * 1e3);
    }
    if moves {
        // QEMU's own figure for its part; done by now, or about to be. The destination runs
        // already: a failure here is reported, not acted on.
        match wait_migrated(q, opts, cancel, &relay, &peer.pipe, progress) {
            Ok(done) => report.qemu_downtime_ms = done.get("downtime").and_then(Value::as_u64),
            Err(e) => tracing::warn!(error = %e, "the source QEMU after the switch-over"),
        }
    }
    // Closed after the switch-over: closing waits for its threads.
    report.stream_bytes = relay.close();
    restore_settings(q, undo);
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
    report.status = format!("source {}, destination {status}", q.status()?);
    Ok(report)
}

/// Starts QEMU's own migration into a relay socket (device state only in the page modes);
/// returns the relay and when it started.
fn start_device_state(
    q: &mut Control,
    peer: &Peer,
    opts: &SendOptions,
    undo: &mut Undo,
) -> Result<(Relay, Instant), MigrateError> {
    let sock = opts.run_dir.join(format!(
        "rmem-migrate-{}-{}.sock",
        std::process::id(),
        &auth::nonce()[..8]
    ));
    let started = Instant::now();
    let owner = q.qmp().and_then(|m| m.peer_owner());
    let relay = Relay::source(peer.pipe.clone(), &sock, owner)
        .map_err(|e| MigrateError::io(format!("relay socket {}", sock.display()), e))?;
    q.execute(
        "migrate",
        Some(json!({"uri": format!("unix:{}", sock.display())})),
    )?;
    tracing::debug!("switch-over: QEMU's migration started");
    undo.migrating = true;
    Ok((relay, started))
}

fn pulled_pages(r: &Report) -> usize {
    r.pages_sent + r.postcopy.map_or(0, |p| p.pages)
}
