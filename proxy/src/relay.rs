//! The TCP relay: bytes both ways between two sockets, half-close carried, resets passed on.
//!
//! Each direction moves data with splice(2) through a pipe (socket → pipe → socket, no copy into
//! user space). A direction holds a pipe only while bytes are in it: the pipe is taken from a
//! small per-thread pool when the source turns readable and given back once drained, so an idle
//! connection costs its two sockets and nothing else (docker-proxy keeps six descriptors per
//! connection). The pipe is refilled only when empty, so a splice into it can only block on the
//! socket, never on the pipe. When no pipe can be had (descriptor limit) or the kernel refuses to
//! splice a socket (`EINVAL`), the direction falls back to a buffered copy through a pooled buffer,
//! again held only while bytes are in flight.
//!
//! End of stream on one side becomes `shutdown(SHUT_WR)` on the other while the reverse
//! direction keeps flowing. An error on either side (a reset, a broken pipe) ends both
//! directions at once and the caller resets both sockets (`SO_LINGER` 0), so a reset is passed on
//! as a reset, never as a clean FIN.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::task::{Context, Poll, ready};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe size asked for (the kernel may give less); bigger pipes mean fewer syscalls in bulk.
const PIPE_SIZE: i32 = 1 << 20;
/// Buffer size for the buffered fallback.
const BUF_SIZE: usize = 64 * 1024;
/// Idle pipes and buffers kept for reuse per thread; the rest are closed or freed.
const POOL_MAX: usize = 16;

/// A pipe for splicing: read end, write end, and how much one splice may move.
#[derive(Debug)]
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let cap = match fcntl(w.as_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
            Ok(n) => usize::try_from(n).unwrap_or(64 * 1024),
            // Over the per-user pipe quota the default size stays; still correct.
            Err(_) => fcntl(w.as_fd(), FcntlArg::F_GETPIPE_SZ)
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(64 * 1024),
        };
        Ok(Pipe { r, w, cap })
    }

    /// How many buffers the pipe holds (one page each at most, one byte each at least).
    fn slots(&self) -> usize {
        self.cap / 4096
    }

    /// Returns an empty pipe to the pool.
    fn give_back(self) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
            }
        });
    }
}

fn take_buf() -> Box<[u8]> {
    BUFS.with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice())
}

fn give_back_buf(buf: Box<[u8]>) {
    BUFS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < POOL_MAX {
            b.push(buf);
        }
    });
}

/// Bytes in flight in one direction.
#[derive(Debug)]
enum InFlight {
    /// Nothing held.
    Empty,
    /// `len` bytes sit in the pipe.
    Pipe { pipe: Pipe, len: usize },
    /// `buf[pos..len]` still to be written.
    Buf {
        buf: Box<[u8]>,
        pos: usize,
        len: usize,
    },
}

/// One direction of the relay: `src` → `dst`.
#[derive(Debug)]
struct Direction {
    held: InFlight,
    /// Splice refused for these sockets: copy through a buffer from now on.
    buffered: bool,
    /// `src` reached end of stream and everything was written; `dst` was shut down for writing.
    done: bool,
    bytes: u64,
}

/// Which side failed when a relay ends in error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepted (client) socket.
    Client,
    /// The socket towards the container.
    Backend,
}

/// How a relay ended.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes client → backend.
    pub up: u64,
    /// Bytes backend → client.
    pub down: u64,
    /// `None` for a clean end (both directions reached EOF); otherwise the first error, and
    /// which side it came from. Both sockets should then be reset.
    pub error: Option<(Side, io::Error)>,
}

impl Direction {
    fn new() -> Direction {
        Direction {
            held: InFlight::Empty,
            buffered: false,
            done: false,
            bytes: 0,
        }
    }

    /// Moves bytes until `src` would block with nothing held, or the direction is done.
    /// Errors say which side failed.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        src_side: Side,
        dst_side: Side,
    ) -> Poll<Result<(), (Side, io::Error)>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // Drain what is held before reading more.
            match &mut self.held {
                InFlight::Empty => {}
                InFlight::Pipe { pipe, len } => {
                    ready!(dst.poll_write_ready(cx)).map_err(|e| (dst_side, e))?;
                    let n = match dst.try_io(Interest::WRITABLE, || {
                        splice_io(pipe.r.as_fd(), dst.as_fd(), *len)
                    }) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err((dst_side, e))),
                    };
                    *len -= n;
                    self.bytes += n as u64;
                    if *len == 0
                        && let InFlight::Pipe { pipe, .. } =
                            std::mem::replace(&mut self.held, InFlight::Empty)
                    {
                        pipe.give_back();
                    }
                    continue;
                }
                InFlight::Buf { buf, pos, len } => {
                    ready!(dst.poll_write_ready(cx)).map_err(|e| (dst_side, e))?;
                    let n = match dst.try_write(&buf[*pos..*len]) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err((dst_side, e))),
                    };
                    *pos += n;
                    self.bytes += n as u64;
                    if *pos == *len
                        && let InFlight::Buf { buf, .. } =
                            std::mem::replace(&mut self.held, InFlight::Empty)
                    {
                        give_back_buf(buf);
                    }
                    continue;
                }
            }
            // Nothing held: wait for the source, then take a pipe or a buffer for this chunk.
            ready!(src.poll_read_ready(cx)).map_err(|e| (src_side, e))?;
            let n = if self.buffered {
                self.read_buffered(src)
            } else {
                self.read_spliced(src)
            };
            match n {
                Ok(0) => {
                    // End of stream, everything written: pass the FIN on.
                    SockRef::from(dst)
                        .shutdown(Shutdown::Write)
                        .or_else(ignore_not_connected)
                        .map_err(|e| (dst_side, e))?;
                    self.done = true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err((src_side, e))),
            }
        }
    }

    /// Splices from `src` into a pipe; falls back to a buffer when splicing is not possible.
    fn read_spliced(&mut self, src: &TcpStream) -> io::Result<usize> {
        let pipe = match Pipe::take() {
            Ok(p) => p,
            // No descriptor for a pipe right now: this chunk goes through a buffer.
            Err(_) => return self.read_buffered(src),
        };
        match src.try_io(Interest::READABLE, || {
            splice_io(src.as_fd(), pipe.w.as_fd(), pipe.cap)
        }) {
            Ok(0) => {
                pipe.give_back();
                Ok(0)
            }
            Ok(n) => {
                if n < pipe.slots() {
                    // A non-blocking splice from TCP takes everything queued unless the pipe
                    // fills, and a pipe of N slots holds at least N bytes when full: fewer bytes
                    // prove the socket drained. Forget its readiness now, as tokio does after a
                    // short read(2), instead of paying for an EAGAIN splice. On a current-thread
                    // runtime no readiness event can land between the two calls.
                    let _ = src.try_io(Interest::READABLE, || {
                        Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
                    });
                }
                self.held = InFlight::Pipe { pipe, len: n };
                Ok(n)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                pipe.give_back();
                self.buffered = true;
                self.read_buffered(src)
            }
            Err(e) => {
                pipe.give_back();
                Err(e)
            }
        }
    }

    fn read_buffered(&mut self, src: &TcpStream) -> io::Result<usize> {
        let mut buf = take_buf();
        match src.try_read(&mut buf) {
            Ok(n) if n > 0 => {
                self.held = InFlight::Buf {
                    buf,
                    pos: 0,
                    len: n,
                };
                Ok(n)
            }
            other => {
                give_back_buf(buf);
                other
            }
        }
    }

    /// Gives back what the direction holds (the relay is over).
    fn release(&mut self) {
        match std::mem::replace(&mut self.held, InFlight::Empty) {
            InFlight::Empty => {}
            // A pipe with bytes still in it cannot be reused: it is closed.
            InFlight::Pipe { .. } => {}
            InFlight::Buf { buf, .. } => give_back_buf(buf),
        }
    }
}

/// A peer that already went away cannot be shut down; that is not an error for the relay.
fn ignore_not_connected(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotConnected {
        Ok(())
    } else {
        Err(e)
    }
}

/// splice(2) without blocking; `EAGAIN` comes back as `WouldBlock` so that tokio clears the
/// readiness it was woken for.
fn splice_io(
    from: std::os::fd::BorrowedFd<'_>,
    to: std::os::fd::BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    loop {
        match splice(
            from,
            None,
            to,
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        ) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Relays between `client` and `backend` until both directions reach end of stream, or until
/// the first error on either side.
pub async fn relay(client: &TcpStream, backend: &TcpStream) -> Outcome {
    let mut up = Direction::new();
    let mut down = Direction::new();
    let result = poll_fn(|cx| {
        let a = up.poll(cx, client, backend, Side::Client, Side::Backend)?;
        let b = down.poll(cx, backend, client, Side::Backend, Side::Client)?;
        if a.is_ready() && b.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    up.release();
    down.release();
    Outcome {
        up: up.bytes,
        down: down.bytes,
        error: result.err(),
    }
}

/// Closes `stream` with a reset (RST) rather than a FIN.
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
