//! The hostnet forwarder (host side): mirrors the VM's listening ports onto the host's loopback
//! and relays connections and datagrams into the VM over the link; mirrors the host's
//! listeners into the VM (reverse direction) and serves the agent's dial-back requests.
//!
//! # Module map
//!
//! * [`policy`]: the address policy (guest listener → host addresses) and the dial-back target
//!   check, pure functions.
//! * [`mirror`]: the forward direction's table of host bindings (plain state; shared bindings,
//!   states `active` / `conflict` / `retrying`).
//! * [`listen`]: the shell of one binding: bind with retry and back-off, accept TCP, UDP flow
//!   table (idle timeout, LRU eviction, counters).
//! * [`relay`]: one TCP connection over one link stream (half-close, reset, byte counters).
//! * [`session`]: the control conversation with the agent, heartbeats, reconnection.
//! * [`reverse`]: the [`reverse::HostListeners`] seam, the rules filter in front of it, and
//!   dial-back.
//! * [`rules`]: which host listeners the reverse direction may mirror and dial
//!   (`--reverse-allow`, `--reverse-deny`, `--reverse-rules FILE`), pure functions.
//! * [`host`]: this host's listeners, one enumerator per OS (sock_diag, `pcblist_n`, IP Helper).
//! * [`status`]: the status document, its table, the control endpoint (a unix socket, or a named
//!   pipe on Windows).
//! * [`signal`]: the OS's stop requests (signals, console events).
//! * [`sandbox`]: `hostnet-forwarder sandbox`: a command in a new network namespace with an
//!   agent inside (Linux).
//! * [`service`]: running as a background service (systemd, launchd, the Windows service
//!   manager).
//! * [`ctx`]: what every task shares: the connector, the limits, the counters.
//! * [`cli`]: the command line (the binary is `cli::main`).
//!
//! # Host systems
//!
//! The forwarder runs on Linux, macOS and Windows. What differs per host sits behind one module
//! per OS, chosen where the module is declared: the host listener enumerator ([`host`]), the
//! control endpoint ([`status`]), the stop signals ([`signal`]), the sandbox ([`sandbox`], Linux
//! only) and the service integration ([`service`]); the link transports each host has come from
//! `hostnet_link::transport`. The data path (listeners, relays, the session) is the same code on
//! every host.
//!
//! # Use as a library
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use hostnet_forwarder::{Config, Forwarder};
//! let config = Config::new("unix:///run/hostnet/agent.sock".parse()?);
//! let fwd = Forwarder::new(config, hostnet_link::transport::Auth::none())?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! fwd.run(shutdown).await;
//! # Ok(()) }
//! ```

pub mod cli;
pub mod ctx;
pub mod host;
pub mod listen;
pub mod mirror;
pub mod policy;
pub mod relay;
pub mod reverse;
pub mod rules;
pub mod sandbox;
pub mod service;
pub mod session;
pub mod signal;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hostnet_link::proto::{BindState, Listener, MirrorState, Proto};
use hostnet_link::transport::{Auth, Connector, Endpoint, TransportError};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::ctx::{Counters, Ctx};
use crate::mirror::Mirror;
use crate::relay::Traffic;
use crate::reverse::{FilteredHostListeners, HostListeners};
use crate::rules::{ReverseRules, RulesFileError};
use crate::status::{Direction, HostAddr, PortRow, RulesStatus, SessionStatus, StatusReport};

/// Default idle timeout of a UDP flow.
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(120);
/// Default limit on UDP flows.
pub const DEFAULT_MAX_UDP_FLOWS: usize = 4096;
/// Default limit on concurrent link streams (TCP relays, UDP flows, dial-backs).
pub const DEFAULT_MAX_STREAMS: usize = 8192;

/// What a forwarder does.
#[derive(Debug, Clone)]
pub struct Config {
    /// The agent's endpoint.
    pub guest: Endpoint,
    /// Extra host addresses to bind for every guest listener (`--expose`).
    pub expose: Vec<IpAddr>,
    /// Mirror the host's listeners into the guest and serve dial-backs (unless `--no-reverse`).
    pub reverse: bool,
    /// Which host listeners the reverse direction may mirror and dial (default: all).
    pub reverse_rules: ReverseRules,
    /// Idle timeout of a UDP flow.
    pub udp_timeout: Duration,
    /// Limit on UDP flows (beyond it the least recently used flow of the listener is evicted).
    pub max_udp_flows: usize,
    /// Limit on concurrent link streams.
    pub max_streams: usize,
}

impl Config {
    /// Defaults for `guest`.
    pub fn new(guest: Endpoint) -> Self {
        Config {
            guest,
            expose: Vec::new(),
            reverse: true,
            reverse_rules: ReverseRules::default(),
            udp_timeout: DEFAULT_UDP_TIMEOUT,
            max_udp_flows: DEFAULT_MAX_UDP_FLOWS,
            max_streams: DEFAULT_MAX_STREAMS,
        }
    }
}

/// Errors setting a forwarder up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The endpoint or its credentials are not usable.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The host's listener enumeration could not start.
    #[error(
        "reverse direction: cannot list this host's listeners (use --no-reverse to run without it)"
    )]
    HostListeners(#[source] host::StartError),
}

/// State shared by the session and the status server.
#[derive(Debug)]
pub struct Inner {
    ctx: Arc<Ctx>,
    config: Config,
    mirror: Mutex<Mirror>,
    session: Mutex<SessionStatus>,
    reported: Mutex<BTreeSet<Listener>>,
    /// The agent's reverse mirror states, by (protocol, port, VM bind address).
    mirror_states: Mutex<BTreeMap<(u8, u16, IpAddr), MirrorState>>,
    reverse_traffic: Mutex<BTreeMap<(u8, u16), Arc<Traffic>>>,
    /// The host listener source through the reverse rules (`None`: no reverse direction).
    host_listeners: Option<Arc<FilteredHostListeners>>,
    /// Why the last reload of the rules file failed (the rules before it stay).
    rules_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

impl Inner {
    fn mirror(&self) -> MutexGuard<'_, Mirror> {
        lock(&self.mirror)
    }

    fn session_mut(&self, f: impl FnOnce(&mut SessionStatus)) {
        f(&mut lock(&self.session));
    }

    fn reported(&self) -> BTreeSet<Listener> {
        lock(&self.reported).clone()
    }

    fn set_reported(&self, set: BTreeSet<Listener>) {
        // States of mirrors whose port is no longer reported are stale: forget them (the
        // agent closes those mirrors).
        lock(&self.mirror_states)
            .retain(|(p, port, _), _| set.iter().any(|l| l.proto as u8 == *p && l.port == *port));
        *lock(&self.reported) = set;
    }

    fn clear_mirror_states(&self) {
        lock(&self.mirror_states).clear();
    }

    /// Records the agent's `MirrorState` for a reported port (others are stale or bogus, and
    /// logged); `Closed` forgets the mirror.
    fn set_mirror_state(&self, m: MirrorState) {
        let reported = lock(&self.reported);
        if !reported
            .iter()
            .any(|l| l.proto == m.proto && l.port == m.port)
        {
            tracing::debug!(proto = ?m.proto, port = m.port, state = m.state.name(), "mirror state for a port not reported (now); ignored");
            return;
        }
        if !m.bind.is_loopback() {
            tracing::warn!(proto = ?m.proto, port = m.port, bind = %m.bind, "mirror state for a non-loopback VM address; ignored");
            return;
        }
        let bind = SocketAddr::new(m.bind, m.port);
        match (m.state, &m.reason) {
            (BindState::Active | BindState::Closed, _) | (_, None) => {
                tracing::info!(proto = ?m.proto, %bind, state = m.state.name(), "reverse mirror in the VM")
            }
            (_, Some(reason)) => {
                tracing::warn!(proto = ?m.proto, %bind, state = m.state.name(), %reason, "reverse mirror in the VM")
            }
        }
        let mut states = lock(&self.mirror_states);
        let key = (m.proto as u8, m.port, m.bind);
        if m.state == BindState::Closed {
            states.remove(&key);
        } else {
            states.insert(key, m);
        }
    }

    fn reverse_traffic(&self, proto: Proto, port: u16) -> Arc<Traffic> {
        lock(&self.reverse_traffic)
            .entry((proto as u8, port))
            .or_default()
            .clone()
    }

    /// The status document.
    pub fn status(&self) -> StatusReport {
        let mut ports: Vec<PortRow> = Vec::new();
        for (guests, b) in self.mirror().bindings() {
            let key = (proto_name(b.proto), b.host.port());
            let pos = ports.iter().position(|r| (r.proto.as_str(), r.port) == key);
            let row = match pos {
                Some(i) => &mut ports[i],
                None => {
                    ports.push(PortRow {
                        direction: Direction::GuestToHost,
                        proto: key.0.to_owned(),
                        port: key.1,
                        guest: Vec::new(),
                        host: Vec::new(),
                        state: "active".into(),
                        reason: None,
                        connections: 0,
                        connections_total: 0,
                        bytes_to_guest: 0,
                        bytes_from_guest: 0,
                    });
                    ports.last_mut().expect("just pushed")
                }
            };
            for g in guests {
                let s = SocketAddr::new(g.addr, g.port).to_string();
                if !row.guest.contains(&s) {
                    row.guest.push(s);
                }
            }
            let st = b.state();
            row.host.push(HostAddr {
                addr: b.host.to_string(),
                state: st.name().to_owned(),
                reason: st.reason().map(str::to_owned),
            });
            let t = &b.traffic;
            row.connections += t.open.load(Ordering::Relaxed);
            row.connections_total += t.total.load(Ordering::Relaxed);
            row.bytes_to_guest += t.to_guest.load(Ordering::Relaxed);
            row.bytes_from_guest += t.from_guest.load(Ordering::Relaxed);
        }
        for r in &mut ports {
            r.summarize();
        }
        let reported = self.reported();
        let states = lock(&self.mirror_states).clone();
        let mut reverse_rows: BTreeMap<(u8, u16), PortRow> = BTreeMap::new();
        for l in &reported {
            let row = reverse_rows
                .entry((l.proto as u8, l.port))
                .or_insert_with(|| {
                    let t = self.reverse_traffic(l.proto, l.port);
                    PortRow {
                        direction: Direction::HostToGuest,
                        proto: proto_name(l.proto).to_owned(),
                        port: l.port,
                        guest: Vec::new(),
                        host: Vec::new(),
                        state: "reported".into(),
                        reason: None,
                        connections: t.open.load(Ordering::Relaxed),
                        connections_total: t.total.load(Ordering::Relaxed),
                        bytes_to_guest: t.to_guest.load(Ordering::Relaxed),
                        bytes_from_guest: t.from_guest.load(Ordering::Relaxed),
                    }
                });
            // The agent's mirrors of this host listener: the worst state, with the VM address
            // in the reason; `reported` if the agent sent none (yet, or an older agent).
            let mut host = HostAddr {
                addr: SocketAddr::new(l.addr, l.port).to_string(),
                state: "reported".into(),
                reason: None,
            };
            let mut worst: Option<&MirrorState> = None;
            for m in states.values() {
                if m.proto != l.proto || m.port != l.port || !m.hosts.contains(&l.addr) {
                    continue;
                }
                let bind = SocketAddr::new(m.bind, m.port).to_string();
                if !row.guest.contains(&bind) {
                    row.guest.push(bind);
                }
                let rank = |m: &MirrorState| status::state_rank(m.state.name());
                if worst.is_none_or(|w| rank(m) > rank(w)) {
                    worst = Some(m);
                }
            }
            if let Some(m) = worst {
                host.state = m.state.name().to_owned();
                host.reason = m
                    .reason
                    .as_ref()
                    .map(|r| format!("{} in the VM: {r}", SocketAddr::new(m.bind, m.port)));
            }
            row.host.push(host);
        }
        // Host listeners the rules hold back: never reported, shown so that nobody wonders
        // why they are missing in the VM.
        for (l, reason) in self.host_listeners.iter().flat_map(|f| f.denied()) {
            let row = reverse_rows
                .entry((l.proto as u8, l.port))
                .or_insert_with(|| PortRow {
                    direction: Direction::HostToGuest,
                    proto: proto_name(l.proto).to_owned(),
                    port: l.port,
                    guest: Vec::new(),
                    host: Vec::new(),
                    state: status::DENIED.into(),
                    reason: None,
                    connections: 0,
                    connections_total: 0,
                    bytes_to_guest: 0,
                    bytes_from_guest: 0,
                });
            row.host.push(HostAddr {
                addr: SocketAddr::new(l.addr, l.port).to_string(),
                state: status::DENIED.into(),
                reason: Some(reason.0),
            });
        }
        for r in reverse_rows.values_mut() {
            r.guest.sort();
            r.summarize();
        }
        ports.extend(reverse_rows.into_values());
        let reverse_rules = self.host_listeners.as_ref().map(|_| {
            let rules = self.ctx.reverse_rules.borrow();
            RulesStatus {
                rules: rules.describe(),
                file: rules.file.as_ref().map(|f| f.path.display().to_string()),
                reload_error: lock(&self.rules_error).clone(),
            }
        });
        StatusReport {
            version: status::STATUS_VERSION,
            session: lock(&self.session).clone(),
            ports,
            counters: self.ctx.counters_view(),
            reverse_rules,
        }
    }
}

/// A forwarder: [`Forwarder::run`] it; [`Forwarder::status`] says what it mirrors.
#[derive(Debug, Clone)]
pub struct Forwarder {
    inner: Arc<Inner>,
}

impl Forwarder {
    /// A forwarder for `config`, with this host's listener enumeration ([`host::start`]) if
    /// `config.reverse`. Call inside a tokio runtime.
    pub fn new(config: Config, auth: Auth) -> Result<Self, SetupError> {
        let host: Option<Arc<dyn HostListeners>> = if config.reverse {
            Some(host::start().map_err(SetupError::HostListeners)?)
        } else {
            None
        };
        Self::with_host_listeners(config, auth, host)
    }

    /// A forwarder with the given host listener source (`None`: no reverse direction), seen
    /// through `config.reverse_rules`. Call inside a tokio runtime.
    pub fn with_host_listeners(
        config: Config,
        auth: Auth,
        host_listeners: Option<Arc<dyn HostListeners>>,
    ) -> Result<Self, SetupError> {
        let connector = Connector::connect(config.guest.clone(), auth)?;
        let (reverse_rules, rules_rx) = tokio::sync::watch::channel(config.reverse_rules.clone());
        let ctx = Arc::new(Ctx {
            connector,
            streams: Arc::new(Semaphore::new(config.max_streams)),
            channel: Default::default(),
            max_udp_flows: config.max_udp_flows.max(1),
            udp_timeout: config.udp_timeout,
            counters: Counters::default(),
            reverse_rules,
        });
        let session = SessionStatus {
            guest: config.guest.to_string(),
            ..Default::default()
        };
        let host_listeners = if config.reverse { host_listeners } else { None };
        let filter = host_listeners.map(|h| FilteredHostListeners::start(h, rules_rx));
        if filter.is_some() && !config.reverse_rules.is_open() {
            tracing::info!(rules = %config.reverse_rules.describe(), "reverse direction: host listeners the rules deny are neither mirrored nor dialed");
        }
        let ipv6 = policy::host_has_ipv6_loopback();
        if !ipv6 {
            tracing::info!(
                "this host has no IPv6 loopback: guest listeners are mirrored on 127.0.0.1 only"
            );
        }
        Ok(Forwarder {
            inner: Arc::new(Inner {
                ctx,
                mirror: Mutex::new(Mirror::new(
                    config.expose.clone(),
                    ipv6,
                    CancellationToken::new(),
                )),
                config,
                session: Mutex::new(session),
                reported: Mutex::default(),
                mirror_states: Mutex::default(),
                reverse_traffic: Mutex::default(),
                host_listeners: filter,
                rules_error: Mutex::default(),
            }),
        })
    }

    /// Runs until `shutdown` is cancelled: sessions with the agent, reconnecting with back-off.
    /// On return every host listener is closed and open connections are reset.
    pub async fn run(&self, shutdown: CancellationToken) {
        session::run(self.inner.clone(), shutdown).await;
    }

    /// What is mirrored now.
    pub fn status(&self) -> StatusReport {
        self.inner.status()
    }

    /// The reverse direction's rules now.
    pub fn reverse_rules(&self) -> ReverseRules {
        self.inner.ctx.reverse_rules.borrow().clone()
    }

    /// Replaces the reverse direction's rules: host listeners they deny are withdrawn from the
    /// agent (which closes their mirrors in the VM), later dial-backs to them are refused, and
    /// running dial-back relays to them are reset. Returns whether anything changed.
    pub fn set_reverse_rules(&self, rules: ReverseRules) -> bool {
        let changed = self.inner.ctx.reverse_rules.send_if_modified(|cur| {
            let changed = *cur != rules;
            *cur = rules;
            changed
        });
        *lock(&self.inner.rules_error) = None;
        changed
    }

    /// Reads the rules file again (`--reverse-rules FILE`; nothing to do without one) and
    /// applies it with [`Forwarder::set_reverse_rules`]. On an error the rules stay as they
    /// were and `status` shows the error until a reload succeeds. Returns whether anything
    /// changed.
    pub fn reload_reverse_rules(&self) -> Result<bool, RulesFileError> {
        let mut rules = self.reverse_rules();
        let Some(path) = rules.file.as_ref().map(|f| f.path.clone()) else {
            return Ok(false);
        };
        match rules::read_rules(&path) {
            Ok(file) => {
                rules.file = Some(file);
                Ok(self.set_reverse_rules(rules))
            }
            Err(e) => {
                *lock(&self.inner.rules_error) = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// A status function for [`status::ControlSocket::serve`].
    pub fn status_fn(&self) -> impl Fn() -> StatusReport + Send + Sync + 'static {
        let inner = self.inner.clone();
        move || inner.status()
    }
}
