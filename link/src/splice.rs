//! Relaying without copying through user space (Linux): `splice(2)` from one socket into a
//! pipe, then from the pipe into the other socket. The pages move by reference: TCP hands its
//! receive buffers to the pipe, and unix and TCP sockets send pipe pages as they are
//! (`MSG_SPLICE_PAGES`), so a relay on a unix link copies no payload at all, where reading and
//! writing copies every byte twice (into the relay's buffer and out of it).
//!
//! [`Splice`] is what a relay needs of an I/O object to splice it: its descriptor, under the
//! runtime's readiness. It is implemented by `TcpStream` and by link streams on unix sockets
//! (which include the host side of hybrid vsock); on other transports and on other systems the
//! relay copies (the trait has no methods there).
//!
//! A pipe is filled only when it is empty, so that `EAGAIN` from the source can only mean
//! "nothing to read" (a full pipe would say the same), and emptied before it is filled again.

#[cfg(target_os = "linux")]
use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(target_os = "linux")]
use std::task::{Context, Poll};

#[cfg(target_os = "linux")]
use tokio::io::Interest;
use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use crate::pool::Pool;

/// An operation on a ready descriptor: `splice` into or out of a pipe.
#[cfg(target_os = "linux")]
pub type FdOp<'a> = dyn FnMut(BorrowedFd<'_>) -> io::Result<usize> + 'a;

/// I/O whose descriptor a relay may splice to and from (see the module docs). Elsewhere than
/// on Linux, a marker without methods: relays copy.
pub trait Splice {
    /// Waits until the descriptor is ready for `interest` (one of readable or writable) and
    /// runs `op` on it, like tokio's `try_io`: `WouldBlock` from `op` clears that readiness and
    /// waits again. `None`: this I/O cannot be spliced (the relay copies).
    #[cfg(target_os = "linux")]
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        interest: Interest,
        op: &mut FdOp<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        let _ = (cx, interest, op);
        None
    }

    /// [`Splice::poll_splice`], an I/O that cannot be spliced being an `Unsupported` error.
    #[cfg(target_os = "linux")]
    fn poll_splice_or_err(
        &mut self,
        cx: &mut Context<'_>,
        interest: Interest,
        op: &mut FdOp<'_>,
    ) -> Poll<io::Result<usize>> {
        self.poll_splice(cx, interest, op)
            .unwrap_or_else(|| Poll::Ready(Err(unsupported())))
    }

    /// Whether [`Splice::poll_splice`] works on this I/O in that direction.
    fn can_splice(&self, way: Way) -> bool {
        let _ = way;
        false
    }
}

/// The error of splicing an end that cannot be spliced.
#[cfg(target_os = "linux")]
pub(crate) fn unsupported() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "this end cannot be spliced")
}

/// Which way bytes are spliced, as seen from the I/O object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Out of it (it is read from).
    From,
    /// Into it (it is written to).
    Into,
}

impl Splice for TcpStream {
    #[cfg(target_os = "linux")]
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        interest: Interest,
        op: &mut FdOp<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        Some(loop {
            let ready = if interest.is_readable() {
                self.poll_read_ready(cx)
            } else {
                self.poll_write_ready(cx)
            };
            match ready {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
            match self.try_io(interest, || op(self.as_fd())) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break Poll::Ready(r),
            }
        })
    }

    #[cfg(target_os = "linux")]
    fn can_splice(&self, _way: Way) -> bool {
        true
    }
}

/// Bytes a pipe is asked to hold (`F_SETPIPE_SZ`; a process over its pipe quota keeps the
/// default 64 KiB): the most one splice moves, like a relay's copy buffer.
#[cfg(target_os = "linux")]
const PIPE_SIZE: usize = 256 * 1024;
/// Empty pipes kept for reuse (process-wide); each holds two descriptors.
#[cfg(target_os = "linux")]
const PIPES_KEPT: usize = 4;

#[cfg(target_os = "linux")]
static PIPES: Pool<Pipe> = Pool::new(PIPES_KEPT);
/// Bytes relays of this process have spliced (written out of a pipe).
static SPLICED: AtomicU64 = AtomicU64::new(0);

/// Whether relays may splice at all: not when `HOSTNET_SPLICE` is `0`, `off`, `false` or `no`
/// (they then copy, as on other systems: a switch for comparing the two, or for a kernel
/// whose splice misbehaves). Read once per process.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let v = std::env::var("HOSTNET_SPLICE").unwrap_or_default();
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "false" | "no"
        )
    })
}

/// Bytes the relays of this process have moved by splicing instead of copying (0 where they
/// cannot splice).
pub fn spliced_bytes() -> u64 {
    SPLICED.load(Ordering::Relaxed)
}

/// A non-blocking pipe between the two splices of a relay direction.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe.
    held: usize,
}

#[cfg(target_os = "linux")]
impl Pipe {
    /// An empty pipe from the pool, or a new one.
    pub(crate) fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.take() {
            return Ok(p);
        }
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Best effort: the default size works, with smaller splices.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe {
            read,
            write,
            held: 0,
        })
    }

    /// Gives an empty pipe back to the pool (one holding bytes is closed).
    pub(crate) fn give(self) {
        if self.held == 0 {
            PIPES.give(self);
        }
    }

    /// Bytes in the pipe.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Moves up to `max` bytes from `src` into the (empty) pipe; `Ok(0)` at the source's EOF.
    pub(crate) fn fill(&mut self, src: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
        debug_assert_eq!(self.held, 0, "a pipe is filled only when empty");
        let n = splice(src, self.write.as_fd(), max.min(PIPE_SIZE))?;
        self.held += n;
        Ok(n)
    }

    /// Moves up to `max` of the pipe's bytes into `dst`.
    pub(crate) fn drain(&mut self, dst: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
        let n = splice(self.read.as_fd(), dst, max.min(self.held))?;
        self.held -= n.min(self.held);
        SPLICED.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(target_os = "linux")]
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    use nix::fcntl::SpliceFFlags;
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        match nix::fcntl::splice(from, None, to, None, len, flags) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}
