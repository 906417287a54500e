//! The donated memory, carved into slabs: who holds which, and which are free.

use rmem_transport::{Buffer, HugePages};

use crate::protocol::ErrorCode;

/// Slab bookkeeping. Memory is zeroed when a slab comes back, before it can be lent again.
///
/// Reclaim retires slabs: a retired slab's pages go back to the host (`MADV_DONTNEED`) and it
/// is not lent until the pool grows again. A lent slab can only be retired once it comes back,
/// so it is marked `doomed` until then.
pub struct Pool {
    buf: Buffer,
    slab_size: usize,
    free: Vec<u32>,
    owner: Vec<Option<u64>>,
    retired: Vec<u32>,
    doomed: Vec<bool>,
}

impl Pool {
    pub fn new(size: usize, slab_size: usize, huge: HugePages) -> rmem_transport::Result<Pool> {
        let count = size / slab_size;
        let buf = Buffer::alloc(count * slab_size, huge)?;
        Ok(Pool {
            buf,
            slab_size,
            // Lowest ids first: pop from the end.
            free: (0..count as u32).rev().collect(),
            owner: vec![None; count],
            retired: Vec::new(),
            doomed: vec![false; count],
        })
    }

    pub fn buffer(&self) -> &Buffer {
        &self.buf
    }
    pub fn slab_size(&self) -> usize {
        self.slab_size
    }
    pub fn total(&self) -> u32 {
        self.owner.len() as u32
    }
    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }
    pub fn retired_count(&self) -> u32 {
        self.retired.len() as u32
    }
    pub fn doomed_count(&self) -> u32 {
        self.doomed.iter().filter(|d| **d).count() as u32
    }
    pub fn is_doomed(&self, slab: u32) -> bool {
        self.doomed.get(slab as usize).copied().unwrap_or(false)
    }

    /// Retires up to `n` free slabs (highest ids first); returns how many.
    pub fn retire_free(&mut self, n: u32) -> u32 {
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        let mut done = 0;
        while done < n {
            // Highest id sits first after the sort; lowest ids stay last, to be lent first.
            if self.free.is_empty() {
                break;
            }
            let slab = self.free.remove(0);
            // Free slabs are already zero; dropping the pages is what gives memory back.
            if let Err(e) = self.buf.zero(self.offset(slab), self.slab_size) {
                tracing::warn!(slab, error = %e, "could not release a retired slab's pages");
            }
            self.retired.push(slab);
            done += 1;
        }
        done
    }

    /// Marks a lent slab to be retired when it comes back; false when it is not lent.
    pub fn doom(&mut self, slab: u32) -> bool {
        if self.owner(slab).is_none() {
            return false;
        }
        self.doomed[slab as usize] = true;
        true
    }

    /// Lends up to `n` retired slabs again (un-dooming pending reclaims first); returns how many.
    pub fn grow(&mut self, n: u32) -> u32 {
        let mut done = 0;
        for d in self.doomed.iter_mut().filter(|d| **d) {
            if done == n {
                return done;
            }
            *d = false;
            done += 1;
        }
        while done < n {
            let Some(slab) = self.retired.pop() else {
                break;
            };
            self.free.push(slab);
            done += 1;
        }
        // Lowest ids are lent first.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        done
    }

    pub fn offset(&self, slab: u32) -> usize {
        slab as usize * self.slab_size
    }
    pub fn owner(&self, slab: u32) -> Option<u64> {
        self.owner.get(slab as usize).copied().flatten()
    }

    /// Takes `n` slabs for `session`, all or none.
    pub fn take(&mut self, session: u64, n: u32) -> Result<Vec<u32>, (ErrorCode, String)> {
        if n as usize > self.free.len() {
            return Err((
                ErrorCode::PoolExhausted,
                format!("{n} slabs asked, {} free", self.free.len()),
            ));
        }
        let ids: Vec<u32> = (0..n).filter_map(|_| self.free.pop()).collect();
        for &id in &ids {
            self.owner[id as usize] = Some(session);
        }
        Ok(ids)
    }

    /// Zeroes a slab whose registrations are gone and makes it free again.
    pub fn give_back(&mut self, slab: u32) {
        if self.owner.get(slab as usize).copied().flatten().is_none() {
            return;
        }
        if let Err(e) = self.buf.zero(self.offset(slab), self.slab_size) {
            tracing::error!(slab, error = %e, "could not zero a slab; keeping it out of the pool");
            return;
        }
        self.owner[slab as usize] = None;
        if std::mem::take(&mut self.doomed[slab as usize]) {
            self.retired.push(slab);
        } else {
            self.free.push(slab);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retiring_and_growing_keep_every_slab_accounted_for() {
        let mut p = Pool::new(8 << 12, 1 << 12, HugePages::Never).unwrap();
        let lent = p.take(7, 3).unwrap();
        assert_eq!(lent, vec![0, 1, 2], "lowest ids are lent first");
        assert_eq!(p.retire_free(2), 2);
        assert_eq!(p.free_count(), 3);
        assert!(p.doom(lent[0]));
        assert!(!p.doom(6), "a free slab cannot be doomed");
        p.buffer().write_at(0, b"secret").unwrap();
        p.give_back(lent[0]);
        assert_eq!(
            p.retired_count(),
            3,
            "a doomed slab retires when it comes back"
        );
        assert_eq!(p.free_count(), 3);
        p.give_back(lent[1]);
        assert_eq!(p.free_count(), 4, "an undoomed slab is free again");
        assert!(p.doom(lent[2]));
        assert_eq!(p.grow(2), 2, "growing un-dooms first, then un-retires");
        assert!(!p.is_doomed(lent[2]));
        assert_eq!(p.retired_count(), 2);
        assert_eq!(p.grow(10), 2);
        assert_eq!(p.free_count() + 1, p.total());
        // Whatever was lent and retired comes back zeroed when lent again.
        let again = p.take(9, p.free_count()).unwrap();
        assert!(again.contains(&0));
        let mut b = [1u8; 6];
        p.buffer().read_at(0, &mut b).unwrap();
        assert_eq!(b, [0; 6]);
    }
}
