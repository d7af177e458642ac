//! UDP both directions and the reverse direction (host servers reached from inside the
//! namespace via its own loopback), including the same port on both sides (no loop).

use std::time::Duration;

use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::net::{
    LO4, LO6, TcpServer, UdpEcho, echo_on, free_port, host_udp, read_tag, sa, socket_inode,
    tag_handler, tcp_listeners, tcp_listeners_except, udp_bound,
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
    let _e4 = UdpEcho::serve(host_udp(sa(LO4, port)));
    let _e6 = UdpEcho::serve(host_udp(sa(LO6, port)));
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
    let _srv = TcpServer::echo(hostnet_e2e::net::host_listener(sa(LO4, port)));
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
        hostnet_e2e::net::host_listener(sa(LO4, port)),
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
    // Warnings and errors only: with the reverse direction on, info lines about other tests'
    // host listeners coming and going are expected.
    let noisy = |b: &mut Bridge| {
        format!("{}{}", b.agent().stderr(), b.fwd().stderr())
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .count()
    };
    let log0 = noisy(&mut b);
    std::thread::sleep(Duration::from_secs(2));
    let log1 = noisy(&mut b);

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
        log1 - log0 < 5,
        "error storm: {} warning/error lines in 2 s once settled\n{d}",
        log1 - log0
    );
}

/// A host listener mirrored into the namespace must never come back onto the host: not on
/// [::1] (free on the host, so a reflected mirror would bind it), and not on 127.0.0.1 once the
/// host listener closes (the namespace mirror is removed rather than taking its place).
#[test]
fn reverse_mirror_is_not_reflected_back() {
    if !privileged("reverse_mirror_is_not_reflected_back") {
        return;
    }
    let mut b = Bridge::builder(Transport::Unix).reverse().start();
    let port = free_port();
    let l = hostnet_e2e::net::host_listener(sa(LO4, port));
    let mirrored = wait_until(after(Duration::from_secs(5)), || {
        b.ns.run(tcp_listeners).contains(&sa(LO4, port))
    });
    assert!(
        mirrored,
        "host 127.0.0.1:{port} not mirrored into the namespace\n{}",
        b.describe()
    );
    let ours = socket_inode(&l);
    let host_now = |p: u16| tcp_listeners_except(p, ours);
    // Watch for a while with the host listener open, then after closing it.
    let mut seen = Vec::new();
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(600) {
        for a in host_now(port) {
            if !seen.contains(&a) {
                seen.push(a);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(l);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(800) {
        for a in host_now(port) {
            if !seen.contains(&a) {
                seen.push(a);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let gone = wait_until(after(Duration::from_secs(2)), || {
        !b.ns.run(tcp_listeners).iter().any(|a| a.port() == port)
    });
    let d = b.describe();
    assert!(
        seen.is_empty(),
        "the namespace's reverse mirror of host 127.0.0.1:{port} was mirrored back onto the host: {seen:?}\n{d}"
    );
    assert!(
        gone,
        "the reverse mirror of {port} stayed in the namespace after the host closed it\n{d}"
    );
}

/// Short-lived host listeners (a port probed, a server restarting): once gone from the host,
/// nothing may take their port on the host — a reverse mirror in the namespace outliving the
/// host listener must not be reported back as a guest listener and mirrored onto the host.
#[test]
fn short_lived_host_listeners_are_not_reflected_back() {
    if !privileged("short_lived_host_listeners_are_not_reflected_back") {
        return;
    }
    let mut b = Bridge::builder(Transport::Unix).reverse().start();
    // The link is up once a guest-only port is mirrored.
    let marker = free_port();
    let _m = TcpServer::echo(b.ns.tcp_listener(sa(LO4, marker)).unwrap());
    b.expect_tcp(LO4, marker);
    let mut reflected = Vec::new();
    for round in 0..8u64 {
        let port = free_port();
        let l = hostnet_e2e::net::host_listener(sa(LO4, port));
        let ours = socket_inode(&l);
        std::thread::sleep(Duration::from_millis(40 + 20 * round));
        drop(l);
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(400) {
            let others = tcp_listeners_except(port, ours);
            if !others.is_empty() {
                reflected.push((round, port, others, hostnet_e2e::net::who_has(port)));
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    if !reflected.is_empty() {
        panic!(
            "{} of 8 short-lived host listeners came back onto the host after closing (a loop through the namespace): {reflected:?}\n{}",
            reflected.len(),
            b.describe()
        );
    }
}

/// Reverse direction data path: 16 MiB both ways at once with checksums from a namespace client
/// to a host server, and a host server's reset seen as a reset inside.
#[test]
fn reverse_bulk_and_reset() {
    if !privileged("reverse_bulk_and_reset") {
        return;
    }
    use hostnet_e2e::net::{Outcome, duplex, duplex_handler};
    let mut b = Bridge::builder(Transport::Unix).reverse().start();
    let (pd, pr) = (free_port(), free_port());
    let outcome: Outcome = Default::default();
    let len = 16u64 << 20;
    let _d = TcpServer::serve(
        hostnet_e2e::net::host_listener(sa(LO4, pd)),
        duplex_handler(500, len, outcome.clone()),
    );
    let _r = TcpServer::serve(hostnet_e2e::net::host_listener(sa(LO4, pr)), |mut s| {
        use std::io::Read;
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf);
        hostnet_e2e::net::set_linger_zero(&s);
    });
    let ok = wait_until(after(Duration::from_secs(5)), || {
        let l = b.ns.run(tcp_listeners);
        l.contains(&sa(LO4, pd)) && l.contains(&sa(LO4, pr))
    });
    assert!(
        ok,
        "host ports not mirrored into the namespace\n{}",
        b.describe()
    );
    let s = b.ns_connect(sa(LO4, pd)).unwrap();
    hostnet_e2e::net::set_timeouts(&s, Duration::from_secs(30));
    let client = duplex(s, 500, 501, len, "namespace client");
    let server_done = wait_until(after(Duration::from_secs(10)), || {
        !outcome.lock().unwrap().is_empty()
    });
    let server = outcome.lock().unwrap().first().cloned();
    if client.is_err() || !server_done || server.as_ref().is_some_and(|r| r.is_err()) {
        panic!(
            "reverse duplex: client {client:?}, server {server:?}\n{}",
            b.describe()
        );
    }
    let mut c = b.ns_connect(sa(LO4, pr)).unwrap();
    use std::io::Write;
    let r = c
        .write_all(b"hello")
        .and_then(|_| hostnet_e2e::net::read_to_end_or_err(&mut c));
    assert!(
        matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "host server reset; the namespace client should see ECONNRESET, got {r:?}\n{}",
        b.describe()
    );
}

/// The agent's side of the lifecycle: when the forwarder dies or goes silent, the reverse
/// mirrors in the namespace go (heartbeat timeout for a silent one), and come back when a
/// forwarder connects again.
#[test]
fn reverse_mirrors_follow_the_forwarder() {
    if !privileged("reverse_mirrors_follow_the_forwarder") {
        return;
    }
    let port = free_port();
    let _srv = TcpServer::echo(hostnet_e2e::net::host_listener(sa(LO4, port)));
    let mut b = Bridge::builder(Transport::Unix).reverse().start();
    let in_ns = |b: &Bridge| b.ns.run(tcp_listeners).contains(&sa(LO4, port));
    assert!(
        wait_until(after(Duration::from_secs(5)), || in_ns(&b)),
        "not mirrored into the namespace\n{}",
        b.describe()
    );
    // Silent forwarder (SIGSTOP): the agent's heartbeat timeout removes the mirrors.
    b.fwd().signal(nix::sys::signal::Signal::SIGSTOP);
    let t = std::time::Instant::now();
    let wait = hostnet_link::proto::HEARTBEAT_TIMEOUT + Duration::from_secs(3);
    let gone = wait_until(after(wait), || !in_ns(&b));
    let el = t.elapsed();
    b.fwd().signal(nix::sys::signal::Signal::SIGCONT);
    assert!(
        gone,
        "reverse mirror still in the namespace {wait:?} after the forwarder stopped\n{}",
        b.describe()
    );
    eprintln!("reverse mirror gone {el:?} after the forwarder stopped");
    // It comes back (the forwarder reconnects), then a killed forwarder removes it at once,
    // and a new forwarder brings it back.
    assert!(
        wait_until(after(Duration::from_secs(10)), || in_ns(&b)),
        "reverse mirror not back after SIGCONT\n{}",
        b.describe()
    );
    b.fwd().kill9();
    assert!(
        wait_until(after(Duration::from_secs(4)), || !in_ns(&b)),
        "reverse mirror still in the namespace 4 s after the forwarder was killed\n{}",
        b.describe()
    );
    b.start_forwarder();
    assert!(
        wait_until(after(Duration::from_secs(10)), || in_ns(&b)),
        "reverse mirror not back with a new forwarder\n{}",
        b.describe()
    );
    let mut s = b.ns_connect(sa(LO4, port)).unwrap();
    echo_on(&mut s, 3, 10_000).unwrap();
}

/// 300 namespace clients at once through a reverse mirror (each a dial-back stream), every one
/// a checksummed echo.
#[test]
fn reverse_three_hundred_concurrent() {
    if !privileged("reverse_three_hundred_concurrent") {
        return;
    }
    use std::io::{Read, Write};
    hostnet_e2e::raise_nofile();
    let port = free_port();
    let _srv = TcpServer::echo(hostnet_e2e::net::host_listener(sa(LO4, port)));
    let mut b = Bridge::builder(Transport::Unix).reverse().start();
    assert!(
        wait_until(after(Duration::from_secs(5)), || b
            .ns
            .run(tcp_listeners)
            .contains(&sa(LO4, port))),
        "not mirrored into the namespace\n{}",
        b.describe()
    );
    let n = 300;
    let conns: Vec<std::io::Result<std::net::TcpStream>> = b.ns.run(|| {
        (0..n)
            .map(|_| std::net::TcpStream::connect_timeout(&sa(LO4, port), Duration::from_secs(5)))
            .collect()
    });
    let mut failures = Vec::new();
    let mut open = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        match c {
            Ok(mut s) => {
                hostnet_e2e::net::set_timeouts(&s, Duration::from_secs(10));
                if let Err(e) = s.write_all(&hostnet_e2e::payload::payload(i as u64, 1000)) {
                    failures.push(format!("{i}: write {e}"));
                } else {
                    open.push((i, s));
                }
            }
            Err(e) => failures.push(format!("{i}: connect {e}")),
        }
    }
    for (i, s) in &mut open {
        let mut back = vec![0u8; 1000];
        match s.read_exact(&mut back) {
            Ok(()) if back == hostnet_e2e::payload::payload(*i as u64, 1000) => {}
            Ok(()) => failures.push(format!("{i}: echo differs")),
            Err(e) => failures.push(format!("{i}: read {e}")),
        }
    }
    if !failures.is_empty() {
        panic!(
            "{} of {n} reverse connections failed, first {:?}\n{}",
            failures.len(),
            &failures[..failures.len().min(5)],
            b.describe()
        );
    }
}
