//! Pages the destination already holds are not sent (`--dedup`): guests booted from the same
//! kernel and image share many pages with guests already running on the destination host.
//!
//! The destination indexes a hash of every non-zero page of the RAM files it is given (other
//! guests' RAM); the source sends the hash of each page instead of the pages; the destination
//! copies each page it finds from its own files after hashing the candidate again (the file
//! may have changed since it was indexed) and says which pages it filled. The hash is keyed
//! with a key both agents derive from the shared secret and this connection's nonces: a guest
//! cannot craft a page that collides with another guest's, nor learn from one migration what
//! another holds.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use rmem_transport::Buffer;

use crate::dirty::PageSource;
use crate::pages::{is_zero, PageSet, PAGE};

/// The key of one connection's page hashes.
#[derive(Clone)]
pub struct DedupKey([u8; 32]);

impl DedupKey {
    pub fn derive(secret: &[u8], nonce_c: &str, nonce_s: &str) -> DedupKey {
        let mut material = Vec::new();
        for part in [secret, nonce_c.as_bytes(), nonce_s.as_bytes()] {
            material.extend_from_slice(&(part.len() as u64).to_le_bytes());
            material.extend_from_slice(part);
        }
        DedupKey(blake3::derive_key("rmem migrate dedup v1", &material))
    }

    /// A page's keyed hash; 0 stands for "no offer" (zero pages, which are never sent).
    pub fn hash(&self, page: &[u8]) -> u128 {
        let h = blake3::keyed_hash(&self.0, page);
        let b: [u8; 16] = h.as_bytes()[..16].try_into().unwrap_or_default();
        u128::from_le_bytes(b).max(1)
    }

    /// What a page is offered as: 0 for a zero page, else its hash.
    pub fn offered(&self, page: &[u8]) -> u128 {
        if is_zero(page) {
            0
        } else {
            self.hash(page)
        }
    }
}

/// The hash of every page of `src`, 0 for zero pages and for `holes` (not read).
pub fn offer(key: &DedupKey, src: &dyn PageSource, holes: &PageSet) -> Vec<u128> {
    let mut buf = Box::new([0u8; PAGE]);
    (0..src.pages())
        .map(|p| {
            if holes.contains(p) {
                return 0;
            }
            src.read_page(p, &mut buf);
            key.offered(&buf[..])
        })
        .collect()
}

/// The pages of `have` that no longer match what was `offered` for them: written since the
/// offer, so the destination's copies are stale.
pub fn changed_since(
    key: &DedupKey,
    src: &dyn PageSource,
    have: &PageSet,
    offered: &[u128],
) -> PageSet {
    let mut buf = Box::new([0u8; PAGE]);
    let mut changed = PageSet::new(have.len());
    for p in have.iter() {
        src.read_page(p, &mut buf);
        if offered.get(p) != Some(&key.offered(&buf[..])) {
            changed.insert(p);
        }
    }
    changed
}

/// Where each page content is found in the destination's files.
pub struct Index {
    files: Vec<(PathBuf, File)>,
    pages: HashMap<u128, (u32, u64)>,
}

/// What filling from the index did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Filled {
    pub pages: usize,
    /// Candidates whose content changed since indexing (sent after all).
    pub stale: usize,
}

impl Index {
    /// Reads and hashes every non-zero page of `files`.
    pub fn build(key: &DedupKey, files: &[PathBuf]) -> std::io::Result<Index> {
        let mut pages = HashMap::new();
        let mut opened = Vec::with_capacity(files.len());
        let mut buf = vec![0u8; PAGE];
        for (i, path) in files.iter().enumerate() {
            let f = File::open(path)?;
            let n = f.metadata()?.len() / PAGE as u64;
            for p in 0..n {
                f.read_exact_at(&mut buf, p * PAGE as u64)?;
                if !is_zero(&buf) {
                    pages.entry(key.hash(&buf)).or_insert((i as u32, p));
                }
            }
            opened.push((path.clone(), f));
        }
        Ok(Index {
            files: opened,
            pages,
        })
    }

    /// Distinct page contents indexed.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Copies into `ram` every page of `wanted` (hashes by page, 0 for none) found in the
    /// index whose content still hashes the same; returns which pages were filled.
    pub fn fill(
        &self,
        key: &DedupKey,
        wanted: &[u128],
        ram: &Buffer,
    ) -> std::io::Result<(PageSet, Filled)> {
        let mut have = PageSet::new(wanted.len());
        let mut done = Filled::default();
        let mut buf = vec![0u8; PAGE];
        for (p, h) in wanted.iter().enumerate() {
            let Some(&(file, page)) = self.pages.get(h).filter(|_| *h != 0) else {
                continue;
            };
            let Some((_, f)) = self.files.get(file as usize) else {
                continue;
            };
            f.read_exact_at(&mut buf, page * PAGE as u64)?;
            if key.hash(&buf) != *h {
                done.stale += 1;
                continue;
            }
            ram.write_at(p * PAGE, &buf)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            have.insert(p);
            done.pages += 1;
        }
        Ok((have, done))
    }

    /// The files indexed.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.files.iter().map(|(p, _)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::Slice;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE]
    }

    #[test]
    fn keys_differ_per_connection_and_zero_pages_are_never_offered() {
        let a = DedupKey::derive(b"secret-secret-16", "c1", "s1");
        let b = DedupKey::derive(b"secret-secret-16", "c2", "s1");
        assert_ne!(a.hash(&page(7)), b.hash(&page(7)));
        assert_eq!(a.hash(&page(7)), a.hash(&page(7)));
        let mut mem = page(0);
        mem.extend(page(9));
        let none = PageSet::new(2);
        assert_eq!(offer(&a, &Slice(&mem), &none)[0], 0);
        assert_ne!(offer(&a, &Slice(&mem), &none)[1], 0);
    }

    #[test]
    fn offered_pages_written_or_zeroed_since_are_found_and_no_others() {
        let key = DedupKey::derive(b"secret-secret-16", "c", "s");
        let mut mem: Vec<u8> = (1..=4).flat_map(page).collect();
        let offered = offer(&key, &Slice(&mem), &PageSet::new(4));
        let mut have = PageSet::new(4);
        for p in [0, 1, 2] {
            have.insert(p);
        }
        mem[PAGE + 17] ^= 1; // page 1 written
        mem[2 * PAGE..3 * PAGE].fill(0); // page 2 zeroed
        mem[3 * PAGE] = 0; // page 3 written, but never offered as held
        let changed = changed_since(&key, &Slice(&mem), &have, &offered);
        assert_eq!(changed.iter().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn pages_found_in_the_index_are_copied_and_changed_ones_are_not() {
        let key = DedupKey::derive(b"secret-secret-16", "c", "s");
        let dir = tempfile::tempdir().unwrap();
        let donor = dir.path().join("donor");
        let mut d = page(1);
        d.extend(page(2));
        d.extend(page(0));
        std::fs::write(&donor, &d).unwrap();
        let index = Index::build(&key, std::slice::from_ref(&donor)).unwrap();
        assert_eq!(index.len(), 2, "zero pages are not indexed");
        // The source has pages 2, 1, 3 (3 unknown to the destination).
        let mut src = page(2);
        src.extend(page(1));
        src.extend(page(3));
        let wanted = offer(&key, &Slice(&src), &PageSet::new(3));
        // The donor's page 1 changes after indexing: its copy must not be used.
        let mut changed = d.clone();
        changed[PAGE..2 * PAGE].copy_from_slice(&page(5));
        std::fs::write(&donor, &changed).unwrap();
        let ram_file = dir.path().join("ram");
        std::fs::write(&ram_file, vec![0u8; 3 * PAGE]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ram_file)
            .unwrap();
        let ram = Buffer::map_file(&f).unwrap();
        let (have, done) = index.fill(&key, &wanted, &ram).unwrap();
        assert_eq!(have.iter().collect::<Vec<_>>(), vec![1]);
        assert_eq!(done, Filled { pages: 1, stale: 1 });
        let got = std::fs::read(&ram_file).unwrap();
        assert_eq!(&got[PAGE..2 * PAGE], &page(1)[..]);
        assert!(got[..PAGE].iter().all(|&b| b == 0), "stale page not copied");
    }
}
