//! The `tcp` completion queue: a ready list fed by the queue pairs, plus an epoll set over their
//! response sockets and an eventfd, so one fd tells a sleeping or async waiter to come back.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use super::qp::QpShared;
use crate::backend::CqOps;
use crate::{Completion, Error, Result};

const EVENTFD_TOKEN: u64 = u64::MAX;

pub(crate) struct TcpCq {
    ready: Mutex<VecDeque<Completion>>,
    qps: RwLock<Vec<Weak<QpShared>>>,
    epoll: OwnedFd,
    event: OwnedFd,
    armed: AtomicBool,
}

impl TcpCq {
    pub(crate) fn new(depth: usize) -> Result<TcpCq> {
        // SAFETY: plain syscalls; the returned fds are checked and owned below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(Error::last_os("epoll_create1"));
        }
        // SAFETY: `ep` is a fresh fd we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        // SAFETY: as above.
        let ev = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if ev < 0 {
            return Err(Error::last_os("eventfd"));
        }
        // SAFETY: `ev` is a fresh fd we own.
        let event = unsafe { OwnedFd::from_raw_fd(ev) };
        let cq = TcpCq {
            ready: Mutex::new(VecDeque::with_capacity(depth)),
            qps: RwLock::new(Vec::new()),
            epoll,
            event,
            armed: AtomicBool::new(false),
        };
        cq.watch(cq.event.as_raw_fd(), EVENTFD_TOKEN)?;
        Ok(cq)
    }

    fn watch(&self, fd: RawFd, token: u64) -> Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: valid epoll fd and event struct; `fd` is open (owned by a live queue pair).
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 {
            return Err(Error::last_os("epoll_ctl"));
        }
        Ok(())
    }

    /// Routes a queue pair's responses through this CQ.
    pub(crate) fn attach(&self, qp: &Arc<QpShared>) -> Result<()> {
        let mut qps = self.qps.write().unwrap_or_else(|e| e.into_inner());
        qps.retain(|w| w.strong_count() > 0);
        qps.push(Arc::downgrade(qp));
        self.watch(qp.out_fd(), qp.out_fd() as u64)
    }

    /// Stops watching a failed queue pair's socket (it stays readable at EOF for ever).
    pub(crate) fn forget_fd(&self, fd: RawFd) {
        // SAFETY: removing an fd from our own epoll set; an fd not in the set just fails.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    pub(crate) fn push(&self, c: Completion) {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(c);
        if self.armed.swap(false, Ordering::AcqRel) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes from a stack buffer to our eventfd.
            unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }

    fn live_qps(&self) -> smallvec::SmallVec<[Arc<QpShared>; 8]> {
        self.qps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    fn drain_event(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading at most 8 bytes into a stack buffer from our non-blocking eventfd.
        unsafe { libc::read(self.event.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }
}

impl CqOps for TcpCq {
    fn poll(&self, out: &mut [Completion]) -> Result<usize> {
        {
            let qps = self.qps.read().unwrap_or_else(|e| e.into_inner());
            for w in qps.iter() {
                if let Some(q) = w.upgrade() {
                    if q.outstanding() > 0 {
                        q.progress();
                    }
                }
            }
        }
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        let n = out.len().min(ready.len());
        for (slot, c) in out.iter_mut().zip(ready.drain(..n)) {
            *slot = c;
        }
        Ok(n)
    }

    fn arm(&self) -> Result<()> {
        self.armed.store(true, Ordering::Release);
        Ok(())
    }

    fn block(&self, timeout: Option<Duration>) -> Result<()> {
        let limit = match (timeout, self.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let ms = limit.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        // SAFETY: valid epoll fd and a stack array of 16 events.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                ms,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(Error::os("epoll_wait", e));
        }
        let ready = &events[..n as usize];
        if ready.iter().any(|e| e.u64 == EVENTFD_TOKEN) {
            self.drain_event();
        }
        // A readable socket with nothing outstanding is a closing peer; notice it now.
        let fds: smallvec::SmallVec<[RawFd; 16]> = ready
            .iter()
            .filter(|e| e.u64 != EVENTFD_TOKEN)
            .map(|e| e.u64 as RawFd)
            .collect();
        if !fds.is_empty() {
            for q in self.live_qps() {
                if fds.contains(&q.out_fd()) {
                    q.check_idle();
                }
            }
        }
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn ack_event(&self) -> Result<()> {
        self.drain_event();
        for q in self.live_qps() {
            q.check_idle();
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Duration> {
        self.live_qps().iter().filter_map(|q| q.deadline_in()).min()
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}
