//! Framed mode: data / end-of-stream / reset frames over a byte stream that cannot half-close.
//!
//! [`decode_frame_head`] is the pure decoder; [`Framed`] is the adaptor that gives a stream
//! with half-close and reset on top of any `AsyncRead + AsyncWrite`.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

#[cfg(target_os = "linux")]
use std::os::fd::BorrowedFd;

#[cfg(target_os = "linux")]
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{MAX_FRAME_DATA, ProtoError, StreamMode};
#[cfg(target_os = "linux")]
use crate::splice::Splice;

/// Frame type byte of a data frame: `0x01 ‖ len: u32 BE ‖ len bytes`, `1 ≤ len ≤ MAX_FRAME_DATA`.
pub const FRAME_DATA: u8 = 0x01;
/// Frame type byte of the end-of-stream frame (no body): the sender will write no more.
pub const FRAME_END: u8 = 0x02;
/// Frame type byte of the reset frame (no body): the sender aborts both directions.
pub const FRAME_RESET: u8 = 0x03;
/// Bytes in a data frame's head (type and length).
pub const DATA_HEAD_LEN: usize = 5;

const WHAT: &str = "frame";

/// The head of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameHead {
    /// A data frame; this many payload bytes follow the head.
    Data(usize),
    /// End of stream in the sender's direction.
    End,
    /// The sender aborted the stream.
    Reset,
}

impl FrameHead {
    /// Appends the encoded head to `out` (a data frame's payload is appended by the caller).
    pub fn encode(self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        match self {
            FrameHead::Data(len) => {
                let len32 = u32::try_from(len)
                    .ok()
                    .filter(|l| (1..=MAX_FRAME_DATA).contains(l))
                    .ok_or(ProtoError::Invalid {
                        what: WHAT,
                        reason: "data frame length must be 1..=MAX_FRAME_DATA",
                    })?;
                out.push(FRAME_DATA);
                out.extend_from_slice(&len32.to_be_bytes());
            }
            FrameHead::End => out.push(FRAME_END),
            FrameHead::Reset => out.push(FRAME_RESET),
        }
        Ok(())
    }
}

/// Decodes a frame head from the front of `buf`: `Ok(None)` if more bytes are needed, else the
/// head and its length in bytes.
pub fn decode_frame_head(buf: &[u8]) -> Result<Option<(FrameHead, usize)>, ProtoError> {
    let Some(&ty) = buf.first() else {
        return Ok(None);
    };
    match ty {
        FRAME_DATA => {
            let Some([_, a, b, c, d]) = buf.first_chunk::<DATA_HEAD_LEN>() else {
                return Ok(None);
            };
            let len = u32::from_be_bytes([*a, *b, *c, *d]);
            if len == 0 {
                return Err(ProtoError::Invalid {
                    what: WHAT,
                    reason: "empty data frame",
                });
            }
            if len > MAX_FRAME_DATA {
                return Err(ProtoError::TooLarge {
                    what: "data frame",
                    len: u64::from(len),
                    max: u64::from(MAX_FRAME_DATA),
                });
            }
            let len = usize::try_from(len).map_err(|_| ProtoError::Invalid {
                what: WHAT,
                reason: "length does not fit in memory",
            })?;
            Ok(Some((FrameHead::Data(len), DATA_HEAD_LEN)))
        }
        FRAME_END => Ok(Some((FrameHead::End, 1))),
        FRAME_RESET => Ok(Some((FrameHead::Reset, 1))),
        other => Err(ProtoError::UnknownType {
            what: WHAT,
            tag: u64::from(other),
        }),
    }
}

/// Size of the read-ahead buffer, allocated on the first read smaller than [`DIRECT_READ_MIN`]
/// (payload is streamed through it, frames need not fit).
const RBUF_LEN: usize = 64 * 1024;
/// Size of the read buffer until then: frame heads only (a partial head plus the next head read
/// along with a payload), so that a stream read with large buffers (a relay) holds no more.
const HEAD_BUF_LEN: usize = 16;
/// Read payload straight into the caller's buffer when at least this much is wanted.
const DIRECT_READ_MIN: usize = 8 * 1024;
/// A write buffer grown beyond this (a whole frame queued on a transport without vectored
/// writes) is freed once drained, so that an idle stream does not keep it.
const WBUF_KEEP: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// The peer's END frame arrived: reads return EOF.
    Ended,
    /// The peer's RESET frame arrived: reads and writes fail with `ConnectionReset`.
    PeerReset,
    /// This side sent a RESET.
    LocalReset,
    /// The stream broke the protocol or ended without END; reads fail.
    Failed(io::ErrorKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    Open,
    /// END is in the write buffer.
    Ending,
    /// END was written and flushed.
    Ended,
    /// RESET is in the write buffer.
    Resetting,
    /// RESET was written and flushed.
    Reset,
}

/// A byte stream in framed mode, over any transport stream `S`.
///
/// * Writes become data frames (at most [`MAX_FRAME_DATA`] bytes each). Like a `BufWriter`,
///   a write may be accepted before it reaches `S`: call `flush` (or `shutdown`) to push it.
///   A short write (`Ok(k)` with `k` less than offered) must be followed by writing the rest,
///   as `write_all` does: the frame's head has announced it. Shutting down instead is an
///   `InvalidInput` error, and a reset then ends the transport stream (the peer sees a reset).
/// * `shutdown` sends an END frame and flushes, but leaves `S` open so that the other direction
///   keeps flowing. Later writes fail with `BrokenPipe`.
/// * [`Framed::reset`] sends a RESET frame: the peer's reads and writes then fail with
///   `ConnectionReset`; this side's reads fail with `ConnectionAborted`.
/// * Reading the peer's END yields EOF (`Ok(0)`), while writing stays possible. Reads after
///   END keep returning EOF without reading `S`, so a RESET the peer sends after its END is
///   not reported by reads; the peer then closes the stream and this side's writes fail. `S` ending
///   without an END frame, or a malformed frame, is an error (`UnexpectedEof`, `InvalidData`):
///   treat it like a reset.
#[derive(Debug)]
pub struct Framed<S> {
    inner: S,
    rbuf: Box<[u8]>,
    rpos: usize,
    rlen: usize,
    /// Payload bytes of the current data frame not yet read from `S` or `rbuf`.
    data_left: usize,
    rstate: ReadState,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Payload bytes of the data frame being written that the caller has not handed over yet
    /// (after a short write, the frame's head already announced them).
    owed: usize,
    wstate: WriteState,
}

impl<S> Framed<S> {
    /// Wraps a transport stream whose header (and status) have been exchanged.
    pub fn new(inner: S) -> Self {
        Framed {
            inner,
            rbuf: vec![0u8; HEAD_BUF_LEN].into_boxed_slice(),
            rpos: 0,
            rlen: 0,
            data_left: 0,
            rstate: ReadState::Open,
            wbuf: Vec::new(),
            wpos: 0,
            owed: 0,
            wstate: WriteState::Open,
        }
    }

    /// The transport stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The transport stream (writing to it directly breaks the framing).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Whether the peer has sent END (reads return EOF).
    pub fn peer_ended(&self) -> bool {
        self.rstate == ReadState::Ended
    }

    /// Whether the peer has sent RESET.
    pub fn peer_reset(&self) -> bool {
        self.rstate == ReadState::PeerReset
    }

    /// The transport stream, dropping buffered bytes.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "peer reset the link stream")
}

fn invalid(e: ProtoError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncRead + Unpin> Framed<S> {
    /// Reads from `S` into the free end of `rbuf`, until `rbuf` holds at most `limit` bytes;
    /// `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<io::Result<usize>> {
        if limit > self.rbuf.len() {
            // First read-ahead: grow the head buffer, keeping what it holds.
            let mut grown = vec![0u8; RBUF_LEN.max(limit)].into_boxed_slice();
            let held = self.rbuf.get(self.rpos..self.rlen).unwrap_or_default();
            if let Some(dst) = grown.get_mut(..held.len()) {
                dst.copy_from_slice(held);
            }
            self.rlen -= self.rpos;
            self.rpos = 0;
            self.rbuf = grown;
        }
        if self.rpos == self.rlen {
            self.rpos = 0;
            self.rlen = 0;
        } else if self.rpos > 0 {
            self.rbuf.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
        }
        let end = limit.max(self.rlen + 1).min(self.rbuf.len());
        let Some(free) = self.rbuf.get_mut(self.rlen..end).filter(|f| !f.is_empty()) else {
            return Poll::Ready(Err(io::Error::other("framed read buffer overrun")));
        };
        let mut rb = ReadBuf::new(free);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.rlen += n;
        Poll::Ready(Ok(n))
    }

    /// `region` holds bytes just read from `S` at a frame boundary (nothing buffered, no frame
    /// in progress): moves the payload of the frames in it to its front, over their heads, and
    /// returns the payload's length. A frame that goes on past `region` leaves `data_left`; a
    /// head cut short is kept in `rbuf`; after END or RESET the state changes and the rest
    /// (nothing but a RESET may follow an END) is dropped.
    fn deframe_in_place(&mut self, region: &mut [u8]) -> Result<usize, ProtoError> {
        let (mut i, mut out) = (0, 0);
        while i < region.len() {
            let rest = region.get(i..).unwrap_or_default();
            let Some((head, used)) = decode_frame_head(rest)? else {
                // A partial head (shorter than DATA_HEAD_LEN, so it fits the head buffer).
                let Some(dst) = self.rbuf.get_mut(..rest.len()) else {
                    return Err(ProtoError::Invalid {
                        what: WHAT,
                        reason: "partial frame head longer than a head",
                    });
                };
                dst.copy_from_slice(rest);
                self.rpos = 0;
                self.rlen = rest.len();
                break;
            };
            i += used;
            match head {
                FrameHead::Data(len) => {
                    let take = len.min(region.len() - i);
                    region.copy_within(i..i + take, out);
                    out += take;
                    i += take;
                    self.data_left = len - take;
                }
                FrameHead::End => {
                    self.rstate = ReadState::Ended;
                    break;
                }
                FrameHead::Reset => {
                    self.rstate = ReadState::PeerReset;
                    break;
                }
            }
        }
        Ok(out)
    }

    fn fail(&mut self, kind: io::ErrorKind, e: io::Error) -> Poll<io::Result<()>> {
        self.rstate = ReadState::Failed(kind);
        Poll::Ready(Err(e))
    }

    /// Whether the next byte of the transport starts a frame (nothing buffered, no payload
    /// owed, the peer has not ended).
    #[cfg(target_os = "linux")]
    pub fn at_frame_boundary(&self) -> bool {
        self.rstate == ReadState::Open && self.data_left == 0 && self.rpos == self.rlen
    }

    /// At a frame boundary, reads the next frame's head and nothing more (so that a data
    /// frame's payload stays in the transport, to be spliced): a data frame's length, END or
    /// RESET, as a read would take them. Does nothing elsewhere.
    #[cfg(target_os = "linux")]
    pub fn poll_read_head(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.rstate == ReadState::Open && self.data_left == 0 {
            match self.take_head() {
                Ok(true) => {}
                // At most a head's bytes: after END only RESET may follow, and a data frame's
                // payload is not read.
                Ok(false) => ready!(self.poll_fill_head(cx, DATA_HEAD_LEN))?,
                Err(e) => return self.fail(io::ErrorKind::InvalidData, invalid(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes the frame head buffered at `rbuf[rpos..rlen]`, if it is whole: a data frame's
    /// length, END or RESET; `Ok(false)` when more bytes are needed.
    fn take_head(&mut self) -> Result<bool, ProtoError> {
        let pending = self.rbuf.get(self.rpos..self.rlen).unwrap_or_default();
        let Some((head, used)) = decode_frame_head(pending)? else {
            return Ok(false);
        };
        self.rpos += used;
        match head {
            FrameHead::Data(len) => self.data_left = len,
            FrameHead::End => self.rstate = ReadState::Ended,
            FrameHead::Reset => self.rstate = ReadState::PeerReset,
        }
        Ok(true)
    }

    /// Reads more of a frame head (see [`Framed::poll_fill`]); the transport ending there is an
    /// error, inside a head or before one.
    fn poll_fill_head(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<io::Result<()>> {
        let partial = self.rpos < self.rlen;
        if ready!(self.poll_fill(cx, limit))? > 0 {
            return Poll::Ready(Ok(()));
        }
        let what = if partial {
            "link stream ended inside a frame head"
        } else {
            "link stream ended without an end-of-stream frame"
        };
        self.fail(
            io::ErrorKind::UnexpectedEof,
            io::Error::new(io::ErrorKind::UnexpectedEof, what),
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Framed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.rstate {
                ReadState::Open => {}
                ReadState::Ended => return Poll::Ready(Ok(())),
                ReadState::PeerReset => return Poll::Ready(Err(reset_error())),
                ReadState::LocalReset => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "link stream reset by this side",
                    )));
                }
                ReadState::Failed(kind) => {
                    return Poll::Ready(Err(io::Error::new(kind, "link stream failed earlier")));
                }
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.data_left > 0 {
                let buffered = this.rbuf.get(this.rpos..this.rlen).unwrap_or_default();
                if !buffered.is_empty() {
                    let n = buffered.len().min(this.data_left).min(buf.remaining());
                    buf.put_slice(buffered.get(..n).unwrap_or_default());
                    this.rpos += n;
                    this.data_left -= n;
                    return Poll::Ready(Ok(()));
                }
                let want = this.data_left.min(buf.remaining());
                let n = if buf.remaining() >= DIRECT_READ_MIN {
                    // A large caller's buffer: the payload straight into it, no copy (nor a
                    // read-ahead buffer for a small payload whose head came alone). If the rest of the
                    // frame fits with room to spare, read the next frame's head along with it
                    // (into the unfilled part of the caller's buffer, then moved to `rbuf`), so
                    // that a stream of data frames costs one read per frame.
                    let ahead = if want == this.data_left {
                        DATA_HEAD_LEN.min(buf.remaining() - want)
                    } else {
                        0
                    };
                    let mut direct = ReadBuf::new(buf.initialize_unfilled_to(want + ahead));
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                    let got = direct.filled().len();
                    let n = got.min(want);
                    if got > n {
                        // Only the empty head buffer receives these (payload is read
                        // straight only when `rbuf` holds nothing).
                        let extra = direct.filled().get(n..got).unwrap_or_default();
                        let Some(dst) = this.rbuf.get_mut(..extra.len()) else {
                            return Poll::Ready(Err(io::Error::other(
                                "framed read buffer overrun",
                            )));
                        };
                        dst.copy_from_slice(extra);
                        this.rpos = 0;
                        this.rlen = extra.len();
                    }
                    buf.advance(n);
                    this.data_left -= n;
                    if n > 0 {
                        return Poll::Ready(Ok(()));
                    }
                    n
                } else {
                    ready!(this.poll_fill(cx, RBUF_LEN))?
                };
                if n == 0 {
                    return this.fail(
                        io::ErrorKind::UnexpectedEof,
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "link stream ended inside a data frame",
                        ),
                    );
                }
                continue;
            }
            match this.take_head() {
                Ok(true) => {}
                Ok(false) => {
                    let partial = this.rpos < this.rlen;
                    if !partial && buf.remaining() >= DIRECT_READ_MIN {
                        // A large caller's buffer and no head begun: read the head with what
                        // follows it straight into the caller's buffer (a small frame, or
                        // several, in one read) and take the heads out in place; the payload
                        // of a large frame is then read straight, as below.
                        let mut window = ReadBuf::new(buf.initialize_unfilled_to(DIRECT_READ_MIN));
                        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut window))?;
                        let got = window.filled().len();
                        if got == 0 {
                            return this.fail(
                                io::ErrorKind::UnexpectedEof,
                                io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "link stream ended without an end-of-stream frame",
                                ),
                            );
                        }
                        let region = buf.initialize_unfilled_to(got);
                        match this.deframe_in_place(region) {
                            Ok(n) => {
                                buf.advance(n);
                                if n > 0 {
                                    return Poll::Ready(Ok(()));
                                }
                            }
                            Err(e) => return this.fail(io::ErrorKind::InvalidData, invalid(e)),
                        }
                        continue;
                    }
                    // If the caller's buffer is large, read just the rest of the head so that
                    // the payload can go straight into it; else read ahead as much as fits.
                    let limit = if buf.remaining() >= DIRECT_READ_MIN {
                        DATA_HEAD_LEN
                    } else {
                        RBUF_LEN
                    };
                    ready!(this.poll_fill_head(cx, limit))?;
                }
                Err(e) => return this.fail(io::ErrorKind::InvalidData, invalid(e)),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Framed<S> {
    /// Writes out the whole write buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let pending = self.wbuf.get(self.wpos..).unwrap_or_default();
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        if self.wbuf.capacity() > WBUF_KEEP {
            self.wbuf = Vec::new();
        } else {
            self.wbuf.clear();
        }
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// Queues an END or RESET frame (after whatever is buffered) and pushes it out.
    fn poll_control_frame(
        &mut self,
        cx: &mut Context<'_>,
        head: FrameHead,
        queued: WriteState,
        done: WriteState,
    ) -> Poll<io::Result<()>> {
        if self.wstate != queued {
            ready!(self.poll_drain(cx))?;
            head.encode(&mut self.wbuf).map_err(invalid)?;
            self.wstate = queued;
        }
        ready!(self.poll_drain(cx))?;
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.wstate = done;
        Poll::Ready(Ok(()))
    }

    /// Sends a RESET frame: the peer's reads and writes fail with `ConnectionReset`. Allowed
    /// after `shutdown`. Data already accepted by `write` is sent first (a frame cannot be cut).
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.wstate == WriteState::Reset {
            return Poll::Ready(Ok(()));
        }
        if self.owed > 0 {
            // The caller gave up in the middle of a data frame: the frame cannot be finished,
            // so no RESET frame can follow it. Shut the transport stream down instead; the
            // peer sees the stream end inside a frame, which it treats as a reset.
            ready!(self.poll_drain(cx))?;
            ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
            self.owed = 0;
            self.wstate = WriteState::Reset;
        } else {
            ready!(self.poll_control_frame(
                cx,
                FrameHead::Reset,
                WriteState::Resetting,
                WriteState::Reset
            ))?;
        }
        if !matches!(self.rstate, ReadState::PeerReset | ReadState::Failed(_)) {
            self.rstate = ReadState::LocalReset;
        }
        Poll::Ready(Ok(()))
    }

    /// Sends a RESET frame; see [`Framed::poll_reset`].
    pub async fn reset(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_reset(cx)).await
    }

    /// Whether a data frame may be written now.
    fn check_writable(&self) -> io::Result<()> {
        match self.wstate {
            WriteState::Open => {}
            WriteState::Ending | WriteState::Ended => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "write after shutdown of the link stream",
                ));
            }
            WriteState::Resetting | WriteState::Reset => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "write after reset of the link stream",
                ));
            }
        }
        if self.rstate == ReadState::PeerReset {
            return Err(reset_error());
        }
        Ok(())
    }

    /// Writes the rest of a frame whose head is out (`owed > 0`, write buffer drained): these
    /// bytes go straight through.
    fn poll_write_owed(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = self.owed.min(buf.len());
        let chunk = buf.get(..n).unwrap_or_default();
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, chunk))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.owed -= written.min(self.owed);
        Poll::Ready(Ok(written))
    }

    /// Writes `frame[DATA_HEAD_LEN..]` as payload, using `frame[..DATA_HEAD_LEN]` as room for
    /// the data frame's head (overwritten), so that head and payload leave in one write
    /// without copying the payload, vectored writes or not. Returns how many payload bytes
    /// were taken, like `poll_write` (`Ok(0)` only for an empty payload).
    ///
    /// As after a short `poll_write`, the rest must be written next (by this or `poll_write`).
    /// `Pending` may also follow a head that went out only in part: then too the same payload
    /// must be offered again.
    pub fn poll_write_headroom(
        &mut self,
        cx: &mut Context<'_>,
        frame: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.check_writable()?;
        let Some((room, payload)) = frame.split_first_chunk_mut::<DATA_HEAD_LEN>() else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no room for a frame head",
            )));
        };
        if payload.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.poll_drain(cx))?;
        if self.owed > 0 {
            return self.poll_write_owed(cx, payload);
        }
        let n = payload.len().min(MAX_FRAME_DATA as usize);
        let mut head = Vec::with_capacity(DATA_HEAD_LEN);
        FrameHead::Data(n).encode(&mut head).map_err(invalid)?;
        room.copy_from_slice(head.get(..DATA_HEAD_LEN).unwrap_or_default());
        let out = frame.get(..DATA_HEAD_LEN + n).unwrap_or_default();
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, out))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        if written > DATA_HEAD_LEN {
            let took = written - DATA_HEAD_LEN;
            self.owed = n - took.min(n);
            return Poll::Ready(Ok(took.min(n)));
        }
        // At most the head went out: queue the rest of it; the payload is owed.
        self.wbuf
            .extend_from_slice(head.get(written..).unwrap_or_default());
        self.owed = n;
        ready!(self.poll_drain(cx))?;
        let payload = frame
            .get(DATA_HEAD_LEN..DATA_HEAD_LEN + n)
            .unwrap_or_default();
        self.poll_write_owed(cx, payload)
    }
}

/// Splicing the payload of data frames (Linux; see [`crate::splice`]): the relay moves a large
/// frame's payload between the transport's descriptor and a pipe, and the frames stay exactly
/// as [`Framed`]'s own reads and writes make them.
#[cfg(target_os = "linux")]
impl<S: Splice + AsyncWrite + Unpin> Framed<S> {
    /// Payload bytes of the current data frame that may be spliced out of the transport now:
    /// those not read yet, when nothing of them is buffered (else 0: read them).
    pub fn splice_readable(&self) -> usize {
        if self.rstate == ReadState::Open && self.rpos == self.rlen {
            self.data_left
        } else {
            0
        }
    }

    /// Runs `op` (a splice out of the transport's descriptor, of at most the byte count it is
    /// given) when the transport is readable, for the current frame's payload
    /// ([`Framed::splice_readable`] bytes at most). The transport ending inside the frame is
    /// an error, as for reads.
    pub fn poll_splice_read(
        &mut self,
        cx: &mut Context<'_>,
        op: &mut dyn FnMut(BorrowedFd<'_>, usize) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let max = self.splice_readable();
        if max == 0 {
            return Poll::Ready(Err(io::Error::other("no frame payload to splice now")));
        }
        let r = self
            .inner
            .poll_splice_or_err(cx, Interest::READABLE, &mut |fd| op(fd, max));
        match ready!(r) {
            Ok(0) => {
                self.rstate = ReadState::Failed(io::ErrorKind::UnexpectedEof);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "link stream ended inside a data frame",
                )))
            }
            Ok(n) => {
                self.data_left -= n.min(self.data_left);
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Writes `avail` payload bytes that `op` moves into the transport's descriptor (a splice
    /// from a pipe, of at most the byte count it is given): a data frame's head for up to
    /// [`MAX_FRAME_DATA`] of them first (like a write), then as much of its payload as the
    /// transport takes. Returns the payload bytes moved; as after a short write, the rest of
    /// the frame must follow (by this, or by writes).
    pub fn poll_splice_write(
        &mut self,
        cx: &mut Context<'_>,
        avail: usize,
        op: &mut dyn FnMut(BorrowedFd<'_>, usize) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        self.check_writable()?;
        if avail == 0 {
            return Poll::Ready(Ok(0));
        }
        ready!(self.poll_drain(cx))?;
        if self.owed == 0 {
            let n = avail.min(MAX_FRAME_DATA as usize);
            FrameHead::Data(n).encode(&mut self.wbuf).map_err(invalid)?;
            self.owed = n;
            // Pending leaves the head queued and the payload owed: the next call goes on.
            ready!(self.poll_drain(cx))?;
        }
        let max = self.owed.min(avail);
        let n = ready!(
            self.inner
                .poll_splice_or_err(cx, Interest::WRITABLE, &mut |fd| op(fd, max))
        )?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.owed -= n.min(self.owed);
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Framed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_writable()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_drain(cx))?;
        if this.owed > 0 {
            return this.poll_write_owed(cx, buf);
        }
        let n = buf.len().min(MAX_FRAME_DATA as usize);
        let chunk = buf.get(..n).unwrap_or_default();
        let mut head = Vec::with_capacity(DATA_HEAD_LEN);
        FrameHead::Data(n).encode(&mut head).map_err(invalid)?;
        if this.inner.is_write_vectored() {
            // Head and payload in one syscall, without copying the payload; only what the
            // transport did not take is queued.
            let slices = [IoSlice::new(&head), IoSlice::new(chunk)];
            let written = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &slices))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if written >= head.len() + n {
                return Poll::Ready(Ok(n));
            }
            if written > head.len() {
                // A short write: report it as such, and take the rest of this frame's payload
                // from the caller's next writes (no copy).
                let payload = written - head.len();
                this.owed = n - payload;
                return Poll::Ready(Ok(payload));
            }
            // Not even the head went out whole: queue the rest of the frame.
            this.wbuf
                .extend_from_slice(head.get(written..).unwrap_or_default());
            this.wbuf.extend_from_slice(chunk);
        } else {
            this.wbuf.extend_from_slice(&head);
            this.wbuf.extend_from_slice(chunk);
        }
        // Push it out now if the transport takes it; if not, it stays queued for the next
        // write or flush (the waker is registered either way).
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.owed > 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shutdown in the middle of a data frame: a short write was not completed",
            )));
        }
        match this.wstate {
            WriteState::Open | WriteState::Ending => {
                this.poll_control_frame(cx, FrameHead::End, WriteState::Ending, WriteState::Ended)
            }
            WriteState::Ended => Poll::Ready(Ok(())),
            WriteState::Resetting | WriteState::Reset => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "shutdown after reset of the link stream",
            ))),
        }
    }
}

/// A link stream in its payload phase, raw or framed as its header said; relays can be written
/// once against this type.
#[derive(Debug)]
pub enum PayloadStream<S> {
    /// Raw mode: the transport stream itself.
    Raw(S),
    /// Framed mode.
    Framed(Framed<S>),
}

impl<S> PayloadStream<S> {
    /// Wraps `inner` for `mode`.
    pub fn new(inner: S, mode: StreamMode) -> Self {
        match mode {
            StreamMode::Raw => PayloadStream::Raw(inner),
            StreamMode::Framed => PayloadStream::Framed(Framed::new(inner)),
        }
    }

    /// The mode.
    pub fn mode(&self) -> StreamMode {
        match self {
            PayloadStream::Raw(_) => StreamMode::Raw,
            PayloadStream::Framed(_) => StreamMode::Framed,
        }
    }

    /// The transport stream.
    pub fn get_ref(&self) -> &S {
        match self {
            PayloadStream::Raw(s) => s,
            PayloadStream::Framed(f) => f.get_ref(),
        }
    }

    /// The transport stream (writing to it directly breaks framed mode).
    pub fn get_mut(&mut self) -> &mut S {
        match self {
            PayloadStream::Raw(s) => s,
            PayloadStream::Framed(f) => f.get_mut(),
        }
    }
}

impl<S: AsyncWrite + Unpin> PayloadStream<S> {
    /// Writes `frame[DATA_HEAD_LEN..]`: in framed mode as [`Framed::poll_write_headroom`]
    /// (head and payload in one write, `frame[..DATA_HEAD_LEN]` overwritten), in raw mode as a
    /// plain write. Returns the payload bytes taken.
    pub fn poll_write_headroom(
        &mut self,
        cx: &mut Context<'_>,
        frame: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            PayloadStream::Raw(s) => {
                let payload = frame.get(DATA_HEAD_LEN..).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "no room for a frame head")
                })?;
                Pin::new(s).poll_write(cx, payload)
            }
            PayloadStream::Framed(f) => f.poll_write_headroom(cx, frame),
        }
    }

    /// In framed mode, sends a RESET frame and returns `Ok(true)`. In raw mode does nothing
    /// and returns `Ok(false)`: the caller resets the transport stream its own way
    /// (`SO_LINGER` 0 then close; QUIC `reset`).
    pub async fn reset_framed(&mut self) -> io::Result<bool> {
        match self {
            PayloadStream::Raw(_) => Ok(false),
            PayloadStream::Framed(f) => f.reset().await.map(|()| true),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PayloadStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PayloadStream::Raw(s) => Pin::new(s).poll_read(cx, buf),
            PayloadStream::Framed(f) => Pin::new(f).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PayloadStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PayloadStream::Raw(s) => Pin::new(s).poll_write(cx, buf),
            PayloadStream::Framed(f) => Pin::new(f).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PayloadStream::Raw(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PayloadStream::Framed(f) => Pin::new(f).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PayloadStream::Raw(s) => s.is_write_vectored(),
            PayloadStream::Framed(f) => f.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PayloadStream::Raw(s) => Pin::new(s).poll_flush(cx),
            PayloadStream::Framed(f) => Pin::new(f).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PayloadStream::Raw(s) => Pin::new(s).poll_shutdown(cx),
            PayloadStream::Framed(f) => Pin::new(f).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_heads_round_trip_and_limits_hold() {
        let max = MAX_FRAME_DATA as usize;
        for head in [
            FrameHead::Data(1),
            FrameHead::Data(max),
            FrameHead::End,
            FrameHead::Reset,
        ] {
            let mut out = Vec::new();
            head.encode(&mut out).unwrap();
            assert_eq!(decode_frame_head(&out).unwrap(), Some((head, out.len())));
            assert_eq!(decode_frame_head(&out[..out.len() - 1]).unwrap(), None);
        }
        assert!(FrameHead::Data(0).encode(&mut Vec::new()).is_err());
        assert!(FrameHead::Data(max + 1).encode(&mut Vec::new()).is_err());
        let mut over = vec![FRAME_DATA];
        over.extend_from_slice(&(MAX_FRAME_DATA + 1).to_be_bytes());
        assert!(matches!(
            decode_frame_head(&over),
            Err(ProtoError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_frame_head(&[0]),
            Err(ProtoError::UnknownType { tag: 0, .. })
        ));
    }
}
