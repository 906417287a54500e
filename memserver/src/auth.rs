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

fn admin_mac(secret: &[u8], method: &str, path: &str, body: &[u8], ts: u64) -> HmacSha256 {
    let ts = ts.to_string();
    let parts: [&[u8]; 5] = [
        b"rmem-admin-v1",
        method.as_bytes(),
        path.as_bytes(),
        body,
        ts.as_bytes(),
    ];
    mac(secret, &parts)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `Authorization` header value for an admin request: `rmem-hmac ts=T,mac=M`, where M signs
/// the method, path, body and T, so a captured header is good for this request and one minute.
pub fn admin_authorization(secret: &[u8], method: &str, path: &str, body: &[u8]) -> String {
    let ts = unix_now();
    let m = hex::encode(
        admin_mac(secret, method, path, body, ts)
            .finalize()
            .into_bytes(),
    );
    format!("rmem-hmac ts={ts},mac={m}")
}

/// Checks an admin request's `Authorization` header.
pub fn verify_admin(secret: &[u8], method: &str, path: &str, body: &[u8], header: &str) -> bool {
    let Some(rest) = header.strip_prefix("rmem-hmac ") else {
        return false;
    };
    let (mut ts, mut proof) = (None, None);
    for kv in rest.split(',') {
        match kv.trim().split_once('=') {
            Some(("ts", v)) => ts = v.parse::<u64>().ok(),
            Some(("mac", v)) => proof = Some(v),
            _ => return false,
        }
    }
    let (Some(ts), Some(proof)) = (ts, proof) else {
        return false;
    };
    if unix_now().abs_diff(ts) > ADMIN_SKEW_SECS {
        return false;
    }
    verify(admin_mac(secret, method, path, body, ts), proof)
}

#[cfg(test)]
mod admin_tests {
    use super::*;

    #[test]
    fn admin_signatures_bind_request_and_secret() {
        let s = b"0123456789abcdef";
        let h = admin_authorization(s, "POST", "/shrink", b"{\"slabs\":1}");
        assert!(verify_admin(s, "POST", "/shrink", b"{\"slabs\":1}", &h));
        assert!(!verify_admin(s, "POST", "/shrink", b"{\"slabs\":9}", &h));
        assert!(!verify_admin(s, "POST", "/grow", b"{\"slabs\":1}", &h));
        assert!(!verify_admin(
            b"another secret!!",
            "POST",
            "/shrink",
            b"{\"slabs\":1}",
            &h
        ));
        let old = format!(
            "rmem-hmac ts=1000,mac={}",
            hex::encode(
                admin_mac(s, "POST", "/shrink", b"", 1000)
                    .finalize()
                    .into_bytes()
            )
        );
        assert!(!verify_admin(s, "POST", "/shrink", b"", &old), "stale");
        assert!(!verify_admin(s, "POST", "/shrink", b"", "Bearer x"));
        assert!(!verify_admin(s, "POST", "/shrink", b"", "rmem-hmac ts=x"));
    }
}
