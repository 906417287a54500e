//! The client library: authenticate to a donor, borrow slabs, move data one-sided, renew the
//! lease in the background, give slabs back.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rmem_memserver::ClientError> {
//! use rmem_memserver::{Client, ClientConfig};
//! let c = Client::connect(ClientConfig::new("10.0.0.2:7470".parse().unwrap(), b"the shared secret".to_vec())).await?;
//! let slabs = c.alloc(2).await?;
//! c.write(&slabs[0], 0, b"hello")?;
//! let mut back = [0u8; 5];
//! c.read(&slabs[0], 0, &mut back)?;
//! c.free(&[slabs[0].slab, slabs[1].slab]).await?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmem_transport::{
    open, Access, Context, Cq, Mr, OpenOptions, Provider, Qp, QpConfig, RemoteBuf, SendWr, WcStatus,
};
use tokio::net::TcpStream;

use crate::auth;
use crate::protocol::{
    decode, read_frame, write_msg, ClientMsg, DonorStats, ErrorCode, FrameError, ServerMsg,
    SlabGrant, VERSION,
};

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the donor")]
    Connect(#[source] std::io::Error),
    #[error("control connection")]
    Frame(#[from] FrameError),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("donor refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("unexpected reply from the donor: {0}")]
    Protocol(String),
    #[error("transport")]
    Transport(#[from] rmem_transport::Error),
    #[error("one-sided operation failed: {0}")]
    Completion(WcStatus),
    #[error("access outside the slab ({offset}+{len} of {size})")]
    OutOfBounds { offset: u64, len: usize, size: u64 },
}

/// How to reach a donor.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub addr: SocketAddr,
    pub secret: Vec<u8>,
    pub name: String,
    pub provider: Provider,
    pub device: Option<String>,
}

impl ClientConfig {
    pub fn new(addr: SocketAddr, secret: Vec<u8>) -> ClientConfig {
        ClientConfig {
            addr,
            secret,
            name: "rmem-client".into(),
            provider: Provider::Tcp,
            device: None,
        }
    }
}

/// One-sided data path to the donor.
struct DataPath {
    _ctx: Context,
    cq: Cq,
    qp: Qp,
    bounce: Mr,
}

/// A connected, authenticated client.
pub struct Client {
    cfg: ClientConfig,
    conn: tokio::sync::Mutex<TcpStream>,
    next_id: AtomicU64,
    session: String,
    slab_size: u64,
    lease: Duration,
    data: Mutex<DataPath>,
}

const BOUNCE: usize = 1 << 20;
const OP_WAIT: Option<Duration> = Some(Duration::from_secs(30));

impl Client {
    /// Authenticates (both ways) and connects the data queue pair.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let mut s = TcpStream::connect(cfg.addr)
            .await
            .map_err(ClientError::Connect)?;
        s.set_nodelay(true).map_err(ClientError::Connect)?;
        let nonce_c = auth::nonce();
        write_msg(
            &mut s,
            &ClientMsg::Hello {
                version: VERSION,
                client: cfg.name.clone(),
                nonce: nonce_c.clone(),
            },
        )
        .await?;
        let nonce_s = match reply(&mut s).await? {
            ServerMsg::Challenge { nonce, .. } => nonce,
            other => return Err(unexpected(other)),
        };
        let mac = auth::client_proof(&cfg.secret, &nonce_s, &nonce_c, &cfg.name);
        write_msg(&mut s, &ClientMsg::Auth { mac }).await?;
        let (session, slab_size, lease_ms, data_addr, token) = match reply(&mut s).await? {
            ServerMsg::Welcome {
                mac,
                session,
                slab_size,
                lease_ms,
                data_addr,
                data_token,
            } => {
                if !auth::verify_server(&cfg.secret, &nonce_c, &nonce_s, &mac) {
                    return Err(ClientError::Auth(
                        "the donor could not prove it knows the secret".into(),
                    ));
                }
                (session, slab_size, lease_ms, data_addr, data_token)
            }
            ServerMsg::Error {
                code: ErrorCode::AuthFailed,
                message,
                ..
            } => return Err(ClientError::Auth(message)),
            other => return Err(unexpected(other)),
        };
        let data_addr = parse_addr(&data_addr)?;
        let data = connect_data(&cfg, data_addr, token).await?;
        Ok(Client {
            cfg,
            conn: tokio::sync::Mutex::new(s),
            next_id: AtomicU64::new(1),
            session,
            slab_size,
            lease: Duration::from_millis(lease_ms),
            data: Mutex::new(data),
        })
    }

    pub fn session(&self) -> &str {
        &self.session
    }
    pub fn slab_size(&self) -> u64 {
        self.slab_size
    }
    /// The lease the donor grants; renew well within it.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    async fn request(&self, make: impl FnOnce(u64) -> ClientMsg) -> Result<ServerMsg, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut s = self.conn.lock().await;
        write_msg(&mut *s, &make(id)).await?;
        match reply(&mut s).await? {
            ServerMsg::Error { code, message, .. } => Err(ClientError::Refused { code, message }),
            m => Ok(m),
        }
    }

    /// Borrows `count` slabs (all or none).
    pub async fn alloc(&self, count: u32) -> Result<Vec<SlabGrant>, ClientError> {
        match self.request(|id| ClientMsg::Alloc { id, count }).await? {
            ServerMsg::Allocated { slabs, .. } => Ok(slabs),
            other => Err(unexpected(other)),
        }
    }

    /// Gives slabs back (all or none).
    pub async fn free(&self, slabs: &[u32]) -> Result<(), ClientError> {
        match self
            .request(|id| ClientMsg::Free {
                id,
                slabs: slabs.to_vec(),
            })
            .await?
        {
            ServerMsg::Freed { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Extends the lease on everything held.
    pub async fn renew(&self) -> Result<Duration, ClientError> {
        match self.request(|id| ClientMsg::Renew { id }).await? {
            ServerMsg::Renewed { lease_ms, .. } => Ok(Duration::from_millis(lease_ms)),
            other => Err(unexpected(other)),
        }
    }

    pub async fn stats(&self) -> Result<DonorStats, ClientError> {
        match self.request(|id| ClientMsg::Stats { id }).await? {
            ServerMsg::Stats { stats, .. } => Ok(stats),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces the data queue pair, keeping the session and its slabs: needed after a
    /// one-sided operation failed (the queue pair is then in the error state, as on any RC QP).
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        let (addr, token) = match self.request(|id| ClientMsg::Reconnect { id }).await? {
            ServerMsg::Reconnect {
                data_addr,
                data_token,
                ..
            } => (parse_addr(&data_addr)?, data_token),
            other => return Err(unexpected(other)),
        };
        let fresh = connect_data(&self.cfg, addr, token).await?;
        *self.data.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Renews the lease every third of it until the client is dropped or renewal fails.
    pub fn spawn_renewal(self: &Arc<Self>) -> tokio::task::JoinHandle<Result<(), ClientError>> {
        let weak = Arc::downgrade(self);
        let every = self.lease / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(c) = weak.upgrade() else {
                    return Ok(());
                };
                if let Err(e) = c.renew().await {
                    tracing::warn!(error = %e, "lease renewal failed");
                    return Err(e);
                }
            }
        })
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
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        for (k, chunk) in data.chunks(BOUNCE).enumerate() {
            d.bounce.write_at(0, chunk)?;
            let s = [d.bounce.sge(0, chunk.len())?];
            d.qp.post_send(&[SendWr::write(
                0,
                &s,
                remote.at(offset + (k * BOUNCE) as u64),
            )])?;
            complete(&d.cq)?;
        }
        Ok(())
    }

    /// READ through any descriptor.
    pub fn read_remote(
        &self,
        remote: RemoteBuf,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), ClientError> {
        check_bounds(&remote, offset, out.len())?;
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        for (k, chunk) in out.chunks_mut(BOUNCE).enumerate() {
            let s = [d.bounce.sge(0, chunk.len())?];
            d.qp.post_send(&[SendWr::read(0, &s, remote.at(offset + (k * BOUNCE) as u64))])?;
            complete(&d.cq)?;
            d.bounce.read_at(0, chunk)?;
        }
        Ok(())
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, ClientError> {
    s.parse()
        .map_err(|_| ClientError::Protocol(format!("bad data address {s:?}")))
}

async fn connect_data(
    cfg: &ClientConfig,
    addr: SocketAddr,
    token: String,
) -> Result<DataPath, ClientError> {
    let mut o = OpenOptions::new(cfg.provider);
    o.device = cfg.device.clone();
    tokio::task::spawn_blocking(move || -> Result<DataPath, ClientError> {
        let ctx = open(&o)?;
        let pd = ctx.alloc_pd()?;
        let cq = ctx.create_cq(64)?;
        let conn = ctx.connect(addr, &QpConfig::new(&pd, &cq), token.as_bytes())?;
        let bounce = pd.alloc_mr(BOUNCE, Access::LOCAL_WRITE)?;
        Ok(DataPath {
            _ctx: ctx,
            cq,
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

fn complete(cq: &Cq) -> Result<(), ClientError> {
    let c = cq.wait_one(OP_WAIT)?;
    if c.is_ok() {
        Ok(())
    } else {
        Err(ClientError::Completion(c.status))
    }
}

async fn reply(s: &mut TcpStream) -> Result<ServerMsg, ClientError> {
    let body = read_frame(s).await?;
    Ok(decode::<ServerMsg>(&body)?)
}

fn unexpected(m: ServerMsg) -> ClientError {
    match m {
        ServerMsg::Error { code, message, .. } => ClientError::Refused { code, message },
        other => ClientError::Protocol(format!("{other:?}")),
    }
}
