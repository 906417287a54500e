//! Which parts of each chunk were ever written: a rebuild copies only those. A donor hands out
//! every slab zeroed, so a part never written reads as zeros on the old copy and on the new
//! one alike, and copying it would only load the links the swap traffic needs.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Parts per chunk: one bit each.
const PARTS: u64 = 64;
const PAGE: u64 = 4096;

/// One 64-bit mask per chunk.
pub struct WrittenMap {
    part: u64,
    masks: Vec<AtomicU64>,
}

impl WrittenMap {
    /// For `chunks` chunks of `chunk` bytes: each part a whole number of pages.
    pub fn new(chunks: usize, chunk: u64) -> Self {
        let part = chunk.div_ceil(PARTS).div_ceil(PAGE).max(1) * PAGE;
        WrittenMap {
            part,
            masks: (0..chunks).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The bits of the parts `within` (bytes inside the chunk) touches.
    fn bits(&self, within: &Range<u64>) -> u64 {
        if within.is_empty() {
            return 0;
        }
        let first = within.start / self.part;
        let last = ((within.end - 1) / self.part).min(PARTS - 1);
        let n = last.saturating_sub(first) + 1;
        let ones = if n >= PARTS {
            u64::MAX
        } else {
            (1u64 << n) - 1
        };
        ones << first.min(PARTS - 1)
    }

    /// Records a write to bytes `within` of chunk `c`. Called under the chunk's lock, so a
    /// rebuild that checks the map under the same lock sees every write that did not reach
    /// the new copy itself.
    pub fn mark(&self, c: usize, within: Range<u64>) {
        let b = self.bits(&within);
        self.masks[c].fetch_or(b, Ordering::AcqRel);
    }

    /// Whether any of bytes `within` of chunk `c` was ever written.
    pub fn any(&self, c: usize, within: Range<u64>) -> bool {
        self.masks[c].load(Ordering::Acquire) & self.bits(&within) != 0
    }

    /// The next run of written bytes of chunk `c` (of `len` bytes) at or after `from`, at most
    /// `max` bytes long.
    pub fn next_run(&self, c: usize, from: u64, len: u64, max: u64) -> Option<Range<u64>> {
        let mask = self.masks[c].load(Ordering::Acquire);
        let first = from / self.part;
        if first >= PARTS {
            return None;
        }
        let rest = mask >> first;
        if rest == 0 {
            return None;
        }
        let p = first + u64::from(rest.trailing_zeros());
        let start = (p * self.part).max(from);
        if start >= len {
            return None;
        }
        // Consecutive written parts from p on.
        let ones = u64::from((mask >> p).trailing_ones());
        let end = ((p + ones) * self.part).min(len).min(start + max.max(1));
        Some(start..end)
    }

    /// Bytes in parts ever written, over all chunks (what a full rebuild would copy).
    pub fn bytes(&self) -> u64 {
        self.masks
            .iter()
            .map(|m| u64::from(m.load(Ordering::Relaxed).count_ones()) * self.part)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_marks_exactly_the_parts_it_touches() {
        // 8 MiB chunks: parts of 128 KiB.
        let m = WrittenMap::new(2, 8 << 20);
        assert_eq!(m.part, 128 << 10);
        assert!(!m.any(0, 0..8 << 20));
        m.mark(0, (128 << 10) - 4096..(128 << 10) + 4096); // straddles parts 0 and 1
        assert!(m.any(0, 0..4096));
        assert!(m.any(0, 128 << 10..(128 << 10) + 1));
        assert!(!m.any(0, 256 << 10..8 << 20));
        assert!(!m.any(1, 0..8 << 20), "another chunk stays clean");
        m.mark(1, (8 << 20) - 4096..8 << 20); // the last page
        assert!(m.any(1, (8 << 20) - 1..8 << 20));
        assert!(!m.any(1, 0..(8 << 20) - (128 << 10)));
        assert_eq!(m.bytes(), 3 * (128 << 10));
    }

    #[test]
    fn runs_cover_the_written_parts_in_pieces_of_at_most_max() {
        let m = WrittenMap::new(1, 8 << 20);
        let p = 128 << 10;
        assert_eq!(m.next_run(0, 0, 8 << 20, 1 << 20), None);
        m.mark(0, p..3 * p + 1); // parts 1, 2, 3
        m.mark(0, 63 * p..64 * p); // the last part
        assert_eq!(m.next_run(0, 0, 8 << 20, 1 << 20), Some(p..4 * p));
        assert_eq!(m.next_run(0, 0, 8 << 20, p), Some(p..2 * p));
        assert_eq!(
            m.next_run(0, 2 * p + 5, 8 << 20, 1 << 20),
            Some(2 * p + 5..4 * p)
        );
        assert_eq!(m.next_run(0, 4 * p, 8 << 20, 1 << 20), Some(63 * p..64 * p));
        assert_eq!(m.next_run(0, 64 * p, 8 << 20, 1 << 20), None);
        // Walking the runs visits exactly the written bytes.
        let (mut off, mut total) = (0, 0);
        while let Some(r) = m.next_run(0, off, 8 << 20, 200 << 10) {
            assert!(r.start >= off && r.end > r.start && r.end - r.start <= 200 << 10);
            total += r.end - r.start;
            off = r.end;
        }
        assert_eq!(total, 4 * p);
    }

    #[test]
    fn a_whole_chunk_and_empty_ranges() {
        let m = WrittenMap::new(1, 8 << 20);
        m.mark(0, 5..5);
        assert_eq!(m.bytes(), 0, "an empty write marks nothing");
        m.mark(0, 0..8 << 20);
        assert_eq!(m.bytes(), 8 << 20);
    }

    #[test]
    fn small_and_odd_chunks_round_parts_up_to_pages() {
        // A chunk smaller than 64 pages: one page a part, fewer than 64 parts used.
        let m = WrittenMap::new(1, 16 * 4096);
        assert_eq!(m.part, 4096);
        m.mark(0, 15 * 4096..16 * 4096);
        assert!(m.any(0, 15 * 4096..15 * 4096 + 1));
        assert!(!m.any(0, 0..15 * 4096));
        // A chunk of 64 x 3 pages + 1 byte: parts of 4 pages, the last byte in the last part used.
        let odd = 64 * 3 * 4096 + 1;
        let m = WrittenMap::new(1, odd);
        m.mark(0, odd - 1..odd);
        assert!(m.any(0, odd - 1..odd));
    }
}
