//! Byte streams and control messages over one queue pair: the relay that carries QEMU's own
//! migration stream (device state, or everything in `stream` mode) between the two agents.
//!
//! Each side posts [`SLOTS`] receives of [`CHUNK`] bytes. A message is one SEND into one of
//! them: an 8-byte header (channel, kind, length) and up to `CHUNK - 8` bytes. Flow control is
//! one-sided: a receiver that reposts a receive WRITEs its running count into the sender's
//! registered credit word, so returning credit never uses up a receive (no credit deadlock) and
//! a sender never SENDs into a receive that is not posted (no RNR error).
//!
//! Channel 0 carries control messages (any length, reassembled); the others are byte streams
//! either side may open, one per connection QEMU makes (its main stream, multifd channels).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmem_transport::{Access, Completion, Cq, Mr, Pd, Qp, RecvWr, RemoteBuf, SendWr};

/// Bytes per receive (and per message, header included).
pub const CHUNK: usize = 64 * 1024;
/// Receives each side keeps posted; also the SENDs in flight at most.
pub const SLOTS: usize = 32;
const HDR: usize = 8;
/// Payload bytes per message.
pub const PAYLOAD: usize = CHUNK - HDR;
/// The wr_id of a credit WRITE (SENDs use their slot number).
const CREDIT_WR: u64 = u64::MAX;
/// Chunks a stream buffers before the pipe stops taking the peer's messages.
const STREAM_BACKLOG: usize = 256;
/// Control messages are small; one larger than this is refused as malformed.
pub const MAX_CONTROL: usize = 16 << 20;
/// Bulk data (page hashes: 16 bytes a page, 16 MiB for a 4 GiB guest) goes as control
/// messages of at most this many bytes.
pub const BULK_PIECE: usize = 4 << 20;
/// Control messages received and not yet taken: with [`MAX_CONTROL`], what a peer can make this
/// side hold (a peer is connected before it proves the secret).
const CONTROL_BACKLOG: usize = 16;
/// Streams the peer may open over the pipe's life (QEMU opens one, plus its multifd channels).
pub const MAX_STREAMS: usize = 64;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// Bytes of a stream, or a control message's last piece.
    Data = 0,
    /// A control message's piece with more to come.
    More = 1,
    /// The sender opens a stream.
    Open = 2,
    /// The sender will write no more to the stream.
    Eof = 3,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0 => Kind::Data,
            1 => Kind::More,
            2 => Kind::Open,
            3 => Kind::Eof,
            _ => return None,
        })
    }
}

/// Why the pipe stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("the peer stopped taking messages for {0:?}")]
    Stalled(Duration),
    #[error("no message from the peer within {0:?}")]
    Timeout(Duration),
    #[error("the connection to the peer failed: {0}")]
    Failed(String),
    #[error("the peer closed the connection")]
    Closed,
    #[error("more than {0} streams over one connection")]
    TooManyStreams(usize),
    #[error("malformed message from the peer: {0}")]
    Malformed(String),
    #[error(transparent)]
    Transport(#[from] rmem_transport::Error),
}

/// A pipe's registered memory, made before the connection so its credit word can be named in
/// the connection's private data.
pub struct PipeMemory {
    recv: Mr,
    send: Mr,
    /// `[0..16)`: the count the peer writes (value, !value); `[16..32)`: what this side writes.
    credit: Mr,
}

impl PipeMemory {
    pub fn new(pd: &Pd) -> Result<PipeMemory, PipeError> {
        let recv = pd.alloc_mr(SLOTS * CHUNK, Access::LOCAL_WRITE)?;
        let send = pd.alloc_mr(SLOTS * CHUNK, Access::LOCAL_WRITE)?;
        let credit = pd.alloc_mr(32, Access::LOCAL_WRITE | Access::REMOTE_WRITE)?;
        // "No receive reposted yet", consistently encoded.
        credit.store_u64(0, 0)?;
        credit.store_u64(8, !0)?;
        Ok(PipeMemory { recv, send, credit })
    }

    /// Where the peer writes its credit: give this to the peer.
    pub fn credit_word(&self) -> RemoteBuf {
        let mut r = self.credit.remote();
        r.len = 16;
        r
    }

    /// Posts the receives and starts the thread that takes the peer's messages. `peer_credit` is
    /// the peer's [`PipeMemory::credit_word`].
    pub fn start(
        self,
        qp: Qp,
        send_cq: Cq,
        recv_cq: Cq,
        peer_credit: RemoteBuf,
        stall: Duration,
    ) -> Result<Pipe, PipeError> {
        if peer_credit.len < 16 {
            return Err(PipeError::Malformed(format!(
                "credit word of {} bytes",
                peer_credit.len
            )));
        }
        for slot in 0..SLOTS {
            let sge = [self.recv.sge(slot * CHUNK, CHUNK)?];
            qp.post_recv(&[RecvWr::new(slot as u64, &sge)])?;
        }
        let (ctl_tx, ctl_rx) = sync_channel(CONTROL_BACKLOG);
        let (open_tx, open_rx) = sync_channel(MAX_STREAMS);
        let inner = Arc::new(Inner {
            qp,
            send_cq,
            mem: self,
            peer_credit,
            stall,
            send: Mutex::new(SendState {
                sent: 0,
                free: (0..SLOTS).rev().collect(),
                reposted: 0,
                reported: 0,
                credit_in_flight: false,
                peer_known: 0,
            }),
            streams: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            failed: Mutex::new(None),
            closing: AtomicBool::new(false),
            peer_opened: AtomicUsize::new(0),
            next_stream: Mutex::new(1),
        });
        let rx_inner = inner.clone();
        let thread = std::thread::Builder::new()
            .name("rmem-pipe".into())
            .spawn(move || rx_inner.receive_loop(recv_cq, ctl_tx, open_tx))
            .map_err(|e| PipeError::Failed(format!("start the pipe thread: {e}")))?;
        Ok(Pipe {
            inner,
            control: Mutex::new(ctl_rx),
            opened: Mutex::new(open_rx),
            thread: Some(thread),
        })
    }
}

struct SendState {
    /// Messages sent.
    sent: u64,
    /// Send slots not in flight.
    free: Vec<usize>,
    /// Receives this side reposted (after the first [`SLOTS`]).
    reposted: u64,
    /// The count last written to the peer.
    reported: u64,
    credit_in_flight: bool,
    /// The peer's reposted count, last consistent reading.
    peer_known: u64,
}

enum Event {
    Data(Vec<u8>),
    Eof,
}

struct Inner {
    qp: Qp,
    send_cq: Cq,
    mem: PipeMemory,
    peer_credit: RemoteBuf,
    stall: Duration,
    send: Mutex<SendState>,
    streams: Mutex<HashMap<u16, SyncSender<Event>>>,
    /// Streams the peer opened, until [`Pipe::accept_stream`] takes them.
    pending: Mutex<HashMap<u16, Receiver<Event>>>,
    failed: Mutex<Option<String>>,
    closing: AtomicBool,
    /// Streams the peer opened so far.
    peer_opened: AtomicUsize,
    next_stream: Mutex<u16>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn fail(&self, why: String) {
        let mut f = lock(&self.failed);
        if f.is_none() {
            tracing::debug!(%why, "pipe failed");
            *f = Some(why);
        }
    }

    /// What waiting on one of the pipe's queues came to: a failed pipe says why.
    fn received<T>(
        &self,
        r: Result<T, RecvTimeoutError>,
        timeout: Duration,
    ) -> Result<T, PipeError> {
        match r {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Timeout) => {
                self.check()?;
                Err(PipeError::Timeout(timeout))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.check()?;
                Err(PipeError::Closed)
            }
        }
    }

    fn check(&self) -> Result<(), PipeError> {
        match &*lock(&self.failed) {
            Some(why) => Err(PipeError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// The peer's reposted count, if its two words agree (a WRITE may be landing).
    fn read_peer_credit(&self, st: &mut SendState) {
        let (Ok(a), Ok(b)) = (self.mem.credit.load_u64(0), self.mem.credit.load_u64(8)) else {
            return;
        };
        if b == !a && a > st.peer_known {
            st.peer_known = a;
        }
    }

    /// Reaps send completions; posts a credit WRITE if the peer has not heard the latest count.
    fn progress(&self, st: &mut SendState) -> Result<(), PipeError> {
        let mut done = [Completion::default(); 32];
        loop {
            let n = self.send_cq.poll(&mut done)?;
            for c in &done[..n] {
                if !c.is_ok() {
                    let why = format!("a send completed with {}", c.status);
                    self.fail(why.clone());
                    return Err(PipeError::Failed(why));
                }
                if c.wr_id == CREDIT_WR {
                    st.credit_in_flight = false;
                } else {
                    st.free.push(c.wr_id as usize);
                }
            }
            if n < done.len() {
                break;
            }
        }
        if !st.credit_in_flight && st.reposted > st.reported {
            let v = st.reposted;
            self.mem.credit.store_u64(16, v)?;
            self.mem.credit.store_u64(24, !v)?;
            let sge = [self.mem.credit.sge(16, 16)?];
            self.qp
                .post_send(&[SendWr::write(CREDIT_WR, &sge, self.peer_credit.at(0))])?;
            st.credit_in_flight = true;
            st.reported = v;
        }
        Ok(())
    }

    /// Sends one message, waiting for a free slot and the peer's credit.
    fn send_one(&self, channel: u16, kind: Kind, data: &[u8]) -> Result<(), PipeError> {
        debug_assert!(data.len() <= PAYLOAD);
        let deadline = Instant::now() + self.stall;
        let mut nap = Duration::from_micros(20);
        loop {
            self.check()?;
            let mut st = lock(&self.send);
            self.progress(&mut st)?;
            self.read_peer_credit(&mut st);
            let credits = SLOTS as u64 + st.peer_known - st.sent;
            if credits > 0 {
                if let Some(slot) = st.free.pop() {
                    let off = slot * CHUNK;
                    let mut hdr = [0u8; HDR];
                    hdr[0..2].copy_from_slice(&channel.to_le_bytes());
                    hdr[2] = kind as u8;
                    hdr[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
                    self.mem.send.write_at(off, &hdr)?;
                    self.mem.send.write_at(off + HDR, data)?;
                    let sge = [self.mem.send.sge(off, HDR + data.len())?];
                    if let Err(e) = self.qp.post_send(&[SendWr::send(slot as u64, &sge)]) {
                        st.free.push(slot);
                        return Err(e.into());
                    }
                    st.sent += 1;
                    return Ok(());
                }
            }
            drop(st);
            if Instant::now() >= deadline {
                return Err(PipeError::Stalled(self.stall));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }

    fn receive_loop(
        self: Arc<Self>,
        recv_cq: Cq,
        control: SyncSender<Vec<u8>>,
        opened: SyncSender<u16>,
    ) {
        let mut done = [Completion::default(); 16];
        let mut partial: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            if self.closing.load(Ordering::Acquire) {
                break;
            }
            let n = match recv_cq.wait(&mut done, Some(Duration::from_millis(20))) {
                Ok(n) => n,
                Err(rmem_transport::Error::Timeout(_)) => 0,
                Err(e) => {
                    self.fail(format!("receive completions: {e}"));
                    break;
                }
            };
            if n == 0 {
                if self.qp.is_error() && !self.closing.load(Ordering::Acquire) {
                    self.fail("the queue pair went to the error state".into());
                    break;
                }
                // Keep credit flowing even when this side sends nothing.
                let mut st = lock(&self.send);
                if let Err(e) = self.progress(&mut st) {
                    self.fail(e.to_string());
                    break;
                }
                continue;
            }
            for c in &done[..n] {
                if !c.is_ok() {
                    self.fail(format!("a receive completed with {}", c.status));
                    self.close_streams();
                    return;
                }
                let slot = c.wr_id as usize;
                let len = (c.byte_len as usize).min(CHUNK);
                if slot >= SLOTS || len < HDR {
                    self.fail(format!("a receive of {len} bytes in slot {slot}"));
                    self.close_streams();
                    return;
                }
                let off = slot * CHUNK;
                if let Err(e) = self.mem.recv.read_at(off, &mut buf[..len]) {
                    self.fail(e.to_string());
                    break;
                }
                let channel = u16::from_le_bytes([buf[0], buf[1]]);
                let kind = Kind::from_u8(buf[2]);
                let plen = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
                let result = match kind {
                    Some(kind) if plen <= len - HDR => self.deliver(
                        channel,
                        kind,
                        &buf[HDR..HDR + plen],
                        &mut partial,
                        &control,
                        &opened,
                    ),
                    _ => Err(format!(
                        "message kind {} of {plen} bytes in a {len}-byte receive",
                        buf[2]
                    )),
                };
                if let Err(why) = result {
                    self.fail(why);
                    self.close_streams();
                    return;
                }
                let sge = match self.mem.recv.sge(off, CHUNK) {
                    Ok(s) => [s],
                    Err(e) => {
                        self.fail(e.to_string());
                        break;
                    }
                };
                if let Err(e) = self.qp.post_recv(&[RecvWr::new(slot as u64, &sge)]) {
                    self.fail(format!("repost a receive: {e}"));
                    break;
                }
                let mut st = lock(&self.send);
                st.reposted += 1;
                if let Err(e) = self.progress(&mut st) {
                    self.fail(e.to_string());
                    break;
                }
            }
        }
        self.close_streams();
    }

    fn deliver(
        &self,
        channel: u16,
        kind: Kind,
        data: &[u8],
        partial: &mut Vec<u8>,
        control: &SyncSender<Vec<u8>>,
        opened: &SyncSender<u16>,
    ) -> Result<(), String> {
        if channel == 0 {
            if partial.len() + data.len() > MAX_CONTROL {
                return Err(format!("a control message over {MAX_CONTROL} bytes"));
            }
            partial.extend_from_slice(data);
            return match kind {
                Kind::More => Ok(()),
                Kind::Data => {
                    // The receiving side may have gone: nobody listens, nothing to do.
                    let _ = control.send(std::mem::take(partial));
                    Ok(())
                }
                _ => Err(format!("{kind:?} on the control channel")),
            };
        }
        match kind {
            Kind::Open => {
                if self.peer_opened.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
                    return Err(format!("more than {MAX_STREAMS} streams opened"));
                }
                let (tx, rx) = sync_channel(STREAM_BACKLOG);
                if lock(&self.streams).insert(channel, tx).is_some() {
                    return Err(format!("stream {channel} opened twice"));
                }
                lock(&self.pending).insert(channel, rx);
                // Never full: it holds MAX_STREAMS.
                let _ = opened.try_send(channel);
                Ok(())
            }
            Kind::Data | Kind::Eof => {
                let tx = lock(&self.streams).get(&channel).cloned();
                let Some(tx) = tx else {
                    // A stream this side already closed: drop what is still in flight.
                    return Ok(());
                };
                let ev = if kind == Kind::Data {
                    Event::Data(data.to_vec())
                } else {
                    lock(&self.streams).remove(&channel);
                    Event::Eof
                };
                // A full backlog holds this thread, and with it the peer's credit: backpressure.
                let _ = tx.send(ev);
                Ok(())
            }
            Kind::More => Err(format!("a continued message on stream {channel}")),
        }
    }

    fn close_streams(&self) {
        lock(&self.streams).clear();
    }
}

/// One end of a pipe.
pub struct Pipe {
    inner: Arc<Inner>,
    control: Mutex<Receiver<Vec<u8>>>,
    opened: Mutex<Receiver<u16>>,
    thread: Option<JoinHandle<()>>,
}

impl Pipe {
    /// Sends one control message (any length up to [`MAX_CONTROL`]).
    pub fn send_msg(&self, msg: &[u8]) -> Result<(), PipeError> {
        if msg.len() > MAX_CONTROL {
            return Err(PipeError::Malformed(format!(
                "a control message of {} bytes",
                msg.len()
            )));
        }
        let mut pieces = msg.chunks(PAYLOAD).peekable();
        if pieces.peek().is_none() {
            return self.inner.send_one(0, Kind::Data, &[]);
        }
        while let Some(p) = pieces.next() {
            let kind = if pieces.peek().is_some() {
                Kind::More
            } else {
                Kind::Data
            };
            self.inner.send_one(0, kind, p)?;
        }
        Ok(())
    }

    /// The next control message.
    pub fn recv_msg(&self, timeout: Duration) -> Result<Vec<u8>, PipeError> {
        self.inner
            .received(lock(&self.control).recv_timeout(timeout), timeout)
    }

    /// Sends `data` of any length as consecutive control messages of at most [`BULK_PIECE`]
    /// bytes; the peer takes it with [`Pipe::recv_bulk`], knowing the length.
    pub fn send_bulk(&self, data: &[u8]) -> Result<(), PipeError> {
        for piece in data.chunks(BULK_PIECE) {
            self.send_msg(piece)?;
        }
        Ok(())
    }

    /// Takes `len` bytes sent with [`Pipe::send_bulk`]. `len` must come from this side's own
    /// knowledge (its RAM's size), not from the peer: it is what gets allocated. `timeout`
    /// applies to each piece.
    pub fn recv_bulk(&self, len: usize, timeout: Duration) -> Result<Vec<u8>, PipeError> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let piece = self.recv_msg(timeout)?;
            if piece.is_empty() || piece.len() > BULK_PIECE || out.len() + piece.len() > len {
                return Err(PipeError::Malformed(format!(
                    "a bulk piece of {} bytes after {} of {len}",
                    piece.len(),
                    out.len()
                )));
            }
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    /// Opens a stream to the peer. `odd` picks this side's half of the stream numbers so the
    /// two sides never open the same one.
    pub fn open_stream(&self, odd: bool) -> Result<Stream, PipeError> {
        let id = {
            let mut n = lock(&self.inner.next_stream);
            if usize::from(*n) > MAX_STREAMS {
                return Err(PipeError::TooManyStreams(MAX_STREAMS));
            }
            let id = *n * 2 + u16::from(odd);
            *n = n.wrapping_add(1).max(1);
            id
        };
        let (tx, rx) = sync_channel(STREAM_BACKLOG);
        lock(&self.inner.streams).insert(id, tx);
        self.inner.send_one(id, Kind::Open, &[])?;
        Ok(Stream {
            id,
            inner: self.inner.clone(),
            rx: Mutex::new(rx),
        })
    }

    /// The next stream the peer opened.
    pub fn accept_stream(&self, timeout: Duration) -> Result<Stream, PipeError> {
        let id = self
            .inner
            .received(lock(&self.opened).recv_timeout(timeout), timeout)?;
        let rx = lock(&self.inner.pending)
            .remove(&id)
            .ok_or_else(|| PipeError::Malformed(format!("stream {id} vanished")))?;
        Ok(Stream {
            id,
            inner: self.inner.clone(),
            rx: Mutex::new(rx),
        })
    }

    /// Why the pipe failed, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.failed).clone()
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // Let the last messages (a refusal, say) reach the peer before the queue pair goes:
        // wait, briefly, for every send to complete.
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.inner.check().is_ok() && Instant::now() < deadline {
            let mut st = lock(&self.inner.send);
            if self.inner.progress(&mut st).is_err()
                || (st.free.len() == SLOTS && !st.credit_in_flight)
            {
                break;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(1));
        }
        self.inner.closing.store(true, Ordering::Release);
        self.inner.qp.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A byte stream inside a pipe.
pub struct Stream {
    id: u16,
    inner: Arc<Inner>,
    /// Behind a lock so one thread can write while another reads.
    rx: Mutex<Receiver<Event>>,
}

impl Stream {
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Sends `data` (cut into messages).
    pub fn write_all(&self, data: &[u8]) -> Result<(), PipeError> {
        for p in data.chunks(PAYLOAD) {
            self.inner.send_one(self.id, Kind::Data, p)?;
        }
        Ok(())
    }

    /// Tells the peer this side writes no more.
    pub fn finish(&self) -> Result<(), PipeError> {
        self.inner.send_one(self.id, Kind::Eof, &[])
    }

    /// The next bytes from the peer; `None` once it finished.
    pub fn read(&self, timeout: Duration) -> Result<Option<Vec<u8>>, PipeError> {
        match self
            .inner
            .received(lock(&self.rx).recv_timeout(timeout), timeout)?
        {
            Event::Data(d) => Ok(Some(d)),
            Event::Eof => Ok(None),
        }
    }
}
