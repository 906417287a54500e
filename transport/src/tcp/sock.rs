//! Raw socket calls for the data path: non-blocking attempts with explicit waits, so callers can
//! spin, sleep, or make other progress while a socket is not ready.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// One `recv` that never blocks. `Ok(0)` for a non-empty buffer means the peer closed.
///
/// # Safety
/// `buf..buf+len` must be valid for writes for the duration of the call.
pub(crate) unsafe fn recv_nb(fd: RawFd, buf: *mut u8, len: usize) -> io::Result<usize> {
    // SAFETY: the caller guarantees the buffer; MSG_DONTWAIT makes the call non-blocking.
    let n = unsafe { libc::recv(fd, buf.cast(), len, libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `sendmsg` of `iov` that never blocks and never raises SIGPIPE.
pub(crate) fn send_nb(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is valid; we only set the iovec array, which outlives the call and
    // whose entries the callers built from live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len().min(libc::UIO_MAXIOV as usize) as _;
    // SAFETY: msg points at valid iovecs (see above).
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub(crate) use crate::wait::wait_fd;

/// Skips `n` bytes of the iovec list after a partial send.
pub(crate) fn advance(iov: &mut [libc::iovec], mut n: usize) -> usize {
    let mut first = 0;
    while n > 0 && first < iov.len() {
        let l = iov[first].iov_len;
        if n >= l {
            n -= l;
            iov[first].iov_len = 0;
            first += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(n) }.cast();
            iov[first].iov_len -= n;
            n = 0;
        }
    }
    while first < iov.len() && iov[first].iov_len == 0 {
        first += 1;
    }
    first
}

/// Reads exactly `len` bytes into `buf` for a thread that owns the socket: spins until `spin`
/// after the last progress, then sleeps in poll(). `timeout` bounds the wait for the next byte,
/// from the last one (None: wait for ever, used between requests when an idle peer is
/// legitimate).
///
/// # Safety
/// `buf..buf+len` must be valid for writes for the duration of the call.
pub(crate) unsafe fn recv_exact(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    spin: Duration,
    timeout: Option<Duration>,
) -> io::Result<()> {
    let mut got = 0;
    let mut last = Instant::now();
    while got < len {
        // SAFETY: got < len, so the tail is inside the caller's buffer.
        match unsafe { recv_nb(fd, buf.add(got), len - got) } {
            // EOF before any byte is a clean close; EOF inside the frame is a truncation.
            Ok(0) if got == 0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated frame",
                ))
            }
            Ok(n) => {
                got += n;
                last = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let now = Instant::now();
                // Measured from the last byte, not from the start: a peer still sending (a
                // large payload over a slow or lossy link) is not a dead one.
                let left = match timeout {
                    Some(t) => {
                        let left = t.saturating_sub(now - last);
                        if left.is_zero() {
                            return Err(io::ErrorKind::TimedOut.into());
                        }
                        Some(left)
                    }
                    None => None,
                };
                if now - last < spin {
                    std::hint::spin_loop();
                    continue;
                }
                let ev = wait_fd(fd, libc::POLLIN, left)?;
                if ev & (libc::POLLERR | libc::POLLNVAL) != 0 {
                    return Err(io::ErrorKind::ConnectionReset.into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends every byte of `iov` for a thread that owns the socket's sending side, waiting at most
/// `timeout` for the peer to make room.
pub(crate) fn send_all(fd: RawFd, iov: &mut [libc::iovec], timeout: Duration) -> io::Result<()> {
    let mut first = advance(iov, 0);
    while first < iov.len() {
        match send_nb(fd, &iov[first..]) {
            Ok(n) => first += advance(&mut iov[first..], n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if wait_fd(fd, libc::POLLOUT, Some(timeout))? == 0 {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(crate) fn iovec(ptr: *const u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: ptr as *mut libc::c_void,
        iov_len: len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_walks_partial_iovecs() {
        let a = [1u8; 4];
        let b = [2u8; 6];
        let mut iov = [iovec(a.as_ptr(), 4), iovec(b.as_ptr(), 6)];
        assert_eq!(advance(&mut iov, 2), 0);
        assert_eq!(iov[0].iov_len, 2);
        assert_eq!(advance(&mut iov, 5), 1);
        assert_eq!(iov[1].iov_len, 3);
        assert_eq!(advance(&mut iov[1..], 3), 1);
    }

    fn recv_from(writes: Vec<(usize, Duration)>, len: usize, timeout: Duration) -> io::Result<()> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let w = std::thread::spawn(move || {
            for (n, pause) in writes {
                std::thread::sleep(pause);
                let _ = b.write_all(&vec![7u8; n]);
            }
            // Held open until the reader is done.
            std::thread::sleep(Duration::from_millis(600));
        });
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` holds `len` bytes and outlives the call.
        let r = unsafe {
            recv_exact(
                a.as_raw_fd(),
                buf.as_mut_ptr(),
                len,
                Duration::ZERO,
                Some(timeout),
            )
        };
        w.join().unwrap();
        r
    }

    #[test]
    fn recv_exact_times_out_on_a_stall_not_on_a_slow_sender() {
        let step = Duration::from_millis(40);
        // 12 pieces 40 ms apart: 480 ms in all, three times the 150 ms timeout.
        let trickle = vec![(10, step); 12];
        assert!(recv_from(trickle, 120, Duration::from_millis(150)).is_ok());
        // Half the frame, then nothing for 400 ms.
        let stall = vec![(60, Duration::ZERO), (60, Duration::from_millis(400))];
        let e = recv_from(stall, 120, Duration::from_millis(150)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
