//! Sequential read-ahead for a [`StoreChannel`](super::StoreChannel): once reads continue one
//! another, the channel READs the next windows from the donors before they are asked for, into
//! a buffer of its own, and serves the reads that fall inside a window from it.
//!
//! Swap-in is one faulting thread waiting for each readahead cluster (32 KiB) in turn, so every
//! cluster costs a whole round trip to a donor; a window that is already here costs a copy.
//! A window is only served while no write touched its range since its READ was posted: every
//! write bumps the generation of the blocks it covers when it starts and again when it ends
//! (`Store::bump_generations`), and a window remembers their sum when its READ went out.
//! Generations only grow, so an unchanged sum means no write started or ended in between; a
//! write still going on then may be seen or not, as for any read overlapping a write.

use rmem_transport::Buffer;

use super::IoReq;

/// Bytes of one window.
pub(super) const WINDOW: usize = 256 << 10;
/// The largest read that counts in a stream and is looked up in the windows: swap-in's
/// clusters are 32 KiB; a reader of larger blocks has enough in flight without read-ahead,
/// which would only move bytes twice.
pub(super) const STREAM_READ: usize = WINDOW / 4;
/// Windows per channel: one being read while the reads consume another.
pub(super) const WINDOWS: usize = 2;
/// Reads in a row, each starting where the previous ended (or up to [`GAP`] after), before
/// read-ahead starts.
const STREAK: u32 = 2;
/// How far past the previous read's end a read may start and still continue the stream.
const GAP: u64 = 64 << 10;

/// Where a window stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Holds nothing.
    Empty,
    /// Its READ is in flight in the channel's slot.
    Fetching { slot: usize },
    /// Holds `[off, off + len)` as of generation sum `gen`.
    Ready,
}

#[derive(Debug)]
pub(super) struct Window {
    pub(super) state: State,
    pub(super) off: u64,
    pub(super) len: usize,
    pub(super) gen: u64,
    /// Reads that arrived while the window was being fetched, served when it lands.
    pub(super) waiters: Vec<IoReq>,
}

impl Window {
    fn covers(&self, off: u64, len: usize) -> bool {
        self.state != State::Empty && off >= self.off && off + len as u64 <= self.end()
    }

    pub(super) fn end(&self) -> u64 {
        self.off + self.len as u64
    }

    /// Where the window's data starts in the read-ahead buffer.
    pub(super) fn at(index: usize) -> usize {
        index * WINDOW
    }
}

/// A channel's read-ahead: the windows, the buffer behind them, and the stream detector.
pub(super) struct Readahead {
    pub(super) buf: Buffer,
    pub(super) windows: Vec<Window>,
    /// Where the last read ended, and how many reads in a row continued the one before.
    last_end: u64,
    streak: u32,
}

/// What to do with a read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lookup {
    /// Window `index` holds it.
    Hit(usize),
    /// Window `index` is being fetched and will hold it.
    Wait(usize),
    Miss,
}

impl Readahead {
    /// Windows on `buf`, each with room for `depth` waiting reads.
    pub(super) fn new(buf: Buffer, depth: usize) -> Readahead {
        Readahead {
            buf,
            windows: (0..WINDOWS)
                .map(|_| Window {
                    state: State::Empty,
                    off: 0,
                    len: 0,
                    gen: 0,
                    waiters: Vec::with_capacity(depth),
                })
                .collect(),
            last_end: u64::MAX - GAP,
            streak: 0,
        }
    }

    /// Bytes the buffer must hold.
    pub(super) fn buffer_len() -> usize {
        WINDOW * WINDOWS
    }

    /// Records a read of `[off, off + len)` and says where it can be served from.
    pub(super) fn lookup(&mut self, off: u64, len: usize) -> Lookup {
        // Forward by at most a gap: swap readahead skips slots no longer in use.
        let continues = off >= self.last_end && off - self.last_end <= GAP;
        self.streak = if continues {
            self.streak.saturating_add(1)
        } else {
            0
        };
        self.last_end = off + len as u64;
        self.find(off, len)
    }

    /// Where a read of `[off, off + len)` can be served from, without counting it in a stream.
    pub(super) fn find(&self, off: u64, len: usize) -> Lookup {
        match self.windows.iter().position(|w| w.covers(off, len)) {
            Some(i) => match self.windows[i].state {
                State::Ready => Lookup::Hit(i),
                _ => Lookup::Wait(i),
            },
            None => Lookup::Miss,
        }
    }

    /// The next window to fetch after a read ending at `end`, as (window index, device
    /// offset): in a stream, the range right after the furthest window that is still of use
    /// to it (or right after the read), in a window of no use to it: empty, passed, or left
    /// behind by an earlier stream elsewhere. None outside a stream, or with every window busy
    /// or still ahead of the reads.
    pub(super) fn next_fetch(&self, end: u64) -> Option<(usize, u64)> {
        if self.streak < STREAK {
            return None;
        }
        let horizon = end.saturating_add((WINDOWS * WINDOW) as u64);
        let useful = |w: &Window| w.state != State::Empty && w.end() > end && w.off < horizon;
        let ahead = self
            .windows
            .iter()
            .filter(|w| useful(w))
            .map(Window::end)
            .max()
            .unwrap_or(end);
        let free = self.windows.iter().position(|w| {
            w.waiters.is_empty()
                && match w.state {
                    State::Empty => true,
                    State::Ready => !useful(w),
                    State::Fetching { .. } => false,
                }
        })?;
        Some((free, ahead))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmem_transport::HugePages;

    fn window(state: State, off: u64) -> Window {
        Window {
            state,
            off,
            len: WINDOW,
            gen: 0,
            waiters: Vec::new(),
        }
    }

    fn ra() -> Readahead {
        Readahead::new(
            Buffer::alloc(Readahead::buffer_len(), HugePages::Never).unwrap(),
            4,
        )
    }

    #[test]
    fn only_a_stream_of_reads_fetches_ahead() {
        let mut r = ra();
        assert_eq!(r.lookup(0, 4096), Lookup::Miss);
        assert_eq!(r.next_fetch(4096), None, "one read is no stream");
        assert_eq!(r.lookup(4096, 4096), Lookup::Miss);
        assert_eq!(r.next_fetch(8192), None);
        assert_eq!(r.lookup(8192, 4096), Lookup::Miss);
        assert_eq!(r.next_fetch(12288), Some((0, 12288)));
        // A jump elsewhere ends the stream.
        assert_eq!(r.lookup(1 << 30, 4096), Lookup::Miss);
        assert_eq!(r.next_fetch((1 << 30) + 4096), None);
    }

    #[test]
    fn windows_follow_one_another_and_are_reused_once_passed() {
        let mut r = ra();
        for i in 0..3 {
            r.lookup(i * 4096, 4096);
        }
        let (w0, at0) = r.next_fetch(12288).unwrap();
        r.windows[w0] = window(State::Fetching { slot: 7 }, at0);
        let (w1, at1) = r.next_fetch(12288).unwrap();
        assert_ne!(w0, w1);
        assert_eq!(
            at1,
            at0 + WINDOW as u64,
            "the second window follows the first"
        );
        r.windows[w1] = window(State::Fetching { slot: 8 }, at1);
        assert_eq!(r.next_fetch(12288), None, "both windows busy");
        assert_eq!(r.lookup(12288, 4096), Lookup::Wait(w0));
        r.windows[w0].state = State::Ready;
        assert_eq!(r.lookup(16384, 4096), Lookup::Hit(w0));
        // A read straddling two windows is served by neither.
        let edge = at1 - 2048;
        assert_eq!(r.lookup(edge, 4096), Lookup::Miss);
        // Once the reads are past window 0, it is fetched again, after window 1.
        r.windows[w1].state = State::Ready;
        assert_eq!(r.lookup(at1 + 2048, 4096), Lookup::Hit(w1));
        assert_eq!(r.lookup(at1 + 6144, 4096), Lookup::Hit(w1));
        assert_eq!(r.next_fetch(at1 + 10240), Some((w0, at1 + WINDOW as u64)));
    }

    #[test]
    fn windows_left_by_a_stream_elsewhere_are_reused() {
        let mut r = ra();
        for i in 0..3 {
            r.lookup((64 << 20) + i * 4096, 4096);
        }
        let (w, off) = r.next_fetch((64 << 20) + 12288).unwrap();
        r.windows[w] = window(State::Ready, off);
        // A new stream far below: the window ahead of the old one is of no use to it.
        for i in 0..3 {
            r.lookup(i * 4096, 4096);
        }
        let mut fetched = vec![];
        while let Some((w, off)) = r.next_fetch(12288) {
            fetched.push(off);
            r.windows[w] = window(State::Fetching { slot: w }, off);
        }
        assert_eq!(
            fetched,
            vec![12288, 12288 + WINDOW as u64],
            "both windows serve the new stream"
        );
    }
}
