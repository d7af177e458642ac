//! Black-box UDP tests of the hostnet-proxy binary: round trips, reply
//! source on wildcard sockets, refused backends, flow timeout, datagram
//! sizes and the flow cap.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::thread;
use std::time::Duration;

use common::*;

const LO4_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const LO4_3: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const REPLY: Duration = Duration::from_secs(5);

/// Proxy with a UDP socket handed over on fd 4.
fn proxy_fd(front: SocketAddr, backend: SocketAddr) -> Proxy {
    Proxy::udp()
        .listen(udp_listen_socket(front))
        .container(backend)
        .start()
}

/// Datagrams of several sizes, then 200 in a row on the same flow.
fn round_trips(client_ip: IpAddr, to: SocketAddr, seed: u64) {
    let c = udp_client(client_ip);
    for (i, len) in [1, 100, 1400, 9000, 30_000].into_iter().enumerate() {
        udp_echo_check(&c, to, &payload(seed + i as u64, len), REPLY)
            .unwrap_or_else(|e| panic!("{len}-byte datagram via {to}: {e}"));
    }
    for i in 0..200 {
        udp_echo_check(&c, to, &payload(seed + 100 + i, 64), REPLY)
            .unwrap_or_else(|e| panic!("datagram {i} of 200 via {to}: {e}"));
    }
}

#[test]
fn v4_listen_fd_round_trip() {
    let be = UdpServer::echo(any_port(LO4));
    let p = proxy_fd(any_port(LO4), be.addr);
    round_trips(LO4, p.addr(), 1000);
}

#[test]
fn v6_listen_fd_round_trip() {
    let be = UdpServer::echo(any_port(LO6));
    let p = proxy_fd(any_port(LO6), be.addr);
    round_trips(LO6, p.addr(), 2000);
}

#[test]
fn v4_self_bind_round_trip() {
    let be = UdpServer::echo(any_port(LO4));
    let p = Proxy::udp().host_free(LO4).container(be.addr).start();
    round_trips(LO4, p.addr(), 3000);
}

#[test]
fn v6_self_bind_round_trip() {
    let be = UdpServer::echo(any_port(LO6));
    let p = Proxy::udp().host_free(LO6).container(be.addr).start();
    round_trips(LO6, p.addr(), 3500);
}

#[test]
fn v6_front_to_v4_backend() {
    let be = UdpServer::echo(any_port(LO4));
    let p = proxy_fd(any_port(LO6), be.addr);
    round_trips(LO6, p.addr(), 4000);
}

#[test]
fn v4_front_to_v6_backend() {
    let be = UdpServer::echo(any_port(LO6));
    let p = proxy_fd(any_port(LO4), be.addr);
    round_trips(LO4, p.addr(), 5000);
}

/// 20 clients at once, interleaved: each gets exactly its own echoes.
#[test]
fn clients_are_isolated() {
    let be = UdpServer::echo(any_port(LO4));
    let p = proxy_fd(any_port(LO4), be.addr);
    let to = p.addr();
    let clients: Vec<UdpSocket> = (0..20).map(|_| udp_client(LO4)).collect();
    for round in 0..5u64 {
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&payload(round * 100 + i as u64, 200), to)
                .unwrap();
        }
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 1024];
            let (n, from) = c
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("client {i} round {round}: {e}"));
            assert_eq!(from, to, "client {i}: reply source");
            assert_eq!(
                &buf[..n],
                payload(round * 100 + i as u64, 200).as_slice(),
                "client {i} round {round} got someone else's datagram"
            );
        }
    }
}

/// The proxy listens on a wildcard address; replies must come from the
/// address each client sent to.
fn wildcard_reply_source(p: &Proxy, be: &UdpServer) {
    let port = p.addr().port();
    // A connected UDP socket only accepts datagrams from exactly its peer.
    for (k, ip) in [LO4_2, LO4_3].into_iter().enumerate() {
        let target = SocketAddr::new(ip, port);
        let c = udp_client(LO4);
        c.connect(target).unwrap();
        c.set_read_timeout(Some(REPLY)).unwrap();
        let data = payload(40 + k as u64, 300);
        c.send(&data).unwrap();
        let mut buf = [0u8; 1024];
        match c.recv(&mut buf) {
            Ok(n) => assert_eq!(&buf[..n], data.as_slice(), "echo via {target}"),
            Err(e) => panic!(
                "connected client to {target} got no echo ({e}): the reply must come from {target}"
            ),
        }
    }

    // One unconnected socket talking to both addresses: two flows.
    let c = udp_client(LO4);
    let before = be.count();
    let d2 = payload(50, 222);
    let d3 = payload(51, 333);
    let t2 = SocketAddr::new(LO4_2, port);
    let t3 = SocketAddr::new(LO4_3, port);
    c.send_to(&d2, t2).unwrap();
    c.send_to(&d3, t3).unwrap();
    let mut replies = HashMap::new();
    for _ in 0..2 {
        let mut buf = [0u8; 1024];
        let (n, from) = c.recv_from(&mut buf).expect("reply to send_to");
        replies.insert(buf[..n].to_vec(), from);
    }
    assert_eq!(
        replies.get(&d2),
        Some(&t2),
        "reply to the datagram sent to {t2}"
    );
    assert_eq!(
        replies.get(&d3),
        Some(&t3),
        "reply to the datagram sent to {t3}"
    );
    assert!(be.wait_for(before + 2, REPLY));
    let seen = be.received();
    let src_of = |d: &Vec<u8>| {
        seen[before..]
            .iter()
            .find(|(_, b)| b == d)
            .map(|(s, _)| *s)
            .expect("backend missed a datagram")
    };
    assert_ne!(
        src_of(&d2).port(),
        src_of(&d3).port(),
        "one client talking to two host addresses must be two flows"
    );
}

#[test]
fn wildcard_self_bind_reply_source() {
    let be = UdpServer::echo(any_port(LO4));
    let p = Proxy::udp().host_free(ANY4).container(be.addr).start();
    wildcard_reply_source(&p, &be);
}

#[test]
fn wildcard_listen_fd_reply_source() {
    let be = UdpServer::echo(any_port(LO4));
    let p = proxy_fd(any_port(ANY4), be.addr);
    wildcard_reply_source(&p, &be);
}

/// fd 4 is a dual-stack `[::]` socket: IPv4 clients to 127.0.0.2/3 must get
/// replies from those addresses too.
#[test]
fn dual_stack_wildcard_reply_source() {
    let be = UdpServer::echo(any_port(LO4));
    let p = Proxy::udp()
        .listen(udp_listen_socket_opts(any_port(ANY6), true))
        .container(be.addr)
        .start();
    wildcard_reply_source(&p, &be);
    let c = udp_client(LO6);
    udp_echo_check(&c, SocketAddr::new(LO6, p.addr().port()), b"v6 too", REPLY).unwrap();
}

/// Nothing listens on the container port at first (ICMP port unreachable,
/// ECONNREFUSED inside the proxy); once the backend is up, the same client
/// gets its echo.
#[test]
fn backend_refused_then_up() {
    let be_addr = SocketAddr::new(LO4, free_udp_port(LO4));
    let mut p = proxy_fd(any_port(LO4), be_addr);
    let c = udp_client(LO4);
    c.connect(p.addr()).unwrap();
    c.send(b"first").unwrap();
    // Give the ICMP error time to come back: the point is that it does.
    thread::sleep(Duration::from_millis(100));
    c.send(b"second").unwrap();
    thread::sleep(Duration::from_millis(100));
    assert!(p.is_running(), "{}", p.describe());

    let be = UdpServer::echo(be_addr);
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let third = payload(60, 100);
    let mut buf = [0u8; 1024];
    let got = wait_until(after(REPLY), || {
        let _ = c.send(&third);
        // Drain whatever is there; look for the echo of `third`.
        while let Ok(n) = c.recv(&mut buf) {
            if buf[..n] == third[..] {
                return true;
            }
        }
        false
    });
    assert!(
        got,
        "no echo within 5 s after the backend came up (backend got {} datagrams); {}",
        be.count(),
        p.describe()
    );
    assert!(p.is_running(), "{}", p.describe());
}

/// UDP_TIMEOUT=1s; the backend never answers. Client traffic alone keeps the
/// flow (same source port at the backend); after 2 s of silence the flow is
/// gone and a new datagram arrives from a new source port.
#[test]
fn one_sided_flow_kept_alive_then_collected() {
    let be = UdpServer::sink(any_port(LO4));
    let p = Proxy::udp()
        .listen(udp_listen_socket(any_port(LO4)))
        .container(be.addr)
        .env("HOSTNET_PROXY_UDP_TIMEOUT", "1s")
        .start();
    let c = udp_client(LO4);
    for i in 0..15u64 {
        c.send_to(&payload(i, 50), p.addr()).unwrap();
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        be.wait_for(15, REPLY),
        "backend got {} of 15 datagrams",
        be.count()
    );
    let seen = be.received();
    for (i, (_, data)) in seen.iter().enumerate() {
        assert_eq!(data, &payload(i as u64, 50), "datagram {i}");
    }
    let ports: Vec<u16> = seen.iter().map(|(s, _)| s.port()).collect();
    assert!(
        ports.iter().all(|&p| p == ports[0]),
        "a flow with traffic every 100 ms must not expire (timeout 1s): source ports {ports:?}"
    );

    thread::sleep(Duration::from_millis(2100));
    c.send_to(b"after silence", p.addr()).unwrap();
    assert!(be.wait_for(16, REPLY), "datagram after silence lost");
    let last = be.received()[15].clone();
    assert_eq!(last.1, b"after silence");
    assert_ne!(
        last.0.port(),
        ports[0],
        "after 2 s of silence (timeout 1s) the flow should have been collected"
    );
}

/// 65,507 bytes is the largest IPv4 UDP payload.
#[test]
fn full_size_datagram_v4() {
    let be = UdpServer::echo(any_port(LO4));
    let p = proxy_fd(any_port(LO4), be.addr);
    let c = udp_client(LO4);
    udp_echo_check(&c, p.addr(), &payload(70, 65_507), REPLY).unwrap();
}

/// 65,527 bytes is the largest IPv6 UDP payload (no jumbograms).
#[test]
fn full_size_datagram_v6() {
    let be = UdpServer::echo(any_port(LO6));
    let p = proxy_fd(any_port(LO6), be.addr);
    let c = udp_client(LO6);
    udp_echo_check(&c, p.addr(), &payload(71, 65_527), REPLY).unwrap();
}

/// UDP_MAX_DATAGRAM=1000: a 2000-byte datagram is dropped (not forwarded
/// truncated); 1000 and 500 bytes go through intact.
#[test]
fn oversize_datagram_dropped() {
    let be = UdpServer::sink(any_port(LO4));
    let p = Proxy::udp()
        .listen(udp_listen_socket(any_port(LO4)))
        .container(be.addr)
        .env("HOSTNET_PROXY_UDP_MAX_DATAGRAM", "1000")
        .start();
    let c = udp_client(LO4);
    let big = payload(80, 2000);
    let limit = payload(81, 1000);
    let small = payload(82, 500);
    c.send_to(&big, p.addr()).unwrap();
    c.send_to(&limit, p.addr()).unwrap();
    c.send_to(&small, p.addr()).unwrap();
    assert!(
        be.wait_for(2, REPLY),
        "backend got {} datagrams",
        be.count()
    );
    // Anything else would have been sent before `small`; allow a little
    // time for a (wrong) late copy anyway.
    be.wait_for(3, Duration::from_millis(300));
    let got: Vec<Vec<u8>> = be.received().into_iter().map(|(_, d)| d).collect();
    let lens: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(
        lens,
        vec![1000, 500],
        "only the 1000- and 500-byte datagrams may reach the backend"
    );
    assert_eq!(got[0], limit, "1000-byte datagram corrupted");
    assert_eq!(got[1], small, "500-byte datagram corrupted");
}

/// UDP_MAX_FLOWS=4: ten clients each get through; the least recently used
/// flow is evicted (client 1 comes back on a new source port) while the most
/// recent one keeps its port.
#[test]
fn flow_cap_evicts_lru() {
    let be = UdpServer::sink(any_port(LO4));
    let p = Proxy::udp()
        .listen(udp_listen_socket(any_port(LO4)))
        .container(be.addr)
        .env("HOSTNET_PROXY_UDP_MAX_FLOWS", "4")
        .start();
    let clients: Vec<UdpSocket> = (0..10).map(|_| udp_client(LO4)).collect();
    let mut first_port = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let d = payload(90 + i as u64, 40);
        c.send_to(&d, p.addr()).unwrap();
        assert!(
            be.wait_for(i + 1, REPLY),
            "client {} of 10: datagram did not reach the backend (flow cap must evict, not refuse)",
            i + 1
        );
        let (src, got) = be.received()[i].clone();
        assert_eq!(got, d, "client {}", i + 1);
        first_port.push(src.port());
    }

    clients[0].send_to(b"client 1 again", p.addr()).unwrap();
    assert!(be.wait_for(11, REPLY), "client 1's second datagram lost");
    let (src, got) = be.received()[10].clone();
    assert_eq!(got, b"client 1 again");
    assert_ne!(
        src.port(),
        first_port[0],
        "client 1's flow should have been evicted (LRU, max 4 flows)"
    );

    clients[9].send_to(b"client 10 again", p.addr()).unwrap();
    assert!(be.wait_for(12, REPLY), "client 10's second datagram lost");
    let (src, got) = be.received()[11].clone();
    assert_eq!(got, b"client 10 again");
    assert_eq!(
        src.port(),
        first_port[9],
        "client 10's flow is among the 4 most recent and must be kept"
    );
}

/// Expired flows release their descriptors.
#[test]
fn expired_flows_release_descriptors() {
    let be = UdpServer::echo(any_port(LO4));
    let mut p = Proxy::udp()
        .listen(udp_listen_socket(any_port(LO4)))
        .container(be.addr)
        .env("HOSTNET_PROXY_UDP_TIMEOUT", "1s")
        .start();
    let base = fd_count(p.pid());
    let clients: Vec<UdpSocket> = (0..20).map(|_| udp_client(LO4)).collect();
    for (i, c) in clients.iter().enumerate() {
        udp_echo_check(c, p.addr(), &payload(i as u64, 10), REPLY).unwrap();
    }
    let peak = fd_count(p.pid());
    eprintln!("descriptors: baseline {base}, with 20 flows {peak}");
    let ok = wait_until(after(Duration::from_secs(5)), || fd_count(p.pid()) <= base);
    assert!(
        ok,
        "{} descriptors open 5 s after 20 flows went idle (timeout 1s); baseline {base}, peak {peak}; {}",
        fd_count(p.pid()),
        p.describe()
    );
    // And the proxy still serves.
    udp_echo_check(&clients[0], p.addr(), b"still alive", REPLY).unwrap();
}

/// Sends `n` datagrams `gap` apart, stays silent for `silence`, sends one
/// more. Returns the backend-side source ports of the first `n` and of the
/// last datagram.
fn flow_ports(timeout: &str, n: usize, gap: Duration, silence: Duration) -> (Vec<u16>, u16) {
    let be = UdpServer::sink(any_port(LO4));
    let p = Proxy::udp()
        .listen(udp_listen_socket(any_port(LO4)))
        .container(be.addr)
        .env("HOSTNET_PROXY_UDP_TIMEOUT", timeout)
        .start();
    let c = udp_client(LO4);
    for i in 0..n {
        c.send_to(&payload(i as u64, 20), p.addr()).unwrap();
        thread::sleep(gap);
    }
    assert!(be.wait_for(n, REPLY), "backend got {} of {n}", be.count());
    thread::sleep(silence.saturating_sub(gap));
    c.send_to(b"last", p.addr()).unwrap();
    assert!(be.wait_for(n + 1, REPLY), "last datagram lost");
    let seen = be.received();
    (
        seen[..n].iter().map(|(s, _)| s.port()).collect(),
        seen[n].0.port(),
    )
}

/// HOSTNET_PROXY_UDP_TIMEOUT accepts plain seconds and milliseconds.
#[test]
fn udp_timeout_units() {
    // "1" is one second: traffic every 200 ms keeps the flow, 2.1 s of
    // silence ends it.
    let plain = thread::spawn(|| {
        flow_ports(
            "1",
            5,
            Duration::from_millis(200),
            Duration::from_millis(2100),
        )
    });
    // "400ms": traffic every 100 ms keeps the flow, 1 s of silence ends it.
    let (ports, last) = flow_ports(
        "400ms",
        5,
        Duration::from_millis(100),
        Duration::from_millis(1000),
    );
    assert!(
        ports.iter().all(|&p| p == ports[0]),
        "UDP_TIMEOUT=400ms, traffic every 100 ms: flow changed: {ports:?}"
    );
    assert_ne!(
        last, ports[0],
        "UDP_TIMEOUT=400ms: flow not collected after 1 s of silence"
    );
    let (ports, last) = plain.join().unwrap();
    assert!(
        ports.iter().all(|&p| p == ports[0]),
        "UDP_TIMEOUT=1 (seconds), traffic every 200 ms: flow changed: {ports:?}"
    );
    assert_ne!(
        last, ports[0],
        "UDP_TIMEOUT=1: flow not collected after 2.1 s of silence"
    );
}
