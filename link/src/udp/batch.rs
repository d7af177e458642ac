//! Several datagrams to one destination in as few system calls as the host allows. On Linux a
//! run of equal-sized datagrams (the last may be shorter) goes as one UDP GSO send
//! (`UDP_SEGMENT`: the kernel cuts it into the datagrams, one trip down the stack for all), the
//! rest with one `sendmmsg`; elsewhere one `send`/`send_to` each. Nothing waits: a socket that
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

/// Most bytes in one GSO send (all its datagrams; the limit is an IP packet's).
#[cfg(target_os = "linux")]
const GSO_MAX_BYTES: usize = 65_000;
/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels).
#[cfg(target_os = "linux")]
const GSO_MAX_SEGMENTS: usize = 64;

/// Set once a GSO send failed for want of kernel support: sendmmsg from then on.
#[cfg(target_os = "linux")]
static GSO_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(target_os = "linux")]
thread_local! {
    /// Where a GSO run's datagrams are laid end to end.
    static GSO_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How many datagrams from the front go in one GSO send: all of one size (not empty), the
/// last possibly shorter, within the limits.
#[cfg(target_os = "linux")]
fn gso_run(datagrams: &[&[u8]]) -> usize {
    let size = datagrams.first().map_or(0, |d| d.len());
    if size == 0 {
        return 1;
    }
    let (mut n, mut total) = (1, size);
    while let Some(d) = datagrams.get(n) {
        if n == GSO_MAX_SEGMENTS
            || d.is_empty()
            || d.len() > size
            || total + d.len() > GSO_MAX_BYTES
        {
            break;
        }
        total += d.len();
        n += 1;
        if d.len() < size {
            break;
        }
    }
    n
}

/// One GSO send of `datagrams` (a [`gso_run`]).
#[cfg(target_os = "linux")]
fn send_gso(
    sock: &UdpSocket,
    to: Option<&socket2::SockAddr>,
    datagrams: &[&[u8]],
) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    let segment = u16::try_from(datagrams[0].len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    GSO_BUF.with_borrow_mut(|buf| {
        buf.clear();
        for d in datagrams {
            buf.extend_from_slice(d);
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        let mut control = [0u64; 4];
        debug_assert!(space <= size_of_val(&control));
        // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(a) = to {
            msg.msg_name = a.as_ptr().cast_mut().cast();
            msg.msg_namelen = a.len();
        }
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at `control`, which has room for one cmsg of a u16 (checked
        // above); CMSG_FIRSTHDR of a msghdr with that much control space is that buffer.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
        }
        // SAFETY: `msg` points at `iov` (at `buf`), `control` and the address, all alive for
        // the call; the kernel only reads them (MSG_DONTWAIT: never blocks).
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT as _) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    })
}

#[cfg(target_os = "linux")]
fn send_some(sock: &UdpSocket, to: Option<SocketAddr>, datagrams: &[&[u8]]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;

    if datagrams.len() == 1 {
        return send_one(sock, datagrams[0], to).map(|_| 1);
    }
    if !GSO_OFF.load(Ordering::Relaxed) {
        let run = gso_run(datagrams);
        if run >= 2 {
            let addr = to.map(socket2::SockAddr::from);
            match send_gso(sock, addr.as_ref(), &datagrams[..run]) {
                Ok(()) => return Ok(run),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                    ) =>
                {
                    GSO_OFF.store(true, Ordering::Relaxed);
                    tracing::info!(error = %e, "UDP GSO unavailable here; sending datagram by datagram (sendmmsg)");
                }
                Err(e) => return Err(e),
            }
        }
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
