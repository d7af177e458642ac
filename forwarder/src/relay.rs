//! Relaying one TCP connection over one link stream: half-close both ways, a reset turned into
//! a reset, byte counters that status reads while the relay runs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hostnet_link::proto::{self, PayloadStream, RelayStatus, StreamHeader, StreamKind, StreamMode};
use hostnet_link::transport::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How long a framed RESET may take to leave before the stream is dropped anyway.
const RESET_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Copy buffer per direction of a relay (tokio's default of 8 KiB costs bulk throughput: each
/// read becomes one write, and in framed mode one frame).
pub const RELAY_BUFFER: usize = 64 * 1024;

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

/// Resets a TCP socket: `SO_LINGER 0` then close, so the peer gets `ECONNRESET`.
pub fn reset_tcp(s: TcpStream) {
    if let Err(e) = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; closing");
    }
    drop(s);
}

/// Resets a link stream in its payload phase: a RESET frame in framed mode, the transport's
/// reset in raw mode.
pub async fn reset_link(mut s: PayloadStream<Stream>) {
    match s.mode() {
        StreamMode::Framed => {
            let _ = tokio::time::timeout(RESET_WRITE_TIMEOUT, s.reset_framed()).await;
        }
        StreamMode::Raw => match s {
            PayloadStream::Raw(raw) => raw.reset(),
            PayloadStream::Framed(f) => drop(f),
        },
    }
}

/// Why a relay stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The transport could not open a stream.
    #[error("cannot open a link stream: {0}")]
    Link(#[from] hostnet_link::transport::TransportError),
    /// Writing the header or reading the status failed.
    #[error("link stream handshake failed: {0}")]
    Proto(#[from] proto::ProtoError),
    /// The agent answered with a status other than `Ok`.
    #[error("the agent answered {0:?}")]
    Status(RelayStatus),
}

/// Opens a link stream with `kind` in `mode` and waits for an `Ok` status.
pub async fn open_relay(
    connector: &hostnet_link::transport::Connector,
    kind: StreamKind,
    mode: StreamMode,
) -> Result<PayloadStream<Stream>, OpenError> {
    let mut s = connector.open().await?;
    proto::write_header(&mut s, &StreamHeader { kind, mode }).await?;
    let status = proto::read_status(&mut s, proto::STATUS_TIMEOUT).await?;
    if !status.is_ok() {
        return Err(OpenError::Status(status));
    }
    Ok(PayloadStream::new(s, mode))
}

/// How a relay ended, for the log.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions ended cleanly: (client→link, link→client) bytes.
    Done(u64, u64),
    /// A side failed; both were reset.
    Reset(io::Error),
    /// Cancelled (session lost, shutdown); both were reset.
    Cancelled,
}

/// Relays `client` and `link` until both directions end, half-closing each as its source
/// ends; on an error or cancellation resets both.
pub async fn relay<C>(
    mut client: Counted<C>,
    mut link: PayloadStream<Stream>,
    cancel: &CancellationToken,
    reset_client: impl FnOnce(C),
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let res = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut link, RELAY_BUFFER, RELAY_BUFFER) => Some(r),
        () = cancel.cancelled() => None,
    };
    match res {
        Some(Ok((a, b))) => RelayEnd::Done(a, b),
        Some(Err(e)) => {
            reset_client(client.into_inner());
            reset_link(link).await;
            RelayEnd::Reset(e)
        }
        None => {
            reset_client(client.into_inner());
            reset_link(link).await;
            RelayEnd::Cancelled
        }
    }
}
