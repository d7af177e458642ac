//! The harness itself, without the bridge binaries: namespaces, servers in them, the veth path and
//! the socat chain the benchmark compares with.

use std::time::Duration;

use hostnet_e2e::net::{ANY4, LO4, TcpServer, echo_check, free_port, refused, sa, tcp_listeners};
use hostnet_e2e::netns::Netns;
use hostnet_e2e::socat::{self, SocatChain};
use hostnet_e2e::{TempDir, privileged};

#[test]
fn namespace_servers_are_isolated_and_reachable_over_veth() {
    if !privileged("namespace_servers_are_isolated_and_reachable_over_veth") {
        return;
    }
    let ns = Netns::with_veth().unwrap();
    let port = free_port();
    let _srv = TcpServer::echo(ns.tcp_listener(sa(ANY4, port)).unwrap());
    // Inside the namespace, not on the host.
    assert!(ns.run(tcp_listeners).contains(&sa(ANY4, port)));
    assert!(!tcp_listeners().contains(&sa(ANY4, port)));
    assert!(
        refused(sa(LO4, port)),
        "the host must not see the namespace's port"
    );
    // Through the veth pair, and from inside over loopback.
    echo_check(sa(ns.ns_ip().into(), port), 1, 200_000).unwrap();
    let mut s = ns.connect(sa(LO4, port), Duration::from_secs(2)).unwrap();
    hostnet_e2e::net::set_timeouts(&s, Duration::from_secs(5));
    hostnet_e2e::net::echo_on(&mut s, 2, 10_000).unwrap();
    let name = ns.name().to_string();
    drop(ns);
    assert!(!std::path::Path::new(&format!("/var/run/netns/{name}")).exists());
}

#[test]
fn socat_chain_relays_checksummed_bytes() {
    if !privileged("socat_chain_relays_checksummed_bytes") {
        return;
    }
    assert!(
        socat::available(),
        "socat is not installed (apt-get install socat)"
    );
    let ns = Netns::new().unwrap();
    let dir = TempDir::new("socat").unwrap();
    let (p, p2) = (free_port(), free_port());
    let _srv = TcpServer::echo(ns.tcp_listener(sa(LO4, p)).unwrap());
    let _chain = SocatChain::start(&ns, &dir.join("s.sock"), p2, p);
    echo_check(sa(LO4, p2), 3, 1 << 20).unwrap();
}
