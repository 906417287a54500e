//! Serving a ublk queue through one [`StoreChannel`]: every request the kernel hands over goes
//! into the channel at once, and each is committed as soon as its donors answer, in whatever
//! order they do.
//!
//! A tag's data lives in its slot of the channel's registered buffer: every commit gives the
//! driver that slot's address for the tag's next request, so the driver copies a WRITE's data
//! straight into registered memory and a READ's data out of it, and requests move between the
//! kernel and the donors with no copy of ours. Only a tag's first request arrives in the buffer
//! libublk fetched it with, and a first WRITE's data is copied once from there.
//!
//! The queue thread waits for the kernel's requests only when nothing is in flight; otherwise
//! it takes what the ring holds without waiting and then waits for a completion for a short
//! while ([`PEEK_FIRST`], doubling to [`PEEK_MOST`] while nothing happens), so requests that
//! arrive while the donors are slow still go out at once instead of queueing behind the
//! first answer.

use std::time::{Duration, Instant};

use libublk::helpers::IoBuf;
use libublk::io::{UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkIORes, UblkUringData};

use crate::blockio::{self, IoCounters};
use crate::store::{IoOp, IoReq, Store, StoreChannel, StoreError};
use crate::ublk_serve::serve_request;

/// The first wait for a completion while requests are in flight and none is new.
const PEEK_FIRST: Duration = Duration::from_micros(50);
/// The longest: a stalled donor costs the queue thread a wake-up this often.
const PEEK_MOST: Duration = Duration::from_millis(2);

/// What the queue remembers of a request in flight, by tag.
#[derive(Clone, Copy)]
struct Flight {
    write: bool,
    off: u64,
    len: usize,
    started: Instant,
}

/// Serves queue `q` until the device stops. `first` are the buffers its tags were fetched
/// with; the channel's buffer holds a slot of `max` bytes per tag.
pub(crate) fn serve(
    q: &UblkQueue<'_>,
    first: &[IoBuf<u8>],
    mut ch: StoreChannel<'_>,
    store: &Store,
    io: &IoCounters,
    max: usize,
) {
    let depth = first.len();
    if ch.buffer().len() < depth * max {
        tracing::error!("ublk: the channel's buffer is smaller than the queue's slots");
        return;
    }
    let mut queue = Queue {
        q,
        first,
        base: ch.buffer().as_ptr(),
        max,
        in_slot: vec![false; depth],
        flights: vec![None; depth],
        scratch: vec![0u8; max],
        done: Vec::with_capacity(depth),
    };
    let mut arrived: Vec<u16> = Vec::with_capacity(depth);
    let mut peek = PEEK_FIRST;
    loop {
        arrived.clear();
        let wait = usize::from(queue.active() == 0);
        let r = q.flush_and_wake_io_tasks(
            |user_data, cqe, _| {
                // Only commands come back on this ring (no target I/O is submitted); a result
                // other than OK is the driver ending a tag's command: the device is stopping.
                if user_data & UblkUringData::Target as u64 == 0
                    && cqe.result() == sys::UBLK_IO_RES_OK as i32
                {
                    arrived.push(UblkIOCtx::user_data_to_tag(user_data) as u16);
                }
            },
            wait,
        );
        if r.is_err() {
            if queue.active() == 0 {
                // The queue is down and no request of ours is left to answer.
                break;
            }
            // Requests still at the donors are answered first (their commits are submitted by
            // the next turn, which then sees the queue down for good).
            while queue.active() > 0 {
                queue.reap(&mut ch, io, None);
            }
            continue;
        }
        for &tag in &arrived {
            queue.start(&mut ch, store, io, tag);
        }
        if queue.active() == 0 {
            continue;
        }
        // Waits for a completion only when the kernel had nothing new for us, and then only
        // briefly: the ring is looked at again soon either way.
        let wait = if arrived.is_empty() {
            peek
        } else {
            Duration::ZERO
        };
        let finished = queue.reap(&mut ch, io, Some(wait));
        peek = if finished > 0 || !arrived.is_empty() {
            PEEK_FIRST
        } else {
            (peek * 2).min(PEEK_MOST)
        };
    }
}

struct Queue<'a> {
    q: &'a UblkQueue<'a>,
    first: &'a [IoBuf<u8>],
    /// The channel's buffer: tag `t`'s slot is `max` bytes at `t * max`.
    base: *mut u8,
    max: usize,
    /// Per tag: its current request's data is in its slot (every request after its first).
    in_slot: Vec<bool>,
    flights: Vec<Option<Flight>>,
    scratch: Vec<u8>,
    done: Vec<(u64, Result<(), StoreError>)>,
}

impl Queue<'_> {
    /// Starts the request of `tag`: READ and WRITE into the channel, the rest here.
    fn start(&mut self, ch: &mut StoreChannel<'_>, store: &Store, io: &IoCounters, tag: u16) {
        let t = usize::from(tag);
        let iod = self.q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let off = iod.start_sector.saturating_mul(512);
        let len = iod.nr_sectors as usize * 512;
        let write = op == sys::UBLK_IO_OP_WRITE;
        if (op == sys::UBLK_IO_OP_READ || write) && len <= self.max && t < self.first.len() {
            if write && !self.in_slot[t] {
                let data = &self.first[t].as_slice()[..len];
                if let Err(e) = ch.buffer().write_at(t * self.max, data) {
                    tracing::error!(tag, error = %e, "ublk: staging a write failed");
                    self.commit(tag, -libc::EIO);
                    return;
                }
            }
            self.flights[t] = Some(Flight {
                write,
                off,
                len,
                started: Instant::now(),
            });
            let req = IoReq {
                tag: u64::from(tag),
                op: if write { IoOp::Write } else { IoOp::Read },
                off,
                len,
                at: t * self.max,
            };
            match ch.submit(req) {
                Ok(()) => io.saw_in_flight(ch.pending() as u64),
                Err(e) => {
                    self.flights[t] = None;
                    let errno = blockio::account(io, write, off, len, Err(e)).unwrap_err();
                    self.commit(tag, -errno);
                }
            }
            return;
        }
        // FLUSH, DISCARD, WRITE_ZEROES, and what cannot be served (an oversized READ or WRITE,
        // an unknown operation) need no data buffer.
        let res = serve_request(store, io, iod, &mut [], &mut self.scratch);
        self.commit(tag, res);
    }

    /// Commits the requests the channel has finished, waiting up to `wait` for one when none
    /// is (`None`: until one is); returns how many. A failed channel fails everything in
    /// flight, so no request is held forever.
    fn reap(
        &mut self,
        ch: &mut StoreChannel<'_>,
        io: &IoCounters,
        wait: Option<Duration>,
    ) -> usize {
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        let r = match wait {
            Some(most) => ch.reap_upto(&mut done, most),
            None => ch.reap(&mut done, true),
        };
        let mut finished = 0;
        if let Err(e) = r {
            tracing::error!(error = %e, "ublk: the store channel failed");
            for t in 0..self.flights.len() {
                if self.flights[t].is_some() {
                    let err = StoreError::Config(format!("the store channel failed: {e}"));
                    finished += usize::from(self.finish(io, t as u16, Err(err)));
                }
            }
        }
        for (tag, r) in done.drain(..) {
            finished += usize::from(self.finish(io, tag as u16, r));
        }
        self.done = done;
        finished
    }

    /// Requests in flight.
    fn active(&self) -> usize {
        self.flights.iter().filter(|f| f.is_some()).count()
    }

    /// A channel request is over: account for it and commit it; false if `tag` had none in
    /// flight.
    fn finish(&mut self, io: &IoCounters, tag: u16, r: Result<(), StoreError>) -> bool {
        let Some(f) = self
            .flights
            .get_mut(usize::from(tag))
            .and_then(Option::take)
        else {
            return false;
        };
        blockio::warn_if_slow("ublk", f.write, f.off, f.len, f.started);
        let res = match blockio::account(io, f.write, f.off, f.len, r) {
            Ok(()) => f.len as i32,
            Err(errno) => -errno,
        };
        self.commit(tag, res);
        true
    }

    /// Commits `tag` with `res` and hands the driver the tag's slot for its next request (and
    /// for this one's READ data).
    fn commit(&mut self, tag: u16, res: i32) {
        let t = usize::from(tag);
        // The slot is inside the channel's buffer, which outlives every command of this queue
        // (the loop ends only once the driver holds none), and no request of ours is in flight
        // on it: the tag is being committed.
        let slot = self.base.wrapping_add(t * self.max);
        self.in_slot[t] = true;
        if let Err(e) = self.q.complete_io_cmd_unified(
            tag,
            BufDesc::RawAddress(slot),
            Ok(UblkIORes::Result(res)),
        ) {
            tracing::error!(tag, error = %e, "ublk: completing a request failed");
        }
    }
}
