//! What every task of a forwarder shares: the connector, the limits, the counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hostnet_link::transport::Connector;
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
    /// UDP flows refused because the flow limit was reached and none could be evicted.
    pub udp_flows_refused: AtomicU64,
    /// UDP flows evicted (least recently used) to make room for a new one.
    pub udp_flows_evicted: AtomicU64,
    /// UDP flows closed on idle timeout.
    pub udp_flows_expired: AtomicU64,
    /// Datagrams dropped (flow queue full, flow failed to open, oversize).
    pub udp_datagrams_dropped: AtomicU64,
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
    pub udp_flows_refused: u64,
    pub udp_flows_evicted: u64,
    pub udp_flows_expired: u64,
    pub udp_datagrams_dropped: u64,
    pub dial_backs: u64,
    pub dial_backs_failed: u64,
    pub dial_backs_denied: u64,
}

impl Counters {
    /// Reads every counter.
    pub fn view(&self) -> CountersView {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersView {
            sessions: r(&self.sessions),
            streams_refused: r(&self.streams_refused),
            link_open_failed: r(&self.link_open_failed),
            relays_refused: r(&self.relays_refused),
            relays_reset: r(&self.relays_reset),
            udp_flows_refused: r(&self.udp_flows_refused),
            udp_flows_evicted: r(&self.udp_flows_evicted),
            udp_flows_expired: r(&self.udp_flows_expired),
            udp_datagrams_dropped: r(&self.udp_datagrams_dropped),
            dial_backs: r(&self.dial_backs),
            dial_backs_failed: r(&self.dial_backs_failed),
            dial_backs_denied: r(&self.dial_backs_denied),
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
    /// Concurrent link streams (TCP relays, UDP flows, dial-backs).
    pub streams: Arc<Semaphore>,
    /// UDP flows open now, across listeners.
    pub udp_flows: AtomicUsize,
    /// Limit on [`Ctx::udp_flows`].
    pub max_udp_flows: usize,
    /// Idle timeout of a UDP flow.
    pub udp_timeout: Duration,
    /// The counters.
    pub counters: Counters,
    /// The reverse direction's rules now (they change on a reload): checked when host
    /// listeners are reported and again at each dial-back.
    pub reverse_rules: watch::Sender<ReverseRules>,
}
