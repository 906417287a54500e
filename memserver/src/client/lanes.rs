//! The one-sided data path: a client's lanes (a queue pair, completion queue and bounce
//! buffer each), how an operation picks one, and the READs and WRITEs that go through them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rmem_transport::{open, Access, Context, Cq, Mr, OpenOptions, Qp, QpConfig, RemoteBuf, SendWr};

use super::{lock, Client, ClientConfig, ClientError};
use crate::protocol::SlabGrant;

/// One-sided data path to the donor.
pub(super) struct DataPath {
    _ctx: Context,
    cq: Cq,
    op_wait: Duration,
    qp: Qp,
    bounce: Mr,
}

impl Client {
    /// A data path for one operation: a free lane, trying this thread's own first (so a
    /// thread keeps to one lane while there are enough), else waiting for that one.
    fn lane(&self) -> std::sync::MutexGuard<'_, DataPath> {
        thread_local! {
            static HINT: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            };
        }
        let n = self.data.len();
        let first = HINT.with(|h| *h) % n;
        for k in 0..n {
            match self.data[(first + k) % n].try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        lock(&self.data[first])
    }

    /// Lanes this client runs.
    pub fn lanes(&self) -> usize {
        self.data.len()
    }

    /// Writes `data` at `offset` of a slab (one-sided WRITE; blocks this thread).
    pub fn write(&self, slab: &SlabGrant, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.write_remote(slab.remote, offset, data)
    }

    /// Reads `out.len()` bytes at `offset` of a slab (one-sided READ; blocks this thread).
    pub fn read(&self, slab: &SlabGrant, offset: u64, out: &mut [u8]) -> Result<(), ClientError> {
        self.read_remote(slab.remote, offset, out)
    }

    /// WRITE through any descriptor (the donor decides whether this client may).
    pub fn write_remote(
        &self,
        remote: RemoteBuf,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        check_bounds(&remote, offset, data.len())?;
        let d = self.lane();
        let piece = self.cfg.bounce;
        for (k, chunk) in data.chunks(piece).enumerate() {
            d.bounce.write_at(0, chunk)?;
            let s = [d.bounce.sge(0, chunk.len())?];
            d.qp.post_send(&[SendWr::write(0, &s, remote.at(offset + (k * piece) as u64))])?;
            complete(&d.cq, d.op_wait)?;
        }
        Ok(())
    }

    /// Posts a WRITE of `data` (at most [`Client::max_posted`] bytes) and returns without
    /// waiting for it: a caller writing several replicas posts each donor's WRITE before
    /// waiting for any. The lane it took stays the request's until [`PostedWrite::finish`]
    /// (or the drop) reaps it; a caller posting to several clients must take them in one
    /// fixed order, and never one client twice.
    pub fn post_write(
        &self,
        remote: RemoteBuf,
        offset: u64,
        data: &[u8],
    ) -> Result<PostedWrite<'_>, ClientError> {
        check_bounds(&remote, offset, data.len())?;
        if data.len() > self.cfg.bounce {
            return Err(ClientError::OutOfBounds {
                offset,
                len: data.len(),
                size: self.cfg.bounce as u64,
            });
        }
        let d = self.lane();
        d.bounce.write_at(0, data)?;
        let s = [d.bounce.sge(0, data.len())?];
        d.qp.post_send(&[SendWr::write(0, &s, remote.at(offset))])?;
        Ok(PostedWrite { d: Some(d) })
    }

    /// The most one [`Client::post_write`] carries.
    pub fn max_posted(&self) -> usize {
        self.cfg.bounce
    }

    /// READ through any descriptor.
    pub fn read_remote(
        &self,
        remote: RemoteBuf,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), ClientError> {
        check_bounds(&remote, offset, out.len())?;
        let d = self.lane();
        let piece = self.cfg.bounce;
        for (k, chunk) in out.chunks_mut(piece).enumerate() {
            let s = [d.bounce.sge(0, chunk.len())?];
            d.qp.post_send(&[SendWr::read(0, &s, remote.at(offset + (k * piece) as u64))])?;
            complete(&d.cq, d.op_wait)?;
            d.bounce.read_at(0, chunk)?;
        }
        Ok(())
    }
}

/// A WRITE posted on a client's data path and not yet reaped.
pub struct PostedWrite<'a> {
    d: Option<std::sync::MutexGuard<'a, DataPath>>,
}

impl PostedWrite<'_> {
    /// Waits for the WRITE's completion (bounded by the client's operation timeout).
    pub fn finish(mut self) -> Result<(), ClientError> {
        match self.d.take() {
            Some(d) => complete(&d.cq, d.op_wait),
            None => Ok(()),
        }
    }
}

impl Drop for PostedWrite<'_> {
    fn drop(&mut self) {
        // Never leave a completion behind for the next request to take as its own.
        if let Some(d) = self.d.take() {
            let _ = complete(&d.cq, d.op_wait);
        }
    }
}

/// Connects a data queue pair to `addr`; the transport's own connection timeout is what is left
/// until `deadline`, so the blocking thread gives up about when the caller does.
pub(super) async fn connect_data(
    cfg: &ClientConfig,
    addr: SocketAddr,
    token: String,
    deadline: tokio::time::Instant,
) -> Result<DataPath, ClientError> {
    let mut o = OpenOptions::new(cfg.provider);
    o.device = cfg.device.clone();
    let op_timeout = cfg.op_timeout;
    let bounce = cfg.bounce;
    let left = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_millis(1));
    tokio::task::spawn_blocking(move || -> Result<DataPath, ClientError> {
        let ctx = open(&o)?;
        let pd = ctx.alloc_pd()?;
        let cq = ctx.create_cq(64)?;
        let qc = QpConfig::new(&pd, &cq)
            .op_timeout(op_timeout)
            .connect_timeout(left);
        let conn = ctx.connect(addr, &qc, token.as_bytes())?;
        let bounce = pd.alloc_mr(bounce, Access::LOCAL_WRITE)?;
        Ok(DataPath {
            _ctx: ctx,
            cq,
            op_wait: op_timeout + Duration::from_secs(1),
            qp: conn.qp,
            bounce,
        })
    })
    .await
    .map_err(|_| ClientError::Protocol("data connection task failed".into()))?
}

fn check_bounds(remote: &RemoteBuf, offset: u64, len: usize) -> Result<(), ClientError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= remote.len => Ok(()),
        _ => Err(ClientError::OutOfBounds {
            offset,
            len,
            size: remote.len,
        }),
    }
}

fn complete(cq: &Cq, wait: Duration) -> Result<(), ClientError> {
    // The queue pair's own timeout fires first; this bounds a provider that misses it.
    let c = cq.wait_one(Some(wait))?;
    if c.is_ok() {
        Ok(())
    } else {
        Err(ClientError::Completion(c.status))
    }
}
