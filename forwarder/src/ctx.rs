//! What every task of a forwarder shares: the connector, the limits, the counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hostnet_link::transport::Connector;
use hostnet_link::udp;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};

use crate::rules::ReverseRules;

/// Process-wide counters, shown by `status`; each names a limit or failure that bit.
#[derive(Debug, Default)]
pub struct Counters {
    /// Control sessions established.
    pub sessions: AtomicU64,
    /// Host clients turned away because the stream limit was reached.
    pub streams_refused: AtomicU64,
    /// Link streams that could not be opened (transport errors).
    pub link_open_failed: AtomicU64,
    /// Relays the agent answered with a status other than `Ok`.
    pub relays_refused: AtomicU64,
    /// Relays that ended with a reset or error.
    pub relays_reset: AtomicU64,
    /// The datagram channels' counters (every session's; see [`Counters::view`]).
    pub udp: Arc<udp::Counters>,
    /// Dial-back requests served with `Ok`.
    pub dial_backs: AtomicU64,
    /// Dial-back requests refused (`Forbidden`, connect failures).
    pub dial_backs_failed: AtomicU64,
    /// Dial-back requests refused because the reverse rules deny the port (also counted in
    /// `dial_backs_failed`), and dial-back relays reset because their port became denied.
    pub dial_backs_denied: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default)]
#[allow(missing_docs)]
pub struct CountersView {
    pub sessions: u64,
    pub streams_refused: u64,
    pub link_open_failed: u64,
    pub relays_refused: u64,
    pub relays_reset: u64,
    /// UDP flows open now (on the current session's datagram channel).
    pub udp_flows: u64,
    /// UDP flows opened by host clients.
    pub udp_flows_opened: u64,
    /// UDP flows from the guest to host services (the reverse direction).
    pub udp_flows_accepted: u64,
    /// UDP flows turned away: by the agent (target refused, forbidden, unreachable) or by this
    /// side (a guest flow to a host port that is not reported, denied, or refused).
    pub udp_flows_refused: u64,
    pub udp_flows_evicted: u64,
    pub udp_flows_expired: u64,
    pub udp_datagrams_dropped: u64,
    /// Frames too large for a QUIC datagram, sent on the channel's stream instead.
    pub udp_sent_on_stream: u64,
    pub dial_backs: u64,
    pub dial_backs_failed: u64,
    pub dial_backs_denied: u64,
    /// TCP payload bytes the relays moved with splice(2), without copying them (Linux, unix
    /// and hybrid vsock links; 0 elsewhere).
    pub tcp_bytes_spliced: u64,
}

impl Counters {
    /// Reads every counter; `udp_flows` is the number of flows open now.
    pub fn view(&self, udp_flows: usize) -> CountersView {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let u = self.udp.view();
        CountersView {
            udp_flows: udp_flows as u64,
            udp_flows_opened: u.flows_opened,
            udp_flows_accepted: u.flows_accepted,
            udp_flows_refused: u.flows_refused + u.flows_refused_by_peer,
            udp_flows_evicted: u.flows_evicted,
            udp_flows_expired: u.flows_expired,
            udp_datagrams_dropped: u.datagrams_dropped,
            udp_sent_on_stream: u.sent_on_stream,
            sessions: r(&self.sessions),
            streams_refused: r(&self.streams_refused),
            link_open_failed: r(&self.link_open_failed),
            relays_refused: r(&self.relays_refused),
            relays_reset: r(&self.relays_reset),
            dial_backs: r(&self.dial_backs),
            dial_backs_failed: r(&self.dial_backs_failed),
            dial_backs_denied: r(&self.dial_backs_denied),
            tcp_bytes_spliced: hostnet_link::splice::spliced_bytes(),
        }
    }
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Shared by every task.
#[derive(Debug)]
pub struct Ctx {
    /// Opens link streams to the agent.
    pub connector: Connector,
    /// Concurrent link streams (TCP relays, dial-backs).
    pub streams: Arc<Semaphore>,
    /// The current session's datagram channel (`None` between sessions, or when the agent
    /// has none).
    pub channel: std::sync::Mutex<Option<udp::Channel>>,
    /// Limit on the UDP flows of a session (both directions).
    pub max_udp_flows: usize,
    /// Idle timeout of a UDP flow.
    pub udp_timeout: Duration,
    /// The counters.
    pub counters: Counters,
    /// The reverse direction's rules now (they change on a reload): checked when host
    /// listeners are reported and again at each dial-back.
    pub reverse_rules: watch::Sender<ReverseRules>,
}

impl Ctx {
    /// The counters, with the UDP flows open now.
    pub fn counters_view(&self) -> CountersView {
        let flows = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, udp::Channel::flows);
        self.counters.view(flows)
    }
}
