//! UDP flows over the session's datagram channel (the protocol is in [`crate::proto`],
//! "Datagram channel"; the frames in [`crate::proto::channel`]).
//!
//! One [`Channel`] per session and side carries every UDP flow of the session, both directions:
//!
//! * **Listener flows**: a listening socket this side holds (the forwarder's mirror of a guest
//!   listener, the agent's mirror of a host listener) is registered with
//!   [`Channel::listener`]; its receive loop hands each datagram to
//!   [`ListenerHandle::datagram`]. A client's first datagram opens a flow (an OPEN frame with
//!   the target and the client, no round trip), later ones are DATA; the peer's replies go out
//!   with `send_to(client)` on the listening socket.
//! * **Dialed flows**: an OPEN from the peer is checked by this side's [`Dialer`] and gets a
//!   connected UDP socket towards the target; a small task per flow waits for that socket to be
//!   readable and drains it into the channel through a shared buffer. A refused target (ICMP
//!   port unreachable), a forbidden one or one that cannot be reached is answered with CLOSE.
//!
//! Per idle flow this side holds a table entry (and, for a dialed flow, its socket and its
//! waiting task, no buffer). The table is bounded ([`Config::max_flows`]): at the limit the
//! least recently used flow, of either direction, is closed to make room (a CLOSE tells the
//! peer, so the two sides' limits never disagree into refusals); flows idle for
//! [`Config::idle`] are closed the same way. The channel never blocks a sender: a datagram
//! that finds the channel's outgoing queue full ([`Config::queue_bytes`]) is dropped and
//! counted, as a congested network would drop it.
//!
//! On QUIC a frame goes as a QUIC datagram (RFC 9221) when it fits the path's datagram size,
//! else on the channel's stream, whole; CLOSE frames always go on the stream (they must not be
//! lost).

mod batch;
mod io;
mod table;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::proto::channel::{AGENT_FLOW, CloseReason, Frame};
use crate::transport::Stream;
use table::{Deliver, End, Flow, ListenerEntry, Table};

/// The receive buffer a listening socket asks for (`SO_RCVBUF`; the kernel caps it at
/// `net.core.rmem_max`, 208 KiB by default on Linux): a burst of a fast sender waits there
/// while the relay catches up, instead of being dropped by the kernel. Kernel memory, used only
/// while datagrams wait.
pub const LISTENER_RECV_BUFFER: usize = 4 * 1024 * 1024;

/// Default limit on the bytes queued towards the peer before datagrams are dropped (about
/// 100 ms of 64-byte datagrams at full speed: late datagrams are worth less than dropped ones).
pub const DEFAULT_QUEUE_BYTES: usize = 1024 * 1024;

/// Which side of the session a channel serves: it picks the id bit of the flows it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The forwarder (its flows have [`AGENT_FLOW`] clear).
    Forwarder,
    /// The agent (its flows have [`AGENT_FLOW`] set).
    Agent,
}

/// A channel's limits.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which side this is.
    pub side: Side,
    /// Flows open at once, both directions; at the limit the least recently used is closed.
    pub max_flows: usize,
    /// A flow with no datagram either way for this long is closed.
    pub idle: Duration,
    /// Bytes queued towards the peer (on the stream) beyond which datagrams are dropped.
    pub queue_bytes: usize,
}

/// Per-port traffic accounting, kept by the owner of a listener or a dialed target.
pub trait Tally: Send + Sync {
    /// A datagram of `bytes` went to the peer.
    fn sent(&self, bytes: usize);
    /// A datagram of `bytes` came from the peer.
    fn received(&self, bytes: usize);
    /// A flow opened.
    fn opened(&self);
    /// A flow closed.
    fn closed(&self);
}

/// Decides where the flows the peer opens go.
pub trait Dialer: Send + Sync {
    /// Where a flow from the peer's `client` to `target` (as the peer named it) goes, and the
    /// tally of its traffic; or why it may not.
    #[allow(clippy::type_complexity)]
    fn admit(
        &self,
        target: SocketAddr,
        client: SocketAddr,
    ) -> Result<(SocketAddr, Option<Arc<dyn Tally>>), CloseReason>;
}

/// A dialer that admits nothing (a side that takes no flows from its peer).
#[derive(Debug, Clone, Copy)]
pub struct RefuseAll;

impl Dialer for RefuseAll {
    fn admit(
        &self,
        _: SocketAddr,
        _: SocketAddr,
    ) -> Result<(SocketAddr, Option<Arc<dyn Tally>>), CloseReason> {
        Err(CloseReason::Forbidden)
    }
}

/// What happened on a channel, for `status` and logs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Flows this side opened (a client's first datagram on a listener).
    pub flows_opened: AtomicU64,
    /// Flows the peer opened that this side dialed.
    pub flows_accepted: AtomicU64,
    /// Flows the peer opened that this side turned away (forbidden, refused, unreachable).
    pub flows_refused: AtomicU64,
    /// Flows this side opened that the peer turned away (a CLOSE with a refusal).
    pub flows_refused_by_peer: AtomicU64,
    /// Flows closed to make room at the flow limit.
    pub flows_evicted: AtomicU64,
    /// Flows closed after the idle timeout.
    pub flows_expired: AtomicU64,
    /// Datagrams dropped: outgoing queue full, a send that would block or failed, a datagram
    /// for a flow that is gone, the channel closed.
    pub datagrams_dropped: AtomicU64,
    /// Frames that did not fit a QUIC datagram and went on the stream instead.
    pub sent_on_stream: AtomicU64,
}

/// A snapshot of [`Counters`] plus the flows open now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct CountersView {
    pub flows: u64,
    pub flows_opened: u64,
    pub flows_accepted: u64,
    pub flows_refused: u64,
    pub flows_refused_by_peer: u64,
    pub flows_evicted: u64,
    pub flows_expired: u64,
    pub datagrams_dropped: u64,
    pub sent_on_stream: u64,
}

impl Counters {
    /// Reads every counter; `flows` is filled in by the caller that knows the open channel.
    pub fn view(&self) -> CountersView {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersView {
            flows: 0,
            flows_opened: r(&self.flows_opened),
            flows_accepted: r(&self.flows_accepted),
            flows_refused: r(&self.flows_refused),
            flows_refused_by_peer: r(&self.flows_refused_by_peer),
            flows_evicted: r(&self.flows_evicted),
            flows_expired: r(&self.flows_expired),
            datagrams_dropped: r(&self.datagrams_dropped),
            sent_on_stream: r(&self.sent_on_stream),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Log lines about refusals are kept to one per this interval (the counters have the rest).
const LOG_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct Inner {
    config: Config,
    table: Mutex<Table>,
    out: io::Out,
    dialer: Arc<dyn Dialer>,
    counters: Arc<Counters>,
    /// Cancelled when the channel ends (its stream ended or failed, or it was closed).
    done: CancellationToken,
    /// Signalled when the first flow enters an empty table (the sweeper sleeps otherwise).
    not_empty: Notify,
    last_refusal_log: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One session's datagram channel. Cloning gives another handle to the same channel; it closes
/// (every flow with it) when its stream ends, or on [`Channel::close`].
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("side", &self.inner.config.side)
            .field("flows", &self.flows())
            .finish()
    }
}

impl Channel {
    /// Runs the channel over `stream` (whose header has been written or read; on QUIC its
    /// connection's datagrams are used too). Spawns its tasks on the current runtime.
    pub fn start(
        stream: Stream,
        config: Config,
        dialer: Arc<dyn Dialer>,
        counters: Arc<Counters>,
    ) -> Self {
        let quic = stream.quic_connection().cloned();
        let (rd, wr) = tokio::io::split(stream);
        let inner = Arc::new(Inner {
            table: Mutex::new(Table::new(match config.side {
                Side::Forwarder => 0,
                Side::Agent => AGENT_FLOW,
            })),
            out: io::Out::new(quic.clone(), config.queue_bytes, counters.clone()),
            config,
            dialer,
            counters,
            done: CancellationToken::new(),
            not_empty: Notify::new(),
            last_refusal_log: Mutex::new(None),
        });
        io::spawn(&inner, rd, wr, quic);
        tokio::spawn(sweep(Arc::downgrade(&inner), inner.done.clone()));
        Self { inner }
    }

    /// Registers a listening socket: its clients' datagrams, handed to
    /// [`ListenerHandle::datagram`], open flows to `target` (as the peer names it).
    /// Dropping the handle closes the listener's flows.
    pub fn listener(
        &self,
        sock: Arc<UdpSocket>,
        target: SocketAddr,
        tally: Option<Arc<dyn Tally>>,
    ) -> ListenerHandle {
        let lid = lock(&self.inner.table).add_listener(ListenerEntry {
            sock,
            target,
            tally,
        });
        ListenerHandle {
            inner: Arc::downgrade(&self.inner),
            lid,
        }
    }

    /// Flows open now.
    pub fn flows(&self) -> usize {
        lock(&self.inner.table).len()
    }

    /// The channel's counters (shared with whoever passed them in).
    pub fn counters(&self) -> &Arc<Counters> {
        &self.inner.counters
    }

    /// Whether the channel has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.done.is_cancelled()
    }

    /// Resolves when the channel has ended.
    pub async fn closed(&self) {
        self.inner.done.cancelled().await;
    }

    /// Whether `other` is a handle to the same channel.
    pub fn same(&self, other: &Channel) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Ends the channel: every flow closes (dialed sockets with them), the stream is shut.
    pub fn close(&self) {
        self.inner.finish();
    }
}

/// A listening socket registered with a [`Channel`]; dropping it closes its flows.
#[derive(Debug)]
pub struct ListenerHandle {
    inner: Weak<Inner>,
    lid: u32,
}

impl ListenerHandle {
    /// A datagram from `client` on this listener: DATA on its flow, or an OPEN for a new one
    /// (closing the least recently used flow at the limit). Dropped and counted if the channel
    /// is gone or congested.
    pub fn datagram(&self, client: SocketAddr, payload: &[u8]) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        inner.client_datagram(self.lid, client, payload);
    }

    /// Receives `sock`'s datagrams and hands them to the channel ([`ListenerHandle::datagram`]),
    /// draining the socket at each wake-up; returns when the channel has ended. `sock` is the
    /// socket registered for this handle. Cancel-safe: callers select it against their own
    /// stop conditions.
    pub async fn pump(&self, sock: &UdpSocket) {
        let Some(done) = self.inner.upgrade().map(|i| i.done.clone()) else {
            return;
        };
        let mut buf = vec![0u8; crate::proto::MAX_DATAGRAM];
        loop {
            tokio::select! {
                () = done.cancelled() => return,
                r = sock.readable() => if let Err(e) = r {
                    tracing::warn!(error = %e, "UDP listener failed");
                    return;
                },
            }
            for _ in 0..io::DRAIN_BATCH {
                match sock.try_recv_from(&mut buf) {
                    Ok((n, client)) => self.datagram(client, &buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // ICMP errors of earlier sends surface here on some systems; keep going.
                    Err(e) => tracing::debug!(error = %e, "UDP receive failed"),
                }
            }
        }
    }

    /// Whether the channel this listener belongs to has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.upgrade().is_none_or(|i| i.done.is_cancelled())
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let ids = lock(&inner.table).remove_listener(self.lid);
            for flow in ids {
                inner.out.send(&Frame::Close {
                    flow,
                    reason: CloseReason::Gone,
                });
            }
        }
    }
}

impl Inner {
    /// Ends the channel: flows first, so that whoever waits for the end finds them gone.
    fn finish(&self) {
        if !self.done.is_cancelled() {
            lock(&self.table).clear();
            self.out.close();
            self.done.cancel();
        }
    }

    fn client_datagram(&self, lid: u32, client: SocketAddr, payload: &[u8]) {
        if self.done.is_cancelled() {
            bump(&self.counters.datagrams_dropped);
            return;
        }
        let now = Instant::now();
        let mut t = lock(&self.table);
        if let Some(flow) = t.flow_of(lid, client)
            && t.sent(flow, now, payload.len())
        {
            drop(t);
            self.out.send(&Frame::Data { flow, payload });
            return;
        }
        let Some(l) = t.listener(lid) else {
            bump(&self.counters.datagrams_dropped);
            return;
        };
        let (target, tally) = (l.target, l.tally.clone());
        let flow = t.next_id();
        if let Some(tally) = &tally {
            tally.sent(payload.len());
        }
        let end = End::Listener { lid, client };
        self.add_flow(t, flow, end, tally);
        bump(&self.counters.flows_opened);
        tracing::debug!(flow, %client, %target, "UDP flow opened");
        self.out.send(&Frame::Open {
            flow,
            target,
            client,
            payload,
        });
    }

    /// Puts a new flow in the table (closing the least recently used one at the limit, and
    /// telling the peer), and wakes the sweeper if it is the only one.
    fn add_flow(
        &self,
        mut t: MutexGuard<'_, Table>,
        id: u32,
        end: End,
        tally: Option<Arc<dyn Tally>>,
    ) {
        let evicted = self.make_room(&mut t);
        let last = Instant::now();
        t.insert(id, Flow { end, last, tally });
        let first = t.len() == 1;
        drop(t);
        if first {
            self.not_empty.notify_one();
        }
        self.close_all(evicted, CloseReason::Evicted);
    }

    /// At the flow limit, removes the least recently used flow; its id (to close).
    fn make_room(&self, t: &mut Table) -> Option<u32> {
        if t.len() < self.config.max_flows.max(1) {
            return None;
        }
        let id = t.evict()?;
        bump(&self.counters.flows_evicted);
        tracing::debug!(
            flow = id,
            limit = self.config.max_flows,
            "UDP flow limit reached; least recently used flow closed"
        );
        Some(id)
    }

    fn close_all(&self, ids: impl IntoIterator<Item = u32>, reason: CloseReason) {
        for flow in ids {
            self.out.send(&Frame::Close { flow, reason });
        }
    }

    /// A frame from the peer.
    fn on_frame(self: &Arc<Self>, frame: Frame<'_>) {
        match frame {
            Frame::Data { flow, payload } => self.on_data(flow, payload),
            Frame::Open {
                flow,
                target,
                client,
                payload,
            } => {
                if lock(&self.table).contains(flow) {
                    self.on_data(flow, payload);
                } else {
                    self.on_open(flow, target, client, payload);
                }
            }
            Frame::Close { flow, reason } => {
                let had = lock(&self.table).remove(flow);
                if !had {
                    return;
                }
                if reason.is_refusal() {
                    bump(&self.counters.flows_refused_by_peer);
                    self.log_refusal(|| {
                        tracing::warn!(
                            flow,
                            reason = reason.name(),
                            "the peer turned a UDP flow away (counted; logged once per 5 s)"
                        )
                    });
                } else {
                    tracing::debug!(flow, reason = reason.name(), "the peer closed a UDP flow");
                }
            }
        }
    }

    fn log_refusal(&self, log: impl FnOnce()) {
        let mut last = lock(&self.last_refusal_log);
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            log();
        }
    }

    fn on_data(&self, flow: u32, payload: &[u8]) {
        self.on_data_run(flow, &[payload]);
    }

    /// Datagrams of one flow from the peer, sent on in one batch.
    pub(crate) fn on_data_run(&self, flow: u32, payloads: &[&[u8]]) {
        let bytes = payloads.iter().map(|p| p.len()).sum();
        let dropped = |n: usize| {
            self.counters
                .datagrams_dropped
                .fetch_add(n as u64, Ordering::Relaxed)
        };
        let mut t = lock(&self.table);
        let Some(deliver) = t.peer_datagram(flow, Instant::now(), bytes) else {
            let peers = !t.is_mine(flow);
            drop(t);
            dropped(payloads.len());
            // A flow of the peer's that this side closed (idle, evicted) while the datagram
            // was on its way: the peer drops it and reopens with its next datagram.
            if peers {
                self.out.send(&Frame::Close {
                    flow,
                    reason: CloseReason::Unknown,
                });
            }
            return;
        };
        drop(t);
        let (sent, err) = match &deliver {
            Some(Deliver::To(sock, client)) => batch::send(sock, Some(*client), payloads),
            Some(Deliver::Connected(sock)) => batch::send(sock, None, payloads),
            None => (0, None),
        };
        if sent < payloads.len() {
            dropped(payloads.len() - sent);
        }
        if let Some(e) = err {
            if matches!(deliver, Some(Deliver::Connected(_)))
                && e.kind() == std::io::ErrorKind::ConnectionRefused
            {
                self.close_flow(flow, CloseReason::Refused);
            } else {
                tracing::debug!(flow, error = %e, "UDP send failed; datagrams dropped");
            }
        }
    }

    fn close_flow(&self, flow: u32, reason: CloseReason) {
        if lock(&self.table).remove(flow) {
            if reason == CloseReason::Refused {
                bump(&self.counters.flows_refused);
            }
            tracing::debug!(flow, reason = reason.name(), "UDP flow closed");
            self.out.send(&Frame::Close { flow, reason });
        }
    }

    fn refuse(&self, flow: u32, reason: CloseReason, target: SocketAddr, client: SocketAddr) {
        bump(&self.counters.flows_refused);
        self.log_refusal(|| {
            tracing::warn!(%target, %client, reason = reason.name(), "UDP flow refused (counted; logged once per 5 s)")
        });
        self.out.send(&Frame::Close { flow, reason });
    }

    fn on_open(
        self: &Arc<Self>,
        flow: u32,
        target: SocketAddr,
        client: SocketAddr,
        payload: &[u8],
    ) {
        if lock(&self.table).is_mine(flow) {
            bump(&self.counters.datagrams_dropped);
            tracing::warn!(
                flow,
                "the peer opened a flow with this side's id bit; ignored"
            );
            return;
        }
        let (addr, tally) = match self.dialer.admit(target, client) {
            Ok(x) => x,
            Err(reason) => return self.refuse(flow, reason, target, client),
        };
        let sock = match connect_udp(addr) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let reason = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    CloseReason::Refused
                } else {
                    CloseReason::Unreachable
                };
                tracing::debug!(%addr, error = %e, "UDP socket towards the target failed");
                return self.refuse(flow, reason, target, client);
            }
        };
        let reader = tokio::spawn(io::drain_dialed(Arc::downgrade(self), flow, sock.clone()));
        let t = lock(&self.table);
        if self.done.is_cancelled() {
            reader.abort();
            return;
        }
        if let Some(tally) = &tally {
            tally.received(payload.len());
        }
        let end = End::Dialed {
            sock: sock.clone(),
            reader: reader.abort_handle(),
        };
        self.add_flow(t, flow, end, tally);
        bump(&self.counters.flows_accepted);
        tracing::debug!(flow, %client, %addr, "UDP flow from the peer");
        if let Err(e) = batch::send_one(&sock, payload, None) {
            bump(&self.counters.datagrams_dropped);
            tracing::debug!(flow, error = %e, "UDP send failed; datagram dropped");
        }
    }

    /// A datagram the target sent back on a dialed flow's socket.
    fn target_datagram(&self, flow: u32, payload: &[u8]) -> bool {
        if !lock(&self.table).sent(flow, Instant::now(), payload.len()) {
            return false;
        }
        self.out.send(&Frame::Data { flow, payload });
        true
    }
}

/// A UDP socket on the target family's loopback, connected to `addr`.
fn connect_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let s = std::net::UdpSocket::bind(local)?;
    s.connect(addr)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// Closes idle flows. Sleeps while the table is empty; otherwise checks every quarter of the
/// idle timeout (at least 250 ms, at most 30 s), so a flow closes between one and one and a
/// quarter timeouts after its last datagram.
async fn sweep(inner: Weak<Inner>, done: CancellationToken) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        let idle = i.config.idle;
        let empty = lock(&i.table).len() == 0;
        let notified = async {
            if empty {
                i.not_empty.notified().await;
            }
        };
        tokio::select! {
            () = done.cancelled() => return,
            () = notified => {}
        }
        drop(i);
        let every = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let Some(i) = inner.upgrade() else { return };
        let Some(before) = Instant::now().checked_sub(idle) else {
            continue;
        };
        let expired = lock(&i.table).expire(before);
        if !expired.is_empty() {
            i.counters
                .flows_expired
                .fetch_add(expired.len() as u64, Ordering::Relaxed);
            tracing::debug!(flows = expired.len(), "idle UDP flows closed");
            i.close_all(expired, CloseReason::Idle);
        }
    }
}
