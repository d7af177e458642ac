//! The relay both sides run between a local TCP connection and a link stream in its payload
//! phase: bytes both ways, each direction half-closed as its source ends, and on an error from
//! either side (or cancellation) both sides reset — a TCP RST locally, a RESET frame or the
//! transport's reset on the link.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::proto::PayloadStream;
use crate::transport::Stream;

/// Copy buffer per direction.
pub const RELAY_BUFFER: usize = 64 * 1024;
/// How long writing a RESET frame may take before the stream is just dropped.
const RESET_GRACE: Duration = Duration::from_secs(1);

/// Resets a TCP connection: `SO_LINGER` 0, then close, so the peer gets `ECONNRESET`.
pub fn reset_tcp(s: TcpStream) {
    if let Err(e) = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; closing");
    }
    drop(s);
}

/// Resets a link stream in its payload phase: a RESET frame in framed mode, the transport's
/// reset in raw mode.
pub async fn reset_link(link: PayloadStream<Stream>) {
    match link {
        PayloadStream::Raw(s) => s.reset(),
        PayloadStream::Framed(mut f) => {
            let _ = tokio::time::timeout(RESET_GRACE, f.reset()).await;
        }
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions ended cleanly: bytes local → link, link → local.
    Done(u64, u64),
    /// A side failed; both were reset.
    Reset(io::Error),
    /// Cancelled (session lost, shutdown); both were reset.
    Cancelled,
}

/// Relays `local` and `link` until both directions end; on an error or when `cancel` fires,
/// resets both (`reset_local` resets the local side, e.g. [`reset_tcp`]).
pub async fn relay<C>(
    mut local: C,
    mut link: PayloadStream<Stream>,
    cancel: &CancellationToken,
    reset_local: impl FnOnce(C),
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let res = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut local, &mut link, RELAY_BUFFER, RELAY_BUFFER) => Some(r),
        () = cancel.cancelled() => None,
    };
    let end = match res {
        Some(Ok((up, down))) => return RelayEnd::Done(up, down),
        Some(Err(e)) => RelayEnd::Reset(e),
        None => RelayEnd::Cancelled,
    };
    reset_local(local);
    reset_link(link).await;
    end
}
