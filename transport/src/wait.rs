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
    let ms = match timeout {
        None => -1,
        Some(t) if t.is_zero() => 0,
        // Round up so a short wait does not turn into a busy loop.
        Some(t) => t.as_millis().clamp(1, i32::MAX as u128) as i32,
    };
    // SAFETY: one valid pollfd on the stack.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
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
