//! The SCTP proxy: accept loop, container connect, message relay.
//!
//! The same shape as the TCP proxy, on the same single-threaded runtime: one listening socket
//! polled by the accept loop, one task per association, both sockets of an association
//! registered with the runtime's epoll (`AsyncFd`), no thread per association (docker-proxy
//! blocks two OS threads in recvmsg for each). The accept loop survives descriptor exhaustion as
//! the TCP one does (back off, accept and abort what is queued with the reserve descriptor).
//!
//! **Per association.** The client's association is accepted (dockerd's listener or ours offers
//! 65,535 streams each way, the client's INIT decides). The proxy connects to the container
//! asking (`SCTP_INITMSG`) for as many outbound streams as the client's association has inbound
//! ones, and taking as many inbound streams as it has outbound ones (read with `SCTP_STATUS`):
//! every stream id the client can send on exists towards the container (if the container takes
//! that many; the kernel allows 65,535), and every one the container can send on exists towards
//! the client. docker-proxy asks for 65,535 outbound streams every time: Linux preallocates an
//! association's outbound stream table for as many streams as it asked for (24 bytes each) and
//! keeps it when the peer takes fewer, so that is about 1.5 MiB of kernel memory per association
//! even when the client uses 10 streams. (The same holds for the client's association, accepted
//! on a listener offering 65,535: dockerd's and ours do, as docker-proxy's.) The connect is
//! bounded by `HOSTNET_PROXY_CONNECT_TIMEOUT`; a refused or timed-out one aborts the client's
//! association at once.
//!
//! **Messages.** Each direction receives one message at a time (`recvmsg` with `SCTP_RCVINFO`)
//! and sends it on whole with the same stream id, payload protocol identifier (bit for bit) and
//! unordered flag (`SCTP_SNDINFO`). A message larger than the receive buffer (64 KiB), or one the
//! kernel hands over in pieces (partial delivery), comes without `MSG_EOR` on all but its last
//! piece: the pieces are **reassembled** into one buffer, grown by doubling up to
//! `HOSTNET_PROXY_SCTP_MAX_MESSAGE` (4 MiB by default), and sent as one message, so a message
//! is never cut in two. (Linux has no `SCTP_EXPLICIT_EOR`, so a message cannot be sent in
//! pieces; docker-proxy passes each 32 KiB read on as a message of its own, which cuts every
//! message over 32,736 bytes.) A message over the limit aborts both associations, with a log
//! line. While a message waits to be sent, the next one is read ahead if it is already queued;
//! when it is whole, the first goes with `MSG_MORE`, so that the kernel bundles small messages
//! into one packet instead of sending a packet per message (`SCTP_NODELAY` is on); a message is
//! never held for one that has not fully arrived. A direction holds buffers only while messages
//! are in flight (taken from a small pool), so an idle association costs its two sockets.
//!
//! **Ends.** SCTP has no half-close: once a peer shuts its association down, nothing more can be
//! sent to it. When one side ends gracefully (recvmsg returns 0 after its last message), the
//! message in flight from it is delivered, what the other side had queued for it is discarded
//! (it can no longer be delivered) and both sockets are closed, which makes the kernel SHUTDOWN
//! the other association gracefully after its queued data. An error on either side (an ABORT
//! received shows up as `ECONNRESET`, a lost peer as `ETIMEDOUT`) aborts the other association:
//! closing with `SO_LINGER` 0 sends an ABORT on Linux, so an ABORT is passed on as an ABORT
//! (docker-proxy closes gracefully in both cases).

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::relay::Side;
use crate::sctp_sys::{self, MsgInfo, Received};
use crate::tcp::{MAX_BACKOFF, Reserve, is_exhaustion, is_transient};

/// Everything an association handler needs.
#[derive(Debug)]
pub struct SctpProxy {
    /// The container address (`-container-ip:-container-port`).
    pub backend: SocketAddr,
    /// Tunables.
    pub config: Config,
}

/// The listening socket, registered with the runtime.
#[derive(Debug)]
pub struct Listener(AsyncFd<OwnedFd>);

impl Listener {
    /// Registers a listening, non-blocking SCTP socket. Needs a tokio runtime.
    pub fn new(sock: Socket) -> io::Result<Listener> {
        // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it: the descriptor stays
        // open and the same until the AsyncFd is dropped or unwrapped.
        unsafe { AsyncFd::register_with_interest(OwnedFd::from(sock), Interest::READABLE) }
            .map(Listener)
            .map_err(|e| e.into_parts().1)
    }
}

/// Receive buffer per direction while a message is in flight; larger messages grow it.
const BUF_SIZE: usize = 64 * 1024;
/// Idle receive buffers kept for reuse.
const POOL_MAX: usize = 16;
/// Most reads spent discarding what a side had queued when the association ends.
const DRAIN_MAX: usize = 256;

thread_local! {
    static BUFS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Vec<u8> {
    BUFS.with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF_SIZE])
}

fn give_back_buf(buf: Vec<u8>) {
    // Only buffers of the standard size go back: one grown for a large message is freed.
    if buf.len() == BUF_SIZE {
        BUFS.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < POOL_MAX {
                b.push(buf);
            }
        });
    }
}

/// A message larger than `HOSTNET_PROXY_SCTP_MAX_MESSAGE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an SCTP message exceeds HOSTNET_PROXY_SCTP_MAX_MESSAGE ({max} bytes)")]
pub struct TooBig {
    /// The limit.
    pub max: usize,
}

/// One message being put together from the pieces recvmsg returns, then sent whole. Plain
/// state, no socket: [`Assembler::space`] gives the room for the next recvmsg,
/// [`Assembler::filled`] records what it returned.
#[derive(Debug)]
pub struct Assembler {
    /// The buffer; empty (no allocation) while nothing is in flight.
    buf: Vec<u8>,
    /// Bytes of the message received so far.
    len: usize,
    /// The message's metadata (from its first piece).
    info: MsgInfo,
    /// The last piece came (`MSG_EOR`): the message is ready to send.
    complete: bool,
    /// Inside a notification that did not fit the buffer: its pieces are dropped.
    skipping: bool,
    max: usize,
}

impl Assembler {
    /// An empty assembler for messages of at most `max` bytes.
    pub fn new(max: usize) -> Assembler {
        Assembler {
            buf: Vec::new(),
            len: 0,
            info: MsgInfo::default(),
            complete: false,
            skipping: false,
            max,
        }
    }

    /// Room for the next piece: a pooled buffer for a new message, or the same one doubled
    /// (up to the limit) when a message has filled it.
    pub fn space(&mut self) -> Result<&mut [u8], TooBig> {
        if self.buf.is_empty() {
            self.buf = take_buf();
            if self.buf.len() > self.max {
                self.buf.truncate(self.max);
            }
        }
        if self.len == self.buf.len() {
            if self.len >= self.max {
                return Err(TooBig { max: self.max });
            }
            let grown = (self.len * 2).min(self.max);
            self.buf.resize(grown, 0);
        }
        Ok(&mut self.buf[self.len..])
    }

    /// Records what recvmsg wrote into [`Assembler::space`]. Notifications are dropped.
    pub fn filled(&mut self, r: &Received) {
        if r.notification || self.skipping {
            self.skipping = !r.eor;
            return;
        }
        if self.len == 0 {
            self.info = r.info.unwrap_or_default();
        }
        self.len += r.len;
        self.complete = r.eor;
    }

    /// Part of a message is held (it was cut short if the association ends now).
    pub fn in_progress(&self) -> bool {
        self.len > 0 && !self.complete
    }

    /// A whole message waits to be sent.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The whole message and its metadata.
    pub fn message(&self) -> (&[u8], MsgInfo) {
        (&self.buf[..self.len], self.info)
    }

    /// The message went out: start over and give the buffer back.
    pub fn sent(&mut self) {
        self.len = 0;
        self.complete = false;
        self.release();
    }

    /// Gives the buffer back when nothing is in it (an idle association holds none).
    pub fn release_if_idle(&mut self) {
        if self.len == 0 && !self.complete {
            self.release();
        }
    }

    /// Drops whatever is held.
    pub fn release(&mut self) {
        self.len = 0;
        self.complete = false;
        give_back_buf(std::mem::take(&mut self.buf));
    }
}

/// Serves `listener` until a fatal accept error, which is returned.
pub async fn serve(listener: Listener, proxy: Rc<SctpProxy>) -> io::Error {
    let listener = listener.0;
    let mut reserve = Reserve::open();
    let mut backoff = Duration::from_millis(5);
    let mut exhausted: u64 = 0;
    loop {
        match accept(&listener).await {
            Ok((fd, peer)) => {
                backoff = Duration::from_millis(5);
                reserve.refill();
                let peer = peer.map_or_else(|| "?".to_owned(), |p| p.to_string());
                let span = info_span!("assoc", %peer);
                let proxy = Rc::clone(&proxy);
                tokio::task::spawn_local(handle(fd, proxy).instrument(span));
            }
            Err(e) if is_exhaustion(&e) => {
                exhausted += 1;
                let shed = reserve.shed(listener.get_ref().as_fd());
                if exhausted.is_power_of_two() {
                    warn!(error = %e, exhausted, shed, backoff_ms = backoff.as_millis() as u64,
                        "accept failed for lack of resources; aborting queued associations and retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) if is_transient(&e) => debug!(error = %e, "accept: transient error"),
            Err(e) => return e,
        }
    }
}

async fn accept(listener: &AsyncFd<OwnedFd>) -> io::Result<(OwnedFd, Option<SocketAddr>)> {
    loop {
        let mut guard = listener.readable().await?;
        if let Ok(r) = guard.try_io(|l| sctp_sys::accept(l.as_fd())) {
            return r;
        }
    }
}

/// Registers an association's socket for both directions.
fn register(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, (OwnedFd, io::Error)> {
    // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it: the descriptor stays open
    // and the same until the AsyncFd is dropped or unwrapped.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
        .map_err(|e| e.into_parts())
}

/// Connects to the container: a socket asking for `outbound` streams and taking up to
/// `max_inbound`, `SCTP_RCVINFO` and `SCTP_NODELAY` on, connected without blocking.
async fn connect(
    backend: SocketAddr,
    outbound: u16,
    max_inbound: u16,
) -> io::Result<AsyncFd<OwnedFd>> {
    let sock = sctp_sys::socket(Domain::for_address(backend))?;
    sctp_sys::set_streams(sock.as_fd(), outbound, max_inbound)?;
    sctp_sys::prepare_association(sock.as_fd())?;
    match sock.connect(&backend.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let fd = register(OwnedFd::from(sock)).map_err(|(_, e)| e)?;
    loop {
        let mut guard = fd.writable().await?;
        let sock = SockRef::from(fd.get_ref());
        if let Some(e) = sock.take_error()? {
            return Err(e);
        }
        match sock.peer_addr() {
            Ok(_) => return Ok(fd),
            // Woken before the handshake finished: wait again.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => guard.clear_ready(),
            Err(e) => return Err(e),
        }
    }
}

async fn handle(client: OwnedFd, proxy: Rc<SctpProxy>) {
    let backend_addr = proxy.backend;
    if let Err(e) = sctp_sys::prepare_association(client.as_fd()) {
        info!(error = %e, "cannot set up the client's association; aborting it");
        sctp_sys::abort(client);
        return;
    }
    // The container's association mirrors the client's streams (see the module docs).
    let (inbound, outbound) = match sctp_sys::stream_counts(client.as_fd()) {
        Ok((i, o)) if i > 0 && o > 0 => (i, o),
        _ => (sctp_sys::MAX_STREAMS, sctp_sys::MAX_STREAMS),
    };
    let client = match register(client) {
        Ok(c) => c,
        Err((fd, e)) => {
            info!(error = %e, "cannot watch the client's association; aborting it");
            sctp_sys::abort(fd);
            return;
        }
    };
    let timeout = proxy.config.connect_timeout;
    let connecting = connect(backend_addr, inbound, outbound);
    let backend = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            info!(backend = %backend_addr, error = %e,
                "Can't forward traffic to backend sctp/{backend_addr}: {e}; aborting the client's association");
            sctp_sys::abort(client.into_inner());
            return;
        }
        Err(_) => {
            info!(backend = %backend_addr, timeout_ms = timeout.as_millis() as u64,
                "Can't forward traffic to backend sctp/{backend_addr}: connect timed out; aborting the client's association");
            sctp_sys::abort(client.into_inner());
            return;
        }
    };
    let outcome = relay(&client, &backend, proxy.config.sctp_max_message).await;
    let (up, down) = (outcome.up, outcome.down);
    match outcome.end {
        End::Closed(side) => {
            let other = match side {
                Side::Client => &backend,
                Side::Backend => &client,
            };
            let discarded = drain(other);
            debug!(up_msgs = up.messages, up_bytes = up.bytes, down_msgs = down.messages,
                down_bytes = down.bytes, ended_by = ?side, discarded,
                "association ended gracefully; shutting the other one down");
            // Nothing unread on either socket: close sends a SHUTDOWN, after queued data.
            drop(client);
            drop(backend);
        }
        End::Failed(side, e) => {
            let level_warn = matches!(e.get_ref(), Some(inner) if inner.is::<TooBig>());
            if level_warn {
                warn!(up_msgs = up.messages, down_msgs = down.messages, ?side, error = %e,
                    "message cannot be passed on whole; aborting both associations");
            } else {
                debug!(up_msgs = up.messages, up_bytes = up.bytes, down_msgs = down.messages,
                    down_bytes = down.bytes, ?side, error = %e,
                    "association ended in error; aborting both");
            }
            sctp_sys::abort(client.into_inner());
            sctp_sys::abort(backend.into_inner());
        }
    }
}

/// Reads and drops what `fd` has queued (it cannot be delivered: the other side has ended), so
/// that closing it sends a SHUTDOWN rather than the ABORT the kernel sends for unread data.
/// Returns the bytes dropped.
fn drain(fd: &AsyncFd<OwnedFd>) -> usize {
    let mut buf = take_buf();
    let mut dropped = 0;
    for _ in 0..DRAIN_MAX {
        match sctp_sys::recv(fd.get_ref().as_fd(), &mut buf) {
            Ok(r) if !r.is_eof() => dropped += r.len,
            _ => break,
        }
    }
    give_back_buf(buf);
    dropped
}

/// Messages and bytes moved one way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Whole messages sent on.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// This side's peer shut its association down and everything it sent was passed on.
    Closed(Side),
    /// An error on this side (an ABORT received, a lost peer, a message over the limit).
    Failed(Side, io::Error),
}

/// What a relay did.
#[derive(Debug)]
pub struct Outcome {
    /// Client → container.
    pub up: Moved,
    /// Container → client.
    pub down: Moved,
    /// How it ended.
    pub end: End,
}

/// One direction: messages from one socket to the other.
#[derive(Debug)]
struct Direction {
    /// The message being received, then sent.
    cur: Assembler,
    /// The message after it, read ahead while `cur` waits to be sent.
    next: Assembler,
    moved: Moved,
}

/// What reading ahead found.
#[derive(Debug)]
enum Ahead {
    /// Nothing more queued now, or the next message is whole.
    Open,
    /// The source ended.
    Eof,
    /// The source failed (after the messages before the failure are passed on).
    Failed(io::Error),
}

impl Direction {
    fn new(max: usize) -> Direction {
        Direction {
            cur: Assembler::new(max),
            next: Assembler::new(max),
            moved: Moved::default(),
        }
    }

    /// Moves messages from `src` to `dst` until `src` has ended and its last message is
    /// delivered (`Ok`), or an error (with the side it came from). If `dst` refuses a message
    /// because its peer has shut down (`EPIPE`, `ESHUTDOWN`), this direction stops and waits
    /// forever: the other direction reads that end of stream next.
    ///
    /// Each whole message is sent with `MSG_MORE` when the next one is already whole in hand
    /// (read ahead without waiting): the kernel then bundles small messages into one packet, and
    /// the next send, without the flag when nothing whole follows, releases them. A message is
    /// never held back waiting for one that has not fully arrived.
    async fn run(
        &mut self,
        src: &AsyncFd<OwnedFd>,
        dst: &AsyncFd<OwnedFd>,
        (src_side, dst_side): (Side, Side),
    ) -> Result<(), (Side, io::Error)> {
        let mut eof = false;
        loop {
            if self.cur.is_complete() {
                let ahead = if eof {
                    Ahead::Open
                } else {
                    self.read_ahead(src)
                };
                let more = self.next.is_complete() && matches!(ahead, Ahead::Open);
                if !self.send(dst, dst_side, more).await? {
                    self.cur.release();
                    self.next.release();
                    return std::future::pending().await;
                }
                std::mem::swap(&mut self.cur, &mut self.next);
                match ahead {
                    Ahead::Open => {}
                    Ahead::Eof => eof = true,
                    Ahead::Failed(e) => return Err((src_side, e)),
                }
                continue;
            }
            if eof {
                if self.cur.in_progress() {
                    debug!(side = ?src_side, "association ended inside a message; its start is dropped");
                }
                self.cur.release();
                return Ok(());
            }
            self.cur.release_if_idle();
            // An ABORT shows in epoll as EPOLLERR alone (with EPOLLOUT), never as readable:
            // wait for errors too, or an aborted peer would go unnoticed.
            let mut guard = src
                .ready(Interest::READABLE | Interest::ERROR)
                .await
                .map_err(|e| (src_side, e))?;
            let space = self
                .cur
                .space()
                .map_err(|e| (src_side, io::Error::other(e)))?;
            match guard.try_io(|fd| sctp_sys::recv(fd.get_ref().as_fd(), space)) {
                Ok(Ok(r)) if r.is_eof() => eof = true,
                Ok(Ok(r)) => self.cur.filled(&r),
                Ok(Err(e)) => return Err((src_side, e)),
                Err(_would_block) => {}
            }
        }
    }

    /// Reads into `next` what `src` already has queued, without waiting, until `next` is whole.
    fn read_ahead(&mut self, src: &AsyncFd<OwnedFd>) -> Ahead {
        while !self.next.is_complete() {
            let space = match self.next.space() {
                Ok(s) => s,
                Err(e) => return Ahead::Failed(io::Error::other(e)),
            };
            match src.try_io(Interest::READABLE, |fd| sctp_sys::recv(fd.as_fd(), space)) {
                Ok(r) if r.is_eof() => return Ahead::Eof,
                Ok(r) => self.next.filled(&r),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.next.release_if_idle();
                    return Ahead::Open;
                }
                Err(e) => return Ahead::Failed(e),
            }
        }
        Ahead::Open
    }

    /// Sends `cur` whole. False when `dst`'s peer has shut down.
    async fn send(
        &mut self,
        dst: &AsyncFd<OwnedFd>,
        dst_side: Side,
        more: bool,
    ) -> Result<bool, (Side, io::Error)> {
        let mut grown = false;
        loop {
            let mut guard = dst.writable().await.map_err(|e| (dst_side, e))?;
            let (data, info) = self.cur.message();
            match guard.try_io(|fd| sctp_sys::send(fd.get_ref().as_fd(), data, info, more)) {
                Ok(Ok(n)) => {
                    self.moved.messages += 1;
                    self.moved.bytes += n as u64;
                    self.cur.sent();
                    return Ok(true);
                }
                Ok(Err(e)) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ESHUTDOWN)) => {
                    return Ok(false);
                }
                // Larger than the send buffer: grow it once to fit, and send again.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EMSGSIZE) && !grown => {
                    grown = true;
                    let len = data.len();
                    if let Err(e) = sctp_sys::fit_send_buffer(dst.get_ref().as_fd(), len) {
                        warn!(len, error = %e, "a message is larger than the socket can send");
                        return Err((dst_side, e));
                    }
                    debug!(len, "send buffer grown to fit a large message");
                }
                Ok(Err(e)) => {
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        warn!(stream = info.sid, error = %e,
                            "a message cannot be passed on on its stream (does the other association have fewer streams?)");
                    }
                    return Err((dst_side, e));
                }
                Err(_would_block) => {}
            }
        }
    }
}

/// Relays messages between `client` and `backend` until one side ends (gracefully or not).
pub async fn relay(
    client: &AsyncFd<OwnedFd>,
    backend: &AsyncFd<OwnedFd>,
    max_message: usize,
) -> Outcome {
    let mut up = Direction::new(max_message);
    let mut down = Direction::new(max_message);
    let end = {
        let a = up.run(client, backend, (Side::Client, Side::Backend));
        let b = down.run(backend, client, (Side::Backend, Side::Client));
        tokio::select! {
            biased;
            r = a => r.map(|()| Side::Client),
            r = b => r.map(|()| Side::Backend),
        }
    };
    for d in [&mut up, &mut down] {
        d.cur.release();
        d.next.release();
    }
    Outcome {
        up: up.moved,
        down: down.moved,
        end: match end {
            Ok(side) => End::Closed(side),
            Err((side, e)) => End::Failed(side, e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(len: usize, eor: bool, sid: u16, ppid: u32) -> Received {
        Received {
            len,
            eor,
            notification: false,
            info: Some(MsgInfo {
                sid,
                ppid,
                unordered: false,
            }),
        }
    }

    /// Feeds `data` in pieces of at most `chunk` (and at most the room given), as recvmsg would.
    fn feed(a: &mut Assembler, data: &[u8], chunk: usize, sid: u16, ppid: u32) {
        let mut off = 0;
        while off < data.len() {
            let room = a.space().unwrap();
            let n = room.len().min(chunk).min(data.len() - off);
            room[..n].copy_from_slice(&data[off..off + n]);
            off += n;
            a.filled(&piece(n, off == data.len(), sid, ppid));
        }
    }

    #[test]
    fn one_piece_message() {
        let mut a = Assembler::new(1 << 20);
        feed(&mut a, b"hello", 1 << 20, 7, 46);
        assert!(a.is_complete());
        let (data, info) = a.message();
        assert_eq!(data, b"hello");
        assert_eq!((info.sid, info.ppid), (7, 46));
        a.sent();
        assert!(!a.is_complete() && !a.in_progress());
        assert!(a.buf.is_empty(), "the buffer goes back to the pool");
    }

    #[test]
    fn large_message_is_reassembled_whole() {
        // Larger than the 64 KiB buffer and handed over in 10,000-byte pieces.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut a = Assembler::new(1 << 20);
        feed(&mut a, &data, 10_000, 3, 0xdead_beef);
        assert!(a.is_complete());
        let (got, info) = a.message();
        assert_eq!(got, &data[..]);
        assert_eq!((info.sid, info.ppid), (3, 0xdead_beef));
        a.sent();
        // The next message starts in a fresh standard buffer.
        feed(&mut a, b"x", 1, 0, 0);
        assert_eq!(a.message().0, b"x");
        assert_eq!(a.buf.len(), BUF_SIZE);
    }

    #[test]
    fn metadata_comes_from_the_first_piece() {
        let mut a = Assembler::new(1 << 20);
        let room = a.space().unwrap();
        room[..2].copy_from_slice(b"ab");
        a.filled(&piece(2, false, 5, 9));
        let room = a.space().unwrap();
        room[..1].copy_from_slice(b"c");
        a.filled(&Received {
            len: 1,
            eor: true,
            notification: false,
            info: None,
        });
        assert_eq!(
            a.message(),
            (
                &b"abc"[..],
                MsgInfo {
                    sid: 5,
                    ppid: 9,
                    unordered: false
                }
            )
        );
    }

    #[test]
    fn over_the_limit_is_refused_not_cut() {
        let mut a = Assembler::new(BUF_SIZE * 2);
        let mut fed = 0;
        let err = loop {
            match a.space() {
                Ok(room) => {
                    let n = room.len();
                    fed += n;
                    a.filled(&piece(n, false, 0, 0));
                }
                Err(e) => break e,
            }
        };
        assert_eq!(fed, BUF_SIZE * 2);
        assert_eq!(err, TooBig { max: BUF_SIZE * 2 });
    }

    #[test]
    fn notifications_are_skipped() {
        let mut a = Assembler::new(1 << 20);
        let _ = a.space().unwrap();
        a.filled(&Received {
            len: 100,
            eor: false,
            notification: true,
            info: None,
        });
        // The rest of the notification (no notification flag on a continuation is not relied
        // on: `skipping` covers it).
        let _ = a.space().unwrap();
        a.filled(&Received {
            len: 20,
            eor: true,
            notification: false,
            info: None,
        });
        assert!(!a.in_progress() && !a.is_complete());
        feed(&mut a, b"data", 100, 1, 2);
        assert_eq!(a.message().0, b"data");
    }

    #[test]
    fn idle_assembler_holds_no_buffer() {
        let mut a = Assembler::new(1 << 20);
        let _ = a.space().unwrap();
        a.release_if_idle();
        assert!(a.buf.is_empty());
        // Part of a message is kept.
        let _ = a.space().unwrap();
        a.filled(&piece(10, false, 0, 0));
        a.release_if_idle();
        assert!(a.in_progress() && !a.buf.is_empty());
    }
}
