//! The address policy (DESIGN.md "Address policy"), as pure functions.
//!
//! | guest listener | host listener(s) |
//! |---|---|
//! | `0.0.0.0:P`, `[::]:P` | `127.0.0.1:P` and `[::1]:P` |
//! | `127.0.0.1:P` | `127.0.0.1:P` and `[::1]:P` |
//! | `[::1]:P` | `[::1]:P` |
//!
//! plus `ADDR:P` for every `--expose ADDR`. Where an exposed wildcard address covers a loopback
//! one of its family (`--expose 0.0.0.0` covers `127.0.0.1`), the loopback bind is left out: on
//! Linux a wildcard and a specific TCP listener on one port conflict even with `SO_REUSEADDR`.
//! A guest listener on any other address (the agent reports only wildcard and loopback ones)
//! gets no host listener.
//!
//! The reverse direction's check of dial-back targets ([`dial_back_target`]) lives here too.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hostnet_link::proto::{Listener, Proto};

/// The host addresses that mirror one guest listener, without duplicates, in a stable order.
pub fn host_addrs(guest: &Listener, expose: &[IpAddr]) -> Vec<SocketAddr> {
    let p = guest.port;
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p);
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), p);
    let mut out: BTreeSet<SocketAddr> = BTreeSet::new();
    let loopbacks: &[SocketAddr] = match guest.addr {
        IpAddr::V4(a) if a.is_unspecified() || a.is_loopback() => &[v4, v6],
        IpAddr::V6(a) if a.is_unspecified() => &[v4, v6],
        IpAddr::V6(a) if a.is_loopback() => &[v6],
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) if m.is_loopback() || m.is_unspecified() => &[v4, v6],
            _ => return Vec::new(),
        },
        IpAddr::V4(_) => return Vec::new(),
    };
    out.extend(loopbacks.iter().copied());
    for a in expose {
        out.insert(SocketAddr::new(*a, p));
    }
    let has_v4_any = expose.contains(&IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let has_v6_any = expose.contains(&IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    out.retain(|a| {
        !(has_v4_any && a.is_ipv4() && !a.ip().is_unspecified()
            || has_v6_any && a.is_ipv6() && !a.ip().is_unspecified())
    });
    out.into_iter().collect()
}

/// [`host_addrs`] on a host without IPv6 loopback: `[::1]` becomes `127.0.0.1` (so a guest
/// `[::1]:P` is still reachable as `localhost:P`).
pub fn without_ipv6(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut out: BTreeSet<SocketAddr> = BTreeSet::new();
    for a in addrs {
        match a.ip() {
            IpAddr::V6(ip) if ip.is_loopback() => {
                out.insert(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), a.port()));
            }
            _ => {
                out.insert(a);
            }
        }
    }
    out.into_iter().collect()
}

/// Whether this host can bind `[::1]` (IPv6 may be disabled, e.g. in some containers).
pub fn host_has_ipv6_loopback() -> bool {
    std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// Whether a host listener is one the reverse direction reports: wildcard or loopback.
pub fn reportable(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_unspecified() || a.is_loopback(),
        IpAddr::V6(a) => {
            a.is_unspecified()
                || a.is_loopback()
                || a.to_ipv4_mapped()
                    .is_some_and(|m| m.is_loopback() || m.is_unspecified())
        }
    }
}

/// The address the forwarder connects to for a dial-back request, or `None` (answer
/// `Forbidden`): `target` must be a loopback (or unspecified, meaning loopback) address whose
/// port is a listener of `proto` in the reported host set `reported`, and a listener of that set
/// must accept connections to that address (same address, or a wildcard of its family, or a
/// dual-stack `[::]` for IPv4).
pub fn dial_back_target(
    reported: &BTreeSet<Listener>,
    proto: Proto,
    target: SocketAddr,
) -> Option<SocketAddr> {
    let ip = match target.ip() {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => IpAddr::V4(m),
            None => IpAddr::V6(a),
        },
        other => other,
    };
    if !ip.is_loopback() {
        return None;
    }
    let ok = reported.iter().any(|l| {
        l.proto == proto
            && l.port == target.port()
            && match (l.addr, ip) {
                (a, b) if a == b => true,
                (IpAddr::V4(a), IpAddr::V4(_)) => a.is_unspecified(),
                (IpAddr::V6(a), IpAddr::V6(_)) => a.is_unspecified(),
                (IpAddr::V6(a), IpAddr::V4(_)) => a.is_unspecified() && !l.v6only,
                (IpAddr::V4(_), IpAddr::V6(_)) => false,
            }
    });
    ok.then(|| SocketAddr::new(ip, target.port()))
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

    fn strs(v: Vec<SocketAddr>) -> Vec<String> {
        v.into_iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn the_design_table() {
        for g in ["0.0.0.0", "::", "127.0.0.1"] {
            assert_eq!(
                strs(host_addrs(&l(g, 80), &[])),
                ["127.0.0.1:80", "[::1]:80"],
                "{g}"
            );
        }
        assert_eq!(strs(host_addrs(&l("::1", 80), &[])), ["[::1]:80"]);
        assert!(host_addrs(&l("10.0.0.1", 80), &[]).is_empty());
        assert!(host_addrs(&l("fe80::1", 80), &[]).is_empty());
        assert_eq!(
            strs(without_ipv6(host_addrs(&l("::1", 80), &[]))),
            ["127.0.0.1:80"]
        );
        assert_eq!(
            strs(without_ipv6(host_addrs(&l("::", 80), &[]))),
            ["127.0.0.1:80"]
        );
    }

    #[test]
    fn expose_adds_and_wildcards_cover_loopback() {
        let e: Vec<IpAddr> = vec!["192.168.1.2".parse().unwrap()];
        assert_eq!(
            strs(host_addrs(&l("0.0.0.0", 8), &e)),
            ["127.0.0.1:8", "192.168.1.2:8", "[::1]:8"]
        );
        let e: Vec<IpAddr> = vec!["0.0.0.0".parse().unwrap()];
        assert_eq!(
            strs(host_addrs(&l("0.0.0.0", 8), &e)),
            ["0.0.0.0:8", "[::1]:8"]
        );
        let e: Vec<IpAddr> = vec!["0.0.0.0".parse().unwrap(), "::".parse().unwrap()];
        assert_eq!(strs(host_addrs(&l("::1", 8), &e)), ["0.0.0.0:8", "[::]:8"]);
    }

    #[test]
    fn dial_back_only_to_reported_loopback() {
        let set: BTreeSet<Listener> = [l("127.0.0.1", 80), l("::", 443)].into_iter().collect();
        let t = |s: &str| dial_back_target(&set, Proto::Tcp, s.parse().unwrap());
        assert_eq!(t("127.0.0.1:80"), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(t("0.0.0.0:80"), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(t("[::1]:80"), None);
        assert_eq!(t("127.0.0.1:81"), None);
        assert_eq!(t("10.1.1.1:80"), None);
        assert_eq!(t("[::1]:443"), Some("[::1]:443".parse().unwrap()));
        assert_eq!(t("[::]:443"), Some("[::1]:443".parse().unwrap()));
        // [::]:443 is v6only in this set: no IPv4.
        assert_eq!(t("127.0.0.1:443"), None);
        assert_eq!(
            dial_back_target(&set, Proto::Udp, "127.0.0.1:80".parse().unwrap()),
            None
        );
        let dual: BTreeSet<Listener> = [Listener {
            v6only: false,
            ..l("::", 443)
        }]
        .into_iter()
        .collect();
        assert!(dial_back_target(&dual, Proto::Tcp, "127.0.0.1:443".parse().unwrap()).is_some());
    }
}
