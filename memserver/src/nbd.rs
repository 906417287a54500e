//! NBD export: the donor's memory as a block device for any host with a stock NBD client
//! (`nbd-client`, qemu, libnbd), so it can swap to the donor without rmem installed.
//!
//! Fixed-newstyle handshake (NBD_OPT_GO, INFO, EXPORT_NAME, LIST, ABORT; structured replies are
//! declined, so clients use simple replies), then READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and
//! DISC. Each export is a set of slabs taken from the pool at start-up and kept while the donor
//! runs; bytes move between the socket and the slabs. Block sizes: minimum 1, preferred 4096,
//! maximum 32 MiB per request. The protocol has no authentication: the export listens on
//! loopback unless configured otherwise; put it only on a network you trust.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use rmem_transport::Buffer;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;

use crate::nbd_wire::*;

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

/// Largest READ or WRITE one request may move.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Longest option payload accepted during the handshake.
const MAX_OPTION: u32 = 64 * 1024;

/// An export in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub name: String,
    pub size: crate::ByteSize,
}

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

/// Serves the exports on `listener` for ever.
pub(crate) async fn serve(listener: TcpListener, exports: Exports) {
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                let exports = exports.clone();
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let (r, w) = s.into_split();
                    let conn = Conn {
                        r: BufReader::with_capacity(256 << 10, r),
                        w: BufWriter::with_capacity(256 << 10, w),
                    };
                    match conn.run(&exports).await {
                        Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                        Err(e) => tracing::info!(%peer, error = %e, "NBD connection ended"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
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
}

struct Conn<R, W> {
    r: BufReader<R>,
    w: W,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin + Send + 'static> Conn<R, W> {
    async fn run(mut self, exports: &HashMap<String, Arc<Export>>) -> Result<(), NbdError> {
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
        let Some(export) = self.options(exports, no_zeroes).await? else {
            return Ok(());
        };
        tracing::info!(export = %export.name, "NBD client attached");
        let Conn { r, w } = self;
        transmission(r, w, &export).await
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

fn reply_header(buf: &mut Vec<u8>, error: u32, cookie: u64) {
    buf.clear();
    buf.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&error.to_be_bytes());
    buf.extend_from_slice(&cookie.to_be_bytes());
}

/// The transmission phase: this task parses requests and moves the bytes; a writer task sends
/// the replies, so copying one request overlaps sending the previous one. Buffers go back to
/// this task for reuse, so steady state allocates nothing.
async fn transmission<R, W>(mut r: BufReader<R>, w: W, e: &Export) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Reply>(16);
    let (back_tx, mut back_rx) = tokio::sync::mpsc::channel::<Reply>(16);
    let writer = tokio::spawn(async move {
        let mut w = w;
        while let Some(buf) = rx.recv().await {
            w.write_all(&buf).await?;
            let _ = back_tx.try_send(buf);
            if rx.is_empty() {
                w.flush().await?;
            }
        }
        w.flush().await?;
        Ok::<(), std::io::Error>(())
    });
    let mut data = Vec::new();
    let result = loop {
        let magic = match r.read_u32().await {
            Ok(m) => m,
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(err) => break Err(err.into()),
        };
        if magic != REQUEST_MAGIC {
            break Err(NbdError::Protocol("bad request magic".into()));
        }
        let _flags = r.read_u16().await?;
        let cmd = r.read_u16().await?;
        let cookie = r.read_u64().await?;
        let off = r.read_u64().await?;
        let len = r.read_u32().await?;
        let in_range = off
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= e.size);
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
        if tx.send(out).await.is_err() {
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
}
