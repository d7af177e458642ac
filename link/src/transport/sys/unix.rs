//! macOS (and other unix hosts): unix sockets; no host-side AF_VSOCK (Apple's Virtualization
//! framework exposes guest vsock ports as unix sockets, which `unix://` reaches) and no Hyper-V
//! sockets.

use std::io;

use super::endpoint::Endpoint;
use super::hvsock::Guid;

#[path = "never.rs"]
mod never;

pub(crate) use never::{vm_accept, vsock_bind, vsock_connect};

pub(crate) use super::unix::{
    SocketFile, accept as unix_accept, bind as unix_bind, connect as unix_connect,
};
/// A connected unix stream, watched for reading only (see `unix_io`).
pub(crate) use super::unix_io::UnixIo as UnixStream;
pub(crate) use tokio::net::UnixListener;

/// No VM socket family on this host.
pub(crate) type VmStream = never::Never;
/// No VM socket family on this host.
pub(crate) type VmListener = never::Never;

/// Why `endpoint` cannot be used on this host at all, if it cannot.
pub(crate) fn unsupported(endpoint: &Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::Vsock(_) => Some(
            "vsock:// needs AF_VSOCK, which this host does not have; with vfkit (or a tool built \
             on it) expose the guest port as a unix socket (--device virtio-vsock,port=PORT,\
             socketURL=PATH,connect) and use unix://PATH",
        ),
        Endpoint::Hvsock { .. } => Some(
            "hvsock:// needs Hyper-V sockets (AF_HYPERV), which only Windows hosts have; \
             use unix://, tcp:// or quic://",
        ),
        _ => None,
    }
}

pub(crate) async fn hvsock_connect(_vm: &Guid, _port: u32) -> io::Result<VmStream> {
    Err(io::ErrorKind::Unsupported.into())
}
