//! The agent: its discovery feed, its accept loops and the per-stream dispatch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hostnet_link::discovery::{self, Event, Options, Watcher};
use hostnet_link::proto::{self, DialBackId, ProtoError, StreamKind};
use hostnet_link::transport::{Listener, Stream};
use hostnet_link::udp;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::shared::AgentConfig;
use crate::shared::{Counters, Shared, lock};
use crate::{control, relay};

/// A snapshot of the agent's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Link streams accepted.
    pub streams: u64,
    /// Streams closed because their header was bad, late or missing.
    pub handshake_errors: u64,
    /// Relay requests answered `Forbidden`.
    pub forbidden: u64,
    /// TCP relays refused because `--max-streams` were running.
    pub streams_full: u64,
    /// The datagram channel's counters (every session's), with the flows open now.
    pub udp: udp::CountersView,
    /// Control sessions started.
    pub sessions: u64,
    /// Dial-back requests sent.
    pub dial_backs: u64,
    /// Dial-backs that failed (no stream in time, bad status).
    pub dial_back_failed: u64,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Discovery could not be set up.
    #[error(transparent)]
    Discovery(#[from] discovery::Error),
    /// The discovery watcher stopped before its first snapshot.
    #[error("discovery watcher stopped before its first snapshot")]
    NoSnapshot,
}

/// A running agent: discovery is up; [`Agent::serve`] accepts link streams.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Agent {
    /// Starts discovery (in the caller's network namespace) and waits for its first snapshot.
    /// `shutdown` stops the agent's sessions and its discovery feed.
    pub async fn start(
        config: AgentConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let (watcher, mut events) = Watcher::spawn(Options::default(), config.discovery_interval)?;
        let mut set = match events.recv().await {
            Some(Event::Snapshot(s)) => s,
            Some(Event::Changed(_)) | None => return Err(StartError::NoSnapshot),
        };
        let (tx, rx) = watch::channel(Arc::new(set.clone()));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    () = stop.cancelled() => break,
                };
                match event {
                    Some(Event::Snapshot(s)) => set = s,
                    Some(Event::Changed(d)) => set.apply(&d),
                    None => break,
                }
                tx.send_replace(Arc::new(set.clone()));
            }
            tracing::debug!("discovery feed stopped");
        });
        let shared = Arc::new(Shared {
            streams: Arc::new(Semaphore::new(config.max_streams)),
            udp: Arc::default(),
            channel: watch::Sender::new(None),
            config,
            guest: rx,
            watcher,
            counters: Counters::default(),
            session: Mutex::new(None),
            next_session: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            next_dial_back: AtomicU64::new(1),
            mirrored: Mutex::new(BTreeMap::new()),
            root: shutdown,
        });
        Ok(Self { shared })
    }

    /// What the agent reports right now (as in its `Snapshot{Guest}`).
    pub fn report(&self) -> BTreeSet<proto::Listener> {
        self.shared.report()
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            streams: g(&c.streams),
            handshake_errors: g(&c.handshake_errors),
            forbidden: g(&c.forbidden),
            streams_full: g(&c.streams_full),
            udp: udp::CountersView {
                flows: self
                    .shared
                    .channel
                    .borrow()
                    .as_ref()
                    .map_or(0, |c| c.flows() as u64),
                ..self.shared.udp.view()
            },
            sessions: g(&c.sessions),
            dial_backs: g(&c.dial_backs),
            dial_back_failed: g(&c.dial_back_failed),
        }
    }

    /// Accepts streams from every listener until `shutdown` (or the agent's own shutdown) is
    /// cancelled; each stream is handled in its own task. Per-stream failures are logged and
    /// counted, never end the loop. Returns an error if every listener's accept loop died.
    /// The listeners are closed (a unix socket file removed) when this returns.
    pub async fn serve(
        &self,
        listeners: Vec<Listener>,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let tracker = TaskTracker::new();
        let mut loops = JoinSet::new();
        for mut listener in listeners {
            let shared = self.shared.clone();
            let tasks = tracker.clone();
            loops.spawn(async move {
                let endpoint = listener.local_endpoint().clone();
                loop {
                    match listener.accept().await {
                        Ok(stream) => {
                            shared.counters.streams.fetch_add(1, Ordering::Relaxed);
                            tasks.spawn(handle_stream(shared.clone(), stream));
                        }
                        Err(e) => {
                            tracing::error!(%endpoint, error = %e, "link listener stopped");
                            break;
                        }
                    }
                }
            });
        }
        tracker.close();
        let result = tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            () = self.shared.root.cancelled() => Ok(()),
            () = async { while loops.join_next().await.is_some() {} } => Err(ServeError::ListenersStopped),
        };
        loops.abort_all();
        while loops.join_next().await.is_some() {}
        if let Some(slot) = lock(&self.shared.session).take() {
            slot.cancel.cancel();
        }
        tracing::info!(stats = ?self.stats(), "agent stopped serving");
        result
    }
}

/// Why [`Agent::serve`] stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Every link listener's accept loop ended.
    #[error("every link listener stopped accepting")]
    ListenersStopped,
}

async fn handle_stream(shared: Arc<Shared>, mut stream: Stream) {
    let peer = stream.peer().to_string();
    let header = match proto::read_header(&mut stream, proto::HEADER_TIMEOUT).await {
        Ok(h) => h,
        Err(e) => {
            shared
                .counters
                .handshake_errors
                .fetch_add(1, Ordering::Relaxed);
            if matches!(e, ProtoError::Closed { .. }) {
                tracing::debug!(%peer, "link stream closed before its header");
            } else {
                tracing::warn!(%peer, error = %e, "bad link stream header; closing");
            }
            return;
        }
    };
    tracing::debug!(%peer, ?header, "link stream");
    match header.kind {
        StreamKind::Control => control::run(shared, stream, header.mode, peer).await,
        StreamKind::TcpRelay(t) => relay::tcp(shared, stream, header.mode, t).await,
        StreamKind::Datagrams => crate::udp::run(shared, stream, header.mode, peer).await,
        StreamKind::UdpFlow(t) => relay::refuse_udp_flow(stream, t).await,
        StreamKind::DialBack(DialBackId(id)) => {
            let waiter = lock(&shared.pending).remove(&id);
            match waiter {
                Some(tx) => {
                    if tx.send((stream, header.mode)).is_err() {
                        tracing::debug!(id, "dial-back stream arrived after its request gave up");
                    }
                }
                None => {
                    tracing::warn!(id, %peer, "dial-back stream for an unknown or expired request; closing")
                }
            }
        }
    }
}
