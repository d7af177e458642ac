//! A stream or listener that cannot exist: the type of a transport this host lacks. The
//! portable code matches on it like on any stream; no value of it is ever made. And the AF_VSOCK
//! functions of a host without AF_VSOCK (macOS, Windows).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::super::endpoint::VsockCid;

/// Uninhabited.
#[derive(Debug)]
pub(crate) enum Never {}

impl AsyncRead for Never {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match *self.get_mut() {}
    }
}

impl AsyncWrite for Never {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match *self.get_mut() {}
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self.get_mut() {}
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self.get_mut() {}
    }
}

/// No AF_VSOCK here (the endpoint check refuses `vsock://` before this is reached).
pub(crate) async fn vsock_connect<S>(_cid: u32, _port: u32) -> io::Result<S> {
    Err(io::ErrorKind::Unsupported.into())
}

/// No AF_VSOCK here.
pub(crate) fn vsock_bind(_cid: VsockCid, _port: u32) -> io::Result<Never> {
    Err(io::ErrorKind::Unsupported.into())
}

/// No AF_VSOCK listener can exist here.
pub(crate) async fn vm_accept<S>(listener: &Never) -> io::Result<(S, u32, u32)> {
    match *listener {}
}
