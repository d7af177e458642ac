//! Windows hosts: Hyper-V sockets (AF_HYPERV) to a Hyper-V or WSL2 VM; no unix sockets (tokio
//! has no AF_UNIX on Windows) and no AF_VSOCK.
//!
//! A Hyper-V socket is made with socket2 from its raw family and address (`SOCKADDR_HV`, laid out
//! by [`super::hvsock::sockaddr_hv`]), connected on a blocking thread, then handed to tokio as a
//! `TcpStream`: tokio (mio) drives every Winsock socket the same way (AFD polling), and a stream
//! socket's reads, writes and `shutdown(SD_SEND)` are the same calls whatever its family. Only
//! the TCP-specific options (`TCP_NODELAY`, linger) do not apply, and the relay never sets them
//! on a VM stream. Not run here (no Hyper-V on the build machine): compiled for
//! `x86_64-pc-windows-gnu`, the address layout unit-tested on every host.

use std::io;

use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

use super::endpoint::Endpoint;
use super::hvsock::{AF_HYPERV, Guid, HV_PROTOCOL_RAW, SOCKADDR_HV_LEN, sockaddr_hv};

#[path = "never.rs"]
mod never;

pub(crate) use never::{vm_accept, vsock_bind, vsock_connect};

/// No unix sockets on this host.
pub(crate) type UnixStream = never::Never;
/// No unix sockets on this host.
pub(crate) type UnixListener = never::Never;
/// No unix sockets on this host.
pub(crate) type SocketFile = never::Never;

/// A Hyper-V socket stream.
pub(crate) type VmStream = tokio::net::TcpStream;
/// Listening on Hyper-V sockets is not offered (the forwarder only connects).
pub(crate) type VmListener = never::Never;

const NO_UNIX: &str = "unix sockets (AF_UNIX) are not available to this build for Windows; use \
                       tcp://, quic:// or hvsock://VMID:PORT";

/// Why `endpoint` cannot be used on this host at all, if it cannot.
pub(crate) fn unsupported(endpoint: &Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::Unix(_) | Endpoint::HybridVsock { .. } => Some(NO_UNIX),
        Endpoint::Vsock(_) => Some(
            "vsock:// needs AF_VSOCK, which Windows does not have; reach the VM's vsock port \
             with hvsock://VMID:PORT",
        ),
        _ => None,
    }
}

pub(crate) async fn unix_connect(_path: &std::path::Path) -> io::Result<UnixStream> {
    Err(io::Error::new(io::ErrorKind::Unsupported, NO_UNIX))
}

pub(crate) fn unix_bind(
    endpoint: &Endpoint,
    _path: &std::path::Path,
) -> Result<(UnixListener, SocketFile), super::TransportError> {
    Err(super::TransportError::Unsupported {
        endpoint: endpoint.clone(),
        reason: NO_UNIX,
    })
}

pub(crate) async fn unix_accept(
    listener: &UnixListener,
) -> io::Result<(UnixStream, Option<i32>, Option<u32>)> {
    match *listener {}
}

/// Connects a Hyper-V socket to the guest's vsock port `port` of the VM `vm`.
pub(crate) async fn hvsock_connect(vm: &Guid, port: u32) -> io::Result<VmStream> {
    let addr = hv_sockaddr(vm, port)?;
    let socket = Socket::new(
        Domain::from(i32::from(AF_HYPERV)),
        Type::STREAM,
        Some(Protocol::from(HV_PROTOCOL_RAW)),
    )?;
    let socket = tokio::task::spawn_blocking(move || socket.connect(&addr).map(|()| socket))
        .await
        .map_err(io::Error::other)??;
    socket.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(std::net::TcpStream::from(socket))
}

fn hv_sockaddr(vm: &Guid, port: u32) -> io::Result<SockAddr> {
    let bytes = sockaddr_hv(vm, port);
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: `SockAddrStorage` is a `SOCKADDR_STORAGE` (128 bytes), larger than the 36 bytes
    // copied into it; `view_as` gives its bytes as a plain byte slice of that size.
    unsafe {
        let view = storage.view_as::<[u8; SOCKADDR_HV_LEN]>();
        view.copy_from_slice(&bytes);
    }
    let len = SOCKADDR_HV_LEN as socket2::socklen_t;
    // SAFETY: the storage holds a complete `SOCKADDR_HV` of `len` bytes (family AF_HYPERV).
    Ok(unsafe { SockAddr::new(storage, len) })
}
