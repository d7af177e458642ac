//! Relaying one TCP connection over one link stream: half-close both ways, a reset turned into
//! a reset, byte counters that status reads while the relay runs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use hostnet_link::proto::{self, PayloadStream, StreamHeader, StreamKind, StreamMode};
use hostnet_link::transport::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use hostnet_link::relay::{OpenedEnd, RelayEnd, reset_tcp};

/// Bytes each way and connections, per mirrored address; read by `status`.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Connections (or UDP flows) open now.
    pub open: AtomicU64,
    /// Connections (or flows) relayed in total.
    pub total: AtomicU64,
    /// Bytes from host clients towards the guest.
    pub to_guest: AtomicU64,
    /// Bytes from the guest towards host clients.
    pub from_guest: AtomicU64,
}

/// A UDP flow's traffic on its port: "to the peer" is towards the guest.
impl hostnet_link::udp::Tally for Traffic {
    fn sent(&self, bytes: usize) {
        self.to_guest.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    fn received(&self, bytes: usize) {
        self.from_guest.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }
    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one open connection while alive.
#[derive(Debug)]
pub struct OpenGuard(Arc<Traffic>);

impl OpenGuard {
    /// Counts a new connection on `t`.
    pub fn new(t: Arc<Traffic>) -> Self {
        t.open.fetch_add(1, Ordering::Relaxed);
        t.total.fetch_add(1, Ordering::Relaxed);
        OpenGuard(t)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A host-side socket (a host client, or the host service of a dial-back) whose reads count as
/// bytes towards the guest and writes as bytes from it.
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    traffic: Arc<Traffic>,
}

impl<T> Counted<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, traffic: Arc<Traffic>) -> Self {
        Counted { inner, traffic }
    }

    /// The socket.
    pub fn into_inner(self) -> T {
        self.inner
    }

    fn count(&self, read: bool, n: usize) {
        let c = if read {
            &self.traffic.to_guest
        } else {
            &self.traffic.from_guest
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Spliced bytes are counted like read and written ones.
impl<T: hostnet_link::splice::Splice> hostnet_link::splice::Splice for Counted<T> {
    #[cfg(target_os = "linux")]
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        interest: tokio::io::Interest,
        op: &mut hostnet_link::splice::FdOp<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        let r = self.inner.poll_splice(cx, interest, op)?;
        if let Poll::Ready(Ok(n)) = r {
            self.count(interest.is_readable(), n);
        }
        Some(r)
    }

    fn can_splice(&self, way: hostnet_link::splice::Way) -> bool {
        self.inner.can_splice(way)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.count(true, buf.filled().len() - before);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.count(false, n);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Why a relay stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The transport could not open a stream.
    #[error("cannot open a link stream: {0}")]
    Link(#[from] hostnet_link::transport::TransportError),
    /// Writing the header failed.
    #[error("link stream handshake failed: {0}")]
    Proto(#[from] proto::ProtoError),
}

/// Opens a link stream and writes the header with `kind` in `mode`; the status is read by
/// [`relay_opened`], which sends the client's bytes meanwhile (the opener waits for no round
/// trip before relaying: see "Relay streams and the status" in [`hostnet_link::proto`]).
pub async fn open_stream(
    connector: &hostnet_link::transport::Connector,
    kind: StreamKind,
    mode: StreamMode,
) -> Result<PayloadStream<Stream>, OpenError> {
    let mut s = connector.open().await?;
    proto::write_header(&mut s, &StreamHeader { kind, mode }).await?;
    Ok(PayloadStream::new(s, mode))
}

/// Relays a counted host connection and a stream from [`open_stream`] (see
/// [`hostnet_link::relay::relay_opened`]): the status first, then as [`relay`].
pub async fn relay_opened(
    client: Counted<TcpStream>,
    link: PayloadStream<Stream>,
    cancel: &CancellationToken,
) -> OpenedEnd {
    hostnet_link::relay::relay_opened(client, link, cancel, |c| reset_tcp(c.into_inner())).await
}

/// Relays a counted host connection and `link` (see [`hostnet_link::relay::relay`]): half-close
/// carried each way; on an error or cancellation both sides are reset.
pub async fn relay(
    client: Counted<TcpStream>,
    link: PayloadStream<Stream>,
    cancel: &CancellationToken,
) -> RelayEnd {
    hostnet_link::relay::relay(client, link, cancel, |c| reset_tcp(c.into_inner())).await
}
