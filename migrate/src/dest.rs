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
    open, Access, Buffer, Context, Listener, Mr, OpenOptions, Pd, Provider, Qp, QpConfig,
};
use rmem_wire::auth;
use serde_json::{json, Value};

use crate::agent::{
    Hello, MigrateError, Mode, Msg, PageHello, Progress, RamDesc, Report, Timeouts, Welcome,
    PROTOCOL, VERSION,
};
use crate::dirty::{page_hashes, Mapped};
use crate::pipe::{Pipe, PipeError, PipeMemory};
use crate::qmp::Qmp;
use crate::ram::{guest_ram, GuestRam};
use crate::relay::Relay;

/// What `rmem migrate recv` was asked to do.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    pub listen: SocketAddr,
    pub qmp: PathBuf,
    pub secret: Vec<u8>,
    pub provider: Provider,
    /// Where QEMU's incoming unix socket goes.
    pub run_dir: PathBuf,
    /// How long to wait for the source agent to connect.
    pub accept: Duration,
    pub timeouts: Timeouts,
}

/// A destination agent bound to its address, QEMU checked, waiting for a source.
pub struct Receiver {
    opts: RecvOptions,
    qmp: Qmp,
    ctx: Context,
    pd: Pd,
    listener: Listener,
    rams: Vec<GuestRam>,
}

/// The destination's RAM, punched to zeros, mapped and registered for the source's WRITEs.
struct Region {
    buf: Buffer,
    mr: Mr,
}

impl Receiver {
    /// Checks the destination QEMU is waiting for a migration and starts listening.
    pub fn bind(opts: RecvOptions) -> Result<Receiver, MigrateError> {
        let mut qmp = Qmp::connect(&opts.qmp, opts.timeouts.reply)?;
        let status = status(&mut qmp)?;
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
        let (pipe, plan) = self.accept_source(progress)?;
        let mut started = false;
        let result = self.serve(&pipe, plan, &mut started, progress, t0);
        if let Err(e) = &result {
            if !matches!(e, MigrateError::Aborted(_)) {
                let _ = pipe.send_msg(&Msg::Abort { why: e.to_string() }.encode());
            }
            if !started {
                tracing::warn!(error = %e, "migration abandoned: the destination QEMU quits");
                let _ = self.qmp.execute("quit", None);
            }
        }
        result
    }

    /// Accepts connections until one authenticates; returns its pipe and plan.
    fn accept_source(
        &mut self,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Arc<Pipe>, Mode), MigrateError> {
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
            let qp = inc.accept(&cfg, &serde_json::to_vec(&welcome).unwrap_or_default())?;
            if refused.is_some() {
                continue;
            }
            let pipe = Arc::new(mem.start(qp, sq, rq, hello.credit, self.opts.timeouts.reply)?);
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
            let (mode, ram) = match Msg::decode(&pipe.recv_msg(self.opts.timeouts.reply)?)? {
                Msg::Plan { mode, ram, .. } => (mode, ram),
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
            return Ok((pipe, mode));
        }
    }

    /// The destination's RAM must match the source's, backend for backend.
    fn check_layout(&mut self, theirs: &[RamDesc]) -> Result<(), String> {
        self.rams = guest_ram(&mut self.qmp).map_err(|e| e.to_string())?;
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
        started: &mut bool,
        progress: &mut dyn FnMut(Progress),
        t0: Instant,
    ) -> Result<Report, MigrateError> {
        let reply = self.opts.timeouts.reply;
        let moves = mode.moves_pages();
        let regions = if moves { self.expose()? } else { Vec::new() };
        let token = auth::nonce();
        self.qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": moves}]})),
        )?;
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
        let _page_qp = if moves {
            Some(self.accept_pages(&token)?)
        } else {
            None
        };
        progress(Progress::Phase {
            phase: "receiving".into(),
        });
        let mut report = Report {
            mode: mode.name().into(),
            ..Report::default()
        };
        // Serve the source's requests until QEMU has loaded the device state.
        let loaded = loop {
            match pipe.recv_msg(Duration::from_millis(20)) {
                Ok(m) => match Msg::decode(&m)? {
                    Msg::HashRequest => {
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
                        pipe.send_msg(&hashes)?;
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
            let s = status(&mut self.qmp)?;
            if s != "inmigrate" {
                break s;
            }
            if t0.elapsed() > self.opts.timeouts.total {
                return Err(MigrateError::Qemu(format!(
                    "the device state did not load within {:?}",
                    self.opts.timeouts.total
                )));
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
        pipe.send_msg(&Msg::Loaded { status: loaded }.encode())?;
        let run = match Msg::decode(&pipe.recv_msg(reply)?)? {
            Msg::Start { run } => run,
            Msg::Abort { why } => return Err(MigrateError::Aborted(why)),
            m => return Err(MigrateError::Protocol(format!("expected start, got {m:?}"))),
        };
        *started = true;
        if run && status(&mut self.qmp)? != "running" {
            self.qmp.execute("cont", None)?;
        }
        let end = status(&mut self.qmp)?;
        pipe.send_msg(
            &Msg::Started {
                status: end.clone(),
            }
            .encode(),
        )?;
        report.stream_bytes = relay.close();
        report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        report.status = end;
        progress(Progress::Phase {
            phase: "done".into(),
        });
        Ok(report)
    }

    /// Zeroes the guest's RAM files (so pages the source leaves out read as zeros) and
    /// registers them for the source's WRITEs.
    fn expose(&mut self) -> Result<Vec<Region>, MigrateError> {
        self.rams
            .iter()
            .map(|ram| {
                let f = FileOptions::new()
                    .read(true)
                    .write(true)
                    .open(&ram.path)
                    .map_err(|e| MigrateError::io(format!("open {}", ram.path.display()), e))?;
                punch(&f, ram.size)
                    .map_err(|e| MigrateError::io(format!("zero {}", ram.path.display()), e))?;
                let buf = Buffer::map_file(&f)?;
                let mr = self.pd.register_buffer(
                    &buf,
                    0,
                    buf.len(),
                    Access::LOCAL_WRITE | Access::REMOTE_WRITE,
                )?;
                Ok(Region { buf, mr })
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

fn status(q: &mut Qmp) -> Result<String, MigrateError> {
    let s = q.execute("query-status", None)?;
    Ok(s.get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string())
}

/// Frees a file's pages: they read as zeros after, at no cost (tmpfs, hugetlbfs).
fn punch(f: &std::fs::File, len: u64) -> std::io::Result<()> {
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
    Ok(())
}
