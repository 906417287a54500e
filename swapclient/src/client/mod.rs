//! The client library: authenticate to a donor, borrow slabs, move data one-sided, renew the
//! lease in the background, give slabs back, and move data off slabs the donor reclaims.
//!
//! A background task reads the control connection: it matches replies to requests by id and
//! queues the donor's notices ([`Notice`]), which [`Client::notices`] hands out.
//!
//! ```no_run
//! # async fn demo() -> Result<(), rmem_swapclient::ClientError> {
//! use rmem_swapclient::{Client, ClientConfig};
//! let c = Client::connect(ClientConfig::new("10.0.0.2:7470".parse().unwrap(), b"the shared secret".to_vec())).await?;
//! let slabs = c.alloc(2).await?;
//! c.write(&slabs[0], 0, b"hello")?;
//! let mut back = [0u8; 5];
//! c.read(&slabs[0], 0, &mut back)?;
//! c.free(&[slabs[0].slab, slabs[1].slab]).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmem_transport::{Provider, WcStatus};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

mod lanes;

use lanes::{connect_data, DataPath};
pub use lanes::{Channel, PostedWrite};

use rmem_wire::auth;
use rmem_wire::protocol::{
    decode, read_frame, write_msg, ClientMsg, DonorStats, ErrorCode, FrameError, ServerMsg,
    SlabGrant, MAX_LANES, VERSION,
};

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the donor")]
    Connect(#[source] std::io::Error),
    #[error("control connection")]
    Frame(#[from] FrameError),
    /// The secret did not match; the text says which side's proof failed.
    #[error("authentication failed: {0}; check that the client and the donor use the same shared secret")]
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
    #[error("timed out: the donor did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the control connection to the donor is closed")]
    Closed,
}

/// What the donor tells a client without being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// These slabs are taken back at `deadline`: move what matters ([`Client::move_slab`]) and
    /// free them before.
    Reclaim {
        slabs: Vec<SlabGrant>,
        deadline: Instant,
    },
    /// The session ends at `deadline` (the donor shuts down, the lease expired, or the control
    /// connection was lost).
    Closing { reason: String, deadline: Instant },
}

/// How to reach a donor.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub addr: SocketAddr,
    pub secret: Vec<u8>,
    pub name: String,
    pub provider: Provider,
    pub device: Option<String>,
    /// How long a one-sided operation may take before the donor is treated as dead.
    pub op_timeout: Duration,
    /// Bounds [`Client::connect`] as a whole (TCP connect, hello, challenge, welcome and the
    /// data queue pair's connection) and [`Client::reconnect`]'s new queue pair.
    pub connect_timeout: Duration,
    /// Data queue pairs (lanes), each with its own bounce buffer: as many one-sided
    /// operations as lanes run at once, from as many threads (1 to [`MAX_LANES`]).
    pub lanes: usize,
    /// Each lane's bounce buffer: larger operations go through it in pieces, and
    /// [`Client::post_write`] carries at most this much.
    pub bounce: usize,
}

impl ClientConfig {
    pub fn new(addr: SocketAddr, secret: Vec<u8>) -> ClientConfig {
        ClientConfig {
            addr,
            secret,
            name: "rmem-client".into(),
            provider: Provider::Tcp,
            device: None,
            op_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            lanes: 1,
            bounce: 1 << 20,
        }
    }
}

/// Requests waiting for their replies; `None` once the connection is closed, so a request can
/// never start waiting after the reader has stopped.
type Pending = Mutex<Option<HashMap<u64, oneshot::Sender<ServerMsg>>>>;
/// Slabs held, with the reclaim deadline of those the donor asked back.
type Held = HashMap<u32, (SlabGrant, Option<Instant>)>;

/// A connected, authenticated client.
pub struct Client {
    cfg: ClientConfig,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Pending>,
    reader: tokio::task::JoinHandle<()>,
    notices: Mutex<Option<mpsc::UnboundedReceiver<Notice>>>,
    held: Arc<Mutex<Held>>,
    next_id: AtomicU64,
    session: String,
    slab_size: u64,
    lease: Duration,
    /// One data path per lane; an operation takes a free one (see [`Client::lane`]).
    data: Vec<Mutex<DataPath>>,
    /// Where the data queue pair connected (the donor's data listener).
    data_addr: SocketAddr,
    /// The next lane number a channel takes (after the client's own lanes).
    next_lane: lanes::LaneCounter,
}

/// A donor that does not answer a control request within this is treated as dead.
const REPLY_WAIT: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the control connection until it closes: replies go to their requests, notices to the
/// queue. When it ends, every waiting request fails and a `Closing` notice is queued.
async fn read_control(
    mut r: OwnedReadHalf,
    pending: Arc<Pending>,
    held: Arc<Mutex<Held>>,
    notices: mpsc::UnboundedSender<Notice>,
) {
    let why = loop {
        let m = match read_frame(&mut r)
            .await
            .and_then(|b| decode::<ServerMsg>(&b))
        {
            Ok(m) => m,
            Err(e) => break format!("control connection lost: {e}"),
        };
        if let Some(id) = m.id() {
            let tx = lock(&pending).as_mut().and_then(|p| p.remove(&id));
            if let Some(tx) = tx {
                let _ = tx.send(m);
            }
            continue;
        }
        let now = Instant::now();
        match m {
            ServerMsg::Reclaim { slabs, deadline_ms } => {
                let deadline = now + Duration::from_millis(deadline_ms);
                let grants = {
                    let mut h = lock(&held);
                    slabs
                        .iter()
                        .filter_map(|s| {
                            let e = h.get_mut(s)?;
                            e.1 = Some(deadline);
                            Some(e.0)
                        })
                        .collect()
                };
                let _ = notices.send(Notice::Reclaim {
                    slabs: grants,
                    deadline,
                });
            }
            ServerMsg::Closing {
                reason,
                deadline_ms,
            } => {
                let _ = notices.send(Notice::Closing {
                    reason,
                    deadline: now + Duration::from_millis(deadline_ms),
                });
            }
            other => tracing::warn!(message = ?other, "unexpected message from the donor"),
        }
    };
    tracing::debug!(%why, "control reader stopped");
    lock(&pending).take();
    let _ = notices.send(Notice::Closing {
        reason: why,
        deadline: Instant::now(),
    });
}

impl Client {
    /// Authenticates (both ways) and connects the data queue pair, all within
    /// `cfg.connect_timeout` ([`ClientError::Timeout`] past it).
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        if cfg.lanes == 0 || cfg.lanes > usize::from(MAX_LANES) || cfg.bounce == 0 {
            return Err(ClientError::Protocol(format!(
                "{} lanes of {} bytes: 1 to {MAX_LANES} lanes of at least a byte",
                cfg.lanes, cfg.bounce
            )));
        }
        let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
        let w = match tokio::time::timeout_at(deadline, handshake(&cfg, deadline)).await {
            Ok(w) => w?,
            Err(_) => {
                tracing::debug!(addr = %cfg.addr, "handshake timed out");
                return Err(ClientError::Timeout(cfg.connect_timeout));
            }
        };
        let (r, wr) = w.stream.into_split();
        let cfg_lanes = cfg.lanes;
        let pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let held = Arc::new(Mutex::new(HashMap::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_control(r, pending.clone(), held.clone(), tx));
        let mut client = Client {
            cfg,
            writer: tokio::sync::Mutex::new(wr),
            pending,
            reader,
            notices: Mutex::new(Some(rx)),
            held,
            next_id: AtomicU64::new(1),
            session: w.session,
            slab_size: w.slab_size,
            lease: w.lease,
            data: vec![Mutex::new(w.data)],
            data_addr: w.data_addr,
            next_lane: lanes::LaneCounter::new(cfg_lanes),
        };
        for lane in 1..client.cfg.lanes {
            let path = tokio::time::timeout_at(deadline, client.open_lane(lane as u8))
                .await
                .map_err(|_| ClientError::Timeout(client.cfg.connect_timeout))??;
            client.data.push(Mutex::new(path));
        }
        Ok(client)
    }

    /// A new data path for `lane`, asked of the donor on the control connection.
    async fn open_lane(&self, lane: u8) -> Result<DataPath, ClientError> {
        let (addr, token) = match self.request(|id| ClientMsg::Reconnect { id, lane }).await? {
            ServerMsg::Reconnect {
                data_addr,
                data_token,
                ..
            } => (parse_addr(&data_addr)?, data_token),
            other => return Err(unexpected(other)),
        };
        let limit = self.cfg.connect_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        tokio::time::timeout_at(deadline, connect_data(&self.cfg, addr, token, deadline))
            .await
            .map_err(|_| ClientError::Timeout(limit))?
    }

    pub fn session(&self) -> &str {
        &self.session
    }
    /// The donor's data listener, where the one-sided queue pair connects.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }
    pub fn slab_size(&self) -> u64 {
        self.slab_size
    }
    /// The lease the donor grants; renew well within it.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The donor's notices (reclaim, closing), in order. There is one queue: the first call
    /// takes it, later calls get `None`.
    pub fn notices(&self) -> Option<mpsc::UnboundedReceiver<Notice>> {
        lock(&self.notices).take()
    }

    /// Slabs this client holds, by id (those the donor took at a reclaim deadline are gone).
    pub fn held(&self) -> Vec<SlabGrant> {
        let now = Instant::now();
        let mut h = lock(&self.held);
        h.retain(|_, (_, deadline)| deadline.is_none_or(|d| d > now));
        let mut v: Vec<_> = h.values().map(|e| e.0).collect();
        v.sort_by_key(|g| g.slab);
        v
    }

    async fn request(&self, make: impl FnOnce(u64) -> ClientMsg) -> Result<ServerMsg, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match lock(&self.pending).as_mut() {
            Some(p) => p.insert(id, tx),
            None => return Err(ClientError::Closed),
        };
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        let msg = make(id);
        let sent = tokio::time::timeout_at(deadline, async {
            let mut w = self.writer.lock().await;
            write_msg(&mut *w, &msg).await
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.forget(id);
                return Err(e.into());
            }
            Err(_) => {
                // A frame may be half written: nothing more can go on this connection.
                self.close();
                return Err(ClientError::Timeout(REPLY_WAIT));
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(ServerMsg::Error { code, message, .. })) => {
                Err(ClientError::Refused { code, message })
            }
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                self.forget(id);
                Err(ClientError::Timeout(REPLY_WAIT))
            }
        }
    }

    /// Stops using the control connection: waiting and later requests fail.
    fn close(&self) {
        self.reader.abort();
        lock(&self.pending).take();
    }

    fn forget(&self, id: u64) {
        if let Some(p) = lock(&self.pending).as_mut() {
            p.remove(&id);
        }
    }

    /// Borrows `count` slabs (all or none).
    pub async fn alloc(&self, count: u32) -> Result<Vec<SlabGrant>, ClientError> {
        match self.request(|id| ClientMsg::Alloc { id, count }).await? {
            ServerMsg::Allocated { slabs, .. } => {
                lock(&self.held).extend(slabs.iter().map(|g| (g.slab, (*g, None))));
                Ok(slabs)
            }
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
            ServerMsg::Freed { .. } => {
                let mut h = lock(&self.held);
                for s in slabs {
                    h.remove(s);
                }
                Ok(())
            }
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

    /// Replaces every lane's data queue pair, keeping the session and its slabs: needed after
    /// a one-sided operation failed (the queue pair is then in the error state, as on any RC
    /// QP). Each lane waits for the operation it carries to end before it is replaced.
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        for (lane, slot) in self.data.iter().enumerate() {
            let fresh = self.open_lane(lane as u8).await?;
            *lock(slot) = fresh;
        }
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

    /// Copies a slab's contents to a new slab borrowed from `dest` (another donor, or this one
    /// when it still has room) and frees the old one: the way to answer a reclaim notice.
    /// Returns the new slab; the old descriptor is dead afterwards.
    pub async fn move_slab(
        self: &Arc<Self>,
        slab: SlabGrant,
        dest: &Arc<Client>,
    ) -> Result<SlabGrant, ClientError> {
        if dest.slab_size < slab.remote.len {
            return Err(ClientError::Protocol(format!(
                "destination slabs ({} bytes) are smaller than this one ({})",
                dest.slab_size, slab.remote.len
            )));
        }
        let new = dest
            .alloc(1)
            .await?
            .pop()
            .ok_or_else(|| ClientError::Protocol("donor granted no slab".into()))?;
        let (src, dst) = (self.clone(), dest.clone());
        let copied = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; src.cfg.bounce.min(slab.remote.len as usize)];
            let mut off = 0u64;
            while off < slab.remote.len {
                let n = buf.len().min((slab.remote.len - off) as usize);
                src.read_remote(slab.remote, off, &mut buf[..n])?;
                dst.write_remote(new.remote, off, &buf[..n])?;
                off += n as u64;
            }
            Ok::<(), ClientError>(())
        })
        .await
        .map_err(|_| ClientError::Protocol("copy task failed".into()))?;
        if let Err(e) = copied {
            // The old slab still holds the data; give the new one back.
            let _ = dest.free(&[new.slab]).await;
            return Err(e);
        }
        match self.free(&[slab.slab]).await {
            // Taken by the donor after the copy finished: nothing lost.
            Err(ClientError::Refused {
                code: ErrorCode::UnknownSlab | ErrorCode::NotOwner,
                ..
            }) => {
                lock(&self.held).remove(&slab.slab);
                Ok(new)
            }
            Err(e) => Err(e),
            Ok(()) => Ok(new),
        }
    }
}

/// What a completed handshake leaves: the control connection and the session's terms.
struct Welcomed {
    stream: TcpStream,
    session: String,
    slab_size: u64,
    lease: Duration,
    data: DataPath,
    data_addr: SocketAddr,
}

/// Hello, challenge, proof, welcome (the donor's proof checked), then the data queue pair.
/// The caller bounds it; `deadline` also bounds the blocking queue pair connection.
async fn handshake(
    cfg: &ClientConfig,
    deadline: tokio::time::Instant,
) -> Result<Welcomed, ClientError> {
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
        // The donor's message says no more than the code.
        ServerMsg::Error {
            code: ErrorCode::AuthFailed,
            ..
        } => {
            return Err(ClientError::Auth(
                "the donor did not accept this client's proof".into(),
            ))
        }
        other => return Err(unexpected(other)),
    };
    let data_addr = parse_addr(&data_addr)?;
    let data = connect_data(cfg, data_addr, token, deadline).await?;
    Ok(Welcomed {
        stream: s,
        session,
        slab_size,
        lease: Duration::from_millis(lease_ms),
        data,
        data_addr,
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, ClientError> {
    s.parse()
        .map_err(|_| ClientError::Protocol(format!("bad data address {s:?}")))
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a shared secret for tests";

    /// A listener that takes connections and never says a word; holds them until dropped.
    async fn silent() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        (addr, task)
    }

    fn config(addr: SocketAddr) -> ClientConfig {
        let mut c = ClientConfig::new(addr, SECRET.to_vec());
        c.connect_timeout = Duration::from_millis(300);
        c
    }

    /// Connecting ends with `Timeout` near the deadline, not never.
    async fn assert_times_out(cfg: ClientConfig) {
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), Client::connect(cfg)).await {
            Ok(Err(ClientError::Timeout(d))) => assert_eq!(d, Duration::from_millis(300)),
            Ok(Err(e)) => panic!("expected a timeout, got {e}"),
            Ok(Ok(_)) => panic!("connected to a donor that never answered"),
            Err(_) => panic!("connect still waiting after 5 s"),
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn a_donor_that_accepts_and_never_answers_times_out() {
        let (addr, _l) = silent().await;
        assert_times_out(config(addr)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_data_listener_that_never_answers_times_out_within_the_same_deadline() {
        let (data, _l) = silent().await;
        let donor = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = donor.local_addr().unwrap();
        // Authenticates properly, then points the client at the silent data listener.
        let _d = tokio::spawn(async move {
            let (mut s, _) = donor.accept().await.unwrap();
            let nonce_c = match decode::<ClientMsg>(&read_frame(&mut s).await.unwrap()) {
                Ok(ClientMsg::Hello { nonce, .. }) => nonce,
                other => panic!("{other:?}"),
            };
            let nonce_s = auth::nonce();
            let challenge = ServerMsg::Challenge {
                version: VERSION,
                nonce: nonce_s.clone(),
            };
            write_msg(&mut s, &challenge).await.unwrap();
            read_frame(&mut s).await.unwrap();
            let welcome = ServerMsg::Welcome {
                mac: auth::server_proof(SECRET, &nonce_c, &nonce_s),
                session: "1".into(),
                slab_size: 1 << 20,
                lease_ms: 30_000,
                data_addr: data.to_string(),
                data_token: "t".into(),
            };
            write_msg(&mut s, &welcome).await.unwrap();
            std::future::pending::<()>().await;
        });
        assert_times_out(config(addr)).await;
    }
}
