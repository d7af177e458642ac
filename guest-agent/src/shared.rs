//! What every task of the agent shares: the configuration, the discovery feed, the limits and
//! counters, the current control session and datagram channel, pending dial-backs, and the ports
//! held by reverse mirrors. A leaf module: the modules that act on it (`agent`, `control`,
//! `relay`, `reverse`, `udp`) depend on it, never the other way round.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hostnet_link::discovery::{self, Protocol, WatcherHandle};
use hostnet_link::proto::{self, StreamMode};
use hostnet_link::transport::Stream;
use hostnet_link::udp;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::ports::PortFilter;

/// What the agent does, apart from where it listens.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `--allow` / `--deny`.
    pub filter: PortFilter,
    /// Idle timeout of a UDP flow (`--udp-timeout`).
    pub udp_timeout: Duration,
    /// Concurrent TCP relays, forward and reverse (`--max-streams`).
    pub max_streams: usize,
    /// UDP flows open at once, forward and reverse (`--max-udp-flows`); at the limit the least
    /// recently used is closed.
    pub max_udp_flows: usize,
    /// Discovery poll interval.
    pub discovery_interval: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            filter: PortFilter::default(),
            udp_timeout: Duration::from_secs(120),
            max_streams: 4096,
            max_udp_flows: 4096,
            discovery_interval: discovery::DEFAULT_INTERVAL,
        }
    }
}

/// Counters of events worth knowing about (limits biting, refusals, bad peers).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub streams: AtomicU64,
    pub handshake_errors: AtomicU64,
    pub forbidden: AtomicU64,
    pub streams_full: AtomicU64,
    pub sessions: AtomicU64,
    pub dial_backs: AtomicU64,
    pub dial_back_failed: AtomicU64,
}

/// The control session in charge: a new control stream cancels it and waits (briefly) for
/// `done` to resolve, which happens when its reverse listeners are gone.
pub(crate) struct SessionSlot {
    pub id: u64,
    pub cancel: CancellationToken,
    pub done: oneshot::Receiver<()>,
}

/// A dial-back stream delivered to the task that asked for it.
pub(crate) type DialBackDelivery = (Stream, StreamMode);

pub(crate) struct Shared {
    pub config: AgentConfig,
    /// The latest discovery set (after the agent's own exclusions, before the report filter).
    pub guest: watch::Receiver<Arc<discovery::ListenerSet>>,
    pub watcher: WatcherHandle,
    pub streams: Arc<Semaphore>,
    pub counters: Counters,
    /// The datagram channels' counters.
    pub udp: Arc<udp::Counters>,
    /// The current session's datagram channel, once the forwarder has opened it.
    pub channel: watch::Sender<Option<udp::Channel>>,
    /// The current control session.
    pub session: Mutex<Option<SessionSlot>>,
    pub next_session: AtomicU64,
    /// Dial-back requests waiting for their stream.
    pub pending: Mutex<HashMap<u64, oneshot::Sender<DialBackDelivery>>>,
    pub next_dial_back: AtomicU64,
    /// Ports bound as reverse mirrors (refcounted), kept out of discovery (loop prevention).
    pub mirrored: Mutex<BTreeMap<(Protocol, u16), usize>>,
    pub root: CancellationToken,
}

/// Locks a mutex, ignoring poisoning (the data are plain maps that stay consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The listener set the agent reports right now.
    pub fn report(&self) -> BTreeSet<proto::Listener> {
        crate::policy::report(self.guest.borrow().iter(), &self.config.filter)
    }

    /// Marks a port as mirrored for the host until the guard drops.
    pub fn mirror_guard(self: &Arc<Self>, proto: Protocol, port: u16) -> MirrorGuard {
        let changed = {
            let mut m = lock(&self.mirrored);
            let n = m.entry((proto, port)).or_insert(0);
            *n += 1;
            *n == 1
        };
        if changed {
            self.push_exclusions();
        }
        MirrorGuard {
            shared: self.clone(),
            key: (proto, port),
        }
    }

    fn push_exclusions(&self) {
        let ports: BTreeSet<(Protocol, u16)> = lock(&self.mirrored).keys().copied().collect();
        self.watcher.set_excluded_ports(ports);
    }
}

/// Keeps a (protocol, port) out of the reported set while a reverse mirror holds it.
pub(crate) struct MirrorGuard {
    shared: Arc<Shared>,
    key: (Protocol, u16),
}

impl Drop for MirrorGuard {
    fn drop(&mut self) {
        let changed = {
            let mut m = lock(&self.shared.mirrored);
            match m.get_mut(&self.key) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    m.remove(&self.key);
                    true
                }
                None => false,
            }
        };
        if changed {
            self.shared.push_exclusions();
        }
    }
}

/// Removes a pending dial-back when its waiter goes away (answered, timed out or aborted).
pub(crate) struct PendingGuard {
    pub shared: Arc<Shared>,
    pub id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        lock(&self.shared.pending).remove(&self.id);
    }
}

/// A dial-back request for the current control session to send.
pub(crate) type DialBackTx = mpsc::Sender<proto::DialBack>;
