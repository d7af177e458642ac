//! The host's listening sockets, for the reverse direction: one enumerator per OS behind
//! [`start`], each giving a [`HostListeners`] source.
//!
//! | host | source | latency | cost |
//! |---|---|---|---|
//! | Linux, root | netlink sock_diag dump on kernel events (listen/bind tracepoints, destroy announcements) and every 2 s (`hostnet_link::discovery`) | a few ms | ~70 µs per dump, 0.5 wake-ups/s idle |
//! | Linux, unprivileged | the same dump every 1 s, and at once when a listener's socket is freed | additions ≤ 1 s, removals a few ms | ~70 µs per dump, 1 wake-up/s idle |
//! | macOS | `sysctl net.inet.{tcp,udp}.pcblist_n`, every [`SCAN_INTERVAL`] ([`pcblist`]) | ≤ 1 s | two sysctls per scan |
//! | Windows | `GetExtendedTcpTable` / `GetExtendedUdpTable`, every [`SCAN_INTERVAL`] ([`iphlp`]) | ≤ 1 s | four calls per scan |
//!
//! On macOS and Windows an unprivileged process gets no event when a socket starts listening,
//! so those hosts scan. [`SCAN_INTERVAL`] is 1 s: a host server started after the VM is reachable
//! from it within a second (WSL's NAT mode polls at the same rate; Lima at 3 s), and the
//! forwarder wakes once a second for it, a few tens of microseconds of work each time.
//!
//! Every source leaves out the forwarder's own sockets (by process id where the OS gives one,
//! by inode on Linux), the ports the forwarder mirrors for the guest
//! ([`HostListeners::set_excluded_ports`], loop prevention), UDP sockets on the OS's ephemeral
//! ports (DNS clients and other autobound sockets come and go with every query), and sockets on
//! addresses other than loopback and the wildcard. The table parsers ([`pcblist`], [`iphlp`]) are
//! plain code compiled and tested on every host; only the system calls are per OS.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hostnet_link::discovery::{PortRange, Protocol};
use hostnet_link::proto::{Listener, Proto};

use crate::policy;
use crate::reverse::HostListeners;

pub mod iphlp;
pub mod pcblist;
mod poll;

#[cfg_attr(target_os = "linux", path = "linux.rs")]
#[cfg_attr(target_os = "macos", path = "macos.rs")]
#[cfg_attr(windows, path = "windows.rs")]
#[cfg_attr(
    not(any(target_os = "linux", target_os = "macos", windows)),
    path = "unsupported.rs"
)]
mod imp;

pub use poll::PollingHostListeners;

/// How often the macOS and Windows enumerators scan (see the module docs).
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Why the host's listeners cannot be listed.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// Starts this host's listener source. Call inside a tokio runtime.
pub fn start() -> Result<Arc<dyn HostListeners>, StartError> {
    imp::start()
}

/// One socket found by a platform scan, before the portable filters (own process, excluded
/// ports, ephemeral UDP ports, non-loopback addresses) are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scanned {
    /// TCP (in LISTEN) or UDP (bound, unconnected).
    pub proto: Protocol,
    /// The local address (`0.0.0.0` / `::` for a wildcard bind).
    pub addr: IpAddr,
    /// The local port, never 0.
    pub port: u16,
    /// For IPv6 sockets, whether the socket is v6-only, when the OS says; `None` for IPv4.
    pub v6only: Option<bool>,
    /// The owning process, when the OS says.
    pub pid: Option<u32>,
}

/// What the filters leave out of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusions {
    /// This process's id: its own sockets are never reported.
    pub own_pid: u32,
    /// The (protocol, port) pairs the forwarder mirrors for the guest.
    pub ports: BTreeSet<(Protocol, u16)>,
    /// The OS's ephemeral port range, for UDP.
    pub ephemeral: Option<PortRange>,
}

/// The reportable listeners of a scan (see the module docs for what is left out).
pub fn visible(scan: &[Scanned], ex: &Exclusions) -> BTreeSet<Listener> {
    scan.iter()
        .filter(|s| s.port != 0 && s.pid != Some(ex.own_pid))
        .filter(|s| !ex.ports.contains(&(s.proto, s.port)))
        .filter(|s| s.proto != Protocol::Udp || !ex.ephemeral.is_some_and(|r| r.contains(s.port)))
        .filter(|s| policy::reportable(s.addr))
        .map(|s| Listener {
            proto: match s.proto {
                Protocol::Tcp => Proto::Tcp,
                Protocol::Udp => Proto::Udp,
            },
            addr: s.addr,
            port: s.port,
            // An IPv6 socket of unknown v6only is reported v6-only (no IPv4 promised).
            v6only: s.addr.is_ipv6() && s.v6only.unwrap_or(true),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(proto: Protocol, addr: &str, port: u16, pid: Option<u32>) -> Scanned {
        let addr: IpAddr = addr.parse().unwrap();
        Scanned {
            proto,
            addr,
            port,
            v6only: addr.is_ipv6().then_some(false),
            pid,
        }
    }

    #[test]
    fn filters_leave_out_own_excluded_ephemeral_and_foreign() {
        let scan = [
            s(Protocol::Tcp, "127.0.0.1", 5432, Some(10)),
            s(Protocol::Tcp, "0.0.0.0", 8000, Some(7)), // our own
            s(Protocol::Tcp, "::", 9000, None),
            s(Protocol::Tcp, "::1", 9001, Some(10)), // excluded port
            s(Protocol::Udp, "127.0.0.1", 53, None),
            s(Protocol::Udp, "0.0.0.0", 50000, None), // ephemeral UDP
            s(Protocol::Tcp, "0.0.0.0", 50001, None), // ephemeral TCP is fine
            s(Protocol::Tcp, "192.168.1.5", 22, None), // not loopback
        ];
        let ex = Exclusions {
            own_pid: 7,
            ports: [(Protocol::Tcp, 9001)].into(),
            ephemeral: Some(PortRange {
                first: 49152,
                last: 65535,
            }),
        };
        let got: Vec<(Proto, String, bool)> = visible(&scan, &ex)
            .into_iter()
            .map(|l| {
                (
                    l.proto,
                    std::net::SocketAddr::new(l.addr, l.port).to_string(),
                    l.v6only,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (Proto::Tcp, "0.0.0.0:50001".to_string(), false),
                (Proto::Tcp, "127.0.0.1:5432".to_string(), false),
                (Proto::Tcp, "[::]:9000".to_string(), false),
                (Proto::Udp, "127.0.0.1:53".to_string(), false),
            ]
        );
    }
}
