//! The listener set and its diff: plain data, no I/O (STYLE.md point 2).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Transport protocol of a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// A TCP socket in `LISTEN`.
    Tcp,
    /// A bound, unconnected UDP socket.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// One listening socket of this network namespace, as sock_diag reports it.
///
/// Two listeners are equal only if every field is equal; the socket inode makes each one unique
/// while the socket is alive (two `SO_REUSEPORT` sockets on one port are two listeners).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Listener {
    /// TCP or UDP.
    pub proto: Protocol,
    /// Local address (`0.0.0.0` / `::` for a wildcard bind). An IPv4-mapped IPv6 address stays
    /// IPv6 here, as the kernel reports it.
    pub addr: IpAddr,
    /// Local port, never 0.
    pub port: u16,
    /// For an IPv6 socket, whether it is v6-only (`IPV6_V6ONLY`): a dual-stack `[::]:P` listener
    /// (`Some(false)`) also accepts IPv4. `None` for IPv4 sockets, and for IPv6 sockets on a kernel
    /// too old to report `INET_DIAG_SKV6ONLY` (before 4.16).
    pub v6only: Option<bool>,
    /// Socket inode (the `N` of `socket:[N]` in `/proc/PID/fd`).
    pub inode: u32,
    /// Owner uid of the socket.
    pub uid: u32,
    /// Interface index the socket is bound to with `SO_BINDTODEVICE`, 0 if none.
    pub ifindex: u32,
}

impl Listener {
    /// Local address and port as one socket address (scope id 0).
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }

    /// Whether this socket also receives IPv4 traffic: IPv4 sockets, and IPv6 sockets that are not
    /// v6-only (wildcard or IPv4-mapped address).
    pub fn accepts_ipv4(&self) -> bool {
        match self.addr {
            IpAddr::V4(_) => true,
            IpAddr::V6(a) => {
                self.v6only == Some(false) && (a.is_unspecified() || a.to_ipv4_mapped().is_some())
            }
        }
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} inode={}",
            self.proto,
            self.socket_addr(),
            self.inode
        )?;
        if let Some(v6only) = self.v6only {
            write!(f, " v6only={v6only}")?;
        }
        Ok(())
    }
}

/// What changed between two listener sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Listeners in the new set and not in the old one, in order.
    pub added: Vec<Listener>,
    /// Listeners in the old set and not in the new one, in order.
    pub removed: Vec<Listener>,
}

impl Diff {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// A set of listeners, ordered (so snapshots and diffs are deterministic).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerSet {
    inner: BTreeSet<Listener>,
}

impl ListenerSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a listener; false if it was already there.
    pub fn insert(&mut self, l: Listener) -> bool {
        self.inner.insert(l)
    }

    /// Removes a listener; false if it was not there.
    pub fn remove(&mut self, l: &Listener) -> bool {
        self.inner.remove(l)
    }

    /// Whether the set holds this exact listener.
    pub fn contains(&self, l: &Listener) -> bool {
        self.inner.contains(l)
    }

    /// Number of listeners.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The listeners, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Listener> {
        self.inner.iter()
    }

    /// The listeners on this protocol and port (any address).
    pub fn by_port(&self, proto: Protocol, port: u16) -> impl Iterator<Item = &Listener> {
        self.inner
            .iter()
            .filter(move |l| l.proto == proto && l.port == port)
    }

    /// What turns `self` into `new`: see [`diff`].
    pub fn diff(&self, new: &ListenerSet) -> Diff {
        diff(self, new)
    }

    /// Applies a diff: removes `removed`, then inserts `added`.
    pub fn apply(&mut self, diff: &Diff) {
        for l in &diff.removed {
            self.inner.remove(l);
        }
        for l in &diff.added {
            self.inner.insert(*l);
        }
    }
}

impl FromIterator<Listener> for ListenerSet {
    fn from_iter<I: IntoIterator<Item = Listener>>(iter: I) -> Self {
        Self {
            inner: iter.into_iter().collect(),
        }
    }
}

impl IntoIterator for ListenerSet {
    type Item = Listener;
    type IntoIter = std::collections::btree_set::IntoIter<Listener>;
    fn into_iter(self) -> Self::IntoIter {
        self.inner.into_iter()
    }
}

impl<'a> IntoIterator for &'a ListenerSet {
    type Item = &'a Listener;
    type IntoIter = std::collections::btree_set::Iter<'a, Listener>;
    fn into_iter(self) -> Self::IntoIter {
        self.inner.iter()
    }
}

/// The listeners added and removed between `old` and `new`: `old.apply(&diff(old, new)) == new`.
pub fn diff(old: &ListenerSet, new: &ListenerSet) -> Diff {
    Diff {
        added: new.inner.difference(&old.inner).copied().collect(),
        removed: old.inner.difference(&new.inner).copied().collect(),
    }
}
