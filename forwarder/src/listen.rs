//! The shell around a [`Binding`]: bind the host socket (retrying while it is taken), accept
//! TCP connections and relay each over its own link stream, or hand UDP datagrams to the
//! session's datagram channel ([`hostnet_link::udp`]: a flow per client, bounded,
//! least-recently-used eviction, idle timeout; replies leave from this socket).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hostnet_link::proto::{Proto, RelayTarget, StreamKind, StreamMode};
use hostnet_link::udp;
use socket2::{Domain, Protocol as SockProto, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ctx::{Ctx, bump};
use crate::mirror::{BindState, Binding};
use crate::relay::{self, Counted, OpenGuard, OpenedEnd, RelayEnd};

/// First retry delay of a taken host address.
pub const BIND_RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest retry delay of a taken host address.
pub const BIND_RETRY_MAX: Duration = Duration::from_secs(5);
/// Pause after a failing `accept()` (EMFILE and friends).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
    // Best effort: a smaller buffer only means earlier drops under a burst.
    let _ = s.set_recv_buffer_size(udp::LISTENER_RECV_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Starts the task of a new binding. `session` is cancelled when the control session ends:
/// open connections are then reset. The binding's own token closes the host socket.
pub fn spawn(
    ctx: Arc<Ctx>,
    b: Arc<Binding>,
    mode: StreamMode,
    channel: Option<udp::Channel>,
    session: CancellationToken,
) {
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
                        udp_loop(b, s, channel, session).await;
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
        r = relay::open_stream(&ctx.connector, kind, mode) => r,
        () = session.cancelled() => {
            relay::reset_tcp(client);
            return;
        }
    };
    let link = match link {
        Ok(link) => link,
        Err(e) => {
            bump(&ctx.counters.link_open_failed);
            tracing::warn!(%target, error = %e, "cannot relay; resetting the client");
            relay::reset_tcp(client);
            return;
        }
    };
    // The client's first bytes follow the header at once; the agent's status comes back on
    // the other direction (a refusal resets the client).
    let client = Counted::new(client, b.traffic.clone());
    match relay::relay_opened(client, link, &session).await {
        OpenedEnd::Relayed(RelayEnd::Done(up, down)) => {
            tracing::debug!(to_guest = up, from_guest = down, "closed");
        }
        OpenedEnd::Relayed(RelayEnd::Reset(e)) => {
            bump(&ctx.counters.relays_reset);
            tracing::debug!(error = %e, "relay failed; both sides reset");
        }
        OpenedEnd::Relayed(RelayEnd::Cancelled) => {
            tracing::debug!("session ended; both sides reset");
        }
        OpenedEnd::Refused(s) => {
            bump(&ctx.counters.relays_refused);
            tracing::info!(%target, status = ?s, "the agent did not connect; resetting the client");
        }
        OpenedEnd::NoStatus(e) => {
            bump(&ctx.counters.link_open_failed);
            tracing::warn!(%target, error = %e, "no relay status from the agent; resetting the client");
        }
    }
}

/// Receives host clients' datagrams and hands them to the session's datagram channel, which
/// opens a flow per client and sends the guest's replies back from this socket.
async fn udp_loop(
    b: Arc<Binding>,
    sock: UdpSocket,
    channel: Option<udp::Channel>,
    session: CancellationToken,
) {
    let Some(channel) = channel else {
        tracing::warn!("the agent has no datagram channel; UDP not relayed");
        return;
    };
    let sock = Arc::new(sock);
    let tally: Arc<dyn udp::Tally> = b.traffic.clone();
    let listener = channel.listener(sock.clone(), b.target(), Some(tally));
    tokio::select! {
        () = b.cancel.cancelled() => {}
        () = session.cancelled() => {}
        () = listener.pump(&sock) => {}
    }
    tracing::info!("host UDP socket closed");
}
