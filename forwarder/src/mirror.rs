//! The forward direction's table: which host addresses mirror which guest listeners.
//!
//! A guest listener maps to host addresses by the [address policy](crate::policy); each host
//! address is one *binding* (a host socket, retried while taken), shared by every guest
//! listener that maps to it (`0.0.0.0:P` and `[::]:P` in the guest both map to
//! `127.0.0.1:P` and `[::1]:P`: one bind each, no self-conflict). The table is plain state:
//! [`Mirror::add`] returns the bindings to start, [`Mirror::remove`] cancels the ones no guest
//! listener needs any more (their task closes the host socket at once); the session starts the
//! tasks ([`crate::listen`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hostnet_link::discovery::Protocol;
use hostnet_link::proto::{Listener, Proto};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::policy;
use crate::relay::Traffic;

/// The state of one host binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "reason")]
pub enum BindState {
    /// Not bound yet (first attempt under way).
    Starting,
    /// Bound and serving.
    Active,
    /// Taken by another program or not allowed (address in use; permission denied for a
    /// port below 1024); retried with back-off.
    Conflict(String),
    /// Failed for another reason (e.g. the address does not exist on this host); retried.
    Retrying(String),
}

impl BindState {
    /// The short name shown by `status`.
    pub fn name(&self) -> &'static str {
        match self {
            BindState::Starting => "starting",
            BindState::Active => "active",
            BindState::Conflict(_) => "conflict",
            BindState::Retrying(_) => "retrying",
        }
    }

    /// The reason, for conflict and retrying.
    pub fn reason(&self) -> Option<&str> {
        match self {
            BindState::Conflict(r) | BindState::Retrying(r) => Some(r),
            _ => None,
        }
    }

    /// Classifies a bind error (by kind, so that the OS's error numbers do not matter).
    pub fn from_bind_error(e: &std::io::Error, port: u16) -> Self {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::AddrInUse => BindState::Conflict("address in use".into()),
            ErrorKind::PermissionDenied if port < 1024 => {
                BindState::Conflict("permission denied (port < 1024)".into())
            }
            ErrorKind::PermissionDenied => BindState::Conflict("permission denied".into()),
            ErrorKind::AddrNotAvailable => {
                BindState::Retrying("address not available on this host".into())
            }
            _ => BindState::Retrying(e.to_string()),
        }
    }
}

/// One host binding, shared between the table, its task and `status`.
#[derive(Debug)]
pub struct Binding {
    /// TCP or UDP.
    pub proto: Proto,
    /// The host address bound.
    pub host: SocketAddr,
    /// The guest address relayed to (header target).
    target: Mutex<SocketAddr>,
    state: Mutex<BindState>,
    /// Connections (flows) and bytes.
    pub traffic: Arc<Traffic>,
    /// Cancelled when no guest listener needs the binding any more, or the session ends.
    pub cancel: CancellationToken,
}

impl Binding {
    /// The guest address to relay to.
    pub fn target(&self) -> SocketAddr {
        *self.target.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> BindState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the state; returns whether it changed (log once per change, not per retry).
    pub fn set_state(&self, s: BindState) -> bool {
        let mut cur = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *cur == s {
            return false;
        }
        *cur = s;
        true
    }
}

#[derive(Debug)]
struct Entry {
    guests: BTreeSet<Listener>,
    binding: Arc<Binding>,
}

/// The table. Cancelling `session` (given to [`Mirror::new`]) cancels every binding.
#[derive(Debug)]
pub struct Mirror {
    expose: Vec<IpAddr>,
    ipv6: bool,
    guest: BTreeSet<Listener>,
    entries: BTreeMap<(Proto, SocketAddr), Entry>,
    session: CancellationToken,
}

fn proto_key(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 0,
        Proto::Udp => 1,
    }
}

impl Mirror {
    /// An empty table; bindings get child tokens of `session`. Without `ipv6` (the host has no
    /// IPv6 loopback) `[::1]` host addresses become `127.0.0.1`.
    pub fn new(expose: Vec<IpAddr>, ipv6: bool, session: CancellationToken) -> Self {
        Mirror {
            expose,
            ipv6,
            guest: BTreeSet::new(),
            entries: BTreeMap::new(),
            session,
        }
    }

    /// Mirrors a guest listener; returns the new bindings, whose tasks the caller starts.
    pub fn add(&mut self, l: Listener) -> Vec<Arc<Binding>> {
        if l.port == 0 || !self.guest.insert(l) {
            return Vec::new();
        }
        let mut new = Vec::new();
        let mut hosts = policy::host_addrs(&l, &self.expose);
        if !self.ipv6 {
            hosts = policy::without_ipv6(hosts);
        }
        for host in hosts {
            let key = (l.proto, host);
            match self.entries.get_mut(&key) {
                Some(e) => {
                    e.guests.insert(l);
                    retarget(e);
                }
                None => {
                    let binding = Arc::new(Binding {
                        proto: l.proto,
                        host,
                        target: Mutex::new(SocketAddr::new(l.addr, l.port)),
                        state: Mutex::new(BindState::Starting),
                        traffic: Arc::default(),
                        cancel: self.session.child_token(),
                    });
                    self.entries.insert(
                        key,
                        Entry {
                            guests: [l].into_iter().collect(),
                            binding: binding.clone(),
                        },
                    );
                    new.push(binding);
                }
            }
        }
        new
    }

    /// Stops mirroring a guest listener; host bindings no other guest listener needs are
    /// cancelled (their sockets close at once). Returns how many were cancelled.
    pub fn remove(&mut self, l: &Listener) -> usize {
        if !self.guest.remove(l) {
            return 0;
        }
        let mut closed = 0;
        self.entries.retain(|_, e| {
            if !e.guests.remove(l) {
                return true;
            }
            if e.guests.is_empty() {
                e.binding.cancel.cancel();
                closed += 1;
                false
            } else {
                retarget(e);
                true
            }
        });
        closed
    }

    /// Clears the table and gives later bindings child tokens of `session` (a new session).
    pub fn reset(&mut self, session: CancellationToken) {
        self.clear();
        self.session = session;
    }

    /// Cancels every binding (the session ended).
    pub fn clear(&mut self) {
        for e in self.entries.values() {
            e.binding.cancel.cancel();
        }
        self.entries.clear();
        self.guest.clear();
    }

    /// The guest listeners mirrored.
    pub fn guest(&self) -> &BTreeSet<Listener> {
        &self.guest
    }

    /// The (protocol, port) pairs mirrored for the guest: never reported back (loop prevention).
    pub fn guest_ports(&self) -> BTreeSet<(Protocol, u16)> {
        self.guest
            .iter()
            .map(|l| {
                let p = match l.proto {
                    Proto::Tcp => Protocol::Tcp,
                    Proto::Udp => Protocol::Udp,
                };
                (p, l.port)
            })
            .collect()
    }

    /// Every binding with the guest listeners it serves, ordered by protocol and address.
    pub fn bindings(&self) -> Vec<(Vec<Listener>, Arc<Binding>)> {
        let mut v: Vec<_> = self
            .entries
            .values()
            .map(|e| (e.guests.iter().copied().collect(), e.binding.clone()))
            .collect();
        v.sort_by_key(|(_, b)| (proto_key(b.proto), b.host.port(), b.host));
        v
    }
}

/// Picks the header target among a binding's guest listeners: one of the host address's
/// family if there is one (an IPv6 host client reaches the guest's IPv6 listener).
fn retarget(e: &Entry) {
    let fam = e.binding.host.is_ipv6();
    let pick = e
        .guests
        .iter()
        .find(|g| g.addr.is_ipv6() == fam)
        .or_else(|| e.guests.iter().next());
    if let Some(g) = pick {
        *e.binding.target.lock().unwrap_or_else(|e| e.into_inner()) =
            SocketAddr::new(g.addr, g.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(addr: &str, port: u16) -> Listener {
        Listener {
            proto: Proto::Tcp,
            addr: addr.parse().unwrap(),
            port,
            v6only: addr.contains(':'),
        }
    }

    #[test]
    fn wildcards_of_both_families_share_bindings() {
        let session = CancellationToken::new();
        let mut m = Mirror::new(Vec::new(), true, session.clone());
        let a = m.add(l("0.0.0.0", 80));
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].target(), "0.0.0.0:80".parse().unwrap());
        let b = m.add(l("::", 80));
        assert!(b.is_empty(), "no duplicate binds");
        assert_eq!(a[1].host, "[::1]:80".parse().unwrap());
        assert_eq!(a[1].target(), "[::]:80".parse().unwrap());
        assert_eq!(a[0].target(), "0.0.0.0:80".parse().unwrap());
        assert!(m.add(l("::", 80)).is_empty());
        assert_eq!(m.remove(&l("0.0.0.0", 80)), 0);
        assert!(!a[0].cancel.is_cancelled());
        assert_eq!(a[0].target(), "[::]:80".parse().unwrap());
        assert_eq!(m.remove(&l("::", 80)), 2);
        assert!(a.iter().all(|b| b.cancel.is_cancelled()));
        assert!(m.bindings().is_empty());
        assert_eq!(m.remove(&l("::", 80)), 0);
    }

    #[test]
    fn clear_and_session_cancel_everything() {
        let session = CancellationToken::new();
        let mut m = Mirror::new(Vec::new(), true, session.clone());
        let a = m.add(l("127.0.0.1", 81));
        let b = m.add(l("::1", 82));
        assert_eq!(m.guest_ports().len(), 2);
        session.cancel();
        assert!(a.iter().chain(&b).all(|b| b.cancel.is_cancelled()));
        m.clear();
        assert!(m.guest().is_empty());
    }

    #[test]
    fn bind_errors_are_classified() {
        let e = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        assert_eq!(BindState::from_bind_error(&e, 80).name(), "conflict");
        let e = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            BindState::from_bind_error(&e, 80).reason(),
            Some("permission denied (port < 1024)")
        );
        let e = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
        assert_eq!(BindState::from_bind_error(&e, 80).name(), "retrying");
    }
}
