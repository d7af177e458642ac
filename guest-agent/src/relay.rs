//! TCP relays: a link stream against a TCP connection (half-close and reset carried both
//! ways), for forwarder-opened relay streams and dial-back streams alike. (UDP rides the
//! datagram channel: `crate::udp`.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hostnet_link::proto::{self, PayloadStream, Proto, RelayStatus, RelayTarget, StreamMode};
use hostnet_link::relay::RelayEnd;
use hostnet_link::transport::Stream;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::policy;
use crate::shared::Shared;

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

/// A forwarder-opened `TcpRelay` stream. Its header has been read, exactly: the client's first
/// bytes may already wait behind it (the forwarder does not wait for the status to send them).
/// They are relayed after an `Ok`; on a refusal the stream is closed with them unread, and the
/// forwarder resets its client.
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

/// A `UdpFlow` stream from an older forwarder: UDP rides the datagram channel now.
pub(crate) async fn refuse_udp_flow(mut stream: Stream, t: RelayTarget) {
    tracing::warn!(target = %t.target, client = %t.client, "a UDP flow stream from an older forwarder; refused (UDP rides the datagram channel: upgrade the forwarder)");
    let why = "UDP flow streams are not supported: this agent carries UDP on the datagram channel (upgrade the forwarder)";
    answer(&mut stream, &RelayStatus::error(why)).await;
}
