//! `rmem-swapclient`: the borrower side of rmem.
//!
//! - The client of a donor ([`client`], [`Client`]): authenticate, borrow slabs, move data
//!   one-sided over lanes or over a [`Channel`] with many requests in flight, renew leases,
//!   hand reclaimed slabs back.
//! - A swap device whose blocks live in slabs borrowed from donors and moved with one-sided
//!   READ/WRITE ([`store`]), kept on several donors ([`store::Store`] replicas, rebuilt in the
//!   background), served to the kernel by the `rmem swap` daemon ([`daemon`]) through ublk
//!   ([`kernel_ublk`]) where the kernel has it, else through its NBD client on a local socket
//!   ([`kernel_nbd`]); both front ends share [`blockio`].
//! - A memory region paged to remote slabs with userfaultfd ([`region`]): faults fetched with
//!   one-sided READ, dirty pages written back on eviction, stride prefetch.

pub mod blockio;
pub mod client;
pub mod daemon;
pub mod front;
pub mod kernel_nbd;
pub mod kernel_ublk;
pub mod metrics;
pub mod nbd_channel;
pub mod nbd_serve;
pub mod region;
pub mod reserve;
pub mod status;
pub mod store;
pub mod swapfile;
mod ublk_channel;
pub mod ublk_serve;
pub mod written;

pub use client::{Channel, Client, ClientConfig, ClientError, Notice, PostedWrite};
pub use region::{Backing, PollMode, Region, RegionConfig, RegionError, RegionStats};
pub use store::{
    DonorSpec, IoOp, IoReq, Store, StoreChannel, StoreConfig, StoreError, StoreStatus,
};
