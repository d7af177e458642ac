//! Several datagrams to one destination in as few system calls as the host allows: one
//! `sendmmsg` on Linux, one `send`/`send_to` each elsewhere. Nothing waits: a socket that
//! cannot take more now stops the batch, and the caller counts the rest as dropped.

use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;

/// Most datagrams in one batch.
pub(super) const MAX: usize = 64;

/// Sends `datagrams` on `sock` (connected when `to` is `None`); how many went, and the error
/// that stopped the batch, if one did.
pub(super) fn send(
    sock: &UdpSocket,
    to: Option<SocketAddr>,
    datagrams: &[&[u8]],
) -> (usize, Option<io::Error>) {
    let mut sent = 0;
    while sent < datagrams.len() {
        match send_some(sock, to, &datagrams[sent..]) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) => return (sent, Some(e)),
        }
    }
    (sent, None)
}

/// One datagram, straight to the socket (tokio's `try_send` would report a fresh socket, whose
/// writability the reactor has not seen yet, as busy).
pub(super) fn send_one(
    sock: &UdpSocket,
    payload: &[u8],
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    let s = socket2::SockRef::from(sock);
    match to {
        Some(to) => s.send_to(payload, &to.into()),
        None => s.send(payload),
    }
}

#[cfg(not(target_os = "linux"))]
fn send_some(sock: &UdpSocket, to: Option<SocketAddr>, datagrams: &[&[u8]]) -> io::Result<usize> {
    match datagrams.first() {
        Some(d) => send_one(sock, d, to).map(|_| 1),
        None => Ok(0),
    }
}

#[cfg(target_os = "linux")]
fn send_some(sock: &UdpSocket, to: Option<SocketAddr>, datagrams: &[&[u8]]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;

    if datagrams.len() == 1 {
        return send_one(sock, datagrams[0], to).map(|_| 1);
    }
    let n = datagrams.len().min(MAX);
    let addr = to.map(socket2::SockAddr::from);
    let mut iovs: [libc::iovec; MAX] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX];
    // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid (empty) value.
    let mut msgs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: datagrams[i].as_ptr().cast_mut().cast(),
            iov_len: datagrams[i].len(),
        };
        let h = &mut msgs[i].msg_hdr;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        if let Some(a) = &addr {
            h.msg_name = a.as_ptr().cast_mut().cast();
            h.msg_namelen = a.len();
        }
    }
    // SAFETY: `msgs[..n]` point at `iovs[..n]`, which point at the caller's datagrams, and at
    // `addr`; all outlive the call, and the kernel only reads them (MSG_DONTWAIT: never blocks).
    let r = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT as _,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}
