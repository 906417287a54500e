//! Page fingerprints: which host already holds most of a VM's memory.
//!
//! Each host publishes a Bloom filter of its pages' content hashes. Every filter in a cluster has
//! the same size and hash set ([`BloomParams`]), so two can be OR-ed: the number of distinct
//! items in a filter follows from how many bits are set (Swamidass and Baldi), and the pages two
//! hosts share is n(A) + n(B) - n(A | B). Counting hits of A's pages in B instead would overcount
//! by the false-positive rate, which at 8 bits a page is ~2% of everything. An estimate ranks
//! hosts; it never skips a page: migration compares the full hash first.

use serde::{Deserialize, Serialize};

/// The filter layout every host in a cluster uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BloomParams {
    /// Filter size in bits, a multiple of 64.
    pub bits: u64,
    /// Hash functions per item.
    pub hashes: u32,
    /// Mixed into every index, so filters of different clusters do not compare.
    pub seed: u64,
}

impl BloomParams {
    /// `bits_per_page` bits for each of `pages` pages, with the hash count that minimises false
    /// positives at that load (round(ln 2 * bits per page)).
    pub fn for_pages(pages: u64, bits_per_page: u32, seed: u64) -> BloomParams {
        let bits = (pages.max(1) * u64::from(bits_per_page.max(1))).div_ceil(64) * 64;
        let hashes = ((f64::from(bits_per_page) * std::f64::consts::LN_2).round() as u32).max(1);
        BloomParams { bits, hashes, seed }
    }

    /// The cluster default: 8 bits a page for 1 GiB of 4 KiB pages (256 KiB a filter).
    pub fn default_cluster() -> BloomParams {
        BloomParams::for_pages(1 << 18, 8, 0x726d_656d)
    }
}

/// Why two filters cannot be compared or one cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BloomError {
    #[error("filter layout {got:?} differs from the cluster's {want:?}")]
    Layout { got: BloomParams, want: BloomParams },
    #[error("filter of {got} bytes, {want} expected")]
    Length { got: usize, want: usize },
    #[error(
        "filter size must be a multiple of 64 bits and at most 2^32 bits, with 1 to 32 hashes"
    )]
    Params,
}

/// A Bloom filter of 64-bit page hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bloom {
    params: BloomParams,
    words: Vec<u64>,
}

/// A 64-bit finaliser (splitmix64): page hashes are already uniform, but a seeded mix keeps
/// clusters apart and gives the second hash for double hashing.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Bloom {
    pub fn new(params: BloomParams) -> Result<Bloom, BloomError> {
        if params.bits == 0
            || !params.bits.is_multiple_of(64)
            || params.bits > 1 << 32
            || !(1..=32).contains(&params.hashes)
        {
            return Err(BloomError::Params);
        }
        Ok(Bloom {
            params,
            words: vec![0; (params.bits / 64) as usize],
        })
    }

    /// A filter received as bytes (little-endian words), checked against the cluster's layout.
    pub fn from_bytes(
        params: BloomParams,
        cluster: BloomParams,
        bytes: &[u8],
    ) -> Result<Bloom, BloomError> {
        if params != cluster {
            return Err(BloomError::Layout {
                got: params,
                want: cluster,
            });
        }
        let mut b = Bloom::new(params)?;
        let want = b.words.len() * 8;
        if bytes.len() != want {
            return Err(BloomError::Length {
                got: bytes.len(),
                want,
            });
        }
        for (w, c) in b.words.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().expect("chunks of 8"));
        }
        Ok(b)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn params(&self) -> BloomParams {
        self.params
    }

    /// Adds one page's content hash.
    pub fn insert(&mut self, hash: u64) {
        let (h1, h2) = self.pair(hash);
        for i in 0..u64::from(self.params.hashes) {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) % self.params.bits;
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// Whether the page may be present (false positives at the filter's rate, no false negatives).
    pub fn may_contain(&self, hash: u64) -> bool {
        let (h1, h2) = self.pair(hash);
        (0..u64::from(self.params.hashes)).all(|i| {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) % self.params.bits;
            self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }

    fn pair(&self, hash: u64) -> (u64, u64) {
        let h1 = mix(hash ^ self.params.seed);
        // Odd, so the k indices differ whenever the filter size is a power of two.
        let h2 = mix(h1) | 1;
        (h1, h2)
    }

    fn ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn items_for(&self, ones: u64) -> f64 {
        let m = self.params.bits as f64;
        let k = f64::from(self.params.hashes);
        // A full filter says nothing: report as many items as would nearly fill it.
        let x = (ones as f64).min(m - 1.0);
        -(m / k) * (1.0 - x / m).ln()
    }

    /// Estimated distinct pages in the filter.
    pub fn estimate(&self) -> f64 {
        self.items_for(self.ones())
    }

    /// Estimated pages in both filters: n(A) + n(B) - n(A | B), never negative.
    pub fn shared(&self, other: &Bloom) -> Result<f64, BloomError> {
        if self.params != other.params {
            return Err(BloomError::Layout {
                got: other.params,
                want: self.params,
            });
        }
        let union: u64 = self
            .words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| u64::from((a | b).count_ones()))
            .sum();
        Ok((self.estimate() + other.estimate() - self.items_for(union)).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A VM of `vm` pages sharing `overlap` of them with a host of `host` pages; the estimate
    /// is checked against the exact intersection of the two hash lists.
    fn shared_error(vm: u64, host: u64, overlap: f64, seed: u64) -> f64 {
        let params = BloomParams::default_cluster();
        let (mut a, mut b) = (Bloom::new(params).unwrap(), Bloom::new(params).unwrap());
        let common = (vm as f64 * overlap) as u64;
        // Each seed draws another set of page contents.
        let page = |i: u64| mix(i ^ (seed << 48));
        let vm_pages: Vec<u64> = (0..vm).map(page).collect();
        let host_pages: Vec<u64> = (0..common)
            .map(page)
            .chain((0..host - common).map(|i| page(i + (1 << 40))))
            .collect();
        for &h in &vm_pages {
            a.insert(h);
        }
        for &h in &host_pages {
            b.insert(h);
        }
        let exact = {
            let hs: HashSet<u64> = host_pages.iter().copied().collect();
            vm_pages.iter().filter(|h| hs.contains(h)).count() as f64
        };
        assert_eq!(exact as u64, common);
        let est = a.shared(&b).unwrap();
        (est - exact).abs() / vm as f64
    }

    #[test]
    fn shared_pages_are_estimated_within_one_percent_of_the_vm() {
        for overlap in [0.05, 0.30] {
            for seed in [1, 2, 3] {
                let e = shared_error(65_536, 131_072, overlap, seed);
                eprintln!(
                    "overlap {overlap}, seed {seed}: error {:.3}% of the VM",
                    e * 100.0
                );
                assert!(e < 0.01, "overlap {overlap}, seed {seed}: error {e}");
            }
        }
    }

    #[test]
    fn raw_hits_overcount_by_the_false_positive_rate() {
        // Why the estimate uses set-bit counts: with a host filter at its design load, testing
        // each of the VM's private pages against it finds false hits.
        let params = BloomParams::default_cluster();
        let mut host = Bloom::new(params).unwrap();
        for i in 0..(1u64 << 18) {
            host.insert(mix(i + (1 << 50)));
        }
        let hits = (0..65_536u64).filter(|&i| host.may_contain(mix(i))).count();
        assert!(hits > 65_536 / 100, "{hits} false hits");
        let mut vm = Bloom::new(params).unwrap();
        (0..65_536u64).for_each(|i| vm.insert(mix(i)));
        assert!(vm.shared(&host).unwrap() < 65_536.0 * 0.01);
    }

    #[test]
    fn filters_of_another_layout_are_refused() {
        let c = BloomParams::default_cluster();
        let other = BloomParams { hashes: 3, ..c };
        let a = Bloom::new(c).unwrap();
        let b = Bloom::new(other).unwrap();
        assert!(matches!(a.shared(&b), Err(BloomError::Layout { .. })));
        assert!(matches!(
            Bloom::from_bytes(other, c, &b.to_bytes()),
            Err(BloomError::Layout { .. })
        ));
        assert!(matches!(
            Bloom::from_bytes(c, c, &[0; 7]),
            Err(BloomError::Length { .. })
        ));
        assert_eq!(
            Bloom::new(BloomParams { bits: 100, ..c }),
            Err(BloomError::Params)
        );
        let back = Bloom::from_bytes(c, c, &a.to_bytes()).unwrap();
        assert_eq!(back, a);
        assert_eq!(c.bits / 8, 256 << 10, "256 KiB per GiB");
    }
}
