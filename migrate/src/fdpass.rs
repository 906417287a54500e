//! A descriptor passed over a unix socket (SCM_RIGHTS): the preload library inside QEMU sends
//! its userfaultfd, the agent receives it. One file, built into both (`#[path]`): the preload
//! library must not link the agent's crate.
// Each side uses one half.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Sends `data` with one descriptor attached.
pub fn send_with_fd(conn: &UnixStream, data: &[u8], fd: i32) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one int of control data, aligned as cmsghdr wants.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; zero is a valid empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as _;
    // SAFETY: msg_control points at `cbuf`, large enough for one cmsghdr and an int (CMSG_SPACE
    // above); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
    let sent = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        libc::sendmsg(conn.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One message and the descriptor attached to it, if any.
pub fn recv_with_fd(s: &UnixStream) -> std::io::Result<(String, Option<OwnedFd>)> {
    let mut data = [0u8; 256];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; zero is a valid empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: the header points at `data` and `cbuf`, both alive and writable for the call.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fd = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of `cbuf`; CMSG_FIRSTHDR/NXTHDR walk
    // inside them, and an SCM_RIGHTS message carries ints.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((
        String::from_utf8_lossy(&data[..n as usize]).into_owned(),
        fd,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_descriptor_crosses_with_its_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut pr, mut pw) = UnixStream::pair().unwrap();
        send_with_fd(&a, b"ok 1 2 3\n", pw.as_raw_fd()).unwrap();
        let (line, fd) = recv_with_fd(&b).unwrap();
        assert_eq!(line, "ok 1 2 3\n");
        // The received descriptor is the same socket: what is written to it arrives.
        let mut got = UnixStream::from(fd.expect("a descriptor"));
        got.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        pr.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        pw.write_all(b"y").unwrap();
    }
}
