//! The front socket: adopted from fd 4 (`-use-listen-fd`) or bound here as docker-proxy does.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

/// Which transport the proxy serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP: a listening socket.
    Tcp,
    /// UDP: a bound socket with packet info on.
    Udp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
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
}

impl Frontend {
    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Frontend::Tcp(l) => l.local_addr(),
            Frontend::Udp(u) => u.local_addr(),
        }
    }
}

/// The descriptor dockerd passes the bound socket on.
const LISTEN_FD: i32 = 4;

/// Takes the socket dockerd bound and passed as fd 4, and checks that it is what `transport`
/// needs: the right type and protocol, listening for TCP, IPv4 or IPv6. The address family
/// comes from the socket itself, not from `-host-ip`.
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
    check_fd4(&sock, transport).map_err(|e| format!("-use-listen-fd: fd 4 {e}"))?;
    sock.set_nonblocking(true)
        .map_err(|e| format!("-use-listen-fd: fd 4: cannot make it non-blocking: {e}"))?;
    Ok(match transport {
        Transport::Tcp => Frontend::Tcp(sock.into()),
        Transport::Udp => {
            set_pktinfo(&sock).map_err(|e| format!("-use-listen-fd: fd 4: {e}"))?;
            Frontend::Udp(sock.into())
        }
    })
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
    let (want_ty, want_proto) = match transport {
        Transport::Tcp => (Type::STREAM, Protocol::TCP),
        Transport::Udp => (Type::DGRAM, Protocol::UDP),
    };
    if ty != want_ty || protocol != Some(want_proto) {
        return Err(format!(
            "is an unexpected socket type for -proto {}: {ty:?}/{protocol:?}",
            transport.name()
        ));
    }
    if transport == Transport::Tcp && !sock.is_listener().unwrap_or(false) {
        return Err("is a TCP socket that is not listening".to_owned());
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
/// IPv6, packet info for UDP, and the kernel's maximum backlog.
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
    let (ty, proto) = match transport {
        Transport::Tcp => (Type::STREAM, Protocol::TCP),
        Transport::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto)).map_err(|e| fail(&e))?;
    if ip.is_ipv6() {
        sock.set_only_v6(true).map_err(|e| fail(&e))?;
    }
    match transport {
        Transport::Tcp => sock.set_reuse_address(true).map_err(|e| fail(&e))?,
        Transport::Udp => set_pktinfo(&sock).map_err(|e| fail(&e))?,
    }
    sock.bind(&addr.into()).map_err(|e| fail(&e))?;
    if transport == Transport::Tcp {
        // Like listen(fd, -1): the kernel caps the backlog at net.core.somaxconn.
        sock.listen(-1).map_err(|e| fail(&e))?;
    }
    sock.set_nonblocking(true).map_err(|e| fail(&e))?;
    Ok(match transport {
        Transport::Tcp => Frontend::Tcp(sock.into()),
        Transport::Udp => Frontend::Udp(sock.into()),
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
