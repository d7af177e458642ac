//! Relays: a link stream against a TCP connection (half-close and reset carried both ways),
//! and a link stream of datagrams against a UDP socket. Used for forwarder-opened relay
//! streams and for dial-back streams alike.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostnet_link::proto::{self, PayloadStream, Proto, RelayStatus, RelayTarget, StreamMode};
use hostnet_link::relay::RelayEnd;
use hostnet_link::transport::Stream;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::agent::{Shared, lock};
use crate::policy;

/// How long a reset or a final END may take to go out before the stream is just dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Writes the status, bounded: a peer that does not read is not waited for.
async fn answer(stream: &mut Stream, status: &RelayStatus) -> bool {
    match tokio::time::timeout(proto::STATUS_TIMEOUT, proto::write_status(stream, status)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "writing the relay status failed");
            false
        }
        Err(_) => {
            tracing::debug!("writing the relay status timed out");
            false
        }
    }
}

/// Checks the target against policy and the current listeners; answers `Forbidden` (and
/// logs) when refused.
async fn admit(
    shared: &Shared,
    stream: &mut Stream,
    proto: Proto,
    t: &RelayTarget,
) -> Option<SocketAddr> {
    let set = shared.guest.borrow().clone();
    match policy::check_target(proto, t.target, &set, &shared.config.filter) {
        Ok(addr) => Some(addr),
        Err(reason) => {
            shared.counters.forbidden.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target = %t.target, client = %t.client, peer = %stream.peer(), ?proto, %reason, "relay forbidden");
            answer(stream, &RelayStatus::Forbidden).await;
            None
        }
    }
}

/// A forwarder-opened `TcpRelay` stream.
pub(crate) async fn tcp(shared: Arc<Shared>, mut stream: Stream, mode: StreamMode, t: RelayTarget) {
    let span = tracing::info_span!("tcp", target = %t.target, client = %t.client);
    async move {
        let Ok(_permit) = shared.streams.clone().try_acquire_owned() else {
            shared.counters.streams_full.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                max = shared.config.max_streams,
                "too many streams; refusing"
            );
            answer(&mut stream, &RelayStatus::error("too many streams")).await;
            return;
        };
        let Some(addr) = admit(&shared, &mut stream, Proto::Tcp, &t).await else {
            return;
        };
        let tcp = match tokio::time::timeout(proto::CONNECT_TIMEOUT, TcpStream::connect(addr)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let status = RelayStatus::from_connect_error(&e);
                tracing::info!(%addr, error = %e, ?status, "connect failed");
                answer(&mut stream, &status).await;
                return;
            }
            Err(_) => {
                tracing::info!(%addr, "connect timed out");
                answer(&mut stream, &RelayStatus::Timeout).await;
                return;
            }
        };
        if !answer(&mut stream, &RelayStatus::Ok).await {
            reset_tcp(tcp);
            return;
        }
        let _ = tcp.set_nodelay(true);
        relay_tcp(PayloadStream::new(stream, mode), tcp, &shared.root).await;
    }
    .instrument(span)
    .await;
}

pub(crate) use hostnet_link::relay::reset_tcp;

/// Relays until both directions have ended (half-close carried each way); on an error from
/// either side, or when `cancel` fires, resets both (see [`hostnet_link::relay::relay`]).
pub(crate) async fn relay_tcp(
    link: PayloadStream<Stream>,
    tcp: TcpStream,
    cancel: &CancellationToken,
) {
    match hostnet_link::relay::relay(tcp, link, cancel, reset_tcp).await {
        RelayEnd::Done(to_link, to_vm) => tracing::debug!(to_vm, to_link, "relay closed"),
        RelayEnd::Reset(e) => tracing::debug!(error = %e, "relay failed; both sides reset"),
        RelayEnd::Cancelled => tracing::debug!("relay cancelled; both sides reset"),
    }
}

/// A forwarder-opened `UdpFlow` stream.
pub(crate) async fn udp(shared: Arc<Shared>, mut stream: Stream, mode: StreamMode, t: RelayTarget) {
    let span = tracing::info_span!("udp", target = %t.target, client = %t.client);
    async move {
        let Ok(_permit) = shared.udp_flows.clone().try_acquire_owned() else {
            shared
                .counters
                .udp_flows_full
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                max = shared.config.max_udp_flows,
                "too many UDP flows; refusing"
            );
            answer(&mut stream, &RelayStatus::error("too many udp flows")).await;
            return;
        };
        let Some(addr) = admit(&shared, &mut stream, Proto::Udp, &t).await else {
            return;
        };
        let local: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (Ipv6Addr::LOCALHOST, 0).into()
        };
        let sock = async {
            let s = UdpSocket::bind(local).await?;
            s.connect(addr).await?;
            io::Result::Ok(s)
        }
        .await;
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%addr, error = %e, "UDP socket setup failed");
                answer(&mut stream, &RelayStatus::from_connect_error(&e)).await;
                return;
            }
        };
        if !answer(&mut stream, &RelayStatus::Ok).await {
            return;
        }
        let link = PayloadStream::new(stream, mode);
        relay_datagrams(
            link,
            UdpSide::Connected(&sock),
            shared.config.udp_timeout,
            &shared.root,
        )
        .await;
    }
    .instrument(span)
    .await;
}

/// Where datagrams from the link go, and where datagrams for the link come from.
pub(crate) enum UdpSide<'a> {
    /// A connected socket (forward flows): `send` / `recv`.
    Connected(&'a UdpSocket),
    /// A shared listening socket (reverse flows): `send_to(client)`, datagrams from the
    /// mirror's receive loop.
    Shared {
        sock: &'a UdpSocket,
        client: SocketAddr,
        rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    },
}

/// Relays datagrams between a link stream and a UDP socket until either side ends, `cancel`
/// fires, or the flow has been idle (no datagram either way) for `idle`.
pub(crate) async fn relay_datagrams(
    link: PayloadStream<Stream>,
    side: UdpSide<'_>,
    idle: Duration,
    cancel: &CancellationToken,
) {
    let (mut rd, mut wr) = tokio::io::split(link);
    let last = Mutex::new(Instant::now());
    let touch = || *lock(&last) = Instant::now();
    let (sock, client, mut rx) = match side {
        UdpSide::Connected(s) => (s, None, None),
        UdpSide::Shared { sock, client, rx } => (sock, Some(client), Some(rx)),
    };
    let to_vm = async {
        let mut buf = Vec::with_capacity(2048);
        loop {
            match proto::read_datagram(&mut rd, &mut buf).await {
                Ok(true) => {}
                Ok(false) => return "link ended",
                Err(e) => {
                    tracing::debug!(error = %e, "reading a datagram from the link failed");
                    return "link failed";
                }
            }
            touch();
            let sent = match client {
                Some(c) => sock.send_to(&buf, c).await,
                None => sock.send(&buf).await,
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "UDP send failed; datagram dropped");
            }
        }
    };
    let to_link = async {
        let mut buf = vec![0u8; proto::MAX_DATAGRAM];
        loop {
            let written = match &mut rx {
                Some(rx) => match rx.recv().await {
                    Some(d) => proto::write_datagram(&mut wr, &d).await,
                    None => return "mirror closed",
                },
                None => match sock.recv(&mut buf).await {
                    Ok(n) => proto::write_datagram(&mut wr, buf.get(..n).unwrap_or_default()).await,
                    Err(e) => {
                        // ICMP port unreachable and the like: the flow goes on.
                        tracing::debug!(error = %e, "UDP receive failed");
                        continue;
                    }
                },
            };
            if let Err(e) = written {
                tracing::debug!(error = %e, "writing a datagram to the link failed");
                return "link write failed";
            }
            touch();
        }
    };
    let idle_timer = async {
        loop {
            let deadline = *lock(&last) + idle;
            if Instant::now() >= deadline {
                return "idle";
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let why = tokio::select! {
        w = to_vm => w,
        w = to_link => w,
        w = idle_timer => w,
        () = cancel.cancelled() => "cancelled",
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, wr.shutdown()).await;
    tracing::debug!(reason = why, "UDP flow closed");
}
