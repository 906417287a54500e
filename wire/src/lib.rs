//! `rmem-wire`: what both ends of an rmem connection share, whichever subsystem they belong to
//! (the donor and its borrowers, two migration agents).
//!
//! - [`auth`]: mutual challenge-response with a shared secret (HMAC-SHA256), and signed one-shot
//!   requests for admin endpoints.

pub mod auth;
