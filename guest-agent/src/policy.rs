//! What the agent reports, what it lets the forwarder dial, and where it mirrors host
//! listeners: pure functions over listener sets, tested without sockets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hostnet_link::discovery::{self, Protocol};
use hostnet_link::proto::{self, Proto};

use crate::ports::PortFilter;

/// The kernel's loopback interface index (`LOOPBACK_IFINDEX`), the same in every namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// The link protocol's name for a discovery protocol.
pub fn proto_of(p: Protocol) -> Proto {
    match p {
        Protocol::Tcp => Proto::Tcp,
        Protocol::Udp => Proto::Udp,
    }
}

/// The discovery protocol for a link protocol.
pub fn protocol_of(p: Proto) -> Protocol {
    match p {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
    }
}

/// Whether the forwarder can reach this listener through the VM's loopback: bound to a
/// wildcard or a loopback address, and not to a device other than `lo`.
pub fn reachable(l: &discovery::Listener) -> bool {
    let ip = l.addr.to_canonical();
    (ip.is_unspecified() || ip.is_loopback()) && (l.ifindex == 0 || l.ifindex == LOOPBACK_IFINDEX)
}

/// A discovery listener as the protocol carries it (`v6only` is false for IPv4, and for IPv6
/// on kernels that do not report it: Linux's default `bindv6only` is 0).
pub fn to_proto(l: &discovery::Listener) -> proto::Listener {
    proto::Listener {
        proto: proto_of(l.proto),
        addr: l.addr,
        port: l.port,
        v6only: l.addr.is_ipv6() && l.v6only.unwrap_or(false),
    }
}

/// What the agent reports: the reachable listeners whose port passes the filter.
pub fn report<'a>(
    set: impl IntoIterator<Item = &'a discovery::Listener>,
    filter: &PortFilter,
) -> BTreeSet<proto::Listener> {
    set.into_iter()
        .filter(|l| reachable(l) && filter.permits(proto_of(l.proto), l.port))
        .map(to_proto)
        .collect()
}

/// Why a relay target is refused (logged; the forwarder gets `Forbidden`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    /// The target is not a loopback (or unspecified) address.
    #[error("target is not a VM loopback address")]
    NotLoopback,
    /// `--allow` / `--deny` refuse the port.
    #[error("port refused by --allow/--deny")]
    PortPolicy,
    /// Nothing listens on that port and family right now.
    #[error("no current listener on that port for that family")]
    NotListening,
}

/// Checks a relay target against the latest discovery set and the filter, and returns the
/// address to connect to: an unspecified target means that family's loopback (for IPv4, the
/// listener's own 127.x address when only such a listener has the port).
///
/// A v4 target is served by a `0.0.0.0` listener, a listener on that very 127.x address, or a
/// dual-stack `[::]` one; a v6 target by `[::]` or `[::1]`.
pub fn check_target(
    proto: Proto,
    target: SocketAddr,
    set: &discovery::ListenerSet,
    filter: &PortFilter,
) -> Result<SocketAddr, Forbidden> {
    let port = target.port();
    let ip = target.ip().to_canonical();
    if !(ip.is_unspecified() || ip.is_loopback()) {
        return Err(Forbidden::NotLoopback);
    }
    if port == 0 || !filter.permits(proto, port) {
        return Err(Forbidden::PortPolicy);
    }
    let candidates = || {
        set.by_port(protocol_of(proto), port)
            .filter(|l| reachable(l))
    };
    match ip {
        IpAddr::V4(a) => {
            let mut via_loopback = None;
            for l in candidates() {
                match l.addr.to_canonical() {
                    IpAddr::V4(b) if b.is_unspecified() => {
                        let to = if a.is_unspecified() {
                            Ipv4Addr::LOCALHOST
                        } else {
                            a
                        };
                        return Ok(SocketAddr::new(to.into(), port));
                    }
                    IpAddr::V4(b) if a.is_unspecified() || a == b => via_loopback = Some(b),
                    IpAddr::V6(b) if b.is_unspecified() && l.v6only != Some(true) => {
                        let to = if a.is_unspecified() {
                            Ipv4Addr::LOCALHOST
                        } else {
                            a
                        };
                        return Ok(SocketAddr::new(to.into(), port));
                    }
                    _ => {}
                }
            }
            via_loopback
                .map(|b| SocketAddr::new(b.into(), port))
                .ok_or(Forbidden::NotListening)
        }
        IpAddr::V6(_) => candidates()
            .any(|l| matches!(l.addr, IpAddr::V6(b) if b.is_unspecified() || b.is_loopback()))
            .then(|| SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port))
            .ok_or(Forbidden::NotListening),
    }
}

/// One reverse mirror: a socket the agent binds on the VM's loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MirrorKey {
    /// TCP or UDP.
    pub proto: Proto,
    /// `127.0.0.1:P` or `[::1]:P`.
    pub bind: SocketAddr,
}

/// The VM loopback addresses a host listener is mirrored on: host `0.0.0.0`/`::` give
/// `127.0.0.1:P` and `[::1]:P`, host `127.x` gives `127.0.0.1:P`, host `::1` gives `[::1]:P`;
/// any other address none (it is not reachable through the host's loopback, where the
/// forwarder dials).
pub fn mirror_binds(l: &proto::Listener) -> Vec<SocketAddr> {
    let v4 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), l.port);
    let v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), l.port);
    let ip = l.addr.to_canonical();
    if ip.is_unspecified() {
        vec![v4, v6]
    } else if ip.is_loopback() && ip.is_ipv4() {
        vec![v4]
    } else if ip.is_loopback() {
        vec![v6]
    } else {
        Vec::new()
    }
}

/// The reverse mirrors a host listener set asks for: each key with the host listener's address
/// (as the forwarder reported it) to put in dial-back requests. Host `0.0.0.0`/`127.x` give
/// `127.0.0.1:P`, host `::1` gives `[::1]:P`, a wildcard gives both. Host listeners on ports the
/// agent reports itself (`guest`) are skipped and returned second: they are the forwarder's
/// mirrors of guest ports, or ports the guest serves itself.
pub fn reverse_mirrors(
    host: &BTreeSet<proto::Listener>,
    guest: &BTreeSet<(Proto, u16)>,
) -> (BTreeMap<MirrorKey, SocketAddr>, Vec<proto::Listener>) {
    let mut out: BTreeMap<MirrorKey, SocketAddr> = BTreeMap::new();
    let mut skipped = Vec::new();
    for l in host {
        if l.port == 0 {
            continue;
        }
        if guest.contains(&(l.proto, l.port)) {
            skipped.push(*l);
            continue;
        }
        let target = SocketAddr::new(l.addr, l.port);
        for bind in mirror_binds(l) {
            let key = MirrorKey {
                proto: l.proto,
                bind,
            };
            out.entry(key)
                .and_modify(|t| {
                    // Prefer a host listener of the family the guest client used.
                    if t.is_ipv4() != bind.is_ipv4() && target.is_ipv4() == bind.is_ipv4() {
                        *t = target;
                    }
                })
                .or_insert(target);
        }
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dl(proto: Protocol, addr: &str, port: u16, v6only: Option<bool>) -> discovery::Listener {
        discovery::Listener {
            proto,
            addr: addr.parse().unwrap(),
            port,
            v6only,
            inode: u32::from(port) + 7,
            uid: 0,
            ifindex: 0,
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reports_only_reachable_allowed_listeners() {
        let mut bound_eth0 = dl(Protocol::Tcp, "0.0.0.0", 5, None);
        bound_eth0.ifindex = 2;
        let set: discovery::ListenerSet = [
            dl(Protocol::Tcp, "0.0.0.0", 1, None),
            dl(Protocol::Tcp, "127.0.0.5", 2, None),
            dl(Protocol::Tcp, "10.0.0.1", 3, None),
            dl(Protocol::Udp, "::", 4, Some(true)),
            bound_eth0,
            dl(Protocol::Tcp, "::1", 22, Some(true)),
            dl(Protocol::Tcp, "fe80::1", 6, Some(true)),
        ]
        .into_iter()
        .collect();
        let filter = PortFilter {
            allow: None,
            deny: "22".parse().unwrap(),
        };
        let r = report(&set, &filter);
        let ports: Vec<u16> = r.iter().map(|l| l.port).collect();
        assert_eq!(ports, vec![1, 2, 4]);
        assert!(
            r.iter()
                .any(|l| l.port == 4 && l.v6only && l.proto == Proto::Udp)
        );
    }

    #[test]
    fn targets_need_loopback_a_listener_and_the_filter() {
        let set: discovery::ListenerSet = [
            dl(Protocol::Tcp, "0.0.0.0", 80, None),
            dl(Protocol::Tcp, "127.0.0.5", 81, None),
            dl(Protocol::Tcp, "::", 82, Some(false)),
            dl(Protocol::Tcp, "::", 83, Some(true)),
            dl(Protocol::Tcp, "::1", 84, Some(true)),
            dl(Protocol::Udp, "127.0.0.1", 53, None),
        ]
        .into_iter()
        .collect();
        let open = PortFilter::default();
        let t = |target: &str| check_target(Proto::Tcp, sa(target), &set, &open);
        assert_eq!(t("127.0.0.1:80"), Ok(sa("127.0.0.1:80")));
        assert_eq!(t("0.0.0.0:80"), Ok(sa("127.0.0.1:80")));
        assert_eq!(t("[::1]:80"), Err(Forbidden::NotListening));
        assert_eq!(t("0.0.0.0:81"), Ok(sa("127.0.0.5:81")));
        assert_eq!(t("127.0.0.1:81"), Err(Forbidden::NotListening));
        assert_eq!(t("127.0.0.1:82"), Ok(sa("127.0.0.1:82")));
        assert_eq!(t("[::]:82"), Ok(sa("[::1]:82")));
        assert_eq!(t("127.0.0.1:83"), Err(Forbidden::NotListening));
        assert_eq!(t("[::1]:83"), Ok(sa("[::1]:83")));
        assert_eq!(t("[::1]:84"), Ok(sa("[::1]:84")));
        assert_eq!(t("10.0.0.1:80"), Err(Forbidden::NotLoopback));
        assert_eq!(t("[::ffff:127.0.0.1]:80"), Ok(sa("127.0.0.1:80")));
        assert_eq!(t("127.0.0.1:9"), Err(Forbidden::NotListening));
        assert_eq!(t("127.0.0.1:53"), Err(Forbidden::NotListening));
        assert_eq!(
            check_target(Proto::Udp, sa("127.0.0.1:53"), &set, &open),
            Ok(sa("127.0.0.1:53"))
        );
        let deny = PortFilter {
            allow: None,
            deny: "80".parse().unwrap(),
        };
        assert_eq!(
            check_target(Proto::Tcp, sa("127.0.0.1:80"), &set, &deny),
            Err(Forbidden::PortPolicy)
        );
    }

    fn pl(proto: Proto, addr: &str, port: u16) -> proto::Listener {
        proto::Listener {
            proto,
            addr: addr.parse().unwrap(),
            port,
            v6only: false,
        }
    }

    #[test]
    fn host_listeners_map_to_vm_loopback_and_skip_guest_ports() {
        let host: BTreeSet<_> = [
            pl(Proto::Tcp, "0.0.0.0", 80),
            pl(Proto::Tcp, "::1", 81),
            pl(Proto::Tcp, "127.0.0.1", 82),
            pl(Proto::Udp, "::", 53),
            pl(Proto::Tcp, "192.168.1.2", 83),
            pl(Proto::Tcp, "0.0.0.0", 8000),
            pl(Proto::Tcp, "::", 90),
            pl(Proto::Tcp, "127.0.0.1", 90),
        ]
        .into_iter()
        .collect();
        let guest: BTreeSet<_> = [(Proto::Tcp, 8000)].into_iter().collect();
        let (m, skipped) = reverse_mirrors(&host, &guest);
        let k = |proto, bind: &str| MirrorKey {
            proto,
            bind: sa(bind),
        };
        assert_eq!(
            m.get(&k(Proto::Tcp, "127.0.0.1:80")),
            Some(&sa("0.0.0.0:80"))
        );
        assert_eq!(m.get(&k(Proto::Tcp, "[::1]:80")), Some(&sa("0.0.0.0:80")));
        assert_eq!(m.get(&k(Proto::Tcp, "[::1]:81")), Some(&sa("[::1]:81")));
        assert!(!m.contains_key(&k(Proto::Tcp, "127.0.0.1:81")));
        assert_eq!(
            m.get(&k(Proto::Tcp, "127.0.0.1:82")),
            Some(&sa("127.0.0.1:82"))
        );
        assert_eq!(m.get(&k(Proto::Udp, "127.0.0.1:53")), Some(&sa("[::]:53")));
        assert_eq!(m.get(&k(Proto::Udp, "[::1]:53")), Some(&sa("[::]:53")));
        assert_eq!(
            m.get(&k(Proto::Tcp, "127.0.0.1:90")),
            Some(&sa("127.0.0.1:90"))
        );
        assert_eq!(m.get(&k(Proto::Tcp, "[::1]:90")), Some(&sa("[::]:90")));
        assert!(
            m.keys()
                .all(|k| k.bind.port() != 83 && k.bind.port() != 8000)
        );
        assert_eq!(skipped, vec![pl(Proto::Tcp, "0.0.0.0", 8000)]);
    }
}
