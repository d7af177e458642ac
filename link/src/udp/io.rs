//! The channel's I/O: the outgoing queue and its writer, the readers of the stream and of QUIC
//! datagrams, and the task that drains a dialed flow's socket.

use std::cell::RefCell;
use std::io::ErrorKind;
use std::sync::{Arc, Mutex, Weak};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use super::{Counters, Inner, batch, bump, lock};
use crate::proto::channel::{self, CloseReason, Frame};
use crate::proto::{self, ProtoError};
use crate::transport::Stream;

/// Bytes of the stream reader's buffer (several frames per read; at least one whole frame).
const READ_BUF: usize = 256 * 1024;
/// Fresh room for QUIC datagrams, carved into one `Bytes` per datagram.
const QUIC_CHUNK: usize = 64 * 1024;
/// Datagrams drained from one dialed socket before other work gets a turn.
pub(super) const DRAIN_BATCH: usize = 64;

thread_local! {
    /// The buffer a dialed socket's datagram is received into, shared by every flow of the
    /// thread (used only between a receive and the copy into the outgoing queue).
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; proto::MAX_DATAGRAM]);
}

/// The outgoing side: a byte queue the writer task empties onto the stream, and QUIC's
/// datagrams where there are some.
pub(super) struct Out {
    queue: Mutex<Queue>,
    ready: Notify,
    limit: usize,
    quic: Option<quinn::Connection>,
    quic_room: Mutex<BytesMut>,
    counters: Arc<Counters>,
}

struct Queue {
    bytes: Vec<u8>,
    closed: bool,
}

impl Out {
    pub fn new(quic: Option<quinn::Connection>, limit: usize, counters: Arc<Counters>) -> Self {
        Self {
            queue: Mutex::new(Queue {
                bytes: Vec::new(),
                closed: false,
            }),
            ready: Notify::new(),
            limit,
            quic,
            quic_room: Mutex::new(BytesMut::new()),
            counters,
        }
    }

    /// Sends a frame without waiting: as a QUIC datagram when it fits one (not CLOSE), else
    /// queued for the stream; dropped and counted when the queue is full or closed.
    pub fn send(&self, frame: &Frame<'_>) {
        let len = frame.encoded_len();
        if let (Some(conn), false) = (&self.quic, matches!(frame, Frame::Close { .. })) {
            if conn.max_datagram_size().is_some_and(|max| len <= max) {
                let bytes = {
                    let mut room = lock(&self.quic_room);
                    if room.capacity() < len {
                        *room = BytesMut::with_capacity(QUIC_CHUNK.max(len));
                    }
                    if channel::encode_frame(frame, &mut *room).is_err() {
                        return bump(&self.counters.datagrams_dropped);
                    }
                    room.split().freeze()
                };
                match conn.send_datagram(bytes) {
                    Ok(()) => return,
                    // Too large after all (the path shrank): the stream carries it.
                    Err(quinn::SendDatagramError::TooLarge) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "QUIC datagram not sent; dropped");
                        return bump(&self.counters.datagrams_dropped);
                    }
                }
            }
            bump(&self.counters.sent_on_stream);
        }
        let mut q = lock(&self.queue);
        if q.closed || q.bytes.len() + len > self.limit {
            drop(q);
            return bump(&self.counters.datagrams_dropped);
        }
        let was_empty = q.bytes.is_empty();
        if channel::encode_frame(frame, &mut q.bytes).is_err() {
            return bump(&self.counters.datagrams_dropped);
        }
        drop(q);
        if was_empty {
            self.ready.notify_one();
        }
    }

    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.ready.notify_one();
    }
}

/// Starts the writer, the stream reader and (on QUIC) the datagram reader.
pub(super) fn spawn(
    inner: &Arc<Inner>,
    rd: ReadHalf<Stream>,
    wr: WriteHalf<Stream>,
    quic: Option<quinn::Connection>,
) {
    tokio::spawn(write_loop(inner.clone(), wr));
    tokio::spawn(read_stream(Arc::downgrade(inner), rd));
    if let Some(conn) = quic {
        tokio::spawn(read_quic(Arc::downgrade(inner), conn));
    }
}

/// Moves the queue's bytes onto the stream, many frames per write. Ends the channel when a
/// write fails; shuts the stream when the channel ends.
async fn write_loop(inner: Arc<Inner>, mut wr: WriteHalf<Stream>) {
    let mut spare = Vec::new();
    loop {
        let closed = {
            let mut q = lock(&inner.out.queue);
            std::mem::swap(&mut q.bytes, &mut spare);
            q.closed
        };
        if spare.is_empty() {
            if closed {
                break;
            }
            tokio::select! {
                () = inner.out.ready.notified() => continue,
                () = inner.done.cancelled() => break,
            }
        }
        let written = async {
            wr.write_all(&spare).await?;
            wr.flush().await
        };
        let r = tokio::select! {
            r = written => r,
            () = inner.done.cancelled() => break,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "writing the datagram channel failed; channel closed");
            break;
        }
        spare.clear();
        // Give the queue's allocation back if a burst made it large.
        if spare.capacity() > 4 * READ_BUF {
            spare = Vec::new();
        }
    }
    inner.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), wr.shutdown()).await;
    tracing::debug!("datagram channel writer done");
}

/// Reads frames off the stream until it ends; a malformed frame ends the channel.
async fn read_stream(inner: Weak<Inner>, mut rd: ReadHalf<Stream>) {
    let mut buf = Vec::with_capacity(READ_BUF.max(channel::MAX_FRAME));
    let why = loop {
        if buf.capacity() - buf.len() < channel::MAX_FRAME {
            buf.reserve(channel::MAX_FRAME);
        }
        let read = {
            let Some(i) = inner.upgrade() else { return };
            let done = i.done.clone();
            drop(i);
            tokio::select! {
                r = rd.read_buf(&mut buf) => r,
                () = done.cancelled() => return,
            }
        };
        match read {
            Ok(0) => {
                break if buf.is_empty() {
                    "the peer closed it".to_owned()
                } else {
                    "the peer closed it inside a frame".to_owned()
                };
            }
            Ok(_) => {}
            Err(e) => break format!("read failed: {e}"),
        }
        let Some(i) = inner.upgrade() else { return };
        let mut at = 0;
        let mut runs = Runs::new(&i);
        let err = loop {
            match channel::decode_frame(&buf[at..]) {
                Ok(Some((frame, used))) => {
                    runs.push(frame);
                    at += used;
                }
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        runs.flush();
        if let Some(e) = err {
            break format!("malformed frame: {e}");
        }
        buf.drain(..at);
    };
    if let Some(i) = inner.upgrade() {
        if !i.done.is_cancelled() {
            tracing::info!(reason = %why, "datagram channel ended");
        }
        i.finish();
    }
}

/// Reads QUIC datagrams (one frame each) until the connection or the channel ends; what has
/// arrived together is handled together (runs of one flow sent in one batch).
async fn read_quic(inner: Weak<Inner>, conn: quinn::Connection) {
    let mut got: Vec<bytes::Bytes> = Vec::with_capacity(batch::MAX);
    loop {
        let first = {
            let Some(i) = inner.upgrade() else { return };
            let done = i.done.clone();
            drop(i);
            tokio::select! {
                r = conn.read_datagram() => r,
                () = done.cancelled() => return,
            }
        };
        let Ok(first) = first else { return };
        got.push(first);
        // The others already there, without waiting.
        while got.len() < batch::MAX {
            match ready_now(conn.read_datagram()) {
                Some(Ok(b)) => got.push(b),
                _ => break,
            }
        }
        let Some(i) = inner.upgrade() else { return };
        let mut runs = Runs::new(&i);
        for bytes in &got {
            match channel::decode_frame(bytes) {
                Ok(Some((frame, used))) if used == bytes.len() => runs.push(frame),
                r => {
                    bump(&i.counters.datagrams_dropped);
                    let e = match r {
                        Err(e) => e,
                        _ => ProtoError::Invalid {
                            what: "datagram channel frame",
                            reason: "a QUIC datagram must hold exactly one frame",
                        },
                    };
                    tracing::warn!(error = %e, "bad QUIC datagram dropped");
                }
            }
        }
        runs.flush();
        got.clear();
    }
}

/// Polls a future once: its output if it is ready now.
fn ready_now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Frames from the peer, handed on in order, with each run of DATA frames of one flow sent
/// in one batch.
struct Runs<'i, 'a> {
    inner: &'i Arc<Inner>,
    flow: u32,
    run: [&'a [u8]; batch::MAX],
    len: usize,
}

impl<'i, 'a> Runs<'i, 'a> {
    fn new(inner: &'i Arc<Inner>) -> Self {
        Self {
            inner,
            flow: 0,
            run: [&[]; batch::MAX],
            len: 0,
        }
    }

    fn push(&mut self, frame: Frame<'a>) {
        match frame {
            Frame::Data { flow, payload } => {
                if self.len > 0 && (flow != self.flow || self.len == batch::MAX) {
                    self.flush();
                }
                self.flow = flow;
                self.run[self.len] = payload;
                self.len += 1;
            }
            other => {
                self.flush();
                self.inner.on_frame(other);
            }
        }
    }

    fn flush(&mut self) {
        if self.len > 0 {
            self.inner.on_data_run(self.flow, &self.run[..self.len]);
            self.len = 0;
        }
    }
}

/// Waits for a dialed flow's socket to be readable and drains it into the channel; ends when
/// the flow is gone (its table entry aborts this task) or the target refuses.
pub(super) async fn drain_dialed(inner: Weak<Inner>, flow: u32, sock: Arc<UdpSocket>) {
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let Some(i) = inner.upgrade() else { return };
        for _ in 0..DRAIN_BATCH {
            let got = SCRATCH.with_borrow_mut(|buf| match sock.try_recv(buf) {
                Ok(n) => Ok(i.target_datagram(flow, &buf[..n])),
                Err(e) => Err(e),
            });
            match got {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    // ICMP port unreachable for an earlier send: nobody listens there (now).
                    i.close_flow(flow, CloseReason::Refused);
                    return;
                }
                Err(e) => {
                    tracing::debug!(flow, error = %e, "UDP receive failed");
                    break;
                }
            }
        }
        drop(i);
        tokio::task::yield_now().await;
    }
}
