//! Sets of pages of one region, and the contiguous runs they are sent in.

use std::ops::Range;

/// The pages of `file` that are holes (never written, or punched): zero without being read.
/// Reading them through a shared mapping would allocate them; asking the file system where
/// its data is (SEEK_DATA, SEEK_HOLE) touches nothing.
pub fn file_holes(file: &std::fs::File) -> std::io::Result<PageSet> {
    use std::os::fd::AsRawFd;
    let len = file.metadata()?.len();
    let pages = (len as usize) / PAGE;
    let mut holes = PageSet::new(pages);
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we borrow; no memory involved.
        let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `off`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut at = 0u64;
    while at < len {
        let data = seek(at, libc::SEEK_DATA)?.unwrap_or(len).min(len);
        // Whole pages inside the hole [at, data).
        let first = (at as usize).div_ceil(PAGE);
        let end = (data as usize) / PAGE;
        for p in first..end.min(pages) {
            holes.insert(p);
        }
        if data >= len {
            break;
        }
        at = seek(data, libc::SEEK_HOLE)?.unwrap_or(len);
    }
    Ok(holes)
}

/// The runs of pages `[first, end)` that hold data in a file (not holes), at most `max` of
/// them: past that, the runs separated by the smallest gaps are merged (a run may then cover
/// a hole; its users only allocate ahead with it).
pub fn data_runs(file: &std::fs::File, max: usize) -> std::io::Result<Vec<[u64; 2]>> {
    let holes = file_holes(file)?;
    let mut runs: Vec<[u64; 2]> = Vec::new();
    let mut p = 0;
    while p < holes.len() {
        if holes.contains(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < holes.len() && !holes.contains(p) {
            p += 1;
        }
        runs.push([start as u64, p as u64]);
    }
    let mut gap = 1u64;
    while runs.len() > max.max(1) {
        let mut merged: Vec<[u64; 2]> = Vec::with_capacity(runs.len());
        for r in runs {
            match merged.last_mut() {
                Some(last) if r[0] - last[1] <= gap => last[1] = r[1],
                _ => merged.push(r),
            }
        }
        runs = merged;
        gap *= 2;
    }
    Ok(runs)
}

/// The unit of migration: a base page.
pub const PAGE: usize = 4096;

/// A set of page indices of a region of `len` pages, as a bitmap.
#[derive(Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    len: usize,
    count: usize,
}

impl std::fmt::Debug for PageSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageSet({} of {})", self.count, self.len)
    }
}

impl PageSet {
    /// No page of `len`.
    pub fn new(len: usize) -> PageSet {
        PageSet {
            words: vec![0; len.div_ceil(64)],
            len,
            count: 0,
        }
    }

    /// Every page of `len`.
    pub fn full(len: usize) -> PageSet {
        let mut s = PageSet {
            words: vec![u64::MAX; len.div_ceil(64)],
            len,
            count: len,
        };
        if !len.is_multiple_of(64) {
            if let Some(last) = s.words.last_mut() {
                *last = (1u64 << (len % 64)) - 1;
            }
        }
        s
    }

    /// The bitmap as bytes (little-endian words), to send to the other side.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The set `to_bytes` encoded, for a region of `len` pages; `None` if the bytes do not
    /// fit that length (bits past `len` set, or the wrong size).
    pub fn from_bytes(len: usize, b: &[u8]) -> Option<PageSet> {
        if b.len() != len.div_ceil(64) * 8 {
            return None;
        }
        let words: Vec<u64> = b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if !len.is_multiple_of(64) && words.last().is_some_and(|w| w >> (len % 64) != 0) {
            return None;
        }
        let count = words.iter().map(|w| w.count_ones() as usize).sum();
        Some(PageSet { words, len, count })
    }

    /// The pages of this set in `[start, end)`, as a set over the same region.
    pub fn range(&self, start: usize, end: usize) -> PageSet {
        let end = end.min(self.len);
        let mut out = PageSet::new(self.len);
        if start >= end {
            return out;
        }
        let (fw, lw) = (start / 64, (end - 1) / 64);
        for w in fw..=lw {
            let mut m = self.words[w];
            if w == fw {
                m &= u64::MAX << (start % 64);
            }
            if w == lw && !end.is_multiple_of(64) {
                m &= (1u64 << (end % 64)) - 1;
            }
            out.words[w] = m;
            out.count += m.count_ones() as usize;
        }
        out
    }

    /// Pages in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Pages in the set.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn contains(&self, page: usize) -> bool {
        page < self.len && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// Adds `page`; false if it was there already or is outside the region.
    pub fn insert(&mut self, page: usize) -> bool {
        if page >= self.len || self.contains(page) {
            return false;
        }
        self.words[page / 64] |= 1 << (page % 64);
        self.count += 1;
        true
    }

    /// Removes `page`; false if it was not there.
    pub fn remove(&mut self, page: usize) -> bool {
        if !self.contains(page) {
            return false;
        }
        self.words[page / 64] &= !(1 << (page % 64));
        self.count -= 1;
        true
    }

    /// Adds every page of `other` (a region of the same length).
    pub fn union_with(&mut self, other: &PageSet) {
        debug_assert_eq!(self.len, other.len);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.count = self.words.iter().map(|w| w.count_ones() as usize).sum();
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
        self.count = 0;
    }

    /// The pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
    }

    /// The set as ascending runs of consecutive pages, none longer than `max_pages` (one
    /// request each: a long run is cut so many requests can be in flight).
    pub fn runs(&self, max_pages: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        let max = max_pages.max(1);
        let mut pages = self.iter().peekable();
        std::iter::from_fn(move || {
            let start = pages.next()?;
            let mut end = start + 1;
            while end - start < max && pages.peek() == Some(&end) {
                pages.next();
                end += 1;
            }
            Some(start..end)
        })
    }
}

/// True when every byte of `page` is zero (such pages are not sent: the destination's fresh
/// memory is zero already).
pub fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; `align_to` gives the aligned middle.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_keeps_exactly_the_pages_inside() {
        let mut s = PageSet::new(300);
        for p in [0, 1, 63, 64, 65, 127, 128, 200, 299] {
            s.insert(p);
        }
        for (a, b) in [
            (0, 300),
            (1, 64),
            (63, 66),
            (64, 128),
            (65, 65),
            (100, 400),
            (299, 300),
        ] {
            let r = s.range(a, b);
            let want: Vec<usize> = s.iter().filter(|p| *p >= a && *p < b).collect();
            assert_eq!(r.iter().collect::<Vec<_>>(), want, "[{a}, {b})");
            assert_eq!(r.count(), want.len());
            assert_eq!(r.len(), 300);
        }
    }

    #[test]
    fn data_runs_are_the_files_allocated_pages_merged_down_to_the_limit() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile_in("/dev/shm").unwrap();
        f.set_len(64 * PAGE as u64).unwrap();
        for p in [1u64, 2, 10, 12, 40] {
            f.write_all_at(&[1], p * PAGE as u64).unwrap();
        }
        assert_eq!(
            data_runs(&f, 100).unwrap(),
            vec![[1, 3], [10, 11], [12, 13], [40, 41]]
        );
        // Merged across the smallest gaps first; every data page stays covered.
        assert_eq!(data_runs(&f, 3).unwrap(), vec![[1, 3], [10, 13], [40, 41]]);
        assert_eq!(data_runs(&f, 1).unwrap(), vec![[1, 41]]);
        let empty = tempfile::tempfile_in("/dev/shm").unwrap();
        empty.set_len(8 * PAGE as u64).unwrap();
        assert!(data_runs(&empty, 4).unwrap().is_empty());
    }

    #[test]
    fn holes_are_found_without_reading_and_written_pages_are_not_holes() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile_in("/dev/shm").unwrap();
        f.set_len((8 * PAGE) as u64).unwrap();
        f.write_all_at(&[1u8; 10], (2 * PAGE) as u64).unwrap();
        f.write_all_at(&[1u8; PAGE], (5 * PAGE) as u64).unwrap();
        let h = file_holes(&f).unwrap();
        assert_eq!(h.iter().collect::<Vec<_>>(), vec![0, 1, 3, 4, 6, 7]);
    }

    #[test]
    fn a_set_survives_its_byte_encoding_and_bad_bytes_are_refused() {
        let mut a = PageSet::new(130);
        for p in [0, 63, 64, 129] {
            a.insert(p);
        }
        let b = PageSet::from_bytes(130, &a.to_bytes()).unwrap();
        assert_eq!(b, a);
        assert_eq!(b.count(), 4);
        assert!(
            PageSet::from_bytes(131 + 64, &a.to_bytes()).is_none(),
            "wrong size"
        );
        let mut bytes = a.to_bytes();
        bytes[23] |= 0x80; // page 191: past the end
        assert!(PageSet::from_bytes(130, &bytes).is_none());
    }
    use proptest::prelude::*;

    #[test]
    fn full_has_exactly_len_pages() {
        for len in [0, 1, 63, 64, 65, 200] {
            let s = PageSet::full(len);
            assert_eq!(s.count(), len);
            assert_eq!(s.iter().count(), len);
            assert!(!s.contains(len));
        }
    }

    #[test]
    fn insert_remove_and_bounds() {
        let mut s = PageSet::new(100);
        assert!(s.insert(99));
        assert!(!s.insert(99), "twice");
        assert!(!s.insert(100), "outside the region");
        assert_eq!(s.count(), 1);
        assert!(s.remove(99));
        assert!(!s.remove(99));
        assert!(s.is_empty());
    }

    #[test]
    fn runs_are_cut_at_gaps_and_at_the_limit() {
        let mut s = PageSet::new(300);
        for p in (0..10).chain(64..200).chain([250, 251, 299]) {
            s.insert(p);
        }
        let runs: Vec<_> = s.runs(64).collect();
        assert_eq!(
            runs,
            vec![0..10, 64..128, 128..192, 192..200, 250..252, 299..300]
        );
    }

    #[test]
    fn zero_pages() {
        let mut p = vec![0u8; PAGE + 3];
        assert!(is_zero(&p[1..PAGE + 1]));
        p[PAGE] = 1;
        assert!(!is_zero(&p[1..PAGE + 1]));
        assert!(is_zero(&p[..PAGE]));
    }

    proptest! {
        #[test]
        fn runs_cover_exactly_the_set(pages in proptest::collection::btree_set(0usize..500, 0..200),
                                      max in 1usize..40) {
            let mut s = PageSet::new(500);
            for &p in &pages { s.insert(p); }
            prop_assert_eq!(s.count(), pages.len());
            let mut covered = Vec::new();
            let mut last_end = 0;
            for r in s.runs(max) {
                prop_assert!(r.start < r.end && r.end - r.start <= max);
                prop_assert!(r.start >= last_end, "ascending, not overlapping");
                last_end = r.end;
                covered.extend(r);
            }
            prop_assert_eq!(covered, pages.into_iter().collect::<Vec<_>>());
        }

        #[test]
        fn union_counts(a in proptest::collection::vec(0usize..130, 0..60),
                        b in proptest::collection::vec(0usize..130, 0..60)) {
            let (mut x, mut y) = (PageSet::new(130), PageSet::new(130));
            for p in &a { x.insert(*p); }
            for p in &b { y.insert(*p); }
            x.union_with(&y);
            let want: std::collections::BTreeSet<_> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(x.count(), want.len());
            prop_assert_eq!(x.iter().collect::<Vec<_>>(), want.into_iter().collect::<Vec<_>>());
        }
    }
}
