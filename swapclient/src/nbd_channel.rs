//! Answering an NBD client's requests through one [`StoreChannel`]: a reader thread parses
//! requests (a WRITE's payload straight into its slot of the channel's registered buffer) and
//! this thread keeps every one of them in flight at once and replies as each completes, in
//! whatever order the donors answer (the client matches replies by cookie).
//!
//! Against [`crate::nbd_serve::serve`]'s pool of blocking workers: no thread per request in
//! flight, no bounce copy on the way to the donors, and as many requests in flight as slots.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use rmem_wire::nbd::{CMD_READ, CMD_WRITE};

use crate::blockio::{self, IoCounters};
use crate::nbd_serve::{next_request, reply_header, Header};
use crate::store::{IoOp, IoReq, Store, StoreChannel};

/// A request handed from the reader to the I/O thread.
enum Job {
    /// READ or WRITE in buffer slot `slot` (a WRITE's data already there).
    Io {
        write: bool,
        cookie: u64,
        off: u64,
        len: usize,
        slot: usize,
    },
    /// TRIM or WRITE_ZEROES.
    Zero { cookie: u64, off: u64, len: u64 },
}

/// What the I/O thread remembers of a request in flight, by slot.
#[derive(Clone, Copy)]
struct Flight {
    write: bool,
    cookie: u64,
    off: u64,
    len: usize,
    started: Instant,
}

/// With requests in flight and nothing happening, the I/O thread waits in turn on its donors
/// and on the reader for this long, doubling up to [`WAIT_MOST`] while nothing comes: a fixed
/// 50 us wake-up on a one-CPU borrower took the CPU its own TCP stack needed to hear the
/// donors, whose answers then came late enough to fail them (`--op-timeout 2`).
const WAIT_FIRST: Duration = Duration::from_micros(50);
const WAIT_MOST: Duration = Duration::from_millis(2);

/// A reply that takes this long to write is reported.
const SLOW_REPLY: Duration = Duration::from_millis(200);

/// Serves `sock` until the client disconnects, through `ch`, whose buffer holds `slots`
/// requests of `max_request` bytes. Every request read is answered before this returns.
pub fn serve(
    sock: UnixStream,
    mut ch: StoreChannel<'_>,
    store: &Store,
    io: &IoCounters,
    slots: usize,
    max_request: usize,
) -> std::io::Result<()> {
    if slots == 0 || ch.buffer().len() < slots * max_request {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the channel's buffer is smaller than its slots",
        ));
    }
    let writer = Mutex::new(sock.try_clone()?);
    let send = |parts: &[&[u8]]| -> std::io::Result<()> {
        let t = Instant::now();
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        for p in parts {
            w.write_all(p)?;
        }
        // While a reply waits for the kernel to read it, the I/O thread reads no donor's
        // answers either: say so, it can be why a donor's requests time out.
        if t.elapsed() >= SLOW_REPLY {
            tracing::warn!(
                ms = t.elapsed().as_millis() as u64,
                "nbd: a reply waited for the kernel's NBD client to read it"
            );
        }
        Ok(())
    };
    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(slots);
    let (free_tx, free_rx) = crossbeam_channel::bounded::<usize>(slots);
    for k in 0..slots {
        let _ = free_tx.send(k);
    }
    let buf = ch.buffer().clone();
    std::thread::scope(|s| {
        let reader = std::thread::Builder::new()
            .name("nbd-read".into())
            .stack_size(256 << 10)
            .spawn_scoped(s, || {
                let r = read_requests(&sock, &job_tx, &free_rx, &send, &buf, max_request);
                drop(job_tx);
                r
            })?;
        let served = run(&mut ch, store, io, &job_rx, &free_tx, &send, max_request);
        if served.is_err() {
            // The reader may be blocked on the socket: end it.
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        drop(job_rx);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the NBD reader panicked")));
        served.and(read)
    })
}

/// The reader: parses headers (and WRITE payloads) and hands requests to the I/O thread.
fn read_requests(
    mut sock: &UnixStream,
    jobs: &Sender<Job>,
    free: &Receiver<usize>,
    send: &dyn Fn(&[&[u8]]) -> std::io::Result<()>,
    buf: &rmem_transport::Buffer,
    max_request: usize,
) -> std::io::Result<()> {
    let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the I/O thread is gone");
    let mut payload = vec![0u8; max_request];
    while let Some(Header {
        cmd,
        cookie,
        off,
        len,
    }) = next_request(sock, max_request, send)?
    {
        let job = match cmd {
            CMD_READ | CMD_WRITE => {
                let slot = free.recv().map_err(|_| gone())?;
                let write = cmd == CMD_WRITE;
                if write {
                    sock.read_exact(&mut payload[..len])?;
                    buf.write_at(slot * max_request, &payload[..len])
                        .map_err(std::io::Error::other)?;
                }
                Job::Io {
                    write,
                    cookie,
                    off,
                    len,
                    slot,
                }
            }
            // TRIM or WRITE_ZEROES.
            _ => Job::Zero {
                cookie,
                off,
                len: len as u64,
            },
        };
        jobs.send(job).map_err(|_| gone())?;
    }
    Ok(())
}

/// The I/O thread: submits what the reader hands over, replies as requests complete, and
/// ends once the reader has stopped and nothing is in flight.
fn run(
    ch: &mut StoreChannel<'_>,
    store: &Store,
    io: &IoCounters,
    jobs: &Receiver<Job>,
    free: &Sender<usize>,
    send: &dyn Fn(&[&[u8]]) -> std::io::Result<()>,
    max_request: usize,
) -> std::io::Result<()> {
    let slots = free.capacity().unwrap_or(1);
    let mut flights: Vec<Option<Flight>> = vec![None; slots];
    let mut done = Vec::with_capacity(slots);
    let mut data = vec![0u8; max_request];
    let mut scratch = vec![0u8; max_request];
    let mut reading = true;
    let mut wait = WAIT_FIRST;
    loop {
        // New requests first; with nothing in flight, wait for one.
        let next = if ch.pending() == 0 {
            if !reading {
                return Ok(());
            }
            jobs.recv().ok()
        } else {
            match jobs.try_recv() {
                Ok(j) => Some(j),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => {
                    reading = false;
                    None
                }
            }
        };
        let Some(job) = next else {
            if ch.pending() == 0 {
                reading = false;
                continue;
            }
            done.clear();
            if reading {
                ch.reap_upto(&mut done, wait)
                    .map_err(std::io::Error::other)?;
            } else {
                ch.reap(&mut done, true).map_err(std::io::Error::other)?;
            }
            if done.is_empty() && reading {
                match jobs.recv_timeout(wait) {
                    Ok(j) => {
                        wait = WAIT_FIRST;
                        start(
                            ch,
                            store,
                            io,
                            j,
                            &mut flights,
                            &mut scratch,
                            send,
                            max_request,
                        )?
                    }
                    Err(RecvTimeoutError::Timeout) => wait = (wait * 2).min(WAIT_MOST),
                    Err(RecvTimeoutError::Disconnected) => reading = false,
                }
            } else if !done.is_empty() {
                wait = WAIT_FIRST;
            }
            for (tag, r) in done.drain(..) {
                let slot = tag as usize;
                let Some(f) = flights.get_mut(slot).and_then(Option::take) else {
                    continue;
                };
                let result = blockio::account(io, f.write, f.off, f.len, r);
                let sent = match result {
                    Ok(()) if !f.write => {
                        ch.buffer()
                            .read_at(slot * max_request, &mut data[..f.len])
                            .map_err(std::io::Error::other)?;
                        send(&[&reply_header(f.cookie, 0), &data[..f.len]])
                    }
                    Ok(()) => send(&[&reply_header(f.cookie, 0)]),
                    Err(errno) => send(&[&reply_header(f.cookie, errno as u32)]),
                };
                blockio::warn_if_slow("nbd", f.write, f.off, f.len, f.started);
                let _ = free.send(slot);
                sent?;
            }
            continue;
        };
        wait = WAIT_FIRST;
        start(
            ch,
            store,
            io,
            job,
            &mut flights,
            &mut scratch,
            send,
            max_request,
        )?;
    }
}

/// Starts one request: a READ or WRITE goes into the channel; a zeroing is done here.
#[allow(clippy::too_many_arguments)]
fn start(
    ch: &mut StoreChannel<'_>,
    store: &Store,
    io: &IoCounters,
    job: Job,
    flights: &mut [Option<Flight>],
    scratch: &mut [u8],
    send: &dyn Fn(&[&[u8]]) -> std::io::Result<()>,
    max_request: usize,
) -> std::io::Result<()> {
    match job {
        Job::Io {
            write,
            cookie,
            off,
            len,
            slot,
        } => {
            flights[slot] = Some(Flight {
                write,
                cookie,
                off,
                len,
                started: Instant::now(),
            });
            ch.submit(IoReq {
                tag: slot as u64,
                op: if write { IoOp::Write } else { IoOp::Read },
                off,
                len,
                at: slot * max_request,
            })
            .map_err(std::io::Error::other)?;
            io.saw_in_flight(ch.pending() as u64);
            Ok(())
        }
        Job::Zero { cookie, off, len } => {
            // Rare (discards): done in place, in pieces of the scratch buffer.
            let r = blockio::zero(store, io, off, len, scratch);
            send(&[&reply_header(cookie, r.err().unwrap_or(0) as u32)])
        }
    }
}
