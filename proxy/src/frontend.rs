//! The front socket: adopted from fd 4 (`-use-listen-fd`) or bound here as docker-proxy does.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

use crate::sctp_sys;
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

/// Which transport the proxy serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP: a listening socket.
    Tcp,
    /// UDP: a bound socket with packet info on.
    Udp,
    /// SCTP: a listening one-to-one socket (`SOCK_STREAM`, `IPPROTO_SCTP`).
    Sctp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
            Transport::Sctp => "sctp",
        }
    }

    fn socket_type(self) -> (Type, Protocol) {
        match self {
            Transport::Tcp => (Type::STREAM, Protocol::TCP),
            Transport::Udp => (Type::DGRAM, Protocol::UDP),
            Transport::Sctp => (Type::STREAM, sctp_sys::protocol()),
        }
    }
}

/// A front socket, ready to serve (non-blocking, close-on-exec).
#[derive(Debug)]
pub enum Frontend {
    /// A listening TCP socket.
    Tcp(std::net::TcpListener),
    /// A bound UDP socket with IP_PKTINFO / IPV6_RECVPKTINFO on.
    Udp(std::net::UdpSocket),
    /// A listening one-to-one SCTP socket.
    Sctp(Socket),
}

impl Frontend {
    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Frontend::Tcp(l) => l.local_addr(),
            Frontend::Udp(u) => u.local_addr(),
            Frontend::Sctp(s) => s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("not an IP socket")),
        }
    }
}

/// The descriptor dockerd passes the bound socket on.
const LISTEN_FD: i32 = 4;

/// Takes the socket dockerd bound and passed as fd 4, and checks that it is what `transport`
/// needs: the right type and protocol, listening for TCP and SCTP, IPv4 or IPv6. The address
/// family comes from the socket itself, not from `-host-ip`.
pub fn from_fd4(transport: Transport) -> Result<Frontend, String> {
    // SAFETY: F_GETFD only queries the descriptor table, to learn whether fd 4 exists.
    let borrowed = unsafe { BorrowedFd::borrow_raw(LISTEN_FD) };
    if let Err(e) = fcntl(borrowed, FcntlArg::F_GETFD) {
        return Err(format!("-use-listen-fd: fd 4 is not open: {e}"));
    }
    // SAFETY: fd 4 is open and, with -use-listen-fd, dockerd hands it to us alone; this runs
    // before the process opens any descriptor of its own.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FD) };
    let _ = fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    let sock = Socket::from(fd);
    if transport == Transport::Sctp {
        // A kernel without SCTP cannot have made fd 4 an SCTP socket; say that, not "wrong type".
        sctp_sys::available().map_err(|e| sctp_unavailable(&e))?;
    }
    check_fd4(&sock, transport).map_err(|e| format!("-use-listen-fd: fd 4 {e}"))?;
    sock.set_nonblocking(true)
        .map_err(|e| format!("-use-listen-fd: fd 4: cannot make it non-blocking: {e}"))?;
    Ok(match transport {
        Transport::Tcp => Frontend::Tcp(sock.into()),
        Transport::Udp => {
            set_pktinfo(&sock).map_err(|e| format!("-use-listen-fd: fd 4: {e}"))?;
            Frontend::Udp(sock.into())
        }
        Transport::Sctp => Frontend::Sctp(sock),
    })
}

/// The startup error for a kernel that cannot make SCTP sockets.
fn sctp_unavailable(e: &io::Error) -> String {
    format!(
        "SCTP is not available in this kernel: cannot create an SCTP socket: {e} \
         (the sctp kernel module is missing or not loaded: modprobe sctp)"
    )
}

fn check_fd4(sock: &Socket, transport: Transport) -> Result<(), String> {
    let ty = sock.r#type().map_err(|e| format!("is not a socket: {e}"))?;
    let domain = sock
        .domain()
        .map_err(|e| format!("has no address family: {e}"))?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(format!("is not an IPv4 or IPv6 socket ({domain:?})"));
    }
    let protocol = sock
        .protocol()
        .map_err(|e| format!("has no protocol: {e}"))?;
    let (want_ty, want_proto) = transport.socket_type();
    if ty != want_ty || protocol != Some(want_proto) {
        return Err(format!(
            "is an unexpected socket type for -proto {}: {ty:?}/{protocol:?}",
            transport.name()
        ));
    }
    if transport != Transport::Udp && !sock.is_listener().unwrap_or(false) {
        return Err(format!(
            "is a {} socket that is not listening",
            transport.name().to_uppercase()
        ));
    }
    let addr = sock
        .local_addr()
        .map_err(|e| format!("has no local address: {e}"))?;
    if addr.as_socket().is_none_or(|a| a.port() == 0) {
        return Err("is not bound to a port".to_owned());
    }
    Ok(())
}

/// Binds `ip:port` as docker-proxy does without fd 4: SO_REUSEADDR for TCP, IPV6_V6ONLY for
/// IPv6, packet info for UDP, 65,535 streams asked for in SCTP's INIT (`SCTP_INITMSG`), and the
/// kernel's maximum backlog.
pub fn bind(transport: Transport, ip: IpAddr, port: i64) -> Result<Frontend, String> {
    let fail = |e: &dyn std::fmt::Display| {
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        format!(
            "failed to listen on {}/{host}:{port}: {e}",
            transport.name()
        )
    };
    let port = u16::try_from(port).map_err(|_| fail(&"invalid port"))?;
    let addr = SocketAddr::new(ip, port);
    let (ty, proto) = transport.socket_type();
    let sock = match Socket::new(Domain::for_address(addr), ty, Some(proto)) {
        Ok(s) => s,
        Err(e) if transport == Transport::Sctp && sctp_sys::is_unavailable(&e) => {
            return Err(sctp_unavailable(&e));
        }
        Err(e) => return Err(fail(&e)),
    };
    if ip.is_ipv6() {
        sock.set_only_v6(true).map_err(|e| fail(&e))?;
    }
    match transport {
        Transport::Tcp => sock.set_reuse_address(true).map_err(|e| fail(&e))?,
        Transport::Udp => set_pktinfo(&sock).map_err(|e| fail(&e))?,
        // docker-proxy (ishidawataru/sctp) sets no SO_REUSEADDR on SCTP listeners.
        Transport::Sctp => {
            sctp_sys::set_streams(sock.as_fd(), sctp_sys::MAX_STREAMS, sctp_sys::MAX_STREAMS)
                .map_err(|e| fail(&e))?
        }
    }
    sock.bind(&addr.into()).map_err(|e| fail(&e))?;
    if transport != Transport::Udp {
        // Like listen(fd, -1): the kernel caps the backlog at net.core.somaxconn.
        sock.listen(-1).map_err(|e| fail(&e))?;
    }
    sock.set_nonblocking(true).map_err(|e| fail(&e))?;
    Ok(match transport {
        Transport::Tcp => Frontend::Tcp(sock.into()),
        Transport::Udp => Frontend::Udp(sock.into()),
        Transport::Sctp => Frontend::Sctp(sock),
    })
}

/// Turns on the control message that carries a datagram's destination address, so that the
/// reply can leave from the address the client targeted.
fn set_pktinfo(sock: &Socket) -> Result<(), String> {
    let is_v6 = sock.domain().map_err(|e| e.to_string())? == Domain::IPV6;
    let res = if is_v6 {
        setsockopt(sock, sockopt::Ipv6RecvPacketInfo, &true)
            .map_err(|e| format!("failed to setsockopt(IPV6_RECVPKTINFO): {e}"))
    } else {
        setsockopt(sock, sockopt::Ipv4PacketInfo, &true)
            .map_err(|e| format!("failed to setsockopt(IP_PKTINFO): {e}"))
    };
    // A dual-stack IPv6 socket reports IPv4 destinations as v4-mapped IPV6_PKTINFO, so the one
    // option covers both families.
    res
}
