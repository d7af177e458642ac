//! A UDP flood through the bridge: 5,000 host client ports, one datagram each, at the default
//! flow limits. Memory stays bounded on both sides (flows are table entries on the datagram
//! channel, evicted least recently used, with nothing refused), and a fresh client is served
//! right after.

use std::net::UdpSocket;
use std::time::Duration;

use hostnet_e2e::bridge::Bridge;
use hostnet_e2e::net::{ANY4, LO4, UdpEcho, free_port, sa, udp_echo_check};
use hostnet_e2e::process::rss_kib;
use hostnet_e2e::{after, privileged, wait_until};

/// Client ports in the flood (more than the default limit of 4,096 flows).
const CLIENTS: usize = 5_000;
/// The bound on each side's resident set during the flood.
const RSS_LIMIT_KIB: u64 = 32 * 1024;

#[test]
fn five_thousand_client_ports_stay_bounded_and_a_fresh_client_is_served() {
    if !privileged("five_thousand_client_ports_stay_bounded_and_a_fresh_client_is_served") {
        return;
    }
    // 5,000 client sockets: more descriptors than a default soft limit of 1,024.
    hostnet_e2e::raise_nofile();
    let mut b = Bridge::unix();
    let port = free_port();
    let echo = UdpEcho::serve(b.ns.udp_socket(sa(ANY4, port)).unwrap());
    assert!(b.wait_udp(LO4, port, Duration::from_secs(5)).is_some());
    let (fwd, agent) = (b.fwd().pid(), b.agent().pid());
    let before = (rss_kib(fwd).unwrap(), rss_kib(agent).unwrap());
    // One datagram from each of 5,000 client ports, in batches that the echo keeps up with
    // (a datagram lost to a full socket buffer would be counted, not hidden).
    let target = sa(LO4, port);
    // The sockets stay open, so that every client port is a distinct one.
    let mut clients: Vec<UdpSocket> = Vec::with_capacity(CLIENTS);
    let mut sent = 0;
    for batch in 0..CLIENTS / 100 {
        let socks: Vec<UdpSocket> = (0..100)
            .map(|_| UdpSocket::bind(sa(LO4, 0)).expect("a client socket (descriptor limit?)"))
            .collect();
        for (i, s) in socks.iter().enumerate() {
            s.send_to(format!("flood {batch} {i}").as_bytes(), target)
                .unwrap();
            sent += 1;
        }
        clients.extend(socks);
        let count = &echo.count;
        wait_until(after(Duration::from_secs(2)), || {
            count.load(std::sync::atomic::Ordering::Relaxed) >= sent
        });
    }
    let echoed = echo.count.load(std::sync::atomic::Ordering::Relaxed);
    let peak = (rss_kib(fwd).unwrap(), rss_kib(agent).unwrap());
    let counters = b.status_json().unwrap()["counters"].clone();
    eprintln!(
        "udp flood: {CLIENTS} client ports, {echoed} datagrams reached the guest; RSS forwarder {} -> {} KiB, agent {} -> {} KiB; counters {counters}",
        before.0, peak.0, before.1, peak.1
    );
    assert!(
        echoed >= CLIENTS * 99 / 100,
        "only {echoed} of {CLIENTS} datagrams reached the guest\n{}",
        b.describe()
    );
    assert!(
        peak.0 <= RSS_LIMIT_KIB && peak.1 <= RSS_LIMIT_KIB,
        "RSS forwarder {} KiB, agent {} KiB (limit {RSS_LIMIT_KIB} KiB each)",
        peak.0,
        peak.1
    );
    let n = |k: &str| counters[k].as_u64().unwrap_or(0);
    assert!(n("udp_flows") <= 4096, "flows beyond the limit: {counters}");
    assert!(
        n("udp_flows_evicted") >= (CLIENTS - 4096) as u64,
        "{counters}"
    );
    assert_eq!(n("udp_flows_refused"), 0, "{counters}");
    // A fresh client right after the flood gets its echo.
    let fresh = UdpSocket::bind(sa(LO4, 0)).unwrap();
    if let Err(e) = udp_echo_check(&fresh, target, b"after the flood", Duration::from_secs(5)) {
        panic!("fresh client after the flood: {e}\n{}", b.describe());
    }
    assert!(b.fwd().is_running() && b.agent().is_running());
    drop(clients);
}
