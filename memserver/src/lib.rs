//! `rmem-memserver`: the donor side of rmem.
//!
//! A donor ([`Server`]) registers the memory it lends once, carves it into slabs, and hands
//! slabs to clients that prove they hold the shared secret (the control protocol and its
//! authentication are in `rmem-wire`, shared with the borrowers). Each client works in its own
//! protection domain; slabs are leased and come back (freed, expired, client gone)
//! deregistered and zeroed. Borrowers reach a donor through `rmem_swapclient::Client`.

mod admin;
use rmem_wire::{auth, nbd as nbd_wire, protocol};
pub mod config;
mod conn_limit;
mod control;
mod data;
mod donor;
mod ledger;
mod metrics;
mod nbd;
pub mod pressure;
mod server;

pub use admin::Amount;
pub use auth::admin_authorization;
pub use config::{ByteSize, ExportConfig, ServerConfig};
pub use donor::{Control, ShrinkReport};
pub use protocol::{DonorStats, ErrorCode, SlabGrant};
pub use server::{Server, ServerError};
