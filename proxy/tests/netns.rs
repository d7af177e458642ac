//! docker-proxy's real setting: the backend lives in another network
//! namespace, reached through a veth pair, and the proxy forwards from a
//! host address to the "container" address.
//!
//! Needs root and iproute2. Without them these tests FAIL, unless
//! `HOSTNET_SKIP_PRIVILEGED=1` is set, in which case they return early.

mod common;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use common::*;

static NEXT: AtomicU32 = AtomicU32::new(0);
const REPLY: Duration = Duration::from_secs(5);

/// A network namespace with a veth pair: host side `host_ip/30`, namespace
/// side `ns_ip/30`, in 198.18.0.0/15 (RFC 2544). Removed on drop.
#[derive(Debug)]
struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    fn create() -> Result<Self, String> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // A distinct /30 per test, and per process as far as possible.
        let block = (pid.wrapping_mul(8).wrapping_add(n)) % 32768;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + block * 4;
        let ns = Self {
            name: format!("hnp-{pid}-{n}"),
            // Interface names: at most 15 bytes.
            host_if: format!("hnp{}h{n}", pid % 1_000_000),
            ns_if: format!("hnp{}c{n}", pid % 1_000_000),
            host_ip: Ipv4Addr::from(base + 1),
            ns_ip: Ipv4Addr::from(base + 2),
        };
        // From here on, Drop cleans up whatever part was created.
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&["-n", &ns.name, "addr", "add", &ns_cidr, "dev", &ns.ns_if])?;
        ip(&["-n", &ns.name, "link", "set", &ns.ns_if, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread that joined the namespace (CLONE_NEWNET applies
    /// to that thread only; threads it spawns stay in the namespace).
    fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .unwrap()
        })
    }

    fn ns_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ns_ip), port)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end of a veth deletes the pair; the namespace may be
        // kept alive a little longer by sockets still open in it.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn setup(test: &str) -> Option<NetNs> {
    if skip_privileged(test) {
        return None;
    }
    match NetNs::create() {
        Ok(ns) => Some(ns),
        Err(e) => panic!(
            "{test}: cannot set up a network namespace and veth pair (needs root and iproute2; \
             set HOSTNET_SKIP_PRIVILEGED=1 to skip): {e}"
        ),
    }
}

/// TCP: 1 MiB checksummed through a proxy that binds 127.0.0.1 itself, and
/// through one given a listening socket on fd 4.
#[test]
fn tcp_to_container_namespace() {
    let Some(ns) = setup("tcp_to_container_namespace") else {
        return;
    };
    let be = ns.run_inside(|| TcpServer::echo(ns.ns_addr(0)));
    assert_eq!(be.addr.ip(), IpAddr::V4(ns.ns_ip));

    let p = Proxy::tcp().host_free(LO4).container(be.addr).start();
    echo_check(p.addr(), 1, 1024 * 1024).unwrap_or_else(|e| panic!("self-bound proxy: {e}"));

    let p = Proxy::tcp()
        .listen(tcp_listen_socket(any_port(LO4)))
        .container(be.addr)
        .start();
    echo_check(p.addr(), 2, 1024 * 1024).unwrap_or_else(|e| panic!("fd-4 proxy: {e}"));
    // The traffic really went into the namespace.
    assert!(be.accepted.load(Ordering::SeqCst) >= 2);
    drop(be);
    drop(ns);
}

/// UDP round trips to the namespace.
#[test]
fn udp_to_container_namespace() {
    let Some(ns) = setup("udp_to_container_namespace") else {
        return;
    };
    let be = ns.run_inside(|| UdpServer::echo(ns.ns_addr(0)));
    let p = Proxy::udp().host_free(LO4).container(be.addr).start();
    let c = udp_client(LO4);
    for (i, len) in [1usize, 500, 1400, 8000, 60_000].into_iter().enumerate() {
        udp_echo_check(&c, p.addr(), &payload(10 + i as u64, len), REPLY)
            .unwrap_or_else(|e| panic!("{len}-byte datagram: {e}"));
    }
    let seen = be.received();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter()
            .all(|(src, _)| src.ip() == IpAddr::V4(ns.host_ip)),
        "the namespace should see the proxy's datagrams from the veth address {}: {:?}",
        ns.host_ip,
        seen.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    );

    let p = Proxy::udp()
        .listen(udp_listen_socket(any_port(LO4)))
        .container(be.addr)
        .start();
    udp_echo_check(&c, p.addr(), &payload(20, 1000), REPLY)
        .unwrap_or_else(|e| panic!("fd-4 proxy: {e}"));
}

/// The container's stack refuses the connection (RST from a real peer):
/// the client is reset.
#[test]
fn tcp_refused_in_container_resets_client() {
    let Some(ns) = setup("tcp_refused_in_container_resets_client") else {
        return;
    };
    // A port that is free inside the namespace.
    let port = ns.run_inside(|| {
        TcpListener::bind(ns.ns_addr(0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let p = Proxy::tcp()
        .host_free(LO4)
        .container(ns.ns_addr(port))
        .start();
    let end = match connect_or_reset(p.addr()) {
        Some(mut c) => read_until_end(&mut c),
        None => Err(std::io::ErrorKind::ConnectionReset.into()),
    };
    assert_eq!(
        end.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "client should be reset when the container refuses: {end:?}"
    );
}
