//! Mutual challenge-response authentication with a shared secret (HMAC-SHA256). The secret
//! never crosses the wire; both nonces are fresh per connection, so a recorded exchange cannot
//! be replayed, and the server proves it knows the secret too.

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A fresh 32-byte nonce, hex.
pub fn nonce() -> String {
    hex::encode(rand::rng().random::<[u8; 32]>())
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    for p in parts {
        // Length-prefix each part so ("ab","c") and ("a","bc") differ.
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m
}

/// The client's proof: HMAC(secret, "rmem-client-v1", server nonce, client nonce, client name).
pub fn client_proof(secret: &[u8], nonce_s: &str, nonce_c: &str, client: &str) -> String {
    let parts: [&[u8]; 4] = [
        b"rmem-client-v1",
        nonce_s.as_bytes(),
        nonce_c.as_bytes(),
        client.as_bytes(),
    ];
    hex::encode(mac(secret, &parts).finalize().into_bytes())
}

/// The server's proof: HMAC(secret, "rmem-server-v1", client nonce, server nonce).
pub fn server_proof(secret: &[u8], nonce_c: &str, nonce_s: &str) -> String {
    let parts: [&[u8]; 3] = [b"rmem-server-v1", nonce_c.as_bytes(), nonce_s.as_bytes()];
    hex::encode(mac(secret, &parts).finalize().into_bytes())
}

/// Checks a hex proof in constant time.
pub fn verify_client(
    secret: &[u8],
    nonce_s: &str,
    nonce_c: &str,
    client: &str,
    proof: &str,
) -> bool {
    let parts: [&[u8]; 4] = [
        b"rmem-client-v1",
        nonce_s.as_bytes(),
        nonce_c.as_bytes(),
        client.as_bytes(),
    ];
    verify(mac(secret, &parts), proof)
}

pub fn verify_server(secret: &[u8], nonce_c: &str, nonce_s: &str, proof: &str) -> bool {
    let parts: [&[u8]; 3] = [b"rmem-server-v1", nonce_c.as_bytes(), nonce_s.as_bytes()];
    verify(mac(secret, &parts), proof)
}

fn verify(m: HmacSha256, proof: &str) -> bool {
    match hex::decode(proof) {
        Ok(tag) => m.verify_slice(&tag).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_and_nonces() {
        let p = client_proof(b"s3cret", "ns", "nc", "alice");
        assert!(verify_client(b"s3cret", "ns", "nc", "alice", &p));
        assert!(!verify_client(b"other", "ns", "nc", "alice", &p));
        assert!(!verify_client(b"s3cret", "ns2", "nc", "alice", &p));
        assert!(!verify_client(b"s3cret", "ns", "nc", "mallory", &p));
        assert!(!verify_client(b"s3cret", "ns", "nc", "alice", "zz"));
        let s = server_proof(b"s3cret", "nc", "ns");
        assert!(verify_server(b"s3cret", "nc", "ns", &s));
        assert!(
            !verify_server(b"s3cret", "ns", "nc", &s),
            "roles must not be swappable"
        );
        assert_ne!(nonce(), nonce());
    }
}

/// How far an admin request's timestamp may be from the donor's clock.
pub const ADMIN_SKEW_SECS: u64 = 60;
/// Signed admin requests remembered at once (their nonces, for as long as they are valid).
pub const ADMIN_NONCES_MAX: usize = 4096;

fn admin_mac(
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
    ts: u64,
    nonce: &str,
) -> HmacSha256 {
    let ts = ts.to_string();
    let parts: [&[u8]; 6] = [
        b"rmem-admin-v2",
        method.as_bytes(),
        path.as_bytes(),
        body,
        ts.as_bytes(),
        nonce.as_bytes(),
    ];
    mac(secret, &parts)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `Authorization` header value for an admin request: `rmem-hmac ts=T,nonce=N,mac=M`, where
/// M signs the method, path, body, T and the random N. The donor takes it once, within a minute
/// of T.
pub fn admin_authorization(secret: &[u8], method: &str, path: &str, body: &[u8]) -> String {
    let ts = unix_now();
    let nonce = hex::encode(rand::rng().random::<[u8; 16]>());
    let m = hex::encode(
        admin_mac(secret, method, path, body, ts, &nonce)
            .finalize()
            .into_bytes(),
    );
    format!("rmem-hmac ts={ts},nonce={nonce},mac={m}")
}

/// Why an admin request's `Authorization` header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdminRefusal {
    #[error("missing or malformed signature (expected rmem-hmac ts=T,nonce=N,mac=M)")]
    Malformed,
    #[error("stale signature: its time is more than {ADMIN_SKEW_SECS} s from the donor's clock")]
    Stale,
    #[error("wrong signature (the shared secret differs, or the request was altered)")]
    Wrong,
    #[error("replayed: this signed request was already used; sign each request anew")]
    Replayed,
    #[error("too many signed requests in the last {ADMIN_SKEW_SECS} s; try again later")]
    Busy,
}

/// A correctly signed admin request's time and nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSigned {
    pub ts: u64,
    pub nonce: String,
}

/// Checks an admin request's `Authorization` header (not whether it was seen before: see
/// [`AdminNonces`]).
pub fn verify_admin(
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
    header: &str,
) -> Result<AdminSigned, AdminRefusal> {
    verify_admin_at(secret, method, path, body, header, unix_now())
}

fn verify_admin_at(
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
    header: &str,
    now: u64,
) -> Result<AdminSigned, AdminRefusal> {
    let rest = header
        .strip_prefix("rmem-hmac ")
        .ok_or(AdminRefusal::Malformed)?;
    let (mut ts, mut nonce, mut proof) = (None, None, None);
    for kv in rest.split(',') {
        match kv.trim().split_once('=') {
            Some(("ts", v)) => ts = v.parse::<u64>().ok(),
            Some(("nonce", v)) => nonce = Some(v),
            Some(("mac", v)) => proof = Some(v),
            _ => return Err(AdminRefusal::Malformed),
        }
    }
    let (Some(ts), Some(nonce), Some(proof)) = (ts, nonce, proof) else {
        return Err(AdminRefusal::Malformed);
    };
    if !(16..=128).contains(&nonce.len()) || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AdminRefusal::Malformed);
    }
    if now.abs_diff(ts) > ADMIN_SKEW_SECS {
        return Err(AdminRefusal::Stale);
    }
    if !verify(admin_mac(secret, method, path, body, ts, nonce), proof) {
        return Err(AdminRefusal::Wrong);
    }
    Ok(AdminSigned {
        ts,
        nonce: nonce.to_ascii_lowercase(),
    })
}

/// The nonces of signed admin requests still within their validity, so each is taken once.
/// Bounded: entries leave when their request could no longer pass the time check, and when
/// `max` are held a new request is refused ([`AdminRefusal::Busy`]) rather than remembered.
pub struct AdminNonces {
    /// Nonce -> its request's time, and the second the map was last pruned.
    seen: std::sync::Mutex<(std::collections::HashMap<String, u64>, u64)>,
    max: usize,
}

impl AdminNonces {
    pub fn new(max: usize) -> AdminNonces {
        AdminNonces {
            seen: std::sync::Mutex::new((std::collections::HashMap::new(), 0)),
            max,
        }
    }

    /// Takes a verified request's nonce: `Ok` the first time, `Replayed` after.
    pub fn take(&self, signed: &AdminSigned) -> Result<(), AdminRefusal> {
        self.take_at(signed, unix_now())
    }

    fn take_at(&self, signed: &AdminSigned, now: u64) -> Result<(), AdminRefusal> {
        let mut guard = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, pruned) = &mut *guard;
        // A request signed at `ts` passes the time check until ts + skew. Pruning walks the
        // whole map, so it runs once a second (or when full), not on every request: an entry
        // kept a second too long only refuses a replay the time check refuses anyway.
        if now > *pruned || seen.len() >= self.max {
            seen.retain(|_, ts| ts.saturating_add(ADMIN_SKEW_SECS) >= now);
            *pruned = now;
        }
        if seen.contains_key(&signed.nonce) {
            return Err(AdminRefusal::Replayed);
        }
        if seen.len() >= self.max {
            return Err(AdminRefusal::Busy);
        }
        seen.insert(signed.nonce.clone(), signed.ts);
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.lock().unwrap().0.len()
    }
}

#[cfg(test)]
mod admin_tests {
    use super::*;

    const S: &[u8] = b"0123456789abcdef";

    fn signed(ts: u64, nonce: &str) -> String {
        let m = admin_mac(S, "POST", "/shrink", b"", ts, nonce);
        format!(
            "rmem-hmac ts={ts},nonce={nonce},mac={}",
            hex::encode(m.finalize().into_bytes())
        )
    }

    #[test]
    fn admin_signatures_bind_request_and_secret() {
        let h = admin_authorization(S, "POST", "/shrink", b"{\"slabs\":1}");
        assert!(verify_admin(S, "POST", "/shrink", b"{\"slabs\":1}", &h).is_ok());
        let wrong = Err(AdminRefusal::Wrong);
        assert_eq!(
            verify_admin(S, "POST", "/shrink", b"{\"slabs\":9}", &h),
            wrong
        );
        assert_eq!(
            verify_admin(S, "POST", "/grow", b"{\"slabs\":1}", &h),
            wrong
        );
        let other = b"another secret!!";
        assert_eq!(
            verify_admin(other, "POST", "/shrink", b"{\"slabs\":1}", &h),
            wrong
        );
        assert_ne!(
            h,
            admin_authorization(S, "POST", "/shrink", b"{\"slabs\":1}"),
            "each signature has its own nonce"
        );
        let n = "00112233445566778899aabbccddeeff";
        assert_eq!(
            verify_admin_at(S, "POST", "/shrink", b"", &signed(1000, n), 2000),
            Err(AdminRefusal::Stale)
        );
        assert!(verify_admin_at(S, "POST", "/shrink", b"", &signed(1000, n), 1060).is_ok());
        // The nonce is signed: another one in the header does not verify.
        let swapped = signed(1000, n).replace(n, "ffeeddccbbaa99887766554433221100");
        assert_eq!(
            verify_admin_at(S, "POST", "/shrink", b"", &swapped, 1000),
            wrong
        );
        let malformed = Err(AdminRefusal::Malformed);
        for h in [
            "Bearer x",
            "rmem-hmac ts=x",
            "rmem-hmac ts=1000,mac=00",
            "rmem-hmac ts=1000,nonce=short,mac=00",
            "rmem-hmac ts=1000,nonce=not hex not hex not hex,mac=00",
        ] {
            assert_eq!(
                verify_admin_at(S, "POST", "/shrink", b"", h, 1000),
                malformed
            );
        }
    }

    #[test]
    fn a_signed_request_is_taken_once() {
        let nonces = AdminNonces::new(8);
        let h = admin_authorization(S, "POST", "/shrink", b"{}");
        let v = verify_admin(S, "POST", "/shrink", b"{}", &h).unwrap();
        assert_eq!(nonces.take(&v), Ok(()));
        assert_eq!(nonces.take(&v), Err(AdminRefusal::Replayed));
        let again = verify_admin(S, "POST", "/shrink", b"{}", &h).unwrap();
        assert_eq!(nonces.take(&again), Err(AdminRefusal::Replayed));
    }

    #[test]
    fn remembered_nonces_are_bounded_in_time_and_number() {
        let nonces = AdminNonces::new(3);
        let at = |ts, n: &str| AdminSigned {
            ts,
            nonce: n.into(),
        };
        for n in ["a", "b", "c"] {
            assert_eq!(nonces.take_at(&at(1000, n), 1000), Ok(()));
        }
        assert_eq!(
            nonces.take_at(&at(1000, "d"), 1000),
            Err(AdminRefusal::Busy),
            "full: refused, not remembered"
        );
        assert_eq!(nonces.len(), 3);
        // Still valid at ts + skew: still remembered.
        assert_eq!(
            nonces.take_at(&at(1000, "a"), 1000 + ADMIN_SKEW_SECS),
            Err(AdminRefusal::Replayed)
        );
        // Past it the request fails the time check anyway, and its nonce is forgotten.
        assert_eq!(
            nonces.take_at(&at(1061, "d"), 1001 + ADMIN_SKEW_SECS),
            Ok(())
        );
        assert_eq!(nonces.len(), 1);
    }
}

/// Why no usable shared secret was found.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the secret file {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "a shared secret of at least {MIN_SECRET} bytes is required (a secret file or RMEM_SECRET)"
    )]
    Short,
}

/// Shortest secret accepted.
pub const MIN_SECRET: usize = 16;

/// The secret from `file` (surrounding whitespace trimmed), else from RMEM_SECRET.
pub fn load_secret(file: Option<&std::path::Path>) -> Result<Vec<u8>, SecretError> {
    let secret = match file {
        Some(p) => std::fs::read(p)
            .map_err(|source| SecretError::Read {
                path: p.to_path_buf(),
                source,
            })?
            .trim_ascii()
            .to_vec(),
        None => std::env::var("RMEM_SECRET")
            .unwrap_or_default()
            .into_bytes(),
    };
    if secret.len() < MIN_SECRET {
        return Err(SecretError::Short);
    }
    Ok(secret)
}
