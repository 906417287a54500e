//! rmem placement: which donor lends a borrower its slabs, which path carries a transfer, and
//! which host a VM should migrate to.
//!
//! - [`choice`]: the decision core (power of d choices over free memory and link headroom,
//!   replicas in distinct failure domains, seeded).
//! - [`registry`]: donors, their leases and heartbeats, behind one trait with an in-process and
//!   an etcd backend.
//! - [`links`]: the traffic matrix, smoothed and damped, and each path's headroom.
//! - [`bloom`]: page fingerprints, to rank migration targets by the memory they already hold.
//! - [`reserve`]: bandwidth reservations with deadlines.

pub mod bench;
pub mod bloom;
pub mod choice;
pub mod client;
pub mod etcd;
pub mod fingerprint;
pub mod heartbeat;
pub mod http;
pub mod links;
pub mod probe;
pub mod registry;
pub mod reserve;
pub mod service;
pub mod sim;
