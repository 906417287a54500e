//! What the kernel knows about a TCP connection, for the line that says why a peer is given up.
//!
//! A peer that stops answering can mean different faults: its window closed (it stopped
//! reading), bytes unacknowledged with retransmissions backing off (the link), or nothing left
//! queued here (this side stopped sending). The kernel's counters tell them apart at no cost
//! until something has gone wrong.

use std::fmt;
use std::os::fd::RawFd;

/// A snapshot of one TCP socket's state (`TCP_INFO`, `SIOCOUTQ`, `SIOCINQ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkState {
    /// Bytes sent and not acknowledged, plus bytes not sent yet.
    pub queued: u32,
    /// Of those, bytes not sent yet.
    pub not_sent: u32,
    /// Bytes received and not read yet.
    pub unread: u32,
    /// The peer's last advertised window, in bytes (0: it stopped reading).
    pub peer_window: u32,
    /// Retransmissions of the oldest unacknowledged segment so far.
    pub retransmits: u8,
    /// Retransmissions over the connection's life.
    pub total_retrans: u32,
    pub rto_ms: u32,
    pub since_data_sent_ms: u32,
    pub since_data_recv_ms: u32,
    pub since_ack_recv_ms: u32,
}

impl LinkState {
    /// None when the socket is not TCP (or is gone).
    pub(crate) fn of(fd: RawFd) -> Option<LinkState> {
        // SAFETY: `tcp_info` is plain data, valid when zeroed.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` is writable for `len` bytes; the kernel writes at most `len` (an older
        // kernel fewer, leaving the rest zero).
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return None;
        }
        Some(LinkState {
            queued: ioctl_count(fd, libc::TIOCOUTQ),
            not_sent: info.tcpi_notsent_bytes,
            unread: ioctl_count(fd, libc::FIONREAD),
            peer_window: info.tcpi_snd_wnd,
            retransmits: info.tcpi_retransmits,
            total_retrans: info.tcpi_total_retrans,
            rto_ms: info.tcpi_rto / 1000,
            since_data_sent_ms: info.tcpi_last_data_sent,
            since_data_recv_ms: info.tcpi_last_data_recv,
            since_ack_recv_ms: info.tcpi_last_ack_recv,
        })
    }

    /// For a log field: the state, or a word saying there is none.
    pub(crate) fn describe(fd: RawFd) -> String {
        LinkState::of(fd).map_or_else(|| "not a TCP socket".to_owned(), |s| s.to_string())
    }
}

/// `SIOCOUTQ` / `SIOCINQ` (the same numbers as `TIOCOUTQ` / `FIONREAD` on Linux); 0 on error.
fn ioctl_count(fd: RawFd, req: libc::c_ulong) -> u32 {
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int.
    let r = unsafe { libc::ioctl(fd, req as _, &mut n) };
    if r == 0 {
        n.max(0) as u32
    } else {
        0
    }
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "queued {} B ({} not sent), unread {} B, peer window {} B, retransmits {} ({} in all), \
             rto {} ms, last data sent {} ms ago, received {} ms ago, last ack {} ms ago",
            self.queued,
            self.not_sent,
            self.unread,
            self.peer_window,
            self.retransmits,
            self.total_retrans,
            self.rto_ms,
            self.since_data_sent_ms,
            self.since_data_recv_ms,
            self.since_ack_recv_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn a_peer_that_stops_reading_shows_as_a_closed_window_and_unread_bytes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        rx.set_nonblocking(true).unwrap();
        tx.set_nonblocking(true).unwrap();
        // Fill both sides' buffers: the receiver never reads.
        let chunk = vec![5u8; 64 << 10];
        let mut sent = 0usize;
        for _ in 0..10_000 {
            match tx.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Let the window updates arrive, then try once more.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    if tx.write(&chunk).is_err() {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        // The kernel pushes what is queued until the receiver's buffer is full.
        let mut s = LinkState::of(tx.as_raw_fd()).expect("a TCP socket");
        for _ in 0..250 {
            if s.peer_window == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            s = LinkState::of(tx.as_raw_fd()).unwrap();
        }
        let r = LinkState::of(rx.as_raw_fd()).expect("a TCP socket");
        assert!(s.queued > 0, "{s}");
        assert_eq!(s.peer_window, 0, "{s}");
        assert!(r.unread > 0, "{r}");
        assert!(
            (s.queued as usize + r.unread as usize) <= sent,
            "{s} / {r} / {sent}"
        );
        assert!(s.to_string().contains("peer window 0 B"));
    }

    #[test]
    fn a_socket_that_is_not_tcp_has_no_state() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(LinkState::of(a.as_raw_fd()), None);
        assert_eq!(LinkState::describe(a.as_raw_fd()), "not a TCP socket");
    }
}
