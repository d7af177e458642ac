//! The shell around a [`Binding`]: bind the host socket (retrying while it is taken), accept
//! TCP connections or UDP flows, relay each over its own link stream.
//!
//! UDP: each host socket keeps a table of flows keyed by client address; a flow is one
//! `UdpFlow` link stream, fed through a bounded queue (a full queue drops the datagram and
//! counts it). The flow limit is global ([`Ctx::max_udp_flows`]); at the limit a new client
//! evicts the least recently used flow *of the same host socket*, or is refused (counted, warned
//! once per episode) when that socket has none. Flows close after the idle timeout, refreshed by
//! traffic either way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hostnet_link::proto::{self, Proto, RelayTarget, StreamKind, StreamMode};
use socket2::{Domain, Protocol as SockProto, Socket, Type};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ctx::{Ctx, bump};
use crate::mirror::{BindState, Binding};
use crate::relay::{self, Counted, OpenError, OpenGuard, RelayEnd};

/// First retry delay of a taken host address.
pub const BIND_RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest retry delay of a taken host address.
pub const BIND_RETRY_MAX: Duration = Duration::from_secs(5);
/// Pause after a failing `accept()` (EMFILE and friends).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Datagrams queued towards one flow while its stream opens or is busy.
const FLOW_QUEUE: usize = 256;

/// Whether listeners set `SO_REUSEADDR`: on unix it lets a listener bind over connections in
/// TIME_WAIT; on Windows it would let this socket share a port another program listens on (and
/// take its connections), so there it stays off, as std does. (socket2 makes every socket
/// close-on-exec / not inheritable.)
const REUSE_ADDRESS: bool = cfg!(unix);

/// Binds a TCP listener: `SO_REUSEADDR` on unix, IPv6 v6-only.
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProto::TCP),
    )?;
    s.set_reuse_address(REUSE_ADDRESS)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Binds a UDP socket (no `SO_REUSEADDR`: a port taken by another program must show as a
/// conflict, not be shared), IPv6 v6-only.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(SockProto::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Starts the task of a new binding. `session` is cancelled when the control session ends:
/// open connections are then reset. The binding's own token closes the host socket.
pub fn spawn(ctx: Arc<Ctx>, b: Arc<Binding>, mode: StreamMode, session: CancellationToken) {
    let span = tracing::info_span!("mirror", proto = ?b.proto, host = %b.host);
    tokio::spawn(
        async move {
            match b.proto {
                Proto::Tcp => {
                    if let Some(l) = bind_retrying(&b, bind_tcp).await {
                        tcp_accept_loop(ctx, b, l, mode, session).await;
                    }
                }
                Proto::Udp => {
                    if let Some(s) = bind_retrying(&b, bind_udp).await {
                        udp_loop(ctx, b, s, mode, session).await;
                    }
                }
            }
        }
        .instrument(span),
    );
}

/// Binds until it works or the binding is cancelled; logs once per state change.
async fn bind_retrying<T>(
    b: &Binding,
    bind: impl Fn(SocketAddr) -> std::io::Result<T>,
) -> Option<T> {
    let mut delay = BIND_RETRY_FIRST;
    loop {
        if b.cancel.is_cancelled() {
            return None;
        }
        match bind(b.host) {
            Ok(s) => {
                let was = b.state();
                b.set_state(BindState::Active);
                if was == BindState::Starting {
                    tracing::info!(target_addr = %b.target(), "mirroring guest listener");
                } else {
                    tracing::info!(target_addr = %b.target(), previous = was.name(), "host address free again; mirroring guest listener");
                }
                return Some(s);
            }
            Err(e) => {
                let st = BindState::from_bind_error(&e, b.host.port());
                if b.set_state(st.clone()) {
                    tracing::warn!(state = st.name(), reason = st.reason().unwrap_or(""), error = %e, "cannot bind the host address; retrying with back-off");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = b.cancel.cancelled() => return None,
        }
        delay = (delay * 2).min(BIND_RETRY_MAX);
    }
}

async fn tcp_accept_loop(
    ctx: Arc<Ctx>,
    b: Arc<Binding>,
    l: TcpListener,
    mode: StreamMode,
    session: CancellationToken,
) {
    loop {
        tokio::select! {
            () = b.cancel.cancelled() => break,
            r = l.accept() => match r {
                Ok((s, peer)) => {
                    let (ctx, b, session) = (ctx.clone(), b.clone(), session.clone());
                    let span = tracing::debug_span!("tcp", %peer);
                    tokio::spawn(serve_tcp(ctx, b, s, peer, mode, session).instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        () = b.cancel.cancelled() => break,
                    }
                }
            }
        }
    }
    drop(l);
    tracing::info!("host listener closed");
}

async fn serve_tcp(
    ctx: Arc<Ctx>,
    b: Arc<Binding>,
    client: TcpStream,
    peer: SocketAddr,
    mode: StreamMode,
    session: CancellationToken,
) {
    let Ok(_permit) = ctx.streams.clone().try_acquire_owned() else {
        bump(&ctx.counters.streams_refused);
        tracing::warn!("stream limit reached; resetting the client");
        relay::reset_tcp(client);
        return;
    };
    let _open = OpenGuard::new(b.traffic.clone());
    let _ = client.set_nodelay(true);
    let target = b.target();
    let kind = StreamKind::TcpRelay(RelayTarget {
        target,
        client: peer,
    });
    let link = tokio::select! {
        r = relay::open_relay(&ctx.connector, kind, mode) => r,
        () = session.cancelled() => {
            relay::reset_tcp(client);
            return;
        }
    };
    let link = match link {
        Ok(link) => link,
        Err(OpenError::Status(s)) => {
            bump(&ctx.counters.relays_refused);
            tracing::info!(%target, status = ?s, "the agent did not connect; resetting the client");
            relay::reset_tcp(client);
            return;
        }
        Err(e) => {
            bump(&ctx.counters.link_open_failed);
            tracing::warn!(%target, error = %e, "cannot relay; resetting the client");
            relay::reset_tcp(client);
            return;
        }
    };
    let client = Counted::new(client, b.traffic.clone());
    match relay::relay(client, link, &session).await {
        RelayEnd::Done(up, down) => tracing::debug!(to_guest = up, from_guest = down, "closed"),
        RelayEnd::Reset(e) => {
            bump(&ctx.counters.relays_reset);
            tracing::debug!(error = %e, "relay failed; both sides reset");
        }
        RelayEnd::Cancelled => tracing::debug!("session ended; both sides reset"),
    }
}

struct Flow {
    id: u64,
    tx: mpsc::Sender<Vec<u8>>,
    last: Arc<AtomicU64>,
    cancel: CancellationToken,
}

type FlowTable = Arc<std::sync::Mutex<HashMap<SocketAddr, Flow>>>;

fn millis_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Decrements the flow count and removes the flow from its table when the flow task ends.
struct FlowGuard {
    ctx: Arc<Ctx>,
    table: FlowTable,
    client: SocketAddr,
    id: u64,
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.ctx.udp_flows.fetch_sub(1, Ordering::Relaxed);
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.get(&self.client).is_some_and(|f| f.id == self.id) {
            t.remove(&self.client);
        }
    }
}

async fn udp_loop(
    ctx: Arc<Ctx>,
    b: Arc<Binding>,
    sock: UdpSocket,
    mode: StreamMode,
    session: CancellationToken,
) {
    let sock = Arc::new(sock);
    let table: FlowTable = Arc::default();
    let base = Instant::now();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; proto::MAX_DATAGRAM];
    let mut refusing = false;
    loop {
        let (n, client) = tokio::select! {
            () = b.cancel.cancelled() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors of earlier sends surface here on some systems; keep going.
                    tracing::debug!(error = %e, "recv_from failed");
                    continue;
                }
            },
        };
        let data = buf[..n].to_vec();
        let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = t.get(&client).filter(|f| !f.tx.is_closed()) {
            f.last.store(millis_since(base), Ordering::Relaxed);
            if f.tx.try_send(data).is_err() {
                bump(&ctx.counters.udp_datagrams_dropped);
                tracing::debug!(%client, "flow queue full; datagram dropped");
            }
            continue;
        }
        t.remove(&client);
        if ctx.udp_flows.load(Ordering::Relaxed) >= ctx.max_udp_flows {
            // Evict this listener's least recently used flow, if it has one.
            let lru = t
                .iter()
                .min_by_key(|(_, f)| f.last.load(Ordering::Relaxed))
                .map(|(k, _)| *k);
            match lru {
                Some(k) => {
                    if let Some(f) = t.remove(&k) {
                        f.cancel.cancel();
                    }
                    bump(&ctx.counters.udp_flows_evicted);
                    tracing::debug!(evicted = %k, "UDP flow limit reached; evicted the least recently used flow");
                }
                None => {
                    bump(&ctx.counters.udp_flows_refused);
                    bump(&ctx.counters.udp_datagrams_dropped);
                    if !refusing {
                        tracing::warn!(
                            limit = ctx.max_udp_flows,
                            "UDP flow limit reached; new flows refused"
                        );
                        refusing = true;
                    }
                    continue;
                }
            }
        }
        refusing = false;
        next_id += 1;
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        let _ = tx.try_send(data);
        let last = Arc::new(AtomicU64::new(millis_since(base)));
        let cancel = session.child_token();
        let flow_cancel = cancel.clone();
        t.insert(
            client,
            Flow {
                id: next_id,
                tx,
                last: last.clone(),
                cancel,
            },
        );
        ctx.udp_flows.fetch_add(1, Ordering::Relaxed);
        let guard = FlowGuard {
            ctx: ctx.clone(),
            table: table.clone(),
            client,
            id: next_id,
        };
        drop(t);
        let span = tracing::debug_span!("udp", %client);
        tokio::spawn(
            udp_flow(
                ctx.clone(),
                b.clone(),
                sock.clone(),
                client,
                mode,
                rx,
                (base, last),
                flow_cancel,
                guard,
            )
            .instrument(span),
        );
    }
    for (_, f) in table.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        f.cancel.cancel();
    }
    tracing::info!("host UDP socket closed");
}

#[allow(clippy::too_many_arguments)]
async fn udp_flow(
    ctx: Arc<Ctx>,
    b: Arc<Binding>,
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    mode: StreamMode,
    mut rx: mpsc::Receiver<Vec<u8>>,
    (base, last): (Instant, Arc<AtomicU64>),
    cancel: CancellationToken,
    _guard: FlowGuard,
) {
    let Ok(_permit) = ctx.streams.clone().try_acquire_owned() else {
        bump(&ctx.counters.streams_refused);
        bump(&ctx.counters.udp_datagrams_dropped);
        tracing::warn!("stream limit reached; UDP flow refused");
        return;
    };
    let _open = OpenGuard::new(b.traffic.clone());
    let target = b.target();
    let kind = StreamKind::UdpFlow(RelayTarget { target, client });
    let link = tokio::select! {
        r = relay::open_relay(&ctx.connector, kind, mode) => r,
        () = cancel.cancelled() => return,
    };
    let link = match link {
        Ok(l) => l,
        Err(e) => {
            match e {
                OpenError::Status(_) => bump(&ctx.counters.relays_refused),
                _ => bump(&ctx.counters.link_open_failed),
            }
            let queued = rx.len() as u64;
            ctx.counters
                .udp_datagrams_dropped
                .fetch_add(queued, Ordering::Relaxed);
            tracing::info!(%target, error = %e, dropped = queued, "UDP flow not set up; datagrams dropped");
            return;
        }
    };
    let traffic = b.traffic.clone();
    let (rd, mut wr) = tokio::io::split(link);
    let up = async {
        while let Some(d) = rx.recv().await {
            proto::write_datagram(&mut wr, &d).await?;
            last.store(millis_since(base), Ordering::Relaxed);
            traffic
                .to_guest
                .fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Ok::<_, proto::ProtoError>(())
    };
    let down = async {
        let mut rd = BufReader::new(rd);
        let mut buf = Vec::new();
        while proto::read_datagram(&mut rd, &mut buf).await? {
            last.store(millis_since(base), Ordering::Relaxed);
            traffic
                .from_guest
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            if let Err(e) = sock.send_to(&buf, client).await {
                bump(&ctx.counters.udp_datagrams_dropped);
                tracing::debug!(error = %e, "reply to the client failed; datagram dropped");
            }
        }
        Ok::<_, proto::ProtoError>(())
    };
    let idle = async {
        loop {
            let quiet = Duration::from_millis(
                millis_since(base).saturating_sub(last.load(Ordering::Relaxed)),
            );
            if quiet >= ctx.udp_timeout {
                return;
            }
            tokio::time::sleep(ctx.udp_timeout - quiet).await;
        }
    };
    tokio::select! {
        r = up => if let Err(e) = r { tracing::debug!(error = %e, "UDP flow to the guest failed") },
        r = down => match r {
            Ok(()) => tracing::debug!("the agent closed the UDP flow"),
            Err(e) => tracing::debug!(error = %e, "UDP flow from the guest failed"),
        },
        () = idle => {
            bump(&ctx.counters.udp_flows_expired);
            tracing::debug!("UDP flow idle; closed");
        }
        () = cancel.cancelled() => tracing::debug!("UDP flow cancelled"),
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), wr.shutdown()).await;
}
