//! The relay both sides run between a local TCP connection and a link stream in its payload
//! phase: bytes both ways, each direction half-closed as its source ends, and on an error from
//! either side (or cancellation) both sides reset — a TCP RST locally, a RESET frame or the
//! transport's reset on the link.
//!
//! The opener of a relay stream runs [`relay_opened`] right after writing the header: the
//! client's bytes go out at once, and the other direction starts with the status (see
//! "Relay streams and the status" in [`crate::proto`]), so that a new connection costs no
//! round trip of its own.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::proto::framed::DATA_HEAD_LEN;
use crate::proto::{PayloadStream, ProtoError, RelayStatus, STATUS_TIMEOUT, StatusReader};
use crate::transport::Stream;

/// Copy buffer of a direction while data flows (taken from a small pool when a read is due,
/// given back when the source has nothing more for now, so an idle relay holds none).
pub const RELAY_BUFFER: usize = 256 * 1024;
/// Free copy buffers kept for reuse (process-wide); more are allocated when needed and freed
/// when given back to a full pool.
const POOL_KEEP: usize = 4;
/// Room kept before the data in a copy buffer for a frame head (see
/// [`PayloadStream::poll_write_headroom`]).
const HEADROOM: usize = DATA_HEAD_LEN;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn take_buffer() -> Box<[u8]> {
    let pooled = POOL.lock().ok().and_then(|mut p| p.pop());
    pooled.unwrap_or_else(|| vec![0u8; HEADROOM + RELAY_BUFFER].into_boxed_slice())
}

fn give_buffer(buf: Box<[u8]>) {
    if let Ok(mut p) = POOL.lock()
        && p.len() < POOL_KEEP
    {
        p.push(buf);
    }
}

/// Where a direction writes: the local connection, or the link (with a frame head written in
/// the buffer's headroom).
trait Sink {
    /// Writes `buf[HEADROOM..]` (`buf[..HEADROOM]` may be overwritten); the bytes taken.
    fn poll_write_buf(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

struct Local<'a, C>(&'a mut C);

impl<C: AsyncWrite + Unpin> Sink for Local<'_, C> {
    fn poll_write_buf(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf.get(HEADROOM..).unwrap_or_default())
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncWrite + Unpin> Sink for PayloadStream<S> {
    fn poll_write_buf(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.poll_write_headroom(cx, buf)
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_flush(cx)
    }
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }
}

/// One direction of a relay, like tokio's `copy` (read, write it all, again; at EOF flush and
/// shut the writer down), except that the buffer is held only while data flows.
#[derive(Default)]
struct Direction {
    /// Holds `buf[HEADROOM + pos .. HEADROOM + cap]` still to write.
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    shut: bool,
    done: bool,
    amt: u64,
}

impl Direction {
    /// Reads into the free end of the buffer (taking one if none is held); `Pending` leaves
    /// the state as it was (a buffer taken for nothing is given back by the caller).
    fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> Poll<io::Result<()>> {
        let buf = self.buf.get_or_insert_with(take_buffer);
        let Some(free) = buf.get_mut(HEADROOM + self.cap..) else {
            return Poll::Ready(Err(io::Error::other("relay buffer overrun")));
        };
        let mut rb = ReadBuf::new(free);
        loop {
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = rb.filled().len();
        if n == 0 {
            self.read_done = true;
        }
        self.cap += n;
        Poll::Ready(Ok(()))
    }

    /// Gives the buffer back if it holds nothing to write.
    fn release_if_empty(&mut self) {
        if self.pos == self.cap
            && let Some(b) = self.buf.take()
        {
            self.pos = 0;
            self.cap = 0;
            give_buffer(b);
        }
    }

    fn poll_copy<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut impl Sink,
    ) -> Poll<io::Result<u64>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.amt));
            }
            if self.shut {
                ready!(w.poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let room = self.cap < RELAY_BUFFER;
            if room && !self.read_done {
                match self.poll_fill(cx, r) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        if self.pos == self.cap {
                            // Nothing to write and nothing to read: hold no buffer while idle.
                            self.release_if_empty();
                            if self.need_flush {
                                ready!(w.poll_flush(cx))?;
                                self.need_flush = false;
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let Some(buf) = self.buf.as_mut() else {
                    return Poll::Ready(Err(io::Error::other("relay buffer lost")));
                };
                // The bytes before `pos` are written: the frame head may go there.
                let Some(out) = buf.get_mut(self.pos..HEADROOM + self.cap) else {
                    return Poll::Ready(Err(io::Error::other("relay buffer overrun")));
                };
                let n = match w.poll_write_buf(cx, out) {
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        // Top the buffer up meanwhile, for a larger write next time.
                        if !self.read_done && self.cap < RELAY_BUFFER {
                            ready!(self.poll_fill(cx, r))?;
                        }
                        return Poll::Pending;
                    }
                };
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write zero bytes into the relay's writer",
                    )));
                }
                self.pos = (self.pos + n).min(self.cap);
                self.amt += n as u64;
                self.need_flush = true;
            }
            self.pos = 0;
            self.cap = 0;
            if self.read_done {
                self.release_if_empty();
                ready!(w.poll_flush(cx))?;
                self.need_flush = false;
                self.shut = true;
            }
        }
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            give_buffer(b);
        }
    }
}

/// Copies both ways until both directions have ended (like `copy_bidirectional`): bytes
/// local → link, link → local.
async fn copy_both<C>(local: &mut C, link: &mut PayloadStream<Stream>) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::default();
    let mut down = Direction::default();
    std::future::poll_fn(|cx| {
        let a = up.poll_copy(cx, local, link)?;
        let b = down.poll_copy(cx, link, &mut Local(local))?;
        match (a, b) {
            (Poll::Ready(a), Poll::Ready(b)) => Poll::Ready(Ok((a, b))),
            _ => Poll::Pending,
        }
    })
    .await
}

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
        r = copy_both(&mut local, &mut link) => Some(r),
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

/// How a relay started by its opener before the status ([`relay_opened`]) ended.
#[derive(Debug)]
pub enum OpenedEnd {
    /// The acceptor answered something other than `Ok` (it closes the stream; the client's
    /// bytes sent meanwhile are discarded). The local side was reset.
    Refused(RelayStatus),
    /// No status: the stream failed or ended before it, or [`STATUS_TIMEOUT`] passed. Both
    /// sides were reset.
    NoStatus(ProtoError),
    /// The status was `Ok`; then the relay ended like [`relay`].
    Relayed(RelayEnd),
}

/// Why [`copy_opened`] stopped before both directions ended.
enum Stop {
    Refused(RelayStatus),
    NoStatus(ProtoError),
    Failed(io::Error),
}

/// [`copy_both`] for the opener: local → link from the start; link → local once the status
/// (read first on that direction) says `Ok`. An error on local → link while the status is due
/// is held until it arrives: a refusal (the acceptor closes the stream, so writes may fail
/// first) is reported as a refusal.
async fn copy_opened<C>(local: &mut C, link: &mut PayloadStream<Stream>) -> Result<(u64, u64), Stop>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::default();
    let mut down = Direction::default();
    let mut status = Some(StatusReader::new());
    let mut up_failed: Option<io::Error> = None;
    let mut up_done: Option<u64> = None;
    // Dropped with the status read, so that no timer outlives its use.
    let deadline = Some(tokio::time::sleep(STATUS_TIMEOUT));
    tokio::pin!(deadline);
    std::future::poll_fn(|cx| {
        if let Some(reader) = status.as_mut() {
            match reader.poll_read(cx, link.get_mut()) {
                Poll::Ready(Ok(st)) if st.is_ok() => {
                    status = None;
                    deadline.set(None);
                }
                Poll::Ready(Ok(st)) => return Poll::Ready(Err(Stop::Refused(st))),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Stop::NoStatus(e))),
                Poll::Pending => {
                    if let Some(d) = deadline.as_mut().as_pin_mut()
                        && d.poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(Stop::NoStatus(ProtoError::Timeout {
                            what: "relay status",
                            after: STATUS_TIMEOUT,
                        })));
                    }
                }
            }
        }
        if status.is_none()
            && let Some(e) = up_failed.take()
        {
            return Poll::Ready(Err(Stop::Failed(e)));
        }
        if up_failed.is_none() && up_done.is_none() {
            match up.poll_copy(cx, local, link) {
                Poll::Ready(Ok(n)) => up_done = Some(n),
                Poll::Ready(Err(e)) if status.is_some() => up_failed = Some(e),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Stop::Failed(e))),
                Poll::Pending => {}
            }
        }
        if status.is_some() {
            return Poll::Pending;
        }
        let b = down
            .poll_copy(cx, link, &mut Local(local))
            .map_err(Stop::Failed)?;
        match (up_done, b) {
            (Some(a), Poll::Ready(b)) => Poll::Ready(Ok((a, b))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// The opener's relay: call it right after writing a `TcpRelay` header, without waiting for
/// the status. Relays `local` and `link` like [`relay`], except that `link`'s first bytes are
/// the status (read under [`STATUS_TIMEOUT`]): on `Ok` the payload follows; on anything else
/// `local` is reset and the stream dropped ([`OpenedEnd::Refused`]).
pub async fn relay_opened<C>(
    mut local: C,
    mut link: PayloadStream<Stream>,
    cancel: &CancellationToken,
    reset_local: impl FnOnce(C),
) -> OpenedEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let res = tokio::select! {
        r = copy_opened(&mut local, &mut link) => Some(r),
        () = cancel.cancelled() => None,
    };
    let end = match res {
        Some(Ok((up, down))) => return OpenedEnd::Relayed(RelayEnd::Done(up, down)),
        Some(Err(Stop::Refused(st))) => {
            reset_local(local);
            return OpenedEnd::Refused(st);
        }
        Some(Err(Stop::NoStatus(e))) => OpenedEnd::NoStatus(e),
        Some(Err(Stop::Failed(e))) => OpenedEnd::Relayed(RelayEnd::Reset(e)),
        None => OpenedEnd::Relayed(RelayEnd::Cancelled),
    };
    reset_local(local);
    reset_link(link).await;
    end
}
