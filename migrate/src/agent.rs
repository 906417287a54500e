//! What the two migration agents (`rmem migrate send` beside the source QEMU, `rmem migrate
//! recv` beside the destination) say to each other, and what they report.
//!
//! The source connects a pipe queue pair with a [`Hello`] in the connection's private data; the
//! destination answers with a [`Welcome`] that proves it holds the shared secret, and the source
//! proves the same in its first control message ([`Msg::Auth`]). Nothing about either guest is
//! told, and no memory registered, before both proofs check. A second queue pair, named by a
//! one-time token, then carries the pages.

use std::time::Duration;

use rmem_transport::RemoteBuf;
use serde::{Deserialize, Serialize};

use crate::dirty::DirtyError;
use crate::mover::MoveError;
use crate::pipe::PipeError;
use crate::qmp::QmpError;
use crate::ram::RamError;

/// The agents' protocol name and version, checked first.
pub const PROTOCOL: &str = "rmem-migrate";
pub const VERSION: u32 = 1;

/// How RAM moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Pause the source, WRITE all RAM, then device state: the shortest total time, the
    /// longest pause. Needs no preload library.
    StopCopy,
    /// WRITE RAM while the guest runs, in rounds of pages written since the last, until the
    /// rest fits the downtime target; then pause and send the rest.
    Precopy,
    /// QEMU's own migration stream relayed over the transport: any guest configuration.
    Stream,
    /// Pause, hand over device state, resume on the destination at once; the destination
    /// READs each page on its first access, and the rest in the background. Needs the
    /// preload library in the destination QEMU.
    Postcopy,
    /// Pre-copy rounds, then post-copy for what is left instead of a pause to copy it.
    Hybrid,
}

impl Mode {
    /// Whether rmem moves the RAM itself (QEMU sends device state only).
    pub fn moves_pages(self) -> bool {
        !matches!(self, Mode::Stream)
    }

    /// Whether the destination resumes before it has every page.
    pub fn postcopy(self) -> bool {
        matches!(self, Mode::Postcopy | Mode::Hybrid)
    }

    /// Whether rounds run while the guest runs.
    pub fn precopy(self) -> bool {
        matches!(self, Mode::Precopy | Mode::Hybrid)
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::StopCopy => "stop-copy",
            Mode::Precopy => "precopy",
            Mode::Stream => "stream",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        }
    }
}

/// The source's opening, in the pipe connection's private data.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: String,
    pub version: u32,
    pub nonce: String,
    pub credit: RemoteBuf,
}

/// The destination's answer, in the accepted connection's private data.
#[derive(Debug, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u32,
    /// Why the destination will not go on (a protocol version it does not speak).
    pub refused: Option<String>,
    pub nonce: String,
    pub proof: String,
    pub credit: RemoteBuf,
}

/// One RAM backend as the other side sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamDesc {
    pub id: String,
    pub size: u64,
}

/// Control messages, one per pipe message, JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum Msg {
    /// Source: its proof of the secret.
    Auth { proof: String },
    /// Source: what it will send.
    Plan {
        mode: Mode,
        ram: Vec<RamDesc>,
        /// QEMU migration capabilities to turn on at the destination.
        capabilities: Vec<String>,
        /// The source will offer page hashes first (`--dedup`).
        #[serde(default)]
        dedup: bool,
        /// Per region in `ram` order, the runs of pages `[first, end)` holding data at the
        /// source: the destination allocates them before the pause, so WRITEs into its RAM take
        /// no page faults. Older sources send none.
        #[serde(default)]
        data: Vec<Vec<[u64; 2]>>,
    },
    /// Destination: ready for pages (its RAM, registered, in `ram` order) and device state.
    Ready {
        regions: Vec<RemoteBuf>,
        /// Names the page queue pair's connection.
        token: String,
    },
    /// Source (post-copy): its RAM, registered for the destination's READs, in `ram` order.
    SourceRam { regions: Vec<RemoteBuf> },
    /// Source (post-copy, paused): the pages the destination must READ, one hex page bitmap
    /// per region (`PageSet::to_bytes`); the others are right in its file.
    Needed { bitmaps: Vec<String> },
    /// Source (post-copy): needed pages that are zero at the source and in the destination's
    /// file, mapped there without a READ; one hex bitmap per region.
    ZeroPages { bitmaps: Vec<String> },
    /// Destination (post-copy): every page is in place; the source may let go of its RAM.
    AllPages { pulled: crate::postcopy::Pulled },
    /// Either side: it will not go on, and why.
    Refused { why: String },
    /// Source (`--dedup`): a keyed hash of each of its pages follows as one raw message (16
    /// bytes a page, 0 for zero pages, regions in order).
    DedupOffer { pages: u64 },
    /// Destination: the pages it filled from RAM it already holds, a hex bitmap per region.
    DedupHave { bitmaps: Vec<String> },
    /// Source: every page is sent (a destination without device state is then complete).
    PagesDone,
    /// Source: hash your RAM (it is paused; what differs is sent again).
    HashRequest,
    /// Destination: the hashes follow as one raw message, 16 bytes a page, regions in order.
    Hashes { pages: u64 },
    /// Destination: QEMU loaded the device state; its run state now.
    Loaded { status: String },
    /// Source: the switch-over; resume the guest if `run`. The source never resumes after this.
    Start { run: bool },
    /// Destination: the guest is in its final state there.
    Started { status: String },
    /// Either side: the migration is abandoned.
    Abort { why: String },
    /// Destination: the migration is abandoned and its QEMU is gone without ever having run
    /// the guest (loading the device state failed, say): the source may resume it, even after
    /// it let the device state go.
    NotStarted { why: String },
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<Msg, MigrateError> {
        serde_json::from_slice(b).map_err(|e| {
            MigrateError::Protocol(format!(
                "a control message that does not parse ({e}): {}",
                String::from_utf8_lossy(&b[..b.len().min(200)])
            ))
        })
    }
}

/// Page sets as sent in messages: a hex bitmap (`PageSet::to_bytes`) per region.
pub fn encode_sets(sets: &[crate::pages::PageSet]) -> Vec<String> {
    sets.iter().map(|s| hex::encode(s.to_bytes())).collect()
}

/// The page sets of [`encode_sets`], for regions of `pages` pages each; anything else is a
/// protocol error.
pub fn decode_sets(
    bitmaps: &[String],
    pages: &[usize],
) -> Result<Vec<crate::pages::PageSet>, MigrateError> {
    if bitmaps.len() != pages.len() {
        return Err(MigrateError::Protocol(format!(
            "{} page bitmaps for {} regions",
            bitmaps.len(),
            pages.len()
        )));
    }
    bitmaps
        .iter()
        .zip(pages)
        .map(|(b, &n)| {
            hex::decode(b)
                .ok()
                .and_then(|bytes| crate::pages::PageSet::from_bytes(n, &bytes))
                .ok_or_else(|| MigrateError::Protocol("a malformed page bitmap".into()))
        })
        .collect()
}

/// The page queue pair's private data.
#[derive(Debug, Serialize, Deserialize)]
pub struct PageHello {
    pub token: String,
}

/// Why a migration did not happen, grouped as `rmem migrate` reports them in its exit code.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Refused before anything was paused: the guest cannot be moved this way, or the
    /// destination refused.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("QEMU's migration failed: {0}")]
    Qemu(String),
    #[error(transparent)]
    Peer(#[from] PipeError),
    #[error(transparent)]
    Transport(#[from] rmem_transport::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Move(#[from] MoveError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Uffd(#[from] crate::uffd::UffdError),
    #[error("post-copy")]
    Pull(#[source] crate::postcopy::PullError),
    #[error("aborted by the other side: {0}")]
    Aborted(String),
    #[error("the destination did not start the guest: {0}")]
    NotStarted(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the copy differs from the source in {0} pages after the final pass")]
    Verify(usize),
}

impl MigrateError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> MigrateError {
        MigrateError::Io {
            what: what.into(),
            source,
        }
    }

    /// The error and its causes on one line ("a: b: c").
    pub fn detail(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }

    /// Whether the failure came before anything was paused or changed.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            MigrateError::Refused(_)
                | MigrateError::Ram(_)
                | MigrateError::Uffd(crate::uffd::UffdError::Missing { .. })
        )
    }
}

/// One pre-copy round, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub pages: usize,
    pub zero_pages: usize,
    pub ms: f64,
    /// Pages written while the round was sent.
    pub dirtied: usize,
    /// Pages of the round not sent because the guest wrote them after it began (exact dirty
    /// log only): the next round sends them.
    pub deferred: usize,
}

/// What a migration did, for `--json` and the closing line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub mode: String,
    /// The source's final phase (`done`).
    pub phase: String,
    /// How written pages were found (pre-copy).
    pub dirty_log: Option<String>,
    pub rounds: Vec<RoundReport>,
    /// Pages WRITTEN by rmem, and their bytes.
    pub pages_sent: usize,
    pub zero_pages_skipped: usize,
    pub page_bytes: u64,
    /// One-sided requests the pages took (each a contiguous run).
    pub requests: usize,
    /// QEMU's stream relayed, both directions.
    pub stream_bytes: u64,
    pub total_ms: f64,
    /// From the pause of the source to the destination's resume, as the agents saw it.
    pub downtime_ms: Option<f64>,
    /// QEMU's own figure (`query-migrate` downtime).
    pub qemu_downtime_ms: Option<u64>,
    /// Where the pause went: the last pass of pages (source paused), then QEMU's device state
    /// until the destination had loaded it.
    pub last_pass_ms: Option<f64>,
    pub device_state_ms: Option<f64>,
    /// Pages whose hash differed at the final comparison (sent again).
    pub final_pages: Option<usize>,
    /// Both RAMs hashed equal with the source paused.
    pub verified: Option<bool>,
    /// The guest's run state at the end, on this side.
    pub status: String,
    /// Post-copy: faults served, pages READ, pages mapped without a READ.
    pub postcopy: Option<crate::postcopy::Pulled>,
    /// `--dedup`: pages the destination filled from RAM it already held, and bytes not sent.
    pub dedup_pages: Option<usize>,
    pub dedup_bytes_saved: Option<u64>,
}

/// A progress event, as a JSON line on a pipe or a bar on a terminal.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Progress {
    Listening { addr: String },
    Connected { peer: String },
    Phase { phase: String },
    Round(RoundReport),
    Stream { bytes: u64 },
}

/// Timeouts shared by both agents.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A control answer from the other agent, a QMP answer.
    pub reply: Duration,
    /// The whole migration after connection (QEMU's device state load included).
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            reply: Duration::from_secs(30),
            total: Duration::from_secs(600),
        }
    }
}
