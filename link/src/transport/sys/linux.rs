//! Linux hosts and guests: unix sockets, AF_VSOCK (tokio-vsock); no Hyper-V sockets.

use std::io;
use std::os::fd::OwnedFd;

use tokio_vsock::{VMADDR_CID_ANY, VsockAddr};

use super::endpoint::{Endpoint, VsockCid};
use super::hvsock::Guid;

pub(crate) use super::unix::{
    SocketFile, accept as unix_accept, bind as unix_bind, connect as unix_connect,
};
/// A connected unix stream, watched for reading only (see `unix_io`).
pub(crate) use super::unix_io::UnixIo as UnixStream;
pub(crate) use tokio::net::UnixListener;

/// A stream to or from the VM's socket family: AF_VSOCK here, watched like a unix socket
/// (read-only registration, splicing: see `unix_io`).
pub(crate) type VmStream = super::unix_io::UnixIo;
/// A listener of the VM's socket family: AF_VSOCK here.
pub(crate) type VmListener = tokio_vsock::VsockListener;

/// Why `endpoint` cannot be used on this host at all, if it cannot.
pub(crate) fn unsupported(endpoint: &Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::Hvsock { .. } => Some(
            "hvsock:// needs Hyper-V sockets (AF_HYPERV), which only Windows hosts have; \
             on Linux use vsock://CID:PORT or hybrid-vsock:///PATH?port=PORT",
        ),
        _ => None,
    }
}

pub(crate) async fn vsock_connect(cid: u32, port: u32) -> io::Result<VmStream> {
    let s = tokio_vsock::VsockStream::connect(VsockAddr::new(cid, port)).await?;
    VmStream::from_vsock(OwnedFd::from(s))
}

pub(crate) fn vsock_bind(cid: VsockCid, port: u32) -> io::Result<VmListener> {
    let cid = match cid {
        VsockCid::Any => VMADDR_CID_ANY,
        VsockCid::Id(cid) => cid,
    };
    VmListener::bind(VsockAddr::new(cid, port))
}

/// Accepts one vsock connection: the stream and the peer's CID and port.
pub(crate) async fn vm_accept(listener: &VmListener) -> io::Result<(VmStream, u32, u32)> {
    let (s, addr) = listener.accept().await?;
    Ok((
        VmStream::from_vsock(OwnedFd::from(s))?,
        addr.cid(),
        addr.port(),
    ))
}

pub(crate) async fn hvsock_connect(_vm: &Guid, _port: u32) -> io::Result<VmStream> {
    Err(io::ErrorKind::Unsupported.into())
}
