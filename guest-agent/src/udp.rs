//! The agent's end of the datagram channel: flows the forwarder opens go to VM-loopback UDP
//! listeners that policy allows; flows of the reverse mirrors go to the forwarder.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use hostnet_link::proto::channel::CloseReason;
use hostnet_link::proto::{Proto, StreamMode};
use hostnet_link::transport::Stream;
use hostnet_link::udp::{self, Channel, Tally};

use crate::policy;
use crate::shared::Shared;

/// Admits the forwarder's flows: a UDP port listening on the VM's loopback now, allowed by
/// `--allow`/`--deny` (the same check as a TCP relay).
struct GuestDialer(Weak<Shared>);

impl udp::Dialer for GuestDialer {
    fn admit(
        &self,
        target: SocketAddr,
        client: SocketAddr,
    ) -> Result<(SocketAddr, Option<Arc<dyn Tally>>), CloseReason> {
        let shared = self.0.upgrade().ok_or(CloseReason::Gone)?;
        let set = shared.guest.borrow().clone();
        match policy::check_target(Proto::Udp, target, &set, &shared.config.filter) {
            Ok(addr) => Ok((addr, None)),
            Err(reason) => {
                shared.counters.forbidden.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%target, %client, %reason, "UDP flow forbidden");
                Err(CloseReason::Forbidden)
            }
        }
    }
}

/// Runs the datagram channel the forwarder opened until it ends; it replaces the previous one
/// (whose flows close).
pub(crate) async fn run(shared: Arc<Shared>, stream: Stream, mode: StreamMode, peer: String) {
    if mode != StreamMode::Raw {
        tracing::warn!(%peer, ?mode, "a datagram channel must be raw; closing it");
        return;
    }
    let config = udp::Config {
        side: udp::Side::Agent,
        max_flows: shared.config.max_udp_flows,
        idle: shared.config.udp_timeout,
        queue_bytes: udp::DEFAULT_QUEUE_BYTES,
    };
    let dialer = Arc::new(GuestDialer(Arc::downgrade(&shared)));
    let channel = Channel::start(stream, config, dialer, shared.udp.clone());
    if let Some(old) = shared.channel.send_replace(Some(channel.clone())) {
        tracing::info!("a new datagram channel replaces the previous one");
        old.close();
    }
    tracing::debug!(%peer, "datagram channel up");
    tokio::select! {
        () = channel.closed() => {}
        () = shared.root.cancelled() => channel.close(),
    }
    shared.channel.send_if_modified(|c| {
        let ours = c.as_ref().is_some_and(|c| c.same(&channel));
        if ours {
            c.take();
        }
        ours
    });
    tracing::debug!(%peer, "datagram channel closed");
}
