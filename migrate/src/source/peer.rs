//! The connection to the destination agent: connected, authenticated both ways, the plan sent.

use super::*;

/// Data runs sent per region at most (about 40 bytes each on the wire).
const MAX_DATA_RUNS: usize = 4096;

/// The connection to the destination agent.
pub(super) struct Peer {
    /// Keys this connection's page hashes (`--dedup`).
    pub(super) key: DedupKey,
    pub(super) _ctx: Context,
    pub(super) _pd: Pd,
    pub(super) pipe: Arc<Pipe>,
    pub(super) pages: Option<(Qp, Cq, Vec<RemoteBuf>)>,
}

impl Peer {
    pub(super) fn send(&self, m: &Msg) -> Result<(), MigrateError> {
        Ok(self.pipe.send_msg(&m.encode())?)
    }

    /// Fails if the destination gave up (between rounds nothing else is expected).
    pub(super) fn poll_abort(&self) -> Result<(), MigrateError> {
        match self.pipe.recv_msg(Duration::ZERO) {
            Ok(m) => match Msg::decode(&m)? {
                Msg::Abort { why } => Err(MigrateError::Aborted(why)),
                m => Err(unexpected("nothing during pre-copy", &m)),
            },
            Err(crate::pipe::PipeError::Timeout(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn recv(&self, timeout: Duration) -> Result<Msg, MigrateError> {
        let m = Msg::decode(&self.pipe.recv_msg(timeout)?)?;
        match m {
            Msg::Refused { why } => Err(MigrateError::Refused(format!(
                "the destination refused: {why}"
            ))),
            Msg::Abort { why } => Err(MigrateError::Aborted(why)),
            Msg::NotStarted { why } => Err(MigrateError::NotStarted(why)),
            m => Ok(m),
        }
    }
}

/// Connects and authenticates both ways; sends the plan and waits for the destination.
pub(super) fn connect(
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
    // Where the source's RAM holds data, for the destination to allocate ahead. Only a hint:
    // a file that cannot be read here is refused later, when it is mapped.
    let data = if opts.mode.moves_pages() {
        rams.iter()
            .map(|r| {
                std::fs::File::open(&r.path)
                    .and_then(|f| data_runs(&f, MAX_DATA_RUNS))
                    .unwrap_or_default()
            })
            .collect()
    } else {
        Vec::new()
    };
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
        data,
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

pub(super) fn unexpected(want: &str, got: &Msg) -> MigrateError {
    MigrateError::Protocol(format!("expected {want}, got {got:?}"))
}
