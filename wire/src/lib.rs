//! `rmem-wire`: what both ends of an rmem connection share, whichever subsystem they belong to
//! (the donor and its borrowers, two migration agents).
//!
//! - [`auth`]: mutual challenge-response with a shared secret (HMAC-SHA256), and signed one-shot
//!   requests for admin endpoints.
//! - [`protocol`]: the control protocol between a donor and its borrowers (frames, messages).
//! - [`nbd`]: the NBD transmission phase's numbers and header codec (the donor's export, the
//!   borrower's kernel device).
//! - [`http`]: the serve loop of every HTTP endpoint (donor admin, placement, metrics), with a
//!   bound on connections and on the time a client may take to send its headers.

pub mod auth;
pub mod http;
pub mod nbd;
pub mod protocol;
