//! A connected unix stream socket that the runtime watches for reading only. On Linux the
//! guest's AF_VSOCK streams use it too: virtio vsock likewise signals write space as the peer
//! reads (credit updates), and both can be spliced (see [`crate::splice`]).
//!
//! **Why.** A unix socket wakes whoever waits on it for writing each time the peer *reads*
//! (`unix_write_space`: the bytes leave the sender's send-buffer account when the receiver
//! consumes them). tokio registers every `UnixStream` for both directions, edge-triggered, so
//! a relay that sent a frame and went to sleep is woken again when the other relay reads it,
//! only to find nothing to do: measured in the bridge benchmark, the forwarder switched context
//! 3 times per 64-byte round trip instead of 2 (the third one a pure `EPOLLOUT` edge) — a
//! wake-up per round trip on each side, in the middle of the other side's hop. TCP sockets
//! signal write space only after a writer found the buffer full, so they do not need this.
//!
//! So the socket is registered for readable events only, writes go straight to the socket,
//! and only a write that finds the buffer full registers a duplicate of the descriptor for
//! writable events (one epoll entry per open file description and descriptor number, so the
//! duplicate gets its own interest set); the duplicate goes when the writer flushes, which a
//! relay does when its source has nothing more for now. A bulk stream keeps it while data
//! flows; a request/response stream never makes one.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected stream socket: unix, or (Linux) AF_VSOCK (see the module docs).
#[derive(Debug)]
pub(crate) struct UnixIo {
    /// The socket, registered for readable events only.
    read: AsyncFd<Socket>,
    /// A duplicate registered for writable events while a write waits for room.
    write: Option<AsyncFd<OwnedFd>>,
    /// Whether bulk data was spliced into it (and its send buffer enlarged).
    #[cfg(target_os = "linux")]
    bulk: bool,
    /// An AF_VSOCK stream: spliced out of, not into. Before Linux 6.5, splicing into a socket
    /// went through `sendpage`, which AF_VSOCK lacks, so every 4 KiB page became a vsock
    /// packet of its own: in the real-VM benchmark (Debian's 6.1 guest kernel) guest→host
    /// bulk fell from 138 to 103 MB/s; out of it (one copy into the pipe, instead of two
    /// through user space) it did not lose.
    #[cfg(target_os = "linux")]
    vsock: bool,
}

/// The send buffer of a unix link socket that bulk data is spliced into (the default, about
/// 208 KiB, is less than one pipe's worth: the writer then stalls on every splice).
#[cfg(target_os = "linux")]
const BULK_SNDBUF: usize = 1 << 20;

impl UnixIo {
    /// Takes over a tokio stream (its registration is replaced by a read-only one).
    pub(crate) fn from_tokio(s: tokio::net::UnixStream) -> io::Result<Self> {
        Self::from_std(s.into_std()?)
    }

    /// Registers a connected, non-blocking unix socket.
    pub(crate) fn from_std(s: StdUnixStream) -> io::Result<Self> {
        Self::new(Socket::from(OwnedFd::from(s)), false)
    }

    /// Registers a connected, non-blocking AF_VSOCK stream (its plain `send`, `recv` and
    /// `shutdown` are its stream's, as a unix socket's).
    #[cfg(target_os = "linux")]
    pub(crate) fn from_vsock(fd: OwnedFd) -> io::Result<Self> {
        Self::new(Socket::from(fd), true)
    }

    fn new(s: Socket, vsock: bool) -> io::Result<Self> {
        #[cfg(not(target_os = "linux"))]
        let _ = vsock;
        Ok(UnixIo {
            read: register(s, Interest::READABLE)?,
            write: None,
            #[cfg(target_os = "linux")]
            bulk: false,
            #[cfg(target_os = "linux")]
            vsock,
        })
    }

    fn sock(&self) -> &Socket {
        self.read.get_ref()
    }

    /// Runs `op` (a write) now; if the socket is full, waits for room through the duplicate
    /// registration, made on first need and kept until the writer flushes (goes idle).
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&Socket) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        if self.write.is_none() {
            match op(self.sock()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
            let dup = self.sock().as_fd().try_clone_to_owned()?;
            self.write = Some(register(dup, Interest::WRITABLE)?);
        }
        loop {
            let Some(w) = self.write.as_ref() else {
                return Poll::Ready(Err(io::Error::other("unix write registration lost")));
            };
            let mut guard = ready!(w.poll_write_ready(cx))?;
            match guard.try_io(|_| op(self.read.get_ref())) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    /// Drops the writable registration (the writer is idle: nobody waits for room).
    fn quiet(&mut self) {
        self.write = None;
    }
}

impl crate::splice::Splice for UnixIo {
    #[cfg(target_os = "linux")]
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        interest: Interest,
        op: &mut crate::splice::FdOp<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        if !interest.is_readable() {
            if !self.bulk {
                self.bulk = true;
                // Best effort (capped by net.core.wmem_max): a smaller buffer works, slower.
                let _ = self.sock().set_send_buffer_size(BULK_SNDBUF);
            }
            return Some(self.poll_write_with(cx, |s| op(s.as_fd())));
        }
        Some(loop {
            let mut guard = match self.read.poll_read_ready(cx) {
                Poll::Ready(Ok(g)) => g,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            };
            match guard.try_io(|s| op(s.get_ref().as_fd())) {
                Ok(r) => break Poll::Ready(r),
                Err(_would_block) => continue,
            }
        })
    }

    #[cfg(target_os = "linux")]
    fn can_splice(&self, way: crate::splice::Way) -> bool {
        way == crate::splice::Way::From || !self.vsock
    }
}

/// Registers an owned descriptor with the runtime for `interest`.
fn register<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `fd` is owned (a `UnixStream` or an `OwnedFd`) and moves into the `AsyncFd`, which
    // never hands it out: its descriptor stays open and the same until the `AsyncFd` drops.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

impl AsyncRead for UnixIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.read.poll_read_ready(cx))?;
            // Straight into the unfilled part, initialized or not (a reader's `Vec` spare
            // capacity is not zeroed first).
            // SAFETY: `recv` only writes bytes into it: nothing initialized is de-initialized.
            let unfilled = unsafe { buf.unfilled_mut() };
            let want = unfilled.len();
            match guard.try_io(|s| s.get_ref().recv(unfilled)) {
                Ok(Ok(n)) => {
                    // SAFETY: `recv` wrote the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    // A short read emptied the socket: wait for the next event rather than
                    // try a read that would only say EAGAIN (as tokio's own streams do).
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for UnixIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |s| s.send(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |s| s.send_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Writes are not buffered; a flush means the writer has gone idle, so the writable
    /// registration (if a write needed one) goes.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().quiet();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.quiet();
        Poll::Ready(this.sock().shutdown(Shutdown::Write))
    }
}
