//! UDP both directions and the reverse direction (host servers reached from inside the
//! namespace via its own loopback), including the same port on both sides (no loop).

use std::net::UdpSocket;
use std::time::Duration;

use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::net::{
    LO4, LO6, TcpServer, UdpEcho, echo_on, free_port, read_tag, sa, tag_handler, tcp_listeners,
    udp_bound,
};
use hostnet_e2e::{after, privileged, scenario, wait_until};

#[test]
fn udp_echo_forward_several_clients() {
    if !privileged("udp_echo_forward_several_clients") {
        return;
    }
    let mut b = Bridge::unix();
    scenario::udp_forward(&mut b);
}

#[test]
fn udp_echo_reverse_several_clients() {
    if !privileged("udp_echo_reverse_several_clients") {
        return;
    }
    let port = free_port();
    let _e4 = UdpEcho::serve(UdpSocket::bind(sa(LO4, port)).unwrap());
    let _e6 = UdpEcho::serve(UdpSocket::bind(sa(LO6, port)).unwrap());
    let mut b = Bridge::builder(Transport::Unix).reverse().start();
    let ok = wait_until(after(Duration::from_secs(5)), || {
        let bound = b.ns.run(udp_bound);
        bound.contains(&sa(LO4, port)) && bound.contains(&sa(LO6, port))
    });
    if !ok {
        panic!(
            "host UDP 127.0.0.1:{port} and [::1]:{port} not mirrored into the namespace within 5 s (bound there: {:?})\n{}",
            b.ns.run(udp_bound)
                .into_iter()
                .filter(|a| a.port() == port)
                .collect::<Vec<_>>(),
            b.describe()
        );
    }
    let ns = &b.ns;
    let errors = scenario::udp_clients(|ip| ns.udp_socket(sa(ip, 0)), port, 6);
    if !errors.is_empty() {
        panic!("UDP reverse: {errors:?}\n{}", b.describe());
    }
}

#[test]
fn host_server_reached_from_namespace() {
    if !privileged("host_server_reached_from_namespace") {
        return;
    }
    let mut b = Bridge::builder(Transport::Unix).reverse().start();
    let port = free_port();
    let _srv = TcpServer::echo(std::net::TcpListener::bind(sa(LO4, port)).unwrap());
    let ok = wait_until(after(Duration::from_secs(5)), || {
        b.ns.run(tcp_listeners).contains(&sa(LO4, port))
    });
    if !ok {
        panic!(
            "host 127.0.0.1:{port} not mirrored into the namespace within 5 s\n{}",
            b.describe()
        );
    }
    let mut s = b.ns_connect(sa(LO4, port)).unwrap();
    if let Err(e) = echo_on(&mut s, 77, 1 << 20) {
        panic!("namespace -> host echo: {e}\n{}", b.describe());
    }
    // The namespace side never mirrors the port back onto the host a second time.
    let host: Vec<_> = tcp_listeners()
        .into_iter()
        .filter(|a| a.port() == port)
        .collect();
    assert_eq!(host, vec![sa(LO4, port)], "host listeners on {port}");
}

/// The same port on both sides before the bridge starts: both servers keep answering their own
/// side, nothing is mirrored twice, status shows a conflict or nothing, the logs stay quiet.
/// Then a guest-only port: mirrored onto the host once, and never reflected back.
#[test]
fn same_port_on_both_sides_no_loop() {
    if !privileged("same_port_on_both_sides_no_loop") {
        return;
    }
    let port = free_port();
    let _host = TcpServer::serve(
        std::net::TcpListener::bind(sa(LO4, port)).unwrap(),
        tag_handler("host"),
    );
    let mut b = Bridge::builder(Transport::Unix)
        .reverse()
        .without_forwarder()
        .start();
    let _guest = TcpServer::serve(
        b.ns.tcp_listener(sa(LO4, port)).unwrap(),
        tag_handler("guest"),
    );
    b.start_forwarder();
    // A guest-only port, as a marker that the link is up.
    let only = free_port();
    let _g2 = TcpServer::echo(b.ns.tcp_listener(sa(LO4, only)).unwrap());
    b.expect_tcp(LO4, only);
    std::thread::sleep(Duration::from_millis(1000));
    let log0 = b.agent().stderr().lines().count() + b.fwd().stderr().lines().count();
    std::thread::sleep(Duration::from_secs(2));
    let log1 = b.agent().stderr().lines().count() + b.fwd().stderr().lines().count();

    let host_tag = read_tag(sa(LO4, port));
    let ns_tag = b.ns.run(|| read_tag(sa(LO4, port)));
    let states = b.states(port);
    let host_l: Vec<_> = tcp_listeners()
        .into_iter()
        .filter(|a| a.port() == port)
        .collect();
    let ns_l: Vec<_> =
        b.ns.run(tcp_listeners)
            .into_iter()
            .filter(|a| a.port() == port)
            .collect();
    let only_host: Vec<_> = tcp_listeners()
        .into_iter()
        .filter(|a| a.port() == only)
        .collect();
    let only_ns: Vec<_> =
        b.ns.run(tcp_listeners)
            .into_iter()
            .filter(|a| a.port() == only)
            .collect();
    let running = b.agent().is_running() && b.fwd().is_running();
    let d = b.describe();
    assert!(running, "a process died\n{d}");
    assert_eq!(
        host_tag.as_deref(),
        Ok("host"),
        "host client on 127.0.0.1:{port}\n{d}"
    );
    assert_eq!(
        ns_tag.as_deref(),
        Ok("guest"),
        "namespace client on 127.0.0.1:{port}\n{d}"
    );
    // The forwarder either leaves the port alone or shows the taken 127.0.0.1 as a conflict.
    assert!(
        states.is_empty() || states.iter().any(|s| s == "conflict" || s == "retrying"),
        "status for {port} shows no conflict although the host's 127.0.0.1:{port} is taken: {states:?}\n{d}"
    );
    for a in [sa(LO4, port), sa(LO6, port)] {
        let n = host_l.iter().filter(|x| **x == a).count();
        assert!(n <= 1, "{a} bound {n} times on the host: {host_l:?}\n{d}");
    }
    assert_eq!(
        ns_l,
        vec![sa(LO4, port)],
        "namespace listeners on {port}\n{d}"
    );
    let mut want = vec![sa(LO4, only), sa(LO6, only)];
    let mut got = only_host.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "host listeners for guest-only port {only}\n{d}");
    assert_eq!(
        only_ns,
        vec![sa(LO4, only)],
        "the guest-only port {only} was reflected back into the namespace\n{d}"
    );
    assert!(
        log1 - log0 < 20,
        "log storm: {} lines in 2 s once settled\n{d}",
        log1 - log0
    );
}
