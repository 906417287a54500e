//! Answering an NBD client's requests (the kernel's, on a local socket) with many in flight.
//!
//! One thread reads requests continuously; a pool of workers carries them out against the
//! storage and each replies as soon as its request is done, so replies may leave in another
//! order than the requests came: the client matches them by cookie (the NBD protocol allows
//! it, and the kernel's client relies on it). A slow request (a READ waiting on a donor) then
//! holds up no other. Buffers are allocated once per worker; the reader waits for a free one,
//! which bounds what the client can make this side hold.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Instant;

pub(crate) use rmem_wire::nbd::reply_header;
use rmem_wire::nbd::{
    Request, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL,
    REQUEST_HEADER,
};

use crate::blockio::{self, IoCounters};
use crate::store::Store;

/// What a request does to the storage behind the device; `Err` is a positive errno for the
/// client.
pub trait BlockOps: Sync {
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), i32>;
    fn write(&self, off: u64, buf: &[u8]) -> Result<(), i32>;
    /// Discard or write-zeroes of `len` bytes; `scratch` is the worker's own buffer.
    fn zero(&self, off: u64, len: u64, scratch: &mut [u8]) -> Result<(), i32>;
}

/// A [`Store`] with its device's counters.
pub struct StoreOps<'a> {
    pub store: &'a Store,
    pub io: &'a IoCounters,
}

impl BlockOps for StoreOps<'_> {
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), i32> {
        blockio::read(self.store, self.io, off, buf)
    }
    fn write(&self, off: u64, buf: &[u8]) -> Result<(), i32> {
        blockio::write(self.store, self.io, off, buf)
    }
    fn zero(&self, off: u64, len: u64, scratch: &mut [u8]) -> Result<(), i32> {
        blockio::zero(self.store, self.io, off, len, scratch)
    }
}

/// A request handed to a worker.
struct Job {
    cmd: u16,
    cookie: u64,
    off: u64,
    len: usize,
    /// READ and WRITE: the data (a WRITE's already read from the socket).
    buf: Option<Vec<u8>>,
    /// When its header arrived: a slow request is logged (see [`blockio::SLOW`]).
    started: Instant,
}

/// A worker's stack: a request goes through the store and the transport, a few calls deep.
const WORKER_STACK: usize = 256 << 10;

/// Serves `sock` until the client disconnects (NBD_CMD_DISC or end of stream), with `workers`
/// requests in flight at most, each up to `max_request` bytes. Every request read is answered
/// before this returns (a disconnect waits for those in flight).
pub fn serve(
    sock: UnixStream,
    ops: &dyn BlockOps,
    workers: usize,
    max_request: usize,
) -> std::io::Result<()> {
    let workers = workers.max(1);
    let writer = Mutex::new(sock.try_clone()?);
    let failed: Mutex<Option<std::io::Error>> = Mutex::new(None);
    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(workers);
    let (free_tx, free_rx) = crossbeam_channel::bounded::<Vec<u8>>(workers);
    for _ in 0..workers {
        let _ = free_tx.send(vec![0u8; max_request]);
    }
    let send = |parts: &[&[u8]]| -> std::io::Result<()> {
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        for p in parts {
            w.write_all(p)?;
        }
        Ok(())
    };
    let read_result = std::thread::scope(|s| {
        for i in 0..workers {
            let (job_rx, free_tx, send, failed) = (job_rx.clone(), free_tx.clone(), &send, &failed);
            std::thread::Builder::new()
                .name(format!("nbd-io-{i}"))
                // The daemon locks its memory: a default 2 MiB stack would all be resident.
                .stack_size(WORKER_STACK)
                .spawn_scoped(s, move || {
                    let mut scratch = vec![0u8; max_request];
                    for mut job in job_rx.iter() {
                        let sent = work(ops, &mut job, &mut scratch, send);
                        if let Some(buf) = job.buf.take() {
                            let _ = free_tx.send(buf);
                        }
                        if let Err(e) = sent {
                            // The client is gone; the reader sees the end of the stream too.
                            let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                            f.get_or_insert(e);
                        }
                    }
                })?;
        }
        drop(job_rx);
        let r = read_requests(&sock, &job_tx, &free_rx, &send, max_request);
        // Workers finish what was handed to them, then see the channel closed.
        drop(job_tx);
        r
    });
    read_result?;
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The reader: parses headers (and WRITE payloads) and hands requests to the workers.
fn read_requests(
    mut sock: &UnixStream,
    jobs: &crossbeam_channel::Sender<Job>,
    free: &crossbeam_channel::Receiver<Vec<u8>>,
    send: &dyn Fn(&[&[u8]]) -> std::io::Result<()>,
    max_request: usize,
) -> std::io::Result<()> {
    let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "workers gone");
    while let Some(Header {
        cmd,
        cookie,
        off,
        len,
    }) = next_request(sock, max_request, send)?
    {
        let started = Instant::now();
        let buf = match cmd {
            CMD_READ | CMD_WRITE => {
                let mut b = free.recv().map_err(|_| gone())?;
                if cmd == CMD_WRITE {
                    sock.read_exact(&mut b[..len])?;
                }
                Some(b)
            }
            _ => None,
        };
        jobs.send(Job {
            cmd,
            cookie,
            off,
            len,
            buf,
            started,
        })
        .map_err(|_| gone())?;
    }
    Ok(())
}

/// One request's header.
pub(crate) struct Header {
    pub(crate) cmd: u16,
    pub(crate) cookie: u64,
    pub(crate) off: u64,
    pub(crate) len: usize,
}

/// Reads the next request header; `None` at the end of the stream.
fn read_header(mut sock: &UnixStream) -> std::io::Result<Option<Header>> {
    let mut hdr = [0u8; REQUEST_HEADER];
    match sock.read_exact(&mut hdr) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let r = Request::decode(&hdr)
        .map_err(|bad| std::io::Error::new(std::io::ErrorKind::InvalidData, bad))?;
    Ok(Some(Header {
        cmd: r.cmd,
        cookie: r.cookie,
        off: r.off,
        len: r.len as usize,
    }))
}

/// The next request the storage must carry out (READ, WRITE, TRIM, WRITE_ZEROES), answering
/// on the way those that need no storage (FLUSH, unknown commands, READs over `max_request`);
/// `None` at a disconnect or the end of the stream. A WRITE over `max_request` is an error: its
/// payload cannot be skipped safely, so the stream is lost.
pub(crate) fn next_request(
    sock: &UnixStream,
    max_request: usize,
    send: &dyn Fn(&[&[u8]]) -> std::io::Result<()>,
) -> std::io::Result<Option<Header>> {
    while let Some(h) = read_header(sock)? {
        match h.cmd {
            CMD_WRITE if h.len > max_request => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("an NBD write of {} bytes (at most {max_request})", h.len),
                ));
            }
            CMD_READ if h.len > max_request => send(&[&reply_header(h.cookie, EINVAL)])?,
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => return Ok(Some(h)),
            // Every write reached the donors' memory before it was acknowledged.
            CMD_FLUSH => send(&[&reply_header(h.cookie, 0)])?,
            CMD_DISC => return Ok(None),
            _ => send(&[&reply_header(h.cookie, EINVAL)])?,
        }
    }
    Ok(None)
}

/// Carries out one request and sends its reply.
fn work(
    ops: &dyn BlockOps,
    job: &mut Job,
    scratch: &mut [u8],
    send: &dyn Fn(&[&[u8]]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let (off, len) = (job.off, job.len);
    let result = match (job.cmd, job.buf.as_mut()) {
        (CMD_READ, Some(b)) => ops.read(off, &mut b[..len]),
        (CMD_WRITE, Some(b)) => ops.write(off, &b[..len]),
        (CMD_TRIM | CMD_WRITE_ZEROES, _) => ops.zero(off, len as u64, scratch),
        _ => Err(EINVAL as i32),
    };
    let sent = match (result, job.cmd, job.buf.as_ref()) {
        (Ok(()), CMD_READ, Some(b)) => send(&[&reply_header(job.cookie, 0), &b[..len]]),
        (Ok(()), ..) => send(&[&reply_header(job.cookie, 0)]),
        (Err(errno), ..) => send(&[&reply_header(job.cookie, errno as u32)]),
    };
    blockio::warn_if_slow("nbd", job.cmd == CMD_WRITE, off, len, job.started);
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmem_wire::nbd::Reply;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    const MAX: usize = 64 << 10;

    /// Memory behind the device; a READ at `hold_at` waits until the test releases it (at
    /// most 10 s).
    struct Mem {
        bytes: Mutex<Vec<u8>>,
        hold_at: Option<u64>,
        release: (Mutex<bool>, Condvar),
        fail_at: Option<u64>,
    }

    impl Mem {
        fn new(len: usize) -> Mem {
            Mem {
                bytes: Mutex::new((0..len).map(|i| (i / 4096) as u8 ^ (i as u8)).collect()),
                hold_at: None,
                release: (Mutex::new(false), Condvar::new()),
                fail_at: None,
            }
        }
    }

    impl BlockOps for Mem {
        fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), i32> {
            if Some(off) == self.fail_at {
                return Err(libc::EIO);
            }
            if Some(off) == self.hold_at {
                let (m, cv) = &self.release;
                let _unused = cv
                    .wait_timeout_while(m.lock().unwrap(), Duration::from_secs(10), |r| !*r)
                    .unwrap();
            }
            let b = self.bytes.lock().unwrap();
            buf.copy_from_slice(&b[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, off: u64, buf: &[u8]) -> Result<(), i32> {
            self.bytes.lock().unwrap()[off as usize..off as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn zero(&self, off: u64, len: u64, _scratch: &mut [u8]) -> Result<(), i32> {
            self.bytes.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
            Ok(())
        }
    }

    fn request(cmd: u16, cookie: u64, off: u64, len: u32) -> [u8; 28] {
        Request::new(cmd, cookie, off, len).encode()
    }

    /// A reply: (cookie, error, data for a successful READ of `read_len`).
    fn reply(c: &mut UnixStream, read_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).unwrap();
        let Reply { error: err, cookie } = Reply::decode(&h).expect("a simple reply");
        let mut data = vec![0u8; if err == 0 { read_len(cookie) } else { 0 }];
        c.read_exact(&mut data).unwrap();
        (cookie, err, data)
    }

    #[test]
    fn a_slow_read_does_not_hold_up_a_later_one_and_replies_match_by_cookie() {
        let mem = Mem {
            hold_at: Some(0),
            ..Mem::new(1 << 20)
        };
        let want = mem.bytes.lock().unwrap().clone();
        std::thread::scope(|s| {
            // Inside the scope: a failed assertion drops the client, so the server ends.
            let (mut client, server) = UnixStream::pair().unwrap();
            let srv = s.spawn(|| serve(server, &mem, 4, MAX));
            client.write_all(&request(CMD_READ, 1, 0, 4096)).unwrap();
            client.write_all(&request(CMD_READ, 2, 8192, 8192)).unwrap();
            let len = |c: u64| if c == 1 { 4096 } else { 8192 };
            // Read 1 is held until the client has read 2's reply: a server that answers in
            // order would time it out and answer 1 first.
            let (c1, e1, d1) = reply(&mut client, len);
            *mem.release.0.lock().unwrap() = true;
            mem.release.1.notify_all();
            let (c2, e2, d2) = reply(&mut client, len);
            assert_eq!(
                (c1, e1, c2, e2),
                (2, 0, 1, 0),
                "the held read answered last"
            );
            assert_eq!(d1, want[8192..16384]);
            assert_eq!(d2, want[..4096]);
            client.write_all(&request(CMD_DISC, 3, 0, 0)).unwrap();
            srv.join().unwrap().unwrap();
        });
    }

    #[test]
    fn many_requests_in_flight_are_each_answered_once_with_the_right_data() {
        let mem = Mem::new(1 << 20);
        std::thread::scope(|s| {
            let (mut client, server) = UnixStream::pair().unwrap();
            let mut reader = client.try_clone().unwrap();
            let srv = s.spawn(|| serve(server, &mem, 8, MAX));
            // 64 writes of distinct 4 KiB blocks, a trim, then 64 reads, none waiting for replies.
            let writer = s.spawn(move || {
                for i in 0..64u64 {
                    client
                        .write_all(&request(CMD_WRITE, 100 + i, i * 8192, 4096))
                        .unwrap();
                    client.write_all(&vec![i as u8 + 1; 4096]).unwrap();
                }
                client
                    .write_all(&request(CMD_TRIM, 999, 64 * 8192, 8192))
                    .unwrap();
                client
            });
            let mut seen = std::collections::HashSet::new();
            for _ in 0..65 {
                let (c, e, _) = reply(&mut reader, |_| 0);
                assert_eq!(e, 0);
                assert!(seen.insert(c), "cookie {c} answered twice");
            }
            let mut client = writer.join().unwrap();
            for i in 0..64u64 {
                client
                    .write_all(&request(CMD_READ, 200 + i, i * 8192, 4096))
                    .unwrap();
            }
            for _ in 0..64 {
                let (c, e, d) = reply(&mut reader, |_| 4096);
                assert_eq!(e, 0);
                assert!(seen.insert(c), "cookie {c} answered twice");
                assert_eq!(d, vec![(c - 200) as u8 + 1; 4096], "read {c}");
            }
            assert!(mem.bytes.lock().unwrap()[64 * 8192..65 * 8192]
                .iter()
                .all(|b| *b == 0));
            // The end of the stream (both handles closed) ends the loop like a disconnect.
            drop((client, reader));
            srv.join().unwrap().unwrap();
        });
    }

    #[test]
    fn errors_reach_the_client_and_the_loop_goes_on() {
        let mem = Mem {
            fail_at: Some(4096),
            ..Mem::new(1 << 20)
        };
        std::thread::scope(|s| {
            let (mut client, server) = UnixStream::pair().unwrap();
            let srv = s.spawn(|| serve(server, &mem, 2, MAX));
            client.write_all(&request(CMD_READ, 1, 4096, 4096)).unwrap();
            assert_eq!(reply(&mut client, |_| 4096).1, libc::EIO as u32);
            client
                .write_all(&request(CMD_READ, 2, 0, MAX as u32 + 1))
                .unwrap();
            assert_eq!(reply(&mut client, |_| 0).1, EINVAL);
            client.write_all(&request(77, 3, 0, 0)).unwrap();
            assert_eq!(reply(&mut client, |_| 0).1, EINVAL);
            client.write_all(&request(CMD_FLUSH, 4, 0, 0)).unwrap();
            assert_eq!(reply(&mut client, |_| 0), (4, 0, vec![]));
            client.write_all(&request(CMD_READ, 5, 0, 16)).unwrap();
            let (c, e, d) = reply(&mut client, |_| 16);
            assert_eq!((c, e), (5, 0));
            assert_eq!(d, mem.bytes.lock().unwrap()[..16]);
            // A write too large to skip ends the connection with an error.
            client
                .write_all(&request(CMD_WRITE, 6, 0, MAX as u32 + 1))
                .unwrap();
            let e = srv.join().unwrap().unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        });
    }

    #[test]
    fn a_disconnect_waits_for_the_writes_in_flight() {
        let mem = Mem::new(1 << 20);
        std::thread::scope(|s| {
            let (mut client, server) = UnixStream::pair().unwrap();
            let srv = s.spawn(|| serve(server, &mem, 4, MAX));
            for i in 0..16u64 {
                client
                    .write_all(&request(CMD_WRITE, i, i * 4096, 4096))
                    .unwrap();
                client.write_all(&[0xee; 4096]).unwrap();
            }
            client.write_all(&request(CMD_DISC, 99, 0, 0)).unwrap();
            srv.join().unwrap().unwrap();
            assert!(mem.bytes.lock().unwrap()[..16 * 4096]
                .iter()
                .all(|b| *b == 0xee));
            let mut n = 0;
            while n < 16 {
                let (_, e, _) = reply(&mut client, |_| 0);
                assert_eq!(e, 0);
                n += 1;
            }
        });
        // Bad magic: an error, not a hang.
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut bad = request(CMD_READ, 1, 0, 16);
        bad[0] ^= 0xff;
        client.write_all(&bad).unwrap();
        assert!(serve(server, &Mem::new(4096), 2, MAX).is_err());
    }
}
