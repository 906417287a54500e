//! Page fingerprints of memory files (guest RAM on tmpfs or hugetlbfs, any file), for
//! [`crate::bloom`] filters.
//!
//! Pages are hashed with a key derived from the cluster's shared secret, so a filter says
//! nothing to anyone outside the cluster, and one cluster's filters do not match another's.
//! Zero pages are left out: every host has them, and migration never sends them anyway.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::bloom::{Bloom, BloomError, BloomParams};

const PAGE: usize = 4096;

/// The key page hashes are taken with.
#[derive(Clone)]
pub struct PageKey([u8; 32]);

impl std::fmt::Debug for PageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageKey(..)")
    }
}

impl PageKey {
    pub fn derive(secret: &[u8]) -> PageKey {
        PageKey(blake3::derive_key("rmem place fingerprint v1", secret))
    }

    /// A page's 64-bit keyed hash.
    pub fn hash(&self, page: &[u8]) -> u64 {
        let h = blake3::keyed_hash(&self.0, page);
        u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 of 32 bytes"))
    }
}

/// What fingerprinting files found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Fingerprinted {
    pub pages: u64,
    pub zero_pages: u64,
}

/// Why files could not be fingerprinted.
#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Filter(#[from] BloomError),
}

/// Adds every non-zero page of `files` to a new filter; `progress` gets bytes read so far.
pub fn fingerprint_files(
    params: BloomParams,
    key: &PageKey,
    files: &[&Path],
    mut progress: impl FnMut(u64),
) -> Result<(Bloom, Fingerprinted), FingerprintError> {
    let mut bloom = Bloom::new(params)?;
    let mut seen = Fingerprinted::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    for path in files {
        let err = |source| FingerprintError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut f = File::open(path).map_err(err)?;
        loop {
            let n = read_full(&mut f, &mut buf).map_err(err)?;
            if n == 0 {
                break;
            }
            for page in buf[..n].chunks(PAGE) {
                if page.iter().all(|&b| b == 0) {
                    seen.zero_pages += 1;
                } else {
                    bloom.insert(key.hash(page));
                    seen.pages += 1;
                }
            }
            done += n as u64;
            progress(done);
        }
    }
    Ok((bloom, seen))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_share_what_their_pages_share_and_zero_pages_are_left_out() {
        let dir = std::env::temp_dir().join(format!("rmem-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let page = |i: u32| {
            let mut p = vec![0u8; PAGE];
            p[..4].copy_from_slice(&i.to_le_bytes());
            p[100] = 1;
            p
        };
        let write = |name: &str, pages: &mut dyn Iterator<Item = Vec<u8>>| {
            let path = dir.join(name);
            std::fs::write(&path, pages.flatten().collect::<Vec<u8>>()).unwrap();
            path
        };
        // a: pages 0..2000 and 500 zero pages; b: pages 1000..3000.
        let a = write(
            "a",
            &mut (0..2000).map(page).chain((0..500).map(|_| vec![0; PAGE])),
        );
        let b = write("b", &mut (1000..3000).map(page));
        let key = PageKey::derive(b"cluster-secret-0123456789");
        let params = BloomParams::for_pages(1 << 16, 8, 1);
        let (fa, sa) = fingerprint_files(params, &key, &[&a], |_| {}).unwrap();
        let (fb, _) = fingerprint_files(params, &key, &[&b], |_| {}).unwrap();
        assert_eq!(
            sa,
            Fingerprinted {
                pages: 2000,
                zero_pages: 500
            }
        );
        let shared = fa.shared(&fb).unwrap();
        assert!((shared - 1000.0).abs() < 30.0, "{shared}");
        // Another cluster's key shares nothing with these.
        let other = PageKey::derive(b"another-secret-0123456789");
        let (fo, _) = fingerprint_files(params, &other, &[&b], |_| {}).unwrap();
        assert!(fa.shared(&fo).unwrap() < 30.0);
        assert!(fingerprint_files(params, &key, &[&dir.join("missing")], |_| {}).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
