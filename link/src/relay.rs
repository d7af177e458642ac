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
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::pool::Pool;
use crate::proto::framed::DATA_HEAD_LEN;
use crate::proto::{PayloadStream, ProtoError, RelayStatus, STATUS_TIMEOUT, StatusReader};
#[cfg(target_os = "linux")]
use crate::splice::Pipe;
use crate::splice::{Splice, Way};
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

static BUFFERS: Pool<Box<[u8]>> = Pool::new(POOL_KEEP);

fn take_buffer() -> Box<[u8]> {
    BUFFERS
        .take()
        .unwrap_or_else(|| vec![0u8; HEADROOM + RELAY_BUFFER].into_boxed_slice())
}

fn give_buffer(buf: Box<[u8]>) {
    BUFFERS.give(buf);
}

/// A direction's first spliced read after a copied read at least this large (a bulk sender):
/// below it, a read and a write cost less than the splices and the pipe.
#[cfg(target_os = "linux")]
const SPLICE_AFTER: usize = 64 * 1024;
/// A splice that moved less than this (the sender slowed down) makes the direction copy
/// again until the next large read.
#[cfg(target_os = "linux")]
const SPLICE_SMALL: usize = 16 * 1024;
/// Link data frames whose payload left to read is at least this large are spliced.
#[cfg(target_os = "linux")]
const SPLICE_FRAME_MIN: usize = 16 * 1024;

/// Whether and when a direction splices instead of copying (see [`crate::splice`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum SpliceMode {
    /// Never: an end cannot be spliced (or not on this system).
    #[default]
    Off,
    /// From the local connection to the link: after a large read, until a small splice.
    Bulk { on: bool },
    /// From the link to the local connection: the payload of each large data frame. `bulk`
    /// after a spliced frame, until a small one: frame heads are then read alone, so that the
    /// next payload is spliced whole (without it, a head is read with what follows it, the
    /// fewest reads for small frames).
    Frames { bulk: bool },
}

/// Where a direction reads from: the local connection, or the link.
trait Source {
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>>;
    /// Splices bytes into the (empty) pipe; `None` when the bytes due now are not to be spliced
    /// (the link is at a frame head or a small frame): read them. `heads`: a frame head due
    /// now is read first (alone).
    #[cfg(target_os = "linux")]
    fn poll_splice_in(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut Pipe,
        heads: bool,
    ) -> Option<Poll<io::Result<usize>>>;
    /// Whether [`Source::poll_splice_in`] may splice now (checked before a pipe is taken).
    #[cfg(target_os = "linux")]
    fn may_splice(&self, heads: bool) -> bool;
}

/// Where a direction writes: the local connection, or the link (with a frame head written in
/// the buffer's headroom).
trait Sink {
    /// Writes `buf[HEADROOM..]` (`buf[..HEADROOM]` may be overwritten); the bytes taken.
    fn poll_write_buf(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Splices bytes out of the pipe; the bytes moved.
    #[cfg(target_os = "linux")]
    fn poll_splice_out(&mut self, cx: &mut Context<'_>, pipe: &mut Pipe)
    -> Poll<io::Result<usize>>;
}

struct Local<'a, C>(&'a mut C);

impl<C: AsyncRead + Splice + Unpin> Source for Local<'_, C> {
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
    #[cfg(target_os = "linux")]
    fn poll_splice_in(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut Pipe,
        _heads: bool,
    ) -> Option<Poll<io::Result<usize>>> {
        self.0
            .poll_splice(cx, tokio::io::Interest::READABLE, &mut |fd| {
                pipe.fill(fd, RELAY_BUFFER)
            })
    }
    #[cfg(target_os = "linux")]
    fn may_splice(&self, _heads: bool) -> bool {
        true
    }
}

impl<C: AsyncWrite + Splice + Unpin> Sink for Local<'_, C> {
    fn poll_write_buf(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf.get(HEADROOM..).unwrap_or_default())
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
    #[cfg(target_os = "linux")]
    fn poll_splice_out(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut Pipe,
    ) -> Poll<io::Result<usize>> {
        let held = pipe.held();
        self.0
            .poll_splice_or_err(cx, tokio::io::Interest::WRITABLE, &mut |fd| {
                pipe.drain(fd, held)
            })
    }
}

impl<S: AsyncRead + AsyncWrite + Splice + Unpin> Source for PayloadStream<S> {
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
    }
    #[cfg(target_os = "linux")]
    fn poll_splice_in(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut Pipe,
        heads: bool,
    ) -> Option<Poll<io::Result<usize>>> {
        let PayloadStream::Framed(f) = self else {
            return None;
        };
        if heads && f.at_frame_boundary() {
            match f.poll_read_head(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        (f.splice_readable() >= SPLICE_FRAME_MIN)
            .then(|| f.poll_splice_read(cx, &mut |fd, max| pipe.fill(fd, max)))
    }
    #[cfg(target_os = "linux")]
    fn may_splice(&self, heads: bool) -> bool {
        match self {
            PayloadStream::Framed(f) => {
                (heads && f.at_frame_boundary()) || f.splice_readable() >= SPLICE_FRAME_MIN
            }
            PayloadStream::Raw(_) => false,
        }
    }
}

impl<S: AsyncWrite + Splice + Unpin> Sink for PayloadStream<S> {
    fn poll_write_buf(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.poll_write_headroom(cx, buf)
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_flush(cx)
    }
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }
    #[cfg(target_os = "linux")]
    fn poll_splice_out(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut Pipe,
    ) -> Poll<io::Result<usize>> {
        match self {
            PayloadStream::Framed(f) => {
                let held = pipe.held();
                f.poll_splice_write(cx, held, &mut |fd, max| pipe.drain(fd, max))
            }
            PayloadStream::Raw(_) => Poll::Ready(Err(crate::splice::unsupported())),
        }
    }
}

/// Whether the link stream's payload can be spliced that way: framed on a unix or vsock socket
/// (the relay does not splice raw streams, which are QUIC's).
fn link_splices<S: Splice>(link: &PayloadStream<S>, way: Way) -> bool {
    matches!(link, PayloadStream::Framed(f) if f.get_ref().can_splice(way))
}

/// One direction of a relay, like tokio's `copy` (read, write it all, again; at EOF flush and
/// shut the writer down), except that the buffer is held only while data flows, and that bulk
/// data is spliced where both ends allow (the pipe, too, held only while data flows).
#[derive(Default)]
struct Direction {
    splice: SpliceMode,
    #[cfg(target_os = "linux")]
    pipe: Option<Pipe>,
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
    fn new(splice: SpliceMode) -> Self {
        let mut d = Direction::default();
        d.splice = splice;
        d
    }

    /// Reads into the free end of the buffer (taking one if none is held); `Pending` leaves
    /// the state as it was (a buffer taken for nothing is given back by the caller).
    fn poll_fill<R: Source>(&mut self, cx: &mut Context<'_>, r: &mut R) -> Poll<io::Result<()>> {
        let buf = self.buf.get_or_insert_with(take_buffer);
        let Some(free) = buf.get_mut(HEADROOM + self.cap..) else {
            return Poll::Ready(Err(io::Error::other("relay buffer overrun")));
        };
        let mut rb = ReadBuf::new(free);
        loop {
            match r.poll_read_buf(cx, &mut rb) {
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
        #[cfg(target_os = "linux")]
        if n >= SPLICE_AFTER && self.splice == (SpliceMode::Bulk { on: false }) {
            self.splice = SpliceMode::Bulk { on: true };
        }
        self.cap += n;
        Poll::Ready(Ok(()))
    }

    /// Gives the pipe back if it holds nothing.
    #[cfg(target_os = "linux")]
    fn release_pipe(&mut self) {
        if self.pipe.as_ref().is_some_and(|p| p.held() == 0)
            && let Some(p) = self.pipe.take()
        {
            p.give();
        }
    }

    /// The spliced part of [`Direction::poll_copy`], run when the copy buffer holds nothing to
    /// write: bytes in the pipe go out first; then, when splicing is on and the source has
    /// bytes to splice, the pipe is filled. `Ready(Ok(true))`: something moved (or the source
    /// ended: `read_done`); `Ready(Ok(false))`: copy instead.
    #[cfg(target_os = "linux")]
    fn poll_spliced<R: Source, W: Sink>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<bool>> {
        if let Some(pipe) = self.pipe.as_mut()
            && pipe.held() > 0
        {
            while pipe.held() > 0 {
                let n = ready!(w.poll_splice_out(cx, pipe))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice moved zero bytes into the relay's writer",
                    )));
                }
                self.amt += n as u64;
                self.need_flush = true;
            }
            return Poll::Ready(Ok(true));
        }
        let on = match self.splice {
            SpliceMode::Off => false,
            SpliceMode::Bulk { on } => on,
            SpliceMode::Frames { .. } => true,
        };
        let heads = self.splice == SpliceMode::Frames { bulk: true };
        if !on || self.read_done {
            self.release_pipe();
            return Poll::Ready(Ok(false));
        }
        if !r.may_splice(heads) {
            // The link is at a small frame's payload or inside a head: copy, holding no pipe.
            self.release_pipe();
            return Poll::Ready(Ok(false));
        }
        let pipe = match self.pipe.as_mut() {
            Some(p) => p,
            None => match Pipe::take() {
                Ok(p) => self.pipe.insert(p),
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for splicing; the relay copies");
                    self.splice = SpliceMode::Off;
                    return Poll::Ready(Ok(false));
                }
            },
        };
        match r.poll_splice_in(cx, pipe, heads) {
            None => {
                if heads {
                    self.splice = SpliceMode::Frames { bulk: false };
                }
                self.release_pipe();
                Poll::Ready(Ok(false))
            }
            Some(Poll::Pending) => {
                // Nothing to read: hold no pipe while idle; push out what was written.
                self.release_pipe();
                if self.need_flush {
                    ready!(w.poll_flush(cx))?;
                    self.need_flush = false;
                }
                Poll::Pending
            }
            Some(Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
            Some(Poll::Ready(Ok(0))) => {
                self.read_done = true;
                self.release_pipe();
                Poll::Ready(Ok(true))
            }
            Some(Poll::Ready(Ok(n))) => {
                match self.splice {
                    SpliceMode::Bulk { .. } if n < SPLICE_SMALL => {
                        self.splice = SpliceMode::Bulk { on: false };
                    }
                    SpliceMode::Frames { .. } => self.splice = SpliceMode::Frames { bulk: true },
                    _ => {}
                }
                Poll::Ready(Ok(true))
            }
        }
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

    fn poll_copy<R: Source, W: Sink>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
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
            #[cfg(target_os = "linux")]
            if self.pos == self.cap && ready!(self.poll_spliced(cx, r, w))? && !self.read_done {
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
        #[cfg(target_os = "linux")]
        if let Some(p) = self.pipe.take() {
            p.give();
        }
    }
}

/// The two directions of a relay, splicing where both ends allow.
fn directions<C: Splice>(local: &C, link: &PayloadStream<Stream>) -> (Direction, Direction) {
    let on = crate::splice::enabled();
    let up = if on && local.can_splice(Way::From) && link_splices(link, Way::Into) {
        SpliceMode::Bulk { on: false }
    } else {
        SpliceMode::Off
    };
    let down = if on && link_splices(link, Way::From) && local.can_splice(Way::Into) {
        SpliceMode::Frames { bulk: false }
    } else {
        SpliceMode::Off
    };
    (Direction::new(up), Direction::new(down))
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
    local: C,
    link: PayloadStream<Stream>,
    cancel: &CancellationToken,
    reset_local: impl FnOnce(C),
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Splice + Unpin,
{
    match run(local, link, cancel, reset_local, false).await {
        OpenedEnd::Relayed(end) => end,
        // No status is due, so none can refuse or be missing.
        OpenedEnd::Refused(st) => RelayEnd::Reset(io::Error::other(format!(
            "relay status {st:?} where none was due"
        ))),
        OpenedEnd::NoStatus(e) => RelayEnd::Reset(io::Error::other(e)),
    }
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

/// Why [`copy`] stopped before both directions ended.
enum Stop {
    Refused(RelayStatus),
    NoStatus(ProtoError),
    Failed(io::Error),
}

/// Copies both ways until both directions have ended (like `copy_bidirectional`): bytes
/// local → link, link → local. With `status_due` (the opener), link → local starts once the
/// status (read first on that direction) says `Ok`, and an error on local → link while the
/// status is due is held until it arrives: a refusal (the acceptor closes the stream, so writes
/// may fail first) is reported as a refusal.
async fn copy<C>(
    local: &mut C,
    link: &mut PayloadStream<Stream>,
    status_due: bool,
) -> Result<(u64, u64), Stop>
where
    C: AsyncRead + AsyncWrite + Splice + Unpin,
{
    let (mut up, mut down) = directions(local, link);
    let mut status = status_due.then(StatusReader::new);
    let mut up_failed: Option<io::Error> = None;
    let mut up_done: Option<u64> = None;
    // Dropped with the status read, so that no timer outlives its use.
    let deadline = status_due.then(|| tokio::time::sleep(STATUS_TIMEOUT));
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
            match up.poll_copy(cx, &mut Local(local), link) {
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
    local: C,
    link: PayloadStream<Stream>,
    cancel: &CancellationToken,
    reset_local: impl FnOnce(C),
) -> OpenedEnd
where
    C: AsyncRead + AsyncWrite + Splice + Unpin,
{
    run(local, link, cancel, reset_local, true).await
}

/// [`copy`] until it ends or `cancel` fires; then, unless both directions ended cleanly, resets
/// `local` (and the link, except after a refusal: the acceptor closes it).
async fn run<C>(
    mut local: C,
    mut link: PayloadStream<Stream>,
    cancel: &CancellationToken,
    reset_local: impl FnOnce(C),
    status_due: bool,
) -> OpenedEnd
where
    C: AsyncRead + AsyncWrite + Splice + Unpin,
{
    let res = tokio::select! {
        r = copy(&mut local, &mut link, status_due) => Some(r),
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
