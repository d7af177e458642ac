//! The reverse direction: the host's listeners, reported to the agent, and the dial-back
//! streams that carry the guest's connections to them.
//!
//! [`HostListeners`] is the seam for the host's listener enumeration; [`crate::host`] has one
//! source per host system (sock_diag on Linux, `pcblist_n` on macOS, the IP Helper tables on
//! Windows). [`StaticHostListeners`] is a fixed, settable set (tests). [`FilteredHostListeners`]
//! puts the reverse rules ([`crate::rules`]) between a source and the session: what it
//! publishes is what is reported, and it remembers what it held back for `status`.
//!
//! A dial-back is checked against the rules again when it arrives (the rules may have changed
//! since the port was reported), and a running dial-back relay is reset when its port becomes
//! denied.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use hostnet_link::discovery::{self, Protocol};
use hostnet_link::proto::channel::CloseReason;
use hostnet_link::proto::{
    self, DialBack, Listener, PayloadStream, Proto, RelayStatus, StreamHeader, StreamKind,
    StreamMode,
};
use hostnet_link::udp;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ctx::{Ctx, bump};
use crate::policy;
use crate::relay::{self, Counted, OpenGuard, RelayEnd, Traffic};
use crate::rules::{Denied, ReverseRules};

/// A source of the host's listening sockets (wildcard and loopback ones only), as a set that
/// changes over time. Implementations must leave out the forwarder's own sockets and the
/// ports given to [`HostListeners::set_excluded_ports`] (loop prevention).
pub trait HostListeners: Send + Sync + fmt::Debug {
    /// The current set, updated as it changes.
    fn subscribe(&self) -> watch::Receiver<BTreeSet<Listener>>;
    /// The (protocol, port) pairs never to report: those the forwarder mirrors for the guest.
    fn set_excluded_ports(&self, ports: BTreeSet<(Protocol, u16)>);
}

/// A set of listeners and the (protocol, port) pairs left out of it.
type SetAndExcluded = (BTreeSet<Listener>, BTreeSet<(Protocol, u16)>);

/// A settable set: for tests, and hosts without an enumerator.
#[derive(Debug)]
pub struct StaticHostListeners {
    all: Mutex<SetAndExcluded>,
    tx: watch::Sender<BTreeSet<Listener>>,
}

impl StaticHostListeners {
    /// A source reporting `set`.
    pub fn new(set: BTreeSet<Listener>) -> Self {
        let (tx, _) = watch::channel(set.clone());
        StaticHostListeners {
            all: Mutex::new((set, BTreeSet::new())),
            tx,
        }
    }

    /// Replaces the set.
    pub fn set(&self, set: BTreeSet<Listener>) {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        all.0 = set;
        self.publish(&all);
    }

    fn publish(&self, all: &SetAndExcluded) {
        let visible = all
            .0
            .iter()
            .filter(|l| !all.1.contains(&(protocol(l.proto), l.port)))
            .copied()
            .collect();
        self.tx.send_replace(visible);
    }
}

impl HostListeners for StaticHostListeners {
    fn subscribe(&self) -> watch::Receiver<BTreeSet<Listener>> {
        self.tx.subscribe()
    }

    fn set_excluded_ports(&self, ports: BTreeSet<(Protocol, u16)>) {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        all.1 = ports;
        self.publish(&all);
    }
}

/// A [`HostListeners`] source seen through the reverse rules: it publishes the listeners the
/// rules let through (never an unfiltered set, not even the first one) and recomputes when the
/// source's set or the rules change; [`FilteredHostListeners::denied`] has the rest.
#[derive(Debug)]
pub struct FilteredHostListeners {
    source: Arc<dyn HostListeners>,
    shared: Arc<FilterShared>,
}

#[derive(Debug)]
struct FilterShared {
    tx: watch::Sender<BTreeSet<Listener>>,
    denied: Mutex<BTreeMap<Listener, Denied>>,
}

impl FilterShared {
    fn update(&self, set: &BTreeSet<Listener>, rules: &ReverseRules) {
        let (pass, denied) = rules.split(set);
        *self.denied.lock().unwrap_or_else(|e| e.into_inner()) = denied;
        self.tx.send_if_modified(|cur| {
            let changed = *cur != pass;
            *cur = pass;
            changed
        });
    }
}

impl FilteredHostListeners {
    /// Filters `source` through `rules`. Call inside a tokio runtime (a task follows both; it
    /// ends when this is dropped and either changes, or when either sender is gone).
    pub fn start(
        source: Arc<dyn HostListeners>,
        mut rules: watch::Receiver<ReverseRules>,
    ) -> Arc<Self> {
        let mut src = source.subscribe();
        let set = src.borrow_and_update().clone();
        let (pass, denied) = rules.borrow_and_update().split(&set);
        let (tx, _) = watch::channel(pass);
        let shared = Arc::new(FilterShared {
            tx,
            denied: Mutex::new(denied),
        });
        tokio::spawn(follow(Arc::downgrade(&shared), src, rules));
        Arc::new(FilteredHostListeners { source, shared })
    }

    /// The host listeners the rules refuse now, each with the rule's reason.
    pub fn denied(&self) -> BTreeMap<Listener, Denied> {
        self.shared
            .denied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn follow(
    shared: Weak<FilterShared>,
    mut src: watch::Receiver<BTreeSet<Listener>>,
    mut rules: watch::Receiver<ReverseRules>,
) {
    loop {
        tokio::select! {
            r = src.changed() => if r.is_err() { return },
            r = rules.changed() => if r.is_err() { return },
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let set = src.borrow_and_update().clone();
        shared.update(&set, &rules.borrow_and_update());
    }
}

impl HostListeners for FilteredHostListeners {
    fn subscribe(&self) -> watch::Receiver<BTreeSet<Listener>> {
        self.shared.tx.subscribe()
    }

    fn set_excluded_ports(&self, ports: BTreeSet<(Protocol, u16)>) {
        self.source.set_excluded_ports(ports);
    }
}

/// A discovered host listener as the protocol reports it, if it is wildcard or loopback.
pub fn to_proto(l: &discovery::Listener) -> Option<Listener> {
    if !policy::reportable(l.addr) {
        return None;
    }
    Some(Listener {
        proto: match l.proto {
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
        },
        addr: l.addr,
        port: l.port,
        // An IPv6 socket of unknown v6only is reported v6-only (no IPv4 promised).
        v6only: l.addr.is_ipv6() && l.v6only.unwrap_or(true),
    })
}

/// The discovery protocol of a protocol listener.
pub fn protocol(p: Proto) -> Protocol {
    match p {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
    }
}

async fn connect_target(proto: Proto, addr: SocketAddr) -> std::io::Result<HostConn> {
    match proto {
        Proto::Tcp => {
            let s = tokio::time::timeout(proto::CONNECT_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            let _ = s.set_nodelay(true);
            Ok(HostConn::Tcp(s))
        }
        // The agent sends UDP flows on the datagram channel ([`UdpDialer`]), never as a
        // dial-back; an older agent's UDP dial-back is refused here.
        Proto::Udp => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "UDP dial-backs are not supported: UDP flows ride the datagram channel (upgrade the agent)",
        )),
    }
}

enum HostConn {
    Tcp(TcpStream),
}

/// Admits the flows the agent opens on the datagram channel towards host services: a reported
/// host listener (on loopback, see [`policy::dial_back_target`]) on a port the reverse rules
/// allow now.
#[derive(Debug)]
pub struct UdpDialer(pub Weak<crate::Inner>);

impl udp::Dialer for UdpDialer {
    fn admit(
        &self,
        target: SocketAddr,
        client: SocketAddr,
    ) -> Result<(SocketAddr, Option<Arc<dyn udp::Tally>>), CloseReason> {
        let inner = self.0.upgrade().ok_or(CloseReason::Gone)?;
        let ctx = &inner.ctx;
        if let Err(reason) = ctx.reverse_rules.borrow().check(Proto::Udp, target.port()) {
            bump(&ctx.counters.dial_backs_denied);
            tracing::debug!(target_addr = %target, %client, %reason, "guest UDP flow to a port the reverse rules deny; forbidden");
            return Err(CloseReason::Forbidden);
        }
        let Some(addr) = policy::dial_back_target(&inner.reported(), Proto::Udp, target) else {
            tracing::debug!(target_addr = %target, %client, "guest UDP flow to an address that is not a reported host listener; forbidden");
            return Err(CloseReason::Forbidden);
        };
        let traffic: Arc<dyn udp::Tally> = inner.reverse_traffic(Proto::Udp, target.port());
        Ok((addr, Some(traffic)))
    }
}

/// Serves one `DialBack` request: connects to the host target (if the reverse rules allow its
/// port now and it is a reported loopback listener, else `Forbidden`), opens the `DialBack(id)`
/// stream with the connect's status, then relays until done, or until the rules deny the port
/// (then both sides are reset).
pub async fn serve_dial_back(
    ctx: Arc<Ctx>,
    req: DialBack,
    reported: BTreeSet<Listener>,
    traffic: Arc<Traffic>,
    mode: StreamMode,
    session: CancellationToken,
) {
    let mut rules = ctx.reverse_rules.subscribe();
    let denied = rules
        .borrow_and_update()
        .check(req.proto, req.target.port())
        .err();
    let permit = ctx.streams.clone().try_acquire_owned().ok();
    let (status, conn) = match (
        denied,
        &permit,
        policy::dial_back_target(&reported, req.proto, req.target),
    ) {
        (Some(reason), _, _) => {
            bump(&ctx.counters.dial_backs_denied);
            tracing::warn!(target_addr = %req.target, proto = ?req.proto, %reason, "dial-back to a port the reverse rules deny; forbidden");
            (RelayStatus::Forbidden, None)
        }
        (None, None, _) => {
            bump(&ctx.counters.streams_refused);
            tracing::warn!("stream limit reached; dial-back refused");
            (RelayStatus::error("forwarder stream limit reached"), None)
        }
        (None, _, None) => {
            tracing::warn!(target_addr = %req.target, proto = ?req.proto, "dial-back to an address that is not a reported host listener; forbidden");
            (RelayStatus::Forbidden, None)
        }
        (None, _, Some(addr)) => match connect_target(req.proto, addr).await {
            Ok(c) => (RelayStatus::Ok, Some(c)),
            Err(e) => {
                tracing::info!(%addr, error = %e, "dial-back connect failed");
                (RelayStatus::from_connect_error(&e), None)
            }
        },
    };
    if !status.is_ok() {
        bump(&ctx.counters.dial_backs_failed);
    }
    let opened = async {
        let mut s = ctx.connector.open().await.map_err(|e| e.to_string())?;
        proto::write_header(
            &mut s,
            &StreamHeader {
                kind: StreamKind::DialBack(req.id),
                mode,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        proto::write_status(&mut s, &status)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(s)
    };
    let s = match opened.await {
        Ok(s) => s,
        Err(e) => {
            bump(&ctx.counters.link_open_failed);
            tracing::warn!(error = %e, "cannot open the dial-back stream");
            if let Some(HostConn::Tcp(t)) = conn {
                relay::reset_tcp(t);
            }
            return;
        }
    };
    let Some(conn) = conn else { return };
    bump(&ctx.counters.dial_backs);
    let _open = OpenGuard::new(traffic.clone());
    let link = PayloadStream::new(s, mode);
    // Ends the relay (both sides reset) if the rules come to deny this port while it runs.
    let cut = session.child_token();
    let _watch = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(cut_when_denied(
        ctx.clone(),
        rules,
        req.proto,
        req.target.port(),
        cut.clone(),
    )));
    let session = cut;
    match conn {
        HostConn::Tcp(t) => {
            let t = Counted::new(t, traffic);
            match relay::relay(t, link, &session).await {
                RelayEnd::Done(a, b) => {
                    tracing::debug!(from_guest = b, to_guest = a, "dial-back closed")
                }
                RelayEnd::Reset(e) => {
                    bump(&ctx.counters.relays_reset);
                    tracing::debug!(error = %e, "dial-back relay failed; both sides reset");
                }
                RelayEnd::Cancelled => tracing::debug!("session ended; dial-back reset"),
            }
        }
    }
}

/// Cancels `cut` once the reverse rules (`rules`, seen when the dial-back was checked) change
/// to deny `port` of `proto`.
async fn cut_when_denied(
    ctx: Arc<Ctx>,
    mut rules: watch::Receiver<ReverseRules>,
    proto: Proto,
    port: u16,
    cut: CancellationToken,
) {
    while rules.changed().await.is_ok() {
        let verdict = rules.borrow_and_update().check(proto, port);
        if let Err(reason) = verdict {
            bump(&ctx.counters.dial_backs_denied);
            tracing::info!(?proto, port, %reason, "the reverse rules now deny this port; dial-back relay reset");
            cut.cancel();
            return;
        }
    }
}
