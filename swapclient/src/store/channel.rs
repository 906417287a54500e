//! Many block requests in flight from one thread: a [`StoreChannel`] holds a data queue pair
//! of its own to every donor, READs into and WRITEs from one buffer the caller registers once
//! (ublk's per-tag buffers, an NBD loop's buffers), and completes requests in whatever order
//! the donors answer.
//!
//! The failure rules are [`Store::read`]'s and [`Store::write`]'s: a read tries the chunk's
//! complete replicas in turn and fails only when none answers; a write goes to every replica at
//! once and succeeds when one complete copy took it, dropping the copies that missed it. Each
//! piece starts and ends as `piece.rs` says, as the blocking path's do.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::client::{Channel, ClientError};
use arrayvec::ArrayVec;
use rmem_transport::{Buffer, Completion, HugePages, Mr};

use super::piece::Targets;
use super::readahead::{Lookup, Readahead, State, Window, STREAM_READ, WINDOW, WINDOWS};
use super::{Store, StoreError};

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
}

/// One block request: `len` bytes at device offset `off`, to or from the channel's buffer at
/// `at`. `tag` names it in the completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoReq {
    pub tag: u64,
    pub op: IoOp,
    pub off: u64,
    pub len: usize,
    pub at: usize,
}

/// The part of a request inside one chunk.
#[derive(Debug, Clone)]
struct Piece {
    chunk: usize,
    within: u64,
    at: usize,
    len: usize,
    targets: Targets,
    /// Read: the target being read. Write: WRITEs not yet reaped.
    cursor: usize,
    /// Write: complete copies that took it, and the targets that missed it (by index).
    ok: usize,
    missed: u64,
}

#[derive(Debug)]
struct Slot {
    req: IoReq,
    pieces: Vec<Piece>,
    left: usize,
    err: Option<StoreError>,
    /// A read-ahead READ into this window of the read-ahead buffer, not a caller's request.
    window: Option<usize>,
}

/// wr_id: slot (32 bits), piece (16), target (16).
fn wr_id(slot: usize, piece: usize, target: usize) -> u64 {
    ((slot as u64) << 32) | ((piece as u64 & 0xffff) << 16) | (target as u64 & 0xffff)
}

fn unpack(id: u64) -> (usize, usize, usize) {
    (
        (id >> 32) as usize,
        ((id >> 16) & 0xffff) as usize,
        (id & 0xffff) as usize,
    )
}

/// One thread's view of a [`Store`] with many requests in flight.
pub struct StoreChannel<'s> {
    store: &'s Store,
    buf: Buffer,
    /// Per donor: its channel and the buffer registered there.
    chans: Vec<(Channel, Mr)>,
    /// Per donor: its `revived` count when the channel's queue pair was opened.
    opened_at: Vec<u64>,
    /// Where a new queue pair is opened for a donor that came back, blocking the channel's
    /// thread as `reap` does (None: opened outside a tokio runtime; such a channel skips
    /// that donor).
    rt: Option<tokio::runtime::Handle>,
    /// The caller's requests in flight at most (read-ahead's slots come on top).
    depth: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Bytes of the caller's requests in flight (see [`StoreChannel::BYTES_IN_FLIGHT`]).
    bytes: usize,
    /// Requests finished and not yet handed out.
    done: Vec<(u64, Result<(), StoreError>)>,
    comps: Vec<Completion>,
    /// Read-ahead (None when the store has it off), and its buffer's registration per donor.
    ra: Option<Readahead>,
    ra_mrs: Vec<Mr>,
    /// Reads that waited for a window that has landed (or failed): served at the next turn.
    retry: Vec<IoReq>,
    /// Set while `retry` is being served, so serving it does not recurse.
    draining: bool,
}

/// How long [`StoreChannel::advance`] waits when no completion is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    No,
    /// Up to the operation timeout.
    Op,
    Upto(Duration),
}

impl Store {
    /// Opens a channel to every donor for one thread's requests, READing into and WRITEing
    /// from `buf`; at most `depth` requests in flight.
    pub async fn open_channel(
        &self,
        buf: Buffer,
        depth: usize,
    ) -> Result<StoreChannel<'_>, StoreError> {
        // A request lies in two chunks at most (see `submit`), so it puts at most two work
        // requests on one donor's channel.
        let depth = depth.clamp(1, (Channel::DEPTH - 2 * WINDOWS) / 2);
        let mut chans = Vec::with_capacity(self.donors.len());
        let ra = if self.readahead {
            let b = Buffer::alloc(Readahead::buffer_len(), HugePages::Never)
                .map_err(|e| StoreError::Config(format!("read-ahead buffer: {e}")))?;
            Some(Readahead::new(b, depth))
        } else {
            None
        };
        let mut ra_mrs = Vec::new();
        let opened_at = self
            .donors
            .iter()
            .map(|d| d.revived.load(Ordering::Acquire))
            .collect();
        for d in &self.donors {
            let wrap = |source| StoreError::Donor {
                addr: d.spec.addr,
                source,
            };
            let ch = d.client.open_channel().await.map_err(wrap)?;
            let mr = ch.register(&buf).map_err(wrap)?;
            if let Some(ra) = &ra {
                ra_mrs.push(ch.register(&ra.buf).map_err(wrap)?);
            }
            chans.push((ch, mr));
        }
        // Read-ahead has slots of its own (and its work requests room in the queues: a window
        // may span two chunks): the caller's `depth` stays the caller's.
        let slots = depth + ra.as_ref().map_or(0, |r| r.windows.len());
        Ok(StoreChannel {
            store: self,
            buf,
            chans,
            opened_at,
            rt: tokio::runtime::Handle::try_current().ok(),
            depth,
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            bytes: 0,
            done: Vec::with_capacity(depth),
            comps: vec![Completion::default(); 32],
            ra,
            ra_mrs,
            // Reserved: the I/O path allocates as little as it can on a host short of memory.
            retry: Vec::with_capacity(depth),
            draining: false,
        })
    }
}

impl StoreChannel<'_> {
    /// Most bytes in flight at once (a request larger than this goes alone). Every byte on its
    /// way to a donor sits in socket buffers (tcp) or is pinned until its completion, and a
    /// host swapping is short of memory: a 384 MiB guest keeping 8 MiB of writes in flight
    /// stalled its swap. 2 MiB still keeps 512 pages in flight, far beyond a link's
    /// bandwidth-delay product.
    pub const BYTES_IN_FLIGHT: usize = 2 << 20;

    /// The buffer requests read into and write from.
    pub fn buffer(&self) -> &Buffer {
        &self.buf
    }

    /// Requests submitted and not yet finished (read-ahead of the channel's own not counted).
    pub fn in_flight(&self) -> usize {
        let waiting = self.ra.as_ref().map_or(0, |r| {
            r.windows.iter().map(|w| w.waiters.len()).sum::<usize>()
        });
        self.callers_busy() + waiting + self.retry.len()
    }

    /// Slots the caller's requests hold.
    fn callers_busy(&self) -> usize {
        let fetching = self.ra.as_ref().map_or(0, |r| {
            r.windows
                .iter()
                .filter(|w| matches!(w.state, State::Fetching { .. }))
                .count()
        });
        self.busy() - fetching
    }

    /// Slots in use, read-ahead's included.
    fn busy(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Requests submitted and not yet reaped: in flight, or finished and waiting in
    /// [`StoreChannel::reap`] (a request refused at submission finishes at once).
    pub fn pending(&self) -> usize {
        self.in_flight() + self.done.len()
    }

    /// Sends a request. When all slots are busy, completions are reaped first (and kept for
    /// [`StoreChannel::reap`]). A request that cannot start (out of range, outside the buffer)
    /// completes at once with its error.
    pub fn submit(&mut self, req: IoReq) -> Result<(), StoreError> {
        // Large reads carry their own bytes in flight; a window could not hold one anyway.
        if req.op == IoOp::Read && self.ra.is_some() && req.len <= STREAM_READ {
            let lookup = self
                .ra
                .as_mut()
                .map_or(Lookup::Miss, |r| r.lookup(req.off, req.len));
            if !self.serve_from_window(req, lookup) {
                self.submit_plain(req)?;
            }
            self.fetch_ahead(req.off.saturating_add(req.len as u64));
            return self.drain_retries();
        }
        self.submit_plain(req)?;
        self.drain_retries()
    }

    /// Serves a read from a read-ahead window, or queues it on one being fetched; false when
    /// no window holds it (or the one that did is stale: a write touched it since).
    fn serve_from_window(&mut self, req: IoReq, lookup: Lookup) -> bool {
        let Some(ra) = self.ra.as_mut() else {
            return false;
        };
        match lookup {
            Lookup::Miss => false,
            Lookup::Wait(w) => {
                ra.windows[w].waiters.push(req);
                true
            }
            Lookup::Hit(w) => {
                let win = &ra.windows[w];
                let at = Window::at(w) + (req.off - win.off) as usize;
                if self.store.generation_sum(win.off, win.len) != win.gen {
                    ra.windows[w].state = State::Empty;
                    return false;
                }
                // Out of the caller's buffer: the plain path refuses it with its error.
                if ra.buf.copy_to(at, req.len, &self.buf, req.at).is_err() {
                    return false;
                }
                self.store
                    .ra_served
                    .fetch_add(req.len as u64, Ordering::Relaxed);
                self.done.push((req.tag, Ok(())));
                true
            }
        }
    }

    /// Starts the READs of the windows a stream of reads ending at `end` will want next, in
    /// the slots kept for them. Read-ahead never waits, and its bytes do not count against the
    /// caller's bound: a READ's data lands in registered memory, not in socket buffers waiting
    /// to be sent, and two windows bound it. (Counted there, a reclaim's writes kept it out
    /// while a swap-in streamed.)
    fn fetch_ahead(&mut self, end: u64) {
        loop {
            let Some((w, off)) = self.ra.as_ref().and_then(|r| r.next_fetch(end)) else {
                return;
            };
            let len = (self.store.size.saturating_sub(off)).min(WINDOW as u64) as usize;
            if len == 0 || self.free.is_empty() {
                return;
            }
            let gen = self.store.generation_sum(off, len);
            // The slot `start_slot` takes (the last free one), named before it starts: a READ
            // that fails at once lands inside `start_slot` and must find its window waiting.
            let slot = *self.free.last().expect("checked above");
            if let Some(ra) = self.ra.as_mut() {
                ra.windows[w] = Window {
                    state: State::Fetching { slot },
                    off,
                    len,
                    gen,
                    waiters: std::mem::take(&mut ra.windows[w].waiters),
                };
            }
            let req = IoReq {
                tag: u64::MAX,
                op: IoOp::Read,
                off,
                len,
                at: Window::at(w),
            };
            if self.start_slot(req, Some(w)).is_err() {
                // A channel that cannot start a piece fails the caller's next request anyway.
                if let Some(ra) = self.ra.as_mut() {
                    ra.windows[w].state = State::Empty;
                    self.retry.append(&mut ra.windows[w].waiters);
                }
                return;
            }
        }
    }

    /// Serves the reads whose window landed or failed since (once per turn: serving them may
    /// reap completions, which may queue more).
    fn drain_retries(&mut self) -> Result<(), StoreError> {
        if self.draining {
            return Ok(());
        }
        self.draining = true;
        let mut r = Ok(());
        while let Some(req) = self.retry.pop() {
            let lookup = self
                .ra
                .as_ref()
                .map_or(Lookup::Miss, |ra| ra.find(req.off, req.len));
            // A window being fetched again for another stream is not waited on twice.
            let lookup = match lookup {
                Lookup::Wait(_) => Lookup::Miss,
                l => l,
            };
            if !self.serve_from_window(req, lookup) {
                if let Err(e) = self.submit_plain(req) {
                    r = Err(e);
                    break;
                }
            }
        }
        self.draining = false;
        r
    }

    /// Sends a request without looking at read-ahead.
    fn submit_plain(&mut self, req: IoReq) -> Result<(), StoreError> {
        while self.free.is_empty()
            || self.callers_busy() >= self.depth
            || (self.callers_busy() > 0 && self.bytes + req.len > Self::BYTES_IN_FLIGHT)
        {
            self.progress(true)?;
        }
        self.start_slot(req, None)
    }

    /// Starts `req` in a free slot (`window`: a read-ahead READ into that window).
    fn start_slot(&mut self, req: IoReq, window: Option<usize>) -> Result<(), StoreError> {
        let buf_len = match (window, &self.ra) {
            (Some(_), Some(ra)) => ra.buf.len(),
            _ => self.buf.len(),
        };
        let in_buf = req.at.checked_add(req.len).is_some_and(|e| e <= buf_len)
            && req.len as u64 <= self.store.chunk;
        let refused = match self.store.pieces(req.off, req.len as u64) {
            Ok(p) if in_buf => Ok(p.collect::<Vec<_>>()),
            Ok(_) => Err(StoreError::Config(format!(
                "buffer range {}+{} outside the channel's {}-byte buffer, or longer than a chunk \
                 ({} bytes)",
                req.at, req.len, buf_len, self.store.chunk
            ))),
            Err(e) => Err(e),
        };
        let pieces = match refused {
            Ok(p) => p,
            // Read-ahead's own READ reports to its caller; a request finishes with the error.
            Err(e) if window.is_some() => return Err(e),
            Err(e) => {
                self.done.push((req.tag, Err(e)));
                return Ok(());
            }
        };
        let slot = self.free.pop().unwrap_or_default();
        if window.is_none() {
            self.bytes += req.len;
        }
        let mut s = Slot {
            req,
            pieces: Vec::with_capacity(pieces.len()),
            left: pieces.len(),
            err: None,
            window,
        };
        for (chunk, within, r) in pieces {
            s.pieces.push(Piece {
                chunk,
                within,
                at: req.at + r.start,
                len: r.len(),
                targets: ArrayVec::new(),
                cursor: 0,
                ok: 0,
                missed: 0,
            });
        }
        let n = s.pieces.len();
        self.slots[slot] = Some(s);
        for p in 0..n {
            self.start_piece(slot, p)?;
        }
        self.finish_if_done(slot);
        Ok(())
    }

    /// Finished requests, as `(tag, result)`: those ready now, or with `block`, at least one
    /// when any is in flight.
    pub fn reap(
        &mut self,
        out: &mut Vec<(u64, Result<(), StoreError>)>,
        block: bool,
    ) -> Result<(), StoreError> {
        if self.done.is_empty() {
            self.progress(block && self.in_flight() > 0)?;
        }
        while self.done.is_empty() && block && self.in_flight() > 0 {
            self.progress(true)?;
        }
        out.append(&mut self.done);
        Ok(())
    }

    /// Finished requests, waiting at most `most` for one when none is ready: for a thread
    /// that also watches for new requests (a ublk queue's ring) and must not sleep through
    /// them while its donors are slow.
    pub fn reap_upto(
        &mut self,
        out: &mut Vec<(u64, Result<(), StoreError>)>,
        most: Duration,
    ) -> Result<(), StoreError> {
        if self.done.is_empty() {
            self.advance(if self.busy() > 0 {
                Wait::Upto(most)
            } else {
                Wait::No
            })?;
            self.drain_retries()?;
        }
        out.append(&mut self.done);
        Ok(())
    }

    /// Takes the chunk's replicas for a piece (waiting out a rebuild's copy of it, while
    /// reaping this channel's own completions) and sends it.
    fn start_piece(&mut self, slot: usize, p: usize) -> Result<(), StoreError> {
        let (op, chunk, part) = {
            let s = self.slots[slot].as_ref().expect("live slot");
            let piece = &s.pieces[p];
            (
                s.req.op,
                piece.chunk,
                piece.within..piece.within + piece.len as u64,
            )
        };
        let targets = loop {
            match self
                .store
                .try_start_piece(chunk, op == IoOp::Write, part.clone())
            {
                Some(t) => break t,
                None => {
                    // The copy waits for this channel's requests on the chunk: let them finish.
                    self.progress(false)?;
                    std::thread::yield_now();
                }
            }
        };
        self.slots[slot].as_mut().expect("live slot").pieces[p].targets = targets;
        match op {
            IoOp::Read => self.send_read(slot, p),
            IoOp::Write => self.send_writes(slot, p),
        }
        Ok(())
    }

    /// Posts the piece's READ to its next healthy target; none left ends the piece.
    fn send_read(&mut self, slot: usize, p: usize) {
        let store = self.store;
        loop {
            let piece = &mut self.slots[slot].as_mut().expect("live slot").pieces[p];
            let Some(t) = piece.targets.get(piece.cursor).copied() else {
                self.end_read(slot, p, false);
                return;
            };
            if self.usable(t.donor) {
                let s = self.slots[slot].as_ref().expect("live slot");
                let piece = &s.pieces[p];
                let (at, len, within, k) = (piece.at, piece.len, piece.within, piece.cursor);
                let (ch, own) = &mut self.chans[t.donor];
                // Read-ahead READs into its own buffer.
                let mr = match s.window {
                    Some(_) => &self.ra_mrs[t.donor],
                    None => own,
                };
                match ch.post_read(wr_id(slot, p, k), mr, at, len, t.remote, within) {
                    Ok(()) => return,
                    Err(e) => store.fail(t.donor, &e),
                }
            }
            self.slots[slot].as_mut().expect("live slot").pieces[p].cursor += 1;
        }
    }

    /// Posts the piece's WRITE to every target on a healthy donor, all before any is reaped.
    fn send_writes(&mut self, slot: usize, p: usize) {
        let store = self.store;
        let piece = &mut self.slots[slot].as_mut().expect("live slot").pieces[p];
        let (at, len, within) = (piece.at, piece.len, piece.within);
        let targets = piece.targets.clone();
        let mut posted = 0;
        let mut missed = 0u64;
        for (k, t) in targets.iter().enumerate() {
            if !self.usable(t.donor) {
                missed |= 1 << k;
                continue;
            }
            let (ch, mr) = &mut self.chans[t.donor];
            match ch.post_write(wr_id(slot, p, k), mr, at, len, t.remote, within) {
                Ok(()) => posted += 1,
                Err(e) => {
                    store.fail(t.donor, &e);
                    missed |= 1 << k;
                }
            }
        }
        let piece = &mut self.slots[slot].as_mut().expect("live slot").pieces[p];
        piece.cursor = posted;
        piece.missed = missed;
        if posted == 0 {
            self.end_write(slot, p);
        }
    }

    /// Whether donor `d` can take a request on this channel. A donor that came back since the
    /// channel's queue pair to it was opened gets a new one (that queue pair failed with it;
    /// posting there would only fail the donor again), once the old one has nothing in flight.
    fn usable(&mut self, d: usize) -> bool {
        let donor = &self.store.donors[d];
        if !donor.healthy.load(Ordering::Acquire) {
            return false;
        }
        let revived = donor.revived.load(Ordering::Acquire);
        if self.opened_at[d] == revived {
            return true;
        }
        if self.chans[d].0.in_flight() > 0 {
            return false;
        }
        let Some(rt) = self.rt.clone() else {
            return false;
        };
        let (client, old, buf) = (&donor.client, &self.chans[d].0, &self.buf);
        let ra_buf = self.ra.as_ref().map(|r| &r.buf);
        let fresh = rt.block_on(async {
            let ch = client.reopen_channel(old).await?;
            let mr = ch.register(buf)?;
            let ra_mr = ra_buf.map(|b| ch.register(b)).transpose()?;
            Ok::<_, ClientError>((ch, mr, ra_mr))
        });
        match fresh {
            Ok((ch, mr, ra_mr)) => {
                tracing::info!(donor = %donor.spec.addr, "a channel's queue pair to the donor reopened");
                self.chans[d] = (ch, mr);
                if let Some(m) = ra_mr {
                    self.ra_mrs[d] = m;
                }
                self.opened_at[d] = revived;
                true
            }
            Err(e) => {
                self.store.fail(d, &e);
                false
            }
        }
    }

    /// Reaps completions (waiting for one with `block`) and moves their requests on.
    fn progress(&mut self, block: bool) -> Result<(), StoreError> {
        self.advance(if block { Wait::Op } else { Wait::No })?;
        self.drain_retries()
    }

    /// Reaps completions, waiting for one as `wait` says when none is ready, and moves their
    /// requests on.
    fn advance(&mut self, wait: Wait) -> Result<(), StoreError> {
        let mut any = false;
        for d in 0..self.chans.len() {
            loop {
                let n = match self.chans[d].0.poll(&mut self.comps) {
                    Ok(n) => n,
                    Err(e) => {
                        self.store.fail(d, &e);
                        0
                    }
                };
                if n == 0 {
                    break;
                }
                any = true;
                for i in 0..n {
                    let c = self.comps[i];
                    self.complete(d, c);
                }
            }
        }
        if any || wait == Wait::No {
            return Ok(());
        }
        // Nothing ready: wait on a donor with requests in flight. Its queue pair fails them
        // within the operation timeout on a dead donor, so this ends.
        let Some(d) = (0..self.chans.len()).find(|&d| self.chans[d].0.in_flight() > 0) else {
            return Ok(());
        };
        let waited = match wait {
            Wait::Upto(most) => self.chans[d].0.wait_upto(&mut self.comps, most),
            _ => self.chans[d].0.wait(&mut self.comps),
        };
        let n = match waited {
            Ok(n) => n,
            Err(ClientError::Timeout(_)) => 0,
            Err(e) => {
                self.store.fail(d, &e);
                0
            }
        };
        for i in 0..n {
            let c = self.comps[i];
            self.complete(d, c);
        }
        Ok(())
    }

    fn complete(&mut self, d: usize, c: Completion) {
        let (slot, p, k) = unpack(c.wr_id);
        let store = self.store;
        let Some(s) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(piece) = s.pieces.get_mut(p) else {
            return;
        };
        let op = s.req.op;
        let len = piece.len as u64;
        let ok = c.is_ok();
        let donor = &store.donors[d];
        if !ok {
            let e = ClientError::Completion(c.status);
            if donor.healthy.load(Ordering::Acquire) {
                store.fail(d, &e);
            } else {
                donor.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        match op {
            IoOp::Read => {
                if ok {
                    donor.bytes_read.fetch_add(len, Ordering::Relaxed);
                    self.end_read(slot, p, true);
                } else {
                    piece.cursor = k + 1;
                    self.send_read(slot, p);
                }
            }
            IoOp::Write => {
                if ok {
                    donor.bytes_written.fetch_add(len, Ordering::Relaxed);
                    if piece.targets[k].complete {
                        piece.ok += 1;
                    }
                } else {
                    piece.missed |= 1 << k;
                }
                piece.cursor -= 1;
                if piece.cursor == 0 {
                    self.end_write(slot, p);
                }
            }
        }
    }

    fn end_read(&mut self, slot: usize, p: usize, ok: bool) {
        if !ok {
            let chunk = self.slots[slot].as_ref().expect("live slot").pieces[p].chunk;
            self.store.read_lost(chunk);
        }
        self.end_piece(slot, p, !ok);
    }

    /// Applies a write's outcome to the chunk, as [`Store::write`] does.
    fn end_write(&mut self, slot: usize, p: usize) {
        let piece = &self.slots[slot].as_ref().expect("live slot").pieces[p];
        let lost = self.store.settle_write(
            piece.chunk,
            piece.within..piece.within + piece.len as u64,
            &piece.targets,
            piece.ok,
            piece.missed,
        );
        self.end_piece(slot, p, lost);
    }

    /// A piece is over (`lost`: no copy served it): its chunk is free for a rebuild again.
    fn end_piece(&mut self, slot: usize, p: usize, lost: bool) {
        let s = self.slots[slot].as_mut().expect("live slot");
        let piece = &s.pieces[p];
        if lost {
            s.err.get_or_insert(StoreError::Lost {
                off: s.req.off + (piece.at - s.req.at) as u64,
                end: s.req.off + (piece.at - s.req.at + piece.len) as u64,
            });
        }
        self.store.end_piece(piece.chunk);
        s.left -= 1;
        self.finish_if_done(slot);
    }

    fn finish_if_done(&mut self, slot: usize) {
        let finished = self.slots[slot].as_ref().is_some_and(|s| s.left == 0);
        if !finished {
            return;
        }
        if let Some(s) = self.slots[slot].take() {
            if s.window.is_none() {
                self.bytes -= s.req.len;
            }
            self.free.push(slot);
            match s.window {
                Some(w) => self.window_landed(w, slot, s.err.is_none()),
                None => self.done.push((s.req.tag, s.err.map_or(Ok(()), Err))),
            }
        }
    }

    /// A read-ahead READ from `slot` into window `w` is over: the window holds its range (or,
    /// failed, nothing) and the reads waiting for it are served at the next turn.
    fn window_landed(&mut self, w: usize, slot: usize, ok: bool) {
        let Some(ra) = self.ra.as_mut() else {
            return;
        };
        let win = &mut ra.windows[w];
        if win.state != (State::Fetching { slot }) {
            return;
        }
        win.state = if ok { State::Ready } else { State::Empty };
        if ok {
            self.store
                .ra_fetched
                .fetch_add(win.len as u64, Ordering::Relaxed);
        }
        self.retry.append(&mut win.waiters);
    }
}

impl Drop for StoreChannel<'_> {
    fn drop(&mut self) {
        // Requests still in flight (read-ahead's too) hold their chunks against a rebuild:
        // finish them. Reads waiting for read-ahead are dropped with the channel.
        self.draining = true;
        self.retry.clear();
        while self.busy() > 0 {
            let before = self.busy();
            if self.progress(true).is_err() {
                break;
            }
            self.done.clear();
            self.retry.clear();
            if self.busy() == before && self.chans.iter().all(|c| c.0.in_flight() == 0) {
                break;
            }
        }
    }
}
