//! The SCTP socket calls the proxy makes, as thin wrappers over `libc`.
//!
//! Everything here works on one-to-one ("TCP-style") sockets: `SOCK_STREAM` + `IPPROTO_SCTP`,
//! one association per descriptor, which is what dockerd binds and what docker-proxy uses.
//! `libc` carries the structs and constants of `<linux/sctp.h>` (`sctp_initmsg`, `sctp_sndinfo`,
//! `sctp_rcvinfo`, `SCTP_*`); their sizes are asserted below against that header so that a
//! mismatch fails the build instead of corrupting ancillary data.
//!
//! Each message's metadata travels with the RFC 6458 API: `SCTP_RECVRCVINFO` on makes every
//! `recvmsg` carry an `SCTP_RCVINFO` control message (stream id, PPID, flags), and each `sendmsg`
//! carries an `SCTP_SNDINFO` one. (The older `SCTP_SNDRCV` / `sctp_sndrcvinfo` pair needs the
//! `sctp_data_io_event` subscription and carries the same fields plus ones that mean nothing to
//! the other association: TSNs and the local context.)

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

// linux/sctp.h: struct sctp_initmsg { __u16 x4 }, struct sctp_sndinfo { __u16 sid, flags;
// __u32 ppid, context; sctp_assoc_t assoc_id }, struct sctp_rcvinfo { __u16 sid, ssn, flags;
// (2 bytes padding) __u32 ppid, tsn, cumtsn, context; sctp_assoc_t assoc_id }.
const _: () = assert!(size_of::<libc::sctp_initmsg>() == 8);
const _: () = assert!(size_of::<libc::sctp_sndinfo>() == 16);
const _: () = assert!(size_of::<libc::sctp_rcvinfo>() == 28);

/// `struct sctp_status` of linux/sctp.h (not in `libc`): the association's state, with the
/// numbers of inbound and outbound streams it negotiated. Its last member, `struct
/// sctp_paddrinfo` (packed, aligned 4: assoc id, a `sockaddr_storage`, five 32-bit fields,
/// 152 bytes), is kept as bytes: nothing here reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SctpStatus {
    sstat_assoc_id: i32,
    sstat_state: i32,
    sstat_rwnd: u32,
    sstat_unackdata: u16,
    sstat_penddata: u16,
    sstat_instrms: u16,
    sstat_outstrms: u16,
    sstat_fragmentation_point: u32,
    sstat_primary: [u8; 152],
}
const _: () = assert!(size_of::<SctpStatus>() == 176);

/// `SOL_SCTP` (linux/socket.h): the socket option and control message level, `IPPROTO_SCTP`.
const SOL_SCTP: libc::c_int = libc::IPPROTO_SCTP;

/// The most streams an association can have (the stream id is 16 bits; the kernel caps
/// `sinit_num_ostreams` and `sinit_max_instreams` at this, `SCTP_MAX_STREAM`).
pub const MAX_STREAMS: u16 = u16::MAX;

/// The protocol number for socket(2).
pub fn protocol() -> Protocol {
    Protocol::from(libc::IPPROTO_SCTP)
}

/// A new non-blocking, close-on-exec one-to-one SCTP socket.
pub fn socket(domain: Domain) -> io::Result<Socket> {
    Socket::new(domain, Type::STREAM.nonblocking(), Some(protocol()))
}

/// Whether the kernel can make SCTP sockets at all (the `sctp` module may be missing, as on
/// kernels built without it).
pub fn available() -> io::Result<()> {
    Socket::new(Domain::IPV4, Type::STREAM, Some(protocol())).map(drop)
}

/// True for the errors socket(2) gives when the kernel has no SCTP.
pub fn is_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPROTONOSUPPORT | libc::ESOCKTNOSUPPORT | libc::EAFNOSUPPORT)
    )
}

fn setsockopt<T>(fd: BorrowedFd<'_>, name: libc::c_int, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>()).map_err(io::Error::other)?;
    // SAFETY: `value` points to a live `T` of `len` bytes, which the kernel only reads; `fd` is an
    // open descriptor for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_SCTP,
            name,
            std::ptr::from_ref(value).cast(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SCTP_INITMSG`: the streams asked for in the INIT of associations this socket makes or
/// accepts (`outbound`) and the most it takes from the peer (`max_inbound`); the peer's INIT
/// decides the final numbers (the smaller of each pair).
pub fn set_streams(fd: BorrowedFd<'_>, outbound: u16, max_inbound: u16) -> io::Result<()> {
    let init = libc::sctp_initmsg {
        sinit_num_ostreams: outbound,
        sinit_max_instreams: max_inbound,
        sinit_max_attempts: 0,
        sinit_max_init_timeo: 0,
    };
    setsockopt(fd, libc::SCTP_INITMSG, &init)
}

/// The association's negotiated stream counts, `(inbound, outbound)` (`SCTP_STATUS`).
pub fn stream_counts(fd: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    // SAFETY: SctpStatus is plain integers and bytes: all-zero is a valid value.
    let mut st: SctpStatus = unsafe { std::mem::zeroed() };
    let mut len = size_of::<SctpStatus>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `st` (the size of struct sctp_status,
    // asserted above) and sets `len`; `fd` is open.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_SCTP,
            libc::SCTP_STATUS,
            std::ptr::from_mut(&mut st).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.sstat_instrms, st.sstat_outstrms))
}

/// Turns on `SCTP_RCVINFO` with every received message, and `SCTP_NODELAY` (a relay adds no
/// delay of its own to small messages, as TCP_NODELAY does for TCP).
pub fn prepare_association(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    setsockopt(fd, libc::SCTP_RECVRCVINFO, &on)?;
    setsockopt(fd, libc::SCTP_NODELAY, &on)
}

/// The per-message metadata passed on: stream id, payload protocol identifier (opaque, in the
/// byte order it came in: it is passed on bit for bit), and whether it was sent unordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsgInfo {
    /// Stream id.
    pub sid: u16,
    /// Payload protocol identifier, as it was on the wire.
    pub ppid: u32,
    /// The message was sent unordered (`SCTP_UNORDERED`).
    pub unordered: bool,
}

/// What one recvmsg(2) returned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// Bytes written into the buffer.
    pub len: usize,
    /// The message ends with these bytes (`MSG_EOR`); otherwise more of it follows.
    pub eor: bool,
    /// The bytes are an SCTP notification, not data (none is subscribed; skipped if seen).
    pub notification: bool,
    /// The message's metadata, when the `SCTP_RCVINFO` control message came with it.
    pub info: Option<MsgInfo>,
}

impl Received {
    /// End of stream: the peer shut the association down and every message was read.
    pub fn is_eof(&self) -> bool {
        self.len == 0 && !self.notification
    }
}

/// Room for one control message with the largest payload used here, 8-byte aligned as
/// `struct cmsghdr` needs.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Receives (part of) one message without blocking.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (into `buf`) and `cbuf`, both live and writable for the
        // lengths given; `fd` is open.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut info = None;
    // SAFETY: `msg` was filled by recvmsg: msg_control/msg_controllen describe the control
    // messages the kernel wrote into `cbuf`, which CMSG_FIRSTHDR/CMSG_NXTHDR walk within bounds.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points at a complete header inside `cbuf`.
        let hdr = unsafe { &*cmsg };
        // SAFETY: CMSG_LEN only computes a length.
        let want = unsafe { libc::CMSG_LEN(size_of::<libc::sctp_rcvinfo>() as u32) } as usize;
        if hdr.cmsg_level == SOL_SCTP
            && hdr.cmsg_type == libc::SCTP_RCVINFO
            && hdr.cmsg_len as usize >= want
        {
            // SAFETY: the kernel wrote a whole `sctp_rcvinfo` after this header (cmsg_len says
            // so); it may be unaligned for the struct, hence read_unaligned.
            let ri: libc::sctp_rcvinfo = unsafe {
                std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::sctp_rcvinfo>())
            };
            info = Some(MsgInfo {
                sid: ri.rcv_sid,
                ppid: ri.rcv_ppid,
                unordered: libc::c_int::from(ri.rcv_flags) & libc::SCTP_UNORDERED != 0,
            });
        }
        // SAFETY: as for CMSG_FIRSTHDR; NXTHDR returns null past the end.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        len: n,
        eor: msg.msg_flags & libc::MSG_EOR != 0,
        notification: msg.msg_flags & libc::MSG_NOTIFICATION != 0,
        info,
    })
}

/// Sends `data` as one whole message with `info`'s stream id, PPID and ordering, without
/// blocking. The kernel takes a message whole or not at all (`EAGAIN` when the send buffer is
/// full), so a success is always `data.len()`. `more`: another message follows at once
/// (`MSG_MORE`: the kernel may hold this one to bundle them into one packet; a send without it
/// releases them).
pub fn send(fd: BorrowedFd<'_>, data: &[u8], info: MsgInfo, more: bool) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let snd = libc::sctp_sndinfo {
        snd_sid: info.sid,
        snd_flags: if info.unordered {
            libc::SCTP_UNORDERED as u16
        } else {
            0
        },
        snd_ppid: info.ppid,
        snd_context: 0,
        snd_assoc_id: 0,
    };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: CMSG_SPACE only computes a length.
    let space = unsafe { libc::CMSG_SPACE(size_of::<libc::sctp_sndinfo>() as u32) } as usize;
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `cbuf` holds `space` (<= 64) bytes, aligned for cmsghdr; the header and the
    // sndinfo after it are written within them.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_SCTP;
        (*cmsg).cmsg_type = libc::SCTP_SNDINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::sctp_sndinfo>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::sctp_sndinfo>(), snd);
    }
    loop {
        // SAFETY: `msg` points at `iov` (into `data`, only read) and `cbuf`, both live; `fd` is
        // open.
        let n = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 },
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Makes the send buffer hold at least `len` bytes: Linux refuses to send a message larger
/// than the socket's send buffer (`EMSGSIZE`, "API 7.1.7" in `sctp_sendmsg`), and the peer that
/// sent it to us may have had a larger one. `SO_SNDBUFFORCE` (root, as dockerd's proxies run)
/// passes `net.core.wmem_max`; `SO_SNDBUF` is the fallback. The kernel doubles the value given.
pub fn fit_send_buffer(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    let sock = SockRef::from(&fd);
    let want = libc::c_int::try_from(len).map_err(io::Error::other)?;
    let forced = nix::sys::socket::setsockopt(
        &fd,
        nix::sys::socket::sockopt::SndBufForce,
        &(want as usize),
    );
    if forced.is_err() {
        sock.set_send_buffer_size(len)?;
    }
    let got = sock.send_buffer_size()?;
    if got < len {
        return Err(io::Error::other(format!(
            "the send buffer holds {got} bytes at most (net.core.wmem_max), not {len}"
        )));
    }
    Ok(())
}

/// Accepts one association: a non-blocking, close-on-exec socket and the peer's (primary)
/// address.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, Option<SocketAddr>)> {
    // SAFETY: accept4 writes at most `len` bytes of address into the storage SockAddr::try_init
    // provides and sets `len`; the returned descriptor is new and owned by nobody else.
    let (fd, addr) = unsafe {
        SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                listener.as_raw_fd(),
                storage.cast(),
                len,
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            );
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(OwnedFd::from_raw_fd(fd))
            }
        })
    }?;
    Ok((fd, addr.as_socket()))
}

/// Closes the socket with an ABORT rather than a SHUTDOWN: on Linux, closing an SCTP socket
/// whose `SO_LINGER` is on with a zero timeout aborts its association (`sctp_close`).
pub fn abort(fd: impl Into<OwnedFd>) {
    let fd = fd.into();
    let _ = SockRef::from(&fd).set_linger(Some(Duration::ZERO));
    drop(fd);
}
