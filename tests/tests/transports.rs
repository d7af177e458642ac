//! The same scenarios over the tcp (token) and quic (pinned certificates) transports, with the
//! agent listening on the namespace's end of a veth pair.

use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::net::LO6;
use hostnet_e2e::{privileged, scenario};

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
