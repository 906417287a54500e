//! The one-sided data path: a client's lanes (a queue pair, completion queue and bounce
//! buffer each), how an operation picks one, and the READs and WRITEs that go through them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

pub(super) use std::sync::atomic::AtomicUsize as LaneCounter;
use std::time::Duration;

use rmem_transport::{
    open, Access, Buffer, Completion, Context, Cq, Mr, OpenOptions, Pd, Qp, QpConfig, RemoteBuf,
    SendWr,
};

use super::{lock, Client, ClientConfig, ClientError};
use rmem_wire::protocol::SlabGrant;

/// Completions a lane's queue holds: a [`Channel`] keeps at most this many requests in flight.
const CQ_DEPTH: usize = 256;

/// One-sided data path to the donor.
pub(super) struct DataPath {
    _ctx: Context,
    /// Where a [`Channel`]'s caller registers its own buffers.
    pd: Pd,
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
        let cq = ctx.create_cq(CQ_DEPTH)?;
        let qc = QpConfig::new(&pd, &cq)
            .op_timeout(op_timeout)
            .connect_timeout(left);
        let conn = ctx.connect(addr, &qc, token.as_bytes())?;
        let bounce = pd.alloc_mr(bounce, Access::LOCAL_WRITE)?;
        Ok(DataPath {
            _ctx: ctx,
            pd,
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

/// A data queue pair of its own for one thread's many requests in flight: READs into and
/// WRITEs from the caller's registered memory (no bounce copy), each named by the caller's
/// `wr_id`, reaped in whatever order they complete. Nothing in it is shared with other
/// threads or with the client's lanes, so no lock sits on its path.
pub struct Channel {
    d: DataPath,
    in_flight: usize,
    /// The session's lane this channel's queue pair is on.
    lane: u8,
}

impl Client {
    /// Opens a channel: a new data queue pair to the donor (a lane of the session beyond the
    /// client's own; a session has [`MAX_LANES`](rmem_wire::protocol::MAX_LANES) at most).
    pub async fn open_channel(&self) -> Result<Channel, ClientError> {
        let lane = self.next_lane.fetch_add(1, Ordering::Relaxed);
        if lane >= usize::from(rmem_wire::protocol::MAX_LANES) {
            return Err(ClientError::Protocol(format!(
                "a session has {} data queue pairs at most (lanes and channels together)",
                rmem_wire::protocol::MAX_LANES
            )));
        }
        Ok(Channel {
            d: self.open_lane(lane as u8).await?,
            in_flight: 0,
            lane: lane as u8,
        })
    }

    /// A new queue pair on the lane of `old`, whose queue pair failed (the donor replaces the
    /// lane's old one). Uses no new lane, so a channel can come back any number of times.
    pub async fn reopen_channel(&self, old: &Channel) -> Result<Channel, ClientError> {
        Ok(Channel {
            d: self.open_lane(old.lane).await?,
            in_flight: 0,
            lane: old.lane,
        })
    }
}

impl Channel {
    /// Requests in flight at most.
    pub const DEPTH: usize = CQ_DEPTH;

    /// Registers `buf` for this channel's requests (once, before the first).
    pub fn register(&self, buf: &Buffer) -> Result<Mr, ClientError> {
        Ok(self
            .d
            .pd
            .register_buffer(buf, 0, buf.len(), Access::LOCAL_WRITE)?)
    }

    /// Requests posted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Posts a READ of `len` bytes at `offset` of `remote` into `local[at..]`.
    pub fn post_read(
        &mut self,
        wr_id: u64,
        local: &Mr,
        at: usize,
        len: usize,
        remote: RemoteBuf,
        offset: u64,
    ) -> Result<(), ClientError> {
        self.post(wr_id, local, at, len, remote, offset, false)
    }

    /// Posts a WRITE of `local[at..at + len]` to `offset` of `remote`.
    pub fn post_write(
        &mut self,
        wr_id: u64,
        local: &Mr,
        at: usize,
        len: usize,
        remote: RemoteBuf,
        offset: u64,
    ) -> Result<(), ClientError> {
        self.post(wr_id, local, at, len, remote, offset, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn post(
        &mut self,
        wr_id: u64,
        local: &Mr,
        at: usize,
        len: usize,
        remote: RemoteBuf,
        offset: u64,
        write: bool,
    ) -> Result<(), ClientError> {
        check_bounds(&remote, offset, len)?;
        if self.in_flight >= Self::DEPTH {
            return Err(ClientError::Protocol(format!(
                "a channel holds {} requests in flight at most",
                Self::DEPTH
            )));
        }
        let s = [local.sge(at, len)?];
        let wr = if write {
            SendWr::write(wr_id, &s, remote.at(offset))
        } else {
            SendWr::read(wr_id, &s, remote.at(offset))
        };
        self.d.qp.post_send(&[wr])?;
        self.in_flight += 1;
        Ok(())
    }

    /// Completions ready now (none waited for).
    pub fn poll(&mut self, out: &mut [Completion]) -> Result<usize, ClientError> {
        let n = self.d.cq.poll(out)?;
        self.in_flight = self.in_flight.saturating_sub(n);
        Ok(n)
    }

    /// Waits for at least one completion (bounded by the client's operation timeout: the
    /// queue pair fails its requests by then on a dead donor); `Timeout` when none came.
    pub fn wait(&mut self, out: &mut [Completion]) -> Result<usize, ClientError> {
        let wait = self.d.op_wait;
        self.wait_upto(out, wait)
    }

    /// [`Channel::wait`] for at most `most` (never past the operation timeout), for a thread
    /// that has other work to look at meanwhile; `Timeout` when none came.
    pub fn wait_upto(
        &mut self,
        out: &mut [Completion],
        most: Duration,
    ) -> Result<usize, ClientError> {
        if self.in_flight == 0 {
            return Ok(0);
        }
        let wait = most.min(self.d.op_wait);
        let n = self.d.cq.wait(out, Some(wait)).map_err(|e| match e {
            rmem_transport::Error::Timeout(t) => ClientError::Timeout(t),
            e => e.into(),
        })?;
        self.in_flight = self.in_flight.saturating_sub(n);
        Ok(n)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // The lane goes back clean: nothing of this channel's left for its next user to reap.
        let mut done = [Completion::default(); 16];
        while self.in_flight > 0 {
            match self.wait(&mut done) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}
