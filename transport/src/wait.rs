//! Waiting on file descriptors with deadlines, shared by the providers' listeners and queues.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Sleeps until `fd` has one of `events` or `timeout` passes; returns the events seen (0 on
/// timeout or interruption). `None` waits for ever, a zero timeout only looks.
pub(crate) fn wait_fd(fd: RawFd, events: i16, timeout: Option<Duration>) -> std::io::Result<i16> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack.
    let rc = unsafe { libc::poll(&mut p, 1, poll_ms(timeout)) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(if rc == 0 { 0 } else { p.revents })
}

/// A deadline that may never come (`timeout: None`).
pub(crate) struct Deadline {
    at: Option<Instant>,
    timeout: Option<Duration>,
}

impl Deadline {
    pub(crate) fn after(timeout: Option<Duration>) -> Deadline {
        Deadline {
            at: timeout.map(|t| Instant::now() + t),
            timeout,
        }
    }

    /// Time left (`None`: unbounded), or `Error::Timeout` once it has passed.
    pub(crate) fn remaining(&self) -> Result<Option<Duration>> {
        match self.at {
            None => Ok(None),
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(Error::Timeout(self.timeout.unwrap_or_default()))
                } else {
                    Ok(Some(left))
                }
            }
        }
    }
}

/// Sleeps until one of `fds` is readable (or has an error) or `timeout` passes; returns each
/// descriptor's events in order (all zero on timeout or interruption).
pub(crate) fn wait_many(fds: &[RawFd], timeout: Option<Duration>) -> std::io::Result<Vec<i16>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of `p.len()` pollfds that outlives the call.
    let rc = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, poll_ms(timeout)) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
        p.iter_mut().for_each(|x| x.revents = 0);
    }
    Ok(p.iter().map(|x| x.revents).collect())
}

/// poll(2)'s timeout argument: -1 for ever, 0 to look, else milliseconds rounded up so a short
/// wait does not turn into a busy loop.
fn poll_ms(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        Some(t) if t.is_zero() => 0,
        Some(t) => t.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128) as i32,
    }
}
