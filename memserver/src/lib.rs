//! `rmem-memserver`: the donor side of rmem, and the client library that borrows from it.
//!
//! A donor ([`Server`]) registers the memory it lends once, carves it into slabs, and hands
//! slabs to clients that prove they hold the shared secret ([`protocol`], `auth`). Each client
//! works in its own protection domain; slabs are leased and come back (freed, expired, client
//! gone) deregistered and zeroed. The [`Client`] authenticates, borrows, reads and writes
//! one-sided, and renews its lease in the background.

mod admin;
use rmem_wire::auth;
mod client;
pub mod config;
mod conn_limit;
mod control;
mod data;
mod donor;
mod ledger;
mod metrics;
mod nbd;
pub mod nbd_wire;
pub mod pressure;
pub mod protocol;
mod server;

pub use admin::Amount;
pub use auth::admin_authorization;
/// For tools that speak the control protocol ([`protocol`]) themselves.
pub use auth::{client_proof, nonce};
pub use client::{Channel, Client, ClientConfig, ClientError, Notice, PostedWrite};
pub use config::{ByteSize, ExportConfig, ServerConfig};
pub use donor::{Control, ShrinkReport};
pub use protocol::{DonorStats, ErrorCode, SlabGrant};
pub use server::{Server, ServerError};
