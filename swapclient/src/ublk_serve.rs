//! What a ublk request asks for, carried out with the store's blocking operations: shared by
//! the queue that serves one request at a time and by the store channel's queue (for the
//! requests it does not send to the donors, such as discards).

use libublk::sys;

use crate::blockio::{self, IoCounters};
use crate::store::Store;

/// Serves the request `iod` with its tag's buffer `buf`; returns what the driver expects:
/// bytes done (read and write), 0 (flush, discard), or a negative errno.
pub fn serve_request(
    store: &Store,
    io: &IoCounters,
    iod: &sys::ublksrv_io_desc,
    buf: &mut [u8],
    scratch: &mut [u8],
) -> i32 {
    let op = iod.op_flags & 0xff;
    let off = iod.start_sector.saturating_mul(512);
    let len = iod.nr_sectors as usize * 512;
    let data = |buf: &mut [u8]| -> Option<usize> { (len <= buf.len()).then_some(len) };
    let r = match op {
        sys::UBLK_IO_OP_READ => match data(buf) {
            Some(n) => blockio::read(store, io, off, &mut buf[..n]).map(|()| n as i32),
            None => Err(libc::EINVAL),
        },
        sys::UBLK_IO_OP_WRITE => match data(buf) {
            Some(n) => blockio::write(store, io, off, &buf[..n]).map(|()| n as i32),
            None => Err(libc::EINVAL),
        },
        // Every write reached the donors' memory before it completed.
        sys::UBLK_IO_OP_FLUSH => Ok(0),
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
            blockio::zero(store, io, off, len as u64, scratch).map(|()| 0)
        }
        _ => Err(libc::EOPNOTSUPP),
    };
    r.unwrap_or_else(|errno| -errno)
}
