//! The donated memory, carved into slabs: who holds which, and which are free.

use rmem_transport::{Buffer, HugePages};

use crate::protocol::ErrorCode;

/// Slab bookkeeping. Memory is zeroed when a slab comes back, before it can be lent again.
pub struct Pool {
    buf: Buffer,
    slab_size: usize,
    free: Vec<u32>,
    owner: Vec<Option<u64>>,
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
        self.free.push(slab);
    }
}
