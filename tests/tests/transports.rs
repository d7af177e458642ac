//! The same scenarios over the tcp (token) and quic (pinned certificates) transports, with the
//! agent listening on the namespace's end of a veth pair.

use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::net::{ANY4, LO4, LO6, TcpServer, echo_check, free_port, sa};
use hostnet_e2e::{privileged, scenario};

/// The two 500-connection bursts take turns, so each is measured alone on 2 cores. (The tcp one
/// used to go past its 5 s link handshake timeout now and then, alone or not: the agent's link
/// listener had std's backlog of 128, which a burst overflowed; it is 4096 now.)
static BURST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn burst(t: Transport) {
    let _turn = BURST.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = Bridge::builder(t).start();
    scenario::concurrent(&mut b, 500);
}

fn all_over(t: Transport, test: &str) {
    if !privileged(test) {
        return;
    }
    let mut b = Bridge::builder(t).start();
    scenario::reach_all(&mut b);
    scenario::duplex_through(&mut b, LO6, 8 << 20);
    scenario::half_close(&mut b);
    scenario::reset_from_guest(&mut b);
    scenario::udp_forward(&mut b);
}

#[test]
fn tcp_transport_scenarios() {
    all_over(Transport::Tcp, "tcp_transport_scenarios");
}

#[test]
fn quic_transport_scenarios() {
    all_over(Transport::Quic, "quic_transport_scenarios");
}

#[test]
fn host_reset_and_udp_sizes_over_tcp() {
    if !privileged("host_reset_and_udp_sizes_over_tcp") {
        return;
    }
    let mut b = Bridge::builder(Transport::Tcp).start();
    scenario::reset_from_host(&mut b);
    scenario::udp_sizes(&mut b);
}

#[test]
fn host_reset_and_udp_sizes_over_quic() {
    if !privileged("host_reset_and_udp_sizes_over_quic") {
        return;
    }
    let mut b = Bridge::builder(Transport::Quic).start();
    scenario::reset_from_host(&mut b);
    scenario::udp_sizes(&mut b);
    // Small datagrams rode QUIC datagrams, the ones larger than the path's datagram size (9000
    // and 60,000 bytes, both ways) the channel's stream: the forwarder counts its two.
    let counters = b.status_json().unwrap()["counters"].clone();
    let on_stream = counters["udp_sent_on_stream"].as_u64().unwrap_or(0);
    assert!(
        (2..=4).contains(&on_stream),
        "expected the forwarder to send 2 large datagrams (and a retry at most) on the stream, not the small ones: {counters}"
    );
}

/// `--expose ADDR` binds the mirrored port on that host address as well (here the host end of
/// the veth pair), and the port is reachable there.
#[test]
fn expose_binds_an_extra_host_address() {
    if !privileged("expose_binds_an_extra_host_address") {
        return;
    }
    let mut b = Bridge::builder(Transport::Tcp).expose_veth().start();
    let host_ip = b.ns.veth().unwrap().host_ip;
    let port = free_port();
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    b.expect_tcp(host_ip.into(), port);
    echo_check(sa(host_ip.into(), port), 5, 10_000).unwrap();
}

/// Each relayed connection over tcp:// is a new TCP connection with its own token handshake: a
/// burst of 500 must not overflow the agent's pending-handshake cap (it once closed connections
/// beyond 256 pending handshakes; since d5b30ac it stops accepting instead).
#[test]
fn five_hundred_concurrent_over_tcp() {
    if !privileged("five_hundred_concurrent_over_tcp") {
        return;
    }
    burst(Transport::Tcp);
}

/// QUIC carries every relayed connection as a stream of one connection: 500 at once must not
/// stall on a stream-count limit.
#[test]
fn five_hundred_concurrent_over_quic() {
    if !privileged("five_hundred_concurrent_over_quic") {
        return;
    }
    burst(Transport::Quic);
}
