//! The destination agent (`rmem migrate recv`): beside a QEMU started with `-incoming defer`,
//! it waits for an authenticated source agent, checks the plan against its own guest, exposes
//! the guest's RAM to the source's WRITEs, relays device state into QEMU and resumes the guest
//! when the source says so. If the migration is abandoned before that, it quits its QEMU: a
//! half-loaded guest must never run.

use std::fs::OpenOptions as FileOptions;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmem_transport::{
    open, Access, Buffer, Context, Listener, Mr, OpenOptions, Pd, Provider, Qp, QpConfig, RemoteBuf,
};
use rmem_wire::auth;
use serde_json::{json, Value};

use crate::agent::{
    decode_sets, encode_sets, Hello, MigrateError, Mode, Msg, PageHello, Progress, RamDesc, Report,
    Timeouts, Welcome, PROTOCOL, VERSION,
};
use crate::control::{Control, Dest};
use crate::dedup::{DedupKey, Index};
use crate::dirty::{page_hashes, Mapped};
use crate::mover::Mover;
use crate::pages::{PageSet, PAGE};
use crate::pipe::{Pipe, PipeError, PipeMemory};
use crate::postcopy::{self, PullError, Pulled, Puller};
use crate::prefault::Prefault;
use crate::qmp::QmpError;
use crate::ram::GuestRam;
use crate::relay::Relay;
use crate::uffd::{attach, Handoff, Register};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;

/// What `rmem migrate recv` was asked to do.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    pub listen: SocketAddr,
    /// The QEMU (or file) receiving.
    pub dest: Dest,
    pub secret: Vec<u8>,
    pub provider: Provider,
    /// Where QEMU's incoming unix socket goes.
    pub run_dir: PathBuf,
    /// How long to wait for the source agent to connect.
    pub accept: Duration,
    /// The preload library's socket in the destination QEMU: needed for post-copy.
    pub preload: Option<PathBuf>,
    /// Post-copy: bytes per second for the background pass (faults are never held back).
    pub background_rate: Option<u64>,
    /// RAM files on this host (other guests') whose pages a `--dedup` source need not send.
    pub dedup_from: Vec<PathBuf>,
    pub timeouts: Timeouts,
}

/// A destination agent bound to its address, QEMU checked, waiting for a source.
pub struct Receiver {
    opts: RecvOptions,
    qmp: Control,
    ctx: Context,
    pd: Pd,
    listener: Listener,
    rams: Vec<GuestRam>,
    /// This connection's key for page hashes, and whether the source offers them.
    dedup: Option<DedupKey>,
    /// Per region, the page runs that hold data at the source (allocated ahead here).
    source_data: Vec<Vec<[u64; 2]>>,
}

/// The destination's RAM, punched to zeros, mapped and registered for the source's WRITEs.
struct Region {
    buf: Buffer,
    mr: Mr,
    path: PathBuf,
    /// Page runs to allocate ahead of the source's WRITEs (see [`Prefault`]).
    runs: Vec<[u64; 2]>,
}

impl Receiver {
    /// Checks the destination QEMU is waiting for a migration and starts listening.
    pub fn bind(opts: RecvOptions) -> Result<Receiver, MigrateError> {
        let mut qmp = Control::dest(&opts.dest, opts.timeouts.reply)?;
        let status = qmp.status()?;
        if status != "inmigrate" {
            return Err(MigrateError::Refused(format!(
                "the destination QEMU is {status}, not waiting for a migration: start it with \
                 -incoming defer"
            )));
        }
        let ctx = open(&OpenOptions::new(opts.provider))?;
        let pd = ctx.alloc_pd()?;
        let listener = ctx.listen(opts.listen)?;
        Ok(Receiver {
            opts,
            qmp,
            ctx,
            pd,
            listener,
            rams: Vec::new(),
            dedup: None,
            source_data: Vec::new(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Waits for the source and takes the migration to its end. On failure before the
    /// switch-over, the destination QEMU is told to quit.
    pub fn run(mut self, progress: &mut dyn FnMut(Progress)) -> Result<Report, MigrateError> {
        progress(Progress::Listening {
            addr: self.local_addr().to_string(),
        });
        let t0 = Instant::now();
        let (pipe, plan, caps) = self.accept_source(progress)?;
        let mut started = false;
        let mut result = self.serve(&pipe, plan, &caps, &mut started, progress, t0);
        if let (Err(e), false) = (&result, started) {
            // A source that cancels also ends QEMU's incoming migration, which this side may
            // notice first: its reason, if it sent one, is the real one.
            if !matches!(e, MigrateError::Aborted(_)) {
                if let Ok(Ok(Msg::Abort { why })) = pipe
                    .recv_msg(Duration::from_millis(500))
                    .map(|m| Msg::decode(&m))
                {
                    result = Err(MigrateError::Aborted(why));
                }
            }
        }
        if let Err(e) = &result {
            // Before the source's start the guest must not run here: QEMU quits. If it never
            // ran the guest (no RESUME up to its last word), the source may take it back even
            // though it let the device state go: this QEMU would have started the guest the
            // moment it had loaded it.
            let never_ran = !started && {
                tracing::warn!(error = %e, "migration abandoned: the destination QEMU quits");
                self.quit_qemu()
            };
            if !matches!(e, MigrateError::Aborted(_)) {
                let why = e.detail();
                let m = if never_ran {
                    Msg::NotStarted { why }
                } else {
                    Msg::Abort { why }
                };
                let _ = pipe.send_msg(&m.encode());
            }
        }
        result
    }

    /// Tells QEMU to quit and reads its monitor to the end; true when QEMU is gone and said
    /// nothing of a RESUME on the way: the guest never ran here.
    fn quit_qemu(&mut self) -> bool {
        let reply = self.opts.timeouts.reply;
        let Some(q) = self.qmp.qmp() else {
            let _ = self.qmp.execute("quit", None);
            return false;
        };
        match q.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => {}
            Err(_) => return false,
        }
        q.read_to_close(reply)
            && !q
                .take_events()
                .iter()
                .any(|e| e.get("event").and_then(Value::as_str) == Some("RESUME"))
    }

    /// Accepts connections until one authenticates; returns its pipe and plan.
    fn accept_source(
        &mut self,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Arc<Pipe>, Mode, Vec<String>), MigrateError> {
        let deadline = Instant::now() + self.opts.accept;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrateError::Refused(format!(
                    "no source agent within {:?}",
                    self.opts.accept
                )));
            }
            let inc = match self.listener.incoming(Some(left)) {
                Ok(i) => i,
                Err(rmem_transport::Error::Timeout(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let peer = inc.peer_addr();
            let Ok(hello) = serde_json::from_slice::<Hello>(inc.private()) else {
                tracing::warn!(%peer, "a connection that is not a migration source: refused");
                inc.reject();
                continue;
            };
            let (sq, rq) = (self.ctx.create_cq(256)?, self.ctx.create_cq(256)?);
            let mem = PipeMemory::new(&self.pd)?;
            let nonce_s = auth::nonce();
            let refused = (hello.protocol != PROTOCOL || hello.version != VERSION).then(|| {
                format!(
                    "it speaks {} version {}, the source {} version {}",
                    PROTOCOL, VERSION, hello.protocol, hello.version
                )
            });
            let welcome = Welcome {
                version: VERSION,
                refused: refused.clone(),
                proof: auth::server_proof(&self.opts.secret, &hello.nonce, &nonce_s),
                nonce: nonce_s.clone(),
                credit: mem.credit_word(),
            };
            let cfg = QpConfig::new(&self.pd, &sq).recv_cq(&rq);
            // Until a source proves the secret, a connection that fails is that connection's
            // problem: the destination keeps waiting.
            let qp = match inc.accept(&cfg, &serde_json::to_vec(&welcome).unwrap_or_default()) {
                Ok(qp) => qp,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "a connection failed before it authenticated");
                    continue;
                }
            };
            if refused.is_some() {
                continue;
            }
            let pipe = match mem.start(qp, sq, rq, hello.credit, self.opts.timeouts.reply) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "a connection failed before it authenticated");
                    continue;
                }
            };
            let refuse = |why: String| {
                let _ = pipe.send_msg(&Msg::Refused { why: why.clone() }.encode());
                why
            };
            // Until the source proves the secret, whatever goes wrong concerns that connection
            // only: the destination keeps waiting for the real source.
            let msg = pipe
                .recv_msg(self.opts.timeouts.reply)
                .map_err(MigrateError::from)
                .and_then(|m| Msg::decode(&m));
            match msg {
                Ok(Msg::Auth { proof })
                    if auth::verify_client(
                        &self.opts.secret,
                        &nonce_s,
                        &hello.nonce,
                        "source",
                        &proof,
                    ) => {}
                Ok(_) => {
                    let why =
                        refuse("wrong secret: the source does not prove the shared secret".into());
                    tracing::warn!(%peer, why, "source refused; still waiting");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "a source left before it authenticated; still waiting");
                    continue;
                }
            }
            progress(Progress::Connected {
                peer: peer.to_string(),
            });
            let (mode, ram, caps) = match Msg::decode(&pipe.recv_msg(self.opts.timeouts.reply)?)? {
                Msg::Plan {
                    mode,
                    ram,
                    dedup,
                    capabilities,
                    data,
                } => {
                    self.dedup =
                        dedup.then(|| DedupKey::derive(&self.opts.secret, &hello.nonce, &nonce_s));
                    self.source_data = data;
                    (mode, ram, capabilities)
                }
                m => {
                    return Err(MigrateError::Protocol(format!(
                        "expected a plan, got {m:?}"
                    )))
                }
            };
            if mode.moves_pages() {
                if let Err(why) = self.check_layout(&ram) {
                    let why = refuse(why);
                    return Err(MigrateError::Refused(why));
                }
            }
            if mode.postcopy() {
                let why = if self.opts.preload.is_none() {
                    Some(
                        "post-copy needs rmem's preload library in the destination QEMU \
                          (LD_PRELOAD=librmem_preload.so RMEM_PRELOAD_SOCKET=PATH, then \
                          rmem migrate recv --preload-socket PATH)",
                    )
                } else if self.rams.len() != 1 {
                    Some("post-copy moves guests with one RAM backend only")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(MigrateError::Refused(refuse(why.into())));
                }
            }
            return Ok((pipe, mode, caps));
        }
    }

    /// The destination's RAM must match the source's, backend for backend.
    fn check_layout(&mut self, theirs: &[RamDesc]) -> Result<(), String> {
        self.rams = self.qmp.ram(theirs).map_err(|e| e.to_string())?;
        let ours: Vec<RamDesc> = self
            .rams
            .iter()
            .map(|r| RamDesc {
                id: r.id.clone(),
                size: r.size,
            })
            .collect();
        if ours != theirs {
            let show = |v: &[RamDesc]| {
                v.iter()
                    .map(|r| format!("{} {} MiB", r.id, r.size >> 20))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "RAM layouts differ: the source has [{}], the destination [{}]",
                show(theirs),
                show(&ours)
            ));
        }
        Ok(())
    }

    fn serve(
        &mut self,
        pipe: &Arc<Pipe>,
        mode: Mode,
        caps: &[String],
        started: &mut bool,
        progress: &mut dyn FnMut(Progress),
        t0: Instant,
    ) -> Result<Report, MigrateError> {
        let reply = self.opts.timeouts.reply;
        let moves = mode.moves_pages();
        let regions = if moves {
            self.expose(mode.postcopy())?
        } else {
            Vec::new()
        };
        // Allocated before the source may pause; alongside the first round when the guest
        // runs meanwhile (pre-copy), where only the total time pays for it.
        let prefault = Prefault::start(
            regions
                .iter()
                .map(|r| (r.buf.clone(), r.runs.clone()))
                .collect(),
        );
        let _prefault = if mode.precopy() {
            Some(prefault)
        } else {
            prefault.wait();
            None
        };
        let token = auth::nonce();
        self.qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": moves}]})),
        )?;
        // QEMU's own features the source asked for (its post-copy, multifd): both ends must
        // agree on them.
        for c in caps {
            self.qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": c, "state": true}]})),
            )?;
        }
        let sock = self.opts.run_dir.join(format!(
            "rmem-incoming-{}-{}.sock",
            std::process::id(),
            &token[..8]
        ));
        let _ = std::fs::remove_file(&sock);
        self.qmp.execute(
            "migrate-incoming",
            Some(json!({"uri": format!("unix:{}", sock.display())})),
        )?;
        let relay = Relay::destination(pipe.clone(), sock.clone());
        pipe.send_msg(
            &Msg::Ready {
                regions: regions.iter().map(|r| r.mr.remote()).collect(),
                token: token.clone(),
            }
            .encode(),
        )?;
        let page_qp = if moves {
            Some(self.accept_pages(&token)?)
        } else {
            None
        };
        // Post-copy: QEMU's mapping registered for minor faults (and zapped) before the
        // source can pause and the device state can touch RAM.
        let handoff = match (mode.postcopy(), &self.opts.preload, regions.first()) {
            (true, Some(sock), Some(r)) => Some(attach(
                sock,
                Register::Minor,
                &r.path,
                self.opts.timeouts.reply,
            )?),
            _ => None,
        };
        progress(Progress::Phase {
            phase: "receiving".into(),
        });
        let mut report = Report {
            mode: mode.name().into(),
            ..Report::default()
        };
        let stop = AtomicBool::new(false);
        let pulled = postcopy::Progress::default();
        let (zero_tx, zero_rx) = channel::<PageSet>();
        let mut zero_rx = Some(zero_rx);
        let mut source_ram: Vec<RemoteBuf> = Vec::new();
        let total = self.opts.timeouts.total;
        let rate = self.opts.background_rate;
        let result = std::thread::scope(|sc| {
            let mut puller: Option<std::thread::ScopedJoinHandle<'_, Result<Pulled, PullError>>> =
                None;
            let out = (|| {
                // Serve the source until QEMU has loaded the device state and, in the page
                // modes, the source has said its pages are done (in post-copy the device state
                // travels alongside that message).
                let mut pages_done = !moves;
                let loaded = loop {
                    // Short: the device state's arrival ends the guest's pause.
                    match pipe.recv_msg(Duration::from_millis(1)) {
                        Ok(m) => match Msg::decode(&m)? {
                            Msg::HashRequest => send_hashes(pipe, &regions)?,
                            Msg::PagesDone => {
                                pages_done = true;
                                self.qmp.pages_done();
                            }
                            Msg::DedupOffer { pages } => {
                                let have = self.fill_from_index(pipe, &regions, pages)?;
                                pipe.send_msg(&Msg::DedupHave { bitmaps: have }.encode())?;
                            }
                            Msg::SourceRam { regions: r } => source_ram = r,
                            Msg::Needed { bitmaps } => {
                                let (Some(h), Some((qp, cq)), Some(region), Some(remote)) = (
                                    handoff.as_ref(),
                                    page_qp.as_ref(),
                                    regions.first(),
                                    source_ram.first(),
                                ) else {
                                    return Err(MigrateError::Protocol(
                                        "post-copy pages before the source's RAM".into(),
                                    ));
                                };
                                let needed =
                                    decode_sets(&bitmaps, &page_counts(&regions))?.remove(0);
                                let mut present = PageSet::full(needed.len());
                                for p in needed.iter() {
                                    present.remove(p);
                                }
                                let p = Puller {
                                    handoff: h,
                                    qp,
                                    cq,
                                    local: &region.mr,
                                    remote: *remote,
                                    mover: Mover {
                                        timeout: self.opts.timeouts.reply,
                                        ..Mover::default()
                                    },
                                    present,
                                    rate,
                                };
                                let Some(zr) = zero_rx.take() else {
                                    return Err(MigrateError::Protocol(
                                        "post-copy pages named twice".into(),
                                    ));
                                };
                                let (st, pr) = (&stop, &pulled);
                                puller = Some(sc.spawn(move || p.run(zr, st, pr)));
                            }
                            Msg::ZeroPages { bitmaps } => {
                                let _ = zero_tx
                                    .send(decode_sets(&bitmaps, &page_counts(&regions))?.remove(0));
                            }
                            Msg::Abort { why } => return Err(MigrateError::Aborted(why)),
                            m => {
                                return Err(MigrateError::Protocol(format!(
                                    "unexpected {m:?} before the device state"
                                )))
                            }
                        },
                        Err(PipeError::Timeout(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                    if puller.as_ref().is_some_and(|p| p.is_finished())
                        && pulled.mapped.load(std::sync::atomic::Ordering::Relaxed) == 0
                    {
                        // Finished before it mapped anything: it failed.
                        if let Some(Ok(Err(e))) = puller.take().map(|p| p.join()) {
                            return Err(MigrateError::Pull(e));
                        }
                    }
                    // Post-copy: until the needed pages are named nobody serves a fault, and
                    // QEMU's main loop may be loading the device state and waiting on one:
                    // a QMP query now would wait for it too. The names come before the
                    // device state, so nothing can have loaded yet.
                    if t0.elapsed() > total {
                        return Err(MigrateError::Qemu(format!(
                            "the device state did not load within {total:?}"
                        )));
                    }
                    if handoff.is_some() && zero_rx.is_some() {
                        continue;
                    }
                    let s = match self.qmp.status() {
                        // QEMU exits when it cannot load an incoming migration.
                        Err(MigrateError::Qmp(QmpError::Closed)) => {
                            return Err(MigrateError::Qemu(
                                "the destination QEMU exited while loading the device state \
                                 (its log says why: a device or setting the source has and \
                                 it lacks, say)"
                                    .into(),
                            ))
                        }
                        s => s?,
                    };
                    if s != "inmigrate" && pages_done {
                        break s;
                    }
                };
                let mig = self.qmp.execute("query-migrate", None)?;
                if mig.get("status").and_then(Value::as_str) == Some("failed") {
                    let why = mig
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("loading the device state failed");
                    return Err(MigrateError::Qemu(why.to_string()));
                }
                tracing::debug!(status = %loaded, "switch-over: device state loaded");
                pipe.send_msg(&Msg::Loaded { status: loaded }.encode())?;
                let run = loop {
                    match Msg::decode(&pipe.recv_msg(reply)?)? {
                        Msg::Start { run } => break run,
                        Msg::ZeroPages { bitmaps } => {
                            let _ = zero_tx
                                .send(decode_sets(&bitmaps, &page_counts(&regions))?.remove(0));
                        }
                        Msg::Abort { why } => return Err(MigrateError::Aborted(why)),
                        m => {
                            return Err(MigrateError::Protocol(format!(
                                "expected start, got {m:?}"
                            )))
                        }
                    }
                };
                *started = true;
                tracing::debug!(run, "switch-over: start");
                if run && self.qmp.status()? != "running" {
                    self.qmp.execute("cont", None)?;
                }
                let end = self.qmp.status()?;
                pipe.send_msg(
                    &Msg::Started {
                        status: end.clone(),
                    }
                    .encode(),
                )?;
                if let Some(p) = puller.take() {
                    progress(Progress::Phase {
                        phase: "background".into(),
                    });
                    while !p.is_finished() {
                        match pipe.recv_msg(Duration::from_millis(20)) {
                            Ok(m) => {
                                if let Msg::ZeroPages { bitmaps } = Msg::decode(&m)? {
                                    let _ = zero_tx.send(
                                        decode_sets(&bitmaps, &page_counts(&regions))?.remove(0),
                                    );
                                }
                            }
                            Err(PipeError::Timeout(_)) => {}
                            // The source is gone: the puller finds out on its next READ.
                            Err(_) => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                    match p.join() {
                        Ok(Ok(done)) => {
                            report.postcopy = Some(done);
                            let _ = pipe.send_msg(&Msg::AllPages { pulled: done }.encode());
                        }
                        Ok(Err(e)) => return Err(MigrateError::Pull(e)),
                        Err(_) => {
                            return Err(MigrateError::Protocol(
                                "the post-copy thread panicked".into(),
                            ))
                        }
                    }
                }
                Ok(end)
            })();
            stop.store(true, std::sync::atomic::Ordering::Release);
            out
        });
        let end = match result {
            Ok(end) => end,
            Err(e) => {
                if *started && mode.postcopy() {
                    // The guest runs on pages still missing: it must not go on.
                    self.halt_guest(handoff.as_ref());
                }
                return Err(e);
            }
        };
        report.stream_bytes = relay.close();
        report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        report.status = end;
        progress(Progress::Phase {
            phase: "done".into(),
        });
        Ok(report)
    }

    /// Fills pages the source offered from RAM this host holds (`dedup_from`); returns the
    /// bitmaps of the pages filled.
    fn fill_from_index(
        &mut self,
        pipe: &Pipe,
        regions: &[Region],
        pages: u64,
    ) -> Result<Vec<String>, MigrateError> {
        let total: usize = regions.iter().map(|r| r.buf.len() / PAGE).sum();
        if pages != total as u64 {
            return Err(MigrateError::Protocol(format!(
                "page hashes for {pages} pages; the RAM has {total}"
            )));
        }
        let raw = pipe.recv_bulk(total * 16, self.opts.timeouts.reply)?;
        let Some(key) = self.dedup.clone() else {
            return Err(MigrateError::Protocol(
                "page hashes without --dedup in the plan".into(),
            ));
        };
        let files = self.opts.dedup_from.clone();
        let index = Index::build(&key, &files)
            .map_err(|e| MigrateError::io("indexing the RAM files given to --dedup-from", e))?;
        let mut hashes = raw
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().unwrap_or_default()));
        let mut out = Vec::with_capacity(regions.len());
        for r in regions {
            let wanted: Vec<u128> = hashes.by_ref().take(r.buf.len() / PAGE).collect();
            let (have, filled) = index
                .fill(&key, &wanted, &r.buf)
                .map_err(|e| MigrateError::io("copying pages from --dedup-from files", e))?;
            tracing::info!(
                pages = filled.pages,
                stale = filled.stale,
                indexed = index.len(),
                "pages filled from RAM this host holds"
            );
            out.push(encode_sets(std::slice::from_ref(&have)).remove(0));
        }
        Ok(out)
    }

    /// Stops a post-copy guest whose source is lost; kills its QEMU if it cannot be stopped
    /// (a vCPU waiting for a page that will never come).
    fn halt_guest(&mut self, handoff: Option<&Handoff>) {
        tracing::error!("the source is lost during post-copy: stopping the destination guest");
        if self.qmp.execute("stop", None).is_ok() {
            return;
        }
        if let Some(h) = handoff {
            // SAFETY: kill(2) of the QEMU process that handed us its userfaultfd.
            unsafe { libc::kill(h.pid as i32, libc::SIGKILL) };
        }
    }

    /// Zeroes the guest's RAM files (so pages the source leaves out read as zeros) and
    /// registers them for the source's WRITEs. For post-copy every page is then allocated (as
    /// zeros): UFFDIO_CONTINUE maps pages that are in the file, and a hole would let QEMU see
    /// a zero page without a fault. Each region notes the runs to allocate ahead: those that
    /// hold data at the source (all of them for post-copy).
    fn expose(&mut self, allocate: bool) -> Result<Vec<Region>, MigrateError> {
        let data = std::mem::take(&mut self.source_data);
        self.rams
            .iter()
            .enumerate()
            .map(|(i, ram)| {
                let f = FileOptions::new()
                    .read(true)
                    .write(true)
                    .open(&ram.path)
                    .map_err(|e| MigrateError::io(format!("open {}", ram.path.display()), e))?;
                punch(&f, ram.size, allocate)
                    .map_err(|e| MigrateError::io(format!("zero {}", ram.path.display()), e))?;
                let buf = Buffer::map_file(&f)?;
                let runs = if allocate {
                    vec![[0, u64::MAX]]
                } else {
                    data.get(i).cloned().unwrap_or_default()
                };
                let mr = self.pd.register_buffer(
                    &buf,
                    0,
                    buf.len(),
                    Access::LOCAL_WRITE | Access::REMOTE_WRITE,
                )?;
                Ok(Region {
                    buf,
                    mr,
                    path: ram.path.clone(),
                    runs,
                })
            })
            .collect()
    }

    /// Accepts the page queue pair carrying `token`; refuses any other connection.
    fn accept_pages(&self, token: &str) -> Result<(Qp, rmem_transport::Cq), MigrateError> {
        let deadline = Instant::now() + self.opts.timeouts.reply;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let inc = self.listener.incoming(Some(left))?;
            match serde_json::from_slice::<PageHello>(inc.private()) {
                Ok(h) if h.token == token => {
                    let cq = self.ctx.create_cq(16)?;
                    let qp = inc.accept(&QpConfig::new(&self.pd, &cq), b"")?;
                    return Ok((qp, cq));
                }
                _ => inc.reject(),
            }
        }
    }
}

/// Sends a hash of every page of the destination's RAM.
fn send_hashes(pipe: &Pipe, regions: &[Region]) -> Result<(), MigrateError> {
    let hashes: Vec<u8> = regions
        .iter()
        .flat_map(|r| page_hashes(&Mapped(&r.buf)))
        .flat_map(u128::to_le_bytes)
        .collect();
    pipe.send_msg(
        &Msg::Hashes {
            pages: (hashes.len() / 16) as u64,
        }
        .encode(),
    )?;
    pipe.send_bulk(&hashes)?;
    Ok(())
}

/// Pages in each region.
fn page_counts(regions: &[Region]) -> Vec<usize> {
    regions.iter().map(|r| r.buf.len() / PAGE).collect()
}

/// Frees a file's pages: they read as zeros after, at no cost (tmpfs, hugetlbfs); with
/// `allocate`, allocates them again, zeroed.
fn punch(f: &std::fs::File, len: u64, allocate: bool) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if allocate {
        // SAFETY: as above.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
