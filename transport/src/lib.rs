//! `rmem-transport`: one-sided RDMA with a verbs-shaped API and two providers.
//!
//! The objects follow libibverbs so an RDMA engineer is at home: a [`Context`] (an open device)
//! gives protection domains ([`Pd`]), which register memory ([`Mr`]: address, length, lkey, rkey,
//! [`Access`]); queue pairs ([`Qp`], reliable connected) post [`SendWr`] chains (READ, WRITE,
//! WRITE with immediate, SEND, compare-and-swap, fetch-and-add, scatter-gather, signaled or not)
//! and [`RecvWr`]s; completion queues ([`Cq`]) report [`Completion`]s by polling (busy or
//! adaptive) or from tokio.
//!
//! Providers:
//! - [`Provider::Verbs`] (feature `verbs`): libibverbs on InfiniBand, RoCE, rxe, siw.
//! - [`Provider::Tcp`]: the same semantics in software. A target thread per queue pair executes
//!   READ/WRITE/atomics straight against registered memory after checking key, bounds and rights;
//!   the application on that side never sees the requests.
//!
//! Queue pairs are connected by an out-of-band TCP exchange: one side [`Context::listen`]s, the
//! other [`Context::connect`]s, and each may pass private data (a [`RemoteBuf`] as JSON, say).
//!
//! ```no_run
//! use rmem_transport::{open, Access, OpenOptions, Provider, QpConfig, RemoteBuf, SendWr};
//! # fn main() -> rmem_transport::Result<()> {
//! let ctx = open(&OpenOptions::new(Provider::Tcp))?;
//! let pd = ctx.alloc_pd()?;
//! let cq = ctx.create_cq(64)?;
//! let buf = pd.alloc_mr(4096, Access::LOCAL_WRITE)?;
//! let conn = ctx.connect("127.0.0.1:18515".parse().unwrap(), &QpConfig::new(&pd, &cq), b"")?;
//! let remote: RemoteBuf = serde_json::from_slice(&conn.private).unwrap();
//! let sge = [buf.sge(0, 4096)?];
//! conn.qp.post_send(&[SendWr::read(1, &sge, remote.at(0))])?;
//! let wc = cq.wait_one(None)?;
//! assert!(wc.is_ok());
//! # Ok(()) }
//! ```

mod access;
mod api;
mod backend;
pub mod conformance;
mod error;
pub mod exchange;
mod gate;
mod memory;
mod mr;
mod open;
pub mod rate;
mod remote;
pub mod tcp;
mod types;
#[cfg(feature = "verbs")]
pub mod verbs;
mod wait;
mod wr;

pub use access::Access;
pub use api::{Connected, Context, Cq, Incoming, Listener, Pd, Qp, QpConfig};
pub use error::{Error, Result};
pub use gate::ListenLimits;
pub use memory::{Buffer, HugePages};
pub use mr::{Mr, Sge};
pub use open::{open, providers};
pub use remote::{RemoteAddr, RemoteBuf};
pub use types::{
    DeviceInfo, OpenOptions, PollMode, Provider, QpCaps, TargetStats, MAX_PRIVATE_DATA,
};
pub use wr::{Completion, Op, RecvWr, SendWr, WcOpcode, WcStatus};
