//! NBD export: the donor's memory as a block device for any host with a stock NBD client
//! (`nbd-client`, qemu, libnbd), so it can swap to the donor without rmem installed.
//!
//! Fixed-newstyle handshake (NBD_OPT_GO, INFO, EXPORT_NAME, LIST, ABORT; structured replies are
//! declined, so clients use simple replies), then READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and
//! DISC. Each export is a set of slabs taken from the pool at start-up and kept while the donor
//! runs; bytes move between the socket and the slabs. Block sizes: minimum 1, preferred 4096,
//! maximum 32 MiB per request. The protocol has no authentication: the export listens on
//! loopback unless configured otherwise; put it only on a network you trust.
//!
//! What one client can hold is bounded ([`NbdConfig`]): connections in all and per source
//! address (extra ones are closed when accepted), the time to finish the handshake, and the
//! bytes of replies waiting for a client that does not read them (past that, its requests are
//! not read either, so TCP pushes back). A donor's memory for NBD clients is therefore at most
//! about `max_connections` x (`max_queued_replies` + one WRITE payload + 16 reusable reply
//! buffers of up to 2 MiB + socket buffers).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmem_transport::Buffer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::NbdConfig;
use crate::conn_limit::{ConnLimit, Full};
use crate::nbd_wire::{self, *};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TRANSMISSION_FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_CAN_MULTI_CONN;

/// Reply buffers up to this capacity (1 MiB READs and their header, with room for how a `Vec`
/// grows) go back to the reader for reuse, at most 16 of them; larger ones are freed, so idle
/// buffers stay small however large the requests were.
const REUSE_MAX: usize = 2 << 20;
/// Longest option payload accepted during the handshake.
const MAX_OPTION: u32 = 64 * 1024;

/// Every export, by name.
pub(crate) type Exports = Arc<HashMap<String, Arc<Export>>>;

/// One export's storage: slabs of the pool, in order.
pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) buf: Buffer,
    pub(crate) slab_size: u64,
    /// Pool offset of each slab, in export order.
    pub(crate) slabs: Vec<u64>,
}

impl Export {
    /// Calls `f(pool_offset, range_in_request)` for each slab piece of `[off, off + len)`.
    fn pieces(&self, off: u64, len: u64, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let idx = (pos / self.slab_size) as usize;
            let within = pos % self.slab_size;
            let n = (self.slab_size - within).min(len - done);
            f(
                (self.slabs[idx] + within) as usize,
                done as usize..(done + n) as usize,
            );
            done += n;
        }
    }

    /// Appends `[off, off + len)` to `out`.
    fn read_append(&self, off: u64, len: u64, out: &mut Vec<u8>) -> rmem_transport::Result<()> {
        let mut r = Ok(());
        self.pieces(off, len, |p, range| {
            if r.is_ok() {
                r = self.buf.append_to(p, range.len(), out);
            }
        });
        r
    }

    #[cfg(test)]
    fn read(&self, off: u64, out: &mut [u8]) -> rmem_transport::Result<()> {
        let mut r = Ok(());
        self.pieces(off, out.len() as u64, |p, range| {
            if r.is_ok() {
                r = self.buf.read_at(p, &mut out[range]);
            }
        });
        r
    }

    fn write(&self, off: u64, data: &[u8]) -> rmem_transport::Result<()> {
        let mut r = Ok(());
        self.pieces(off, data.len() as u64, |p, range| {
            if r.is_ok() {
                r = self.buf.write_at(p, &data[range]);
            }
        });
        r
    }

    fn zero(&self, off: u64, len: u64) -> rmem_transport::Result<()> {
        let mut r = Ok(());
        self.pieces(off, len, |p, range| {
            if r.is_ok() {
                r = self.buf.zero(p, range.len());
            }
        });
        r
    }
}

/// Figures of the NBD front end (tests read them; nothing else yet).
#[derive(Debug, Default)]
pub(crate) struct NbdStats {
    /// Connections being served.
    pub(crate) connections: Arc<AtomicUsize>,
    /// Connections closed when accepted, over a limit.
    pub(crate) refused: AtomicU64,
    /// Connections closed for not finishing the handshake in time.
    pub(crate) handshake_timeouts: AtomicU64,
    /// The most reply bytes any one connection had waiting for its socket.
    pub(crate) queued_peak: AtomicUsize,
}

/// Connections being served, in all and per source address.
struct Admission {
    limits: NbdConfig,
    places: ConnLimit,
    stats: Arc<NbdStats>,
    /// When a refusal was last logged, and how many went unlogged since: a flood of
    /// connections must not become a flood of log lines.
    refusals: Mutex<(Option<Instant>, u64)>,
}

/// At most one log line per this about refused connections.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Admission {
    /// Counts a connection closed over a limit; logs it unless one was logged lately.
    fn refused(&self, peer: SocketAddr, why: Full) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        let mut log = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if log
            .0
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_EVERY)
        {
            log.1 += 1;
            return;
        }
        let limit = match why {
            Full::Total(_) => "nbd.max_connections",
            Full::Source(_) => "nbd.max_connections_per_ip",
        };
        tracing::warn!(%peer, refused_unlogged = log.1, "NBD connection closed: {why} ({limit})");
        *log = (Some(now), 0);
    }
}

/// Serves the exports on `listener` for ever under `limits`.
pub(crate) async fn serve_with(
    listener: TcpListener,
    exports: Exports,
    limits: NbdConfig,
    stats: Arc<NbdStats>,
) {
    let admission = Arc::new(Admission {
        places: ConnLimit::with_gauge(
            limits.max_connections,
            limits.max_connections_per_ip,
            stats.connections.clone(),
        ),
        limits,
        stats,
        refusals: Mutex::new((None, 0)),
    });
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                let place = match admission.places.admit(peer.ip()) {
                    Ok(p) => p,
                    Err(why) => {
                        drop(s);
                        admission.refused(peer, why);
                        continue;
                    }
                };
                let exports = exports.clone();
                let admission = admission.clone();
                tokio::spawn(async move {
                    let _place = place;
                    let _ = s.set_nodelay(true);
                    let (r, w) = s.into_split();
                    let conn = Conn {
                        r: BufReader::with_capacity(256 << 10, r),
                        w: BufWriter::with_capacity(256 << 10, w),
                    };
                    match conn
                        .run(&exports, &admission.limits, &admission.stats)
                        .await
                    {
                        Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                        Err(e) => tracing::info!(%peer, error = %e, "NBD connection ended"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why an NBD connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NbdError {
    #[error("i/o")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
}

struct Conn<R, W> {
    r: BufReader<R>,
    w: W,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin + Send + 'static> Conn<R, W> {
    async fn run(
        mut self,
        exports: &HashMap<String, Arc<Export>>,
        limits: &NbdConfig,
        stats: &NbdStats,
    ) -> Result<(), NbdError> {
        let limit = limits.handshake_timeout();
        let export = match tokio::time::timeout(limit, self.negotiate(exports)).await {
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(NbdError::HandshakeTimeout(limit));
            }
        };
        tracing::info!(export = %export.name, "NBD client attached");
        let Conn { r, w } = self;
        let budget = limits.max_queued_replies.0 as usize;
        transmission(r, w, &export, budget, stats).await
    }

    /// The newstyle greeting and option haggling; `Some(export)` when the client moves to
    /// transmission.
    async fn negotiate(
        &mut self,
        exports: &HashMap<String, Arc<Export>>,
    ) -> Result<Option<Arc<Export>>, NbdError> {
        self.w.write_u64(NBDMAGIC).await?;
        self.w.write_u64(IHAVEOPT).await?;
        self.w
            .write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
            .await?;
        self.w.flush().await?;
        let cflags = self.r.read_u32().await?;
        if cflags & CLIENT_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol(
                "client does not speak fixed newstyle".into(),
            ));
        }
        let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
        self.options(exports, no_zeroes).await
    }

    async fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
        self.w.write_u64(REPLY_MAGIC).await?;
        self.w.write_u32(opt).await?;
        self.w.write_u32(kind).await?;
        self.w.write_u32(data.len() as u32).await?;
        self.w.write_all(data).await?;
        Ok(())
    }

    /// Option haggling; `Some(export)` when the client moves to transmission.
    async fn options(
        &mut self,
        exports: &HashMap<String, Arc<Export>>,
        no_zeroes: bool,
    ) -> Result<Option<Arc<Export>>, NbdError> {
        loop {
            if self.r.read_u64().await? != IHAVEOPT {
                return Err(NbdError::Protocol("bad option magic".into()));
            }
            let opt = self.r.read_u32().await?;
            let len = self.r.read_u32().await?;
            if len > MAX_OPTION {
                return Err(NbdError::Protocol(format!("option of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            self.r.read_exact(&mut data).await?;
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    // No error reply exists for this option: an unknown name closes.
                    let Some(e) = exports.get(&name) else {
                        return Err(NbdError::Protocol(format!("unknown export {name:?}")));
                    };
                    self.w.write_u64(e.size).await?;
                    self.w.write_u16(TRANSMISSION_FLAGS).await?;
                    if !no_zeroes {
                        self.w.write_all(&[0u8; 124]).await?;
                    }
                    self.w.flush().await?;
                    return Ok(Some(e.clone()));
                }
                OPT_ABORT => {
                    self.reply(opt, REP_ACK, &[]).await?;
                    self.w.flush().await?;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.reply(opt, REP_ERR_INVALID, b"LIST takes no data")
                            .await?;
                    } else {
                        let mut names: Vec<&String> = exports.keys().collect();
                        names.sort();
                        for n in names {
                            let mut d = (n.len() as u32).to_be_bytes().to_vec();
                            d.extend_from_slice(n.as_bytes());
                            self.reply(opt, REP_SERVER, &d).await?;
                        }
                        self.reply(opt, REP_ACK, &[]).await?;
                    }
                }
                OPT_INFO | OPT_GO => match parse_go(&data) {
                    None => {
                        self.reply(opt, REP_ERR_INVALID, b"malformed request")
                            .await?
                    }
                    Some((name, infos)) => match exports.get(&name) {
                        None => {
                            let m = format!("no export named {name:?}");
                            self.reply(opt, REP_ERR_UNKNOWN, m.as_bytes()).await?;
                        }
                        Some(e) => {
                            let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                            d.extend_from_slice(&e.size.to_be_bytes());
                            d.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                            self.reply(opt, REP_INFO, &d).await?;
                            if infos.contains(&INFO_BLOCK_SIZE) {
                                let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                                for v in [1u32, 4096, MAX_REQUEST] {
                                    b.extend_from_slice(&v.to_be_bytes());
                                }
                                self.reply(opt, REP_INFO, &b).await?;
                            }
                            self.reply(opt, REP_ACK, &[]).await?;
                            if opt == OPT_GO {
                                self.w.flush().await?;
                                return Ok(Some(e.clone()));
                            }
                        }
                    },
                },
                _ => {
                    self.reply(opt, REP_ERR_UNSUP, b"option not supported")
                        .await?
                }
            }
            self.w.flush().await?;
        }
    }
}

/// A reply on its way to the writer: the 16-byte header, then READ data, in one buffer.
type Reply = Vec<u8>;

/// Starts `buf` over with a reply's header.
fn reply_header(buf: &mut Vec<u8>, error: u32, cookie: u64) {
    buf.clear();
    buf.extend_from_slice(&nbd_wire::reply_header(cookie, error));
}

/// The transmission phase: this task parses requests and moves the bytes; a writer task sends
/// the replies, so copying one request overlaps sending the previous one. Small buffers go
/// back to this task for reuse, so steady state allocates nothing.
///
/// At most `budget` bytes of replies wait for the socket: before building a reply the reader
/// waits for room, and reads nothing more meanwhile, so a client that sends requests without
/// reading the replies is held back by TCP instead of filling the donor's memory.
async fn transmission<R, W>(
    mut r: BufReader<R>,
    w: W,
    e: &Export,
    budget: usize,
    stats: &NbdStats,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Room for reply bytes waiting for the socket: the reader takes it before building a reply
    // and sends it along; the writer lets it go once the reply is written.
    let budget = budget.min(Semaphore::MAX_PERMITS);
    let room = Arc::new(Semaphore::new(budget));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Reply, OwnedSemaphorePermit)>(16);
    let (back_tx, mut back_rx) = tokio::sync::mpsc::channel::<Reply>(16);
    let writer = tokio::spawn(async move {
        let mut w = w;
        while let Some((buf, room)) = rx.recv().await {
            w.write_all(&buf).await?;
            if rx.is_empty() {
                w.flush().await?;
            }
            // Written (or in the socket's buffer): its bytes no longer wait here.
            drop(room);
            if buf.capacity() <= REUSE_MAX {
                let _ = back_tx.try_send(buf);
            }
        }
        w.flush().await?;
        Ok::<(), std::io::Error>(())
    });
    let mut data = Vec::new();
    let result = loop {
        let mut hdr = [0u8; REQUEST_HEADER];
        match r.read_exact(&mut hdr).await {
            Ok(_) => {}
            // The client left (between requests, or in the middle of one it will never finish).
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(err) => break Err(err.into()),
        }
        let Request {
            cmd,
            cookie,
            off,
            len,
            ..
        } = match Request::decode(&hdr) {
            Ok(h) => h,
            Err(bad) => break Err(NbdError::Protocol(bad.to_string())),
        };
        let in_range = off
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= e.size);
        let reply_len = REPLY_HEADER
            + match cmd {
                CMD_READ if len <= MAX_REQUEST && in_range => len as usize,
                _ => 0,
            };
        // Waits here, reading nothing more, while the client leaves its replies unread.
        let permit = match room
            .clone()
            .acquire_many_owned(reply_len.min(budget) as u32)
            .await
        {
            Ok(p) => p,
            Err(_) => break Err(NbdError::Protocol("reply budget closed".into())),
        };
        let waiting = budget - room.available_permits();
        stats.queued_peak.fetch_max(waiting, Ordering::Relaxed);
        let mut out = back_rx.try_recv().unwrap_or_default();
        match cmd {
            CMD_READ if len <= MAX_REQUEST && in_range => {
                reply_header(&mut out, 0, cookie);
                if e.read_append(off, u64::from(len), &mut out).is_err() {
                    reply_header(&mut out, EIO, cookie);
                }
            }
            CMD_READ => reply_header(&mut out, EINVAL, cookie),
            CMD_WRITE => {
                // The payload follows whatever we think of it; one too large to read in step
                // cannot be skipped safely, so that connection ends.
                if len > MAX_REQUEST {
                    break Err(NbdError::Protocol(format!("WRITE of {len} bytes")));
                }
                data.resize(len as usize, 0);
                r.read_exact(&mut data).await?;
                let err = if !in_range {
                    ENOSPC
                } else if e.write(off, &data).is_err() {
                    EIO
                } else {
                    0
                };
                reply_header(&mut out, err, cookie);
            }
            CMD_FLUSH => reply_header(&mut out, 0, cookie),
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let err = if !in_range {
                    ENOSPC
                } else if e.zero(off, u64::from(len)).is_err() {
                    EIO
                } else {
                    0
                };
                reply_header(&mut out, err, cookie);
            }
            CMD_DISC => break Ok(()),
            _ => reply_header(&mut out, ENOTSUP, cookie),
        }
        if tx.send((out, permit)).await.is_err() {
            break Err(NbdError::Protocol("reply writer stopped".into()));
        }
    };
    drop(tx);
    match writer.await {
        Ok(Ok(())) => result,
        Ok(Err(io)) => result.and(Err(io.into())),
        Err(_) => result.and(Err(NbdError::Protocol("reply writer failed".into()))),
    }
}

/// Parses NBD_OPT_GO / NBD_OPT_INFO data: name length, name, info count, info types.
fn parse_go(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(d.get(4..4usize.checked_add(n)?)?)
        .ok()?
        .to_string();
    let rest = d.get(4 + n..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    Some((
        name,
        list.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Binds the export listener.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_requests_parse_and_malformed_ones_do_not() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"swap");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_go(&d), Some(("swap".into(), vec![INFO_BLOCK_SIZE])));
        assert_eq!(parse_go(&d[..d.len() - 1]), None);
        assert_eq!(parse_go(&[0, 0, 0, 9, b'a']), None);
        assert_eq!(parse_go(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_go(&[]), None);
    }

    #[test]
    fn pieces_split_at_slab_boundaries_in_export_order() {
        let e = Export {
            name: "x".into(),
            size: 3 * 4096,
            buf: Buffer::alloc(4 * 4096, rmem_transport::HugePages::Never).unwrap(),
            slab_size: 4096,
            slabs: vec![3 * 4096, 0, 2 * 4096],
        };
        let mut seen = Vec::new();
        e.pieces(4000, 5000, |p, r| seen.push((p, r)));
        assert_eq!(
            seen,
            vec![
                (3 * 4096 + 4000, 0..96),
                (0, 96..4192),
                (2 * 4096, 4192..5000)
            ]
        );
        let data: Vec<u8> = (0..5000).map(|i| i as u8).collect();
        e.write(4000, &data).unwrap();
        let mut back = vec![0u8; 5000];
        e.read(4000, &mut back).unwrap();
        assert_eq!(back, data);
        e.zero(4000, 5000).unwrap();
        e.read(4000, &mut back).unwrap();
        assert!(back.iter().all(|b| *b == 0));
    }

    mod limits {
        use super::*;
        use tokio::net::{TcpSocket, TcpStream};

        const EXPORT: u64 = 64 << 20;

        /// An NBD front end with one 64 MiB export "e" under `limits`.
        async fn start(limits: NbdConfig) -> (SocketAddr, Arc<NbdStats>) {
            let slab = 32u64 << 20;
            let e = Export {
                name: "e".into(),
                size: EXPORT,
                buf: Buffer::alloc(EXPORT as usize, rmem_transport::HugePages::Never).unwrap(),
                slab_size: slab,
                slabs: vec![0, slab],
            };
            let exports: Exports = Arc::new(HashMap::from([("e".to_string(), Arc::new(e))]));
            let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = l.local_addr().unwrap();
            let stats = Arc::new(NbdStats::default());
            tokio::spawn(serve_with(l, exports, limits, stats.clone()));
            (addr, stats)
        }

        /// Connects from `ip` (any 127.0.0.0/8 address).
        async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
            let s = TcpSocket::new_v4().unwrap();
            s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            s.connect(to).await.unwrap()
        }

        /// True when the donor greets the connection, false when it closes it unread.
        async fn greeted(s: &mut TcpStream) -> bool {
            let mut g = [0u8; 18];
            match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut g)).await {
                Ok(Ok(_)) => {
                    assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
                    true
                }
                Ok(Err(_)) => false,
                Err(_) => panic!("neither greeted nor closed within 5 s"),
            }
        }

        /// Greeting read; EXPORT_NAME "e" sent; its answer read.
        async fn attach(s: &mut TcpStream) {
            assert!(greeted(s).await);
            s.write_u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
                .await
                .unwrap();
            s.write_u64(IHAVEOPT).await.unwrap();
            s.write_u32(OPT_EXPORT_NAME).await.unwrap();
            s.write_u32(1).await.unwrap();
            s.write_all(b"e").await.unwrap();
            assert_eq!(s.read_u64().await.unwrap(), EXPORT);
            s.read_u16().await.unwrap();
        }

        fn read_request(cookie: u64, off: u64, len: u32) -> Vec<u8> {
            Request::new(CMD_READ, cookie, off, len).encode().to_vec()
        }

        /// Waits up to 10 s for `cond`.
        async fn until(what: &str, cond: impl Fn() -> bool) {
            let t = Instant::now();
            while !cond() {
                assert!(t.elapsed() < Duration::from_secs(10), "waited for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn unread_replies_stop_at_the_budget() {
            let budget = (MAX_REQUEST as usize) + (8 << 20);
            let limits = NbdConfig {
                max_queued_replies: crate::ByteSize(budget as u64),
                ..Default::default()
            };
            let (addr, stats) = start(limits).await;
            let mut conns = Vec::new();
            for _ in 0..2 {
                let mut s = TcpStream::connect(addr).await.unwrap();
                attach(&mut s).await;
                // 64 READs of 32 MiB, never read: 2 GiB of replies asked for.
                let mut reqs = Vec::new();
                for i in 0..64u64 {
                    reqs.extend(read_request(
                        i,
                        (i % 2) * u64::from(MAX_REQUEST),
                        MAX_REQUEST,
                    ));
                }
                s.write_all(&reqs).await.unwrap();
                conns.push(s);
            }
            let peak = || stats.queued_peak.load(Ordering::Relaxed);
            until("a full reply queued", || peak() >= MAX_REQUEST as usize).await;
            // Time for the donor to go on reading, if it would.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(peak() <= budget, "{} bytes queued", peak());
            // The replies still come when the client reads them.
            let s = &mut conns[0];
            let mut data = vec![0u8; MAX_REQUEST as usize];
            for i in 0..3u64 {
                assert_eq!(s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
                assert_eq!(s.read_u32().await.unwrap(), 0);
                assert_eq!(s.read_u64().await.unwrap(), i);
                s.read_exact(&mut data).await.unwrap();
            }
            assert!(peak() <= budget, "{} bytes queued", peak());
        }

        #[tokio::test]
        async fn connections_over_the_limits_are_closed_at_once() {
            let limits = NbdConfig {
                max_connections: 3,
                max_connections_per_ip: 2,
                ..Default::default()
            };
            let (addr, stats) = start(limits).await;
            let mut a1 = connect_from("127.0.0.1", addr).await;
            let mut a2 = connect_from("127.0.0.1", addr).await;
            assert!(greeted(&mut a1).await && greeted(&mut a2).await);
            let mut a3 = connect_from("127.0.0.1", addr).await;
            assert!(!greeted(&mut a3).await, "a third from one address");
            let mut b1 = connect_from("127.0.0.2", addr).await;
            assert!(greeted(&mut b1).await, "another address has room");
            let mut c1 = connect_from("127.0.0.3", addr).await;
            assert!(!greeted(&mut c1).await, "a fourth in all");
            assert_eq!(stats.refused.load(Ordering::Relaxed), 2);
            // A place given back is taken again.
            drop(a1);
            until("a place given back", || {
                stats.connections.load(Ordering::Relaxed) == 2
            })
            .await;
            let mut c2 = connect_from("127.0.0.3", addr).await;
            assert!(greeted(&mut c2).await);
        }

        #[tokio::test]
        async fn a_stalled_handshake_is_closed_at_the_deadline() {
            let limits = NbdConfig {
                handshake_timeout_secs: 1,
                ..Default::default()
            };
            let (addr, stats) = start(limits).await;
            // Attached in time: transmission has no such deadline.
            let mut ok = TcpStream::connect(addr).await.unwrap();
            attach(&mut ok).await;
            let mut idle = TcpStream::connect(addr).await.unwrap();
            let t = Instant::now();
            assert!(greeted(&mut idle).await);
            let mut rest = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
                .await
                .expect("closed within 5 s")
                .unwrap_or(0);
            assert_eq!(n, 0);
            assert!(
                t.elapsed() >= Duration::from_millis(900),
                "{:?}",
                t.elapsed()
            );
            assert_eq!(stats.handshake_timeouts.load(Ordering::Relaxed), 1);
            ok.write_all(&read_request(7, 0, 4096)).await.unwrap();
            assert_eq!(ok.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
            assert_eq!(ok.read_u32().await.unwrap(), 0);
            assert_eq!(ok.read_u64().await.unwrap(), 7);
        }
    }
}
