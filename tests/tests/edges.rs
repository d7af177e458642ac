//! Edge cases of the address policy, limits and backpressure (unix transport).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::net::{
    ANY4, ANY6, LO4, LO6, TcpServer, echo_check, free_port, read_tag, sa, set_timeouts,
    tag_handler, tcp_listeners, try_connect,
};
use hostnet_e2e::{after, privileged, wait_until};

/// A connection to `addr` must be reset, with nothing sent: at the first read, or already at
/// connect (on a busy machine the reset can arrive before the client's connect returns).
fn expect_reset(addr: SocketAddr) -> Result<(), String> {
    let mut s = match try_connect(addr) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
        Err(e) => return Err(format!("connect: {e}")),
    };
    set_timeouts(&s, Duration::from_secs(5));
    let mut one = [0u8; 1];
    match s.read(&mut one) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
        r => Err(format!("got {r:?}")),
    }
}

/// A guest `[::]:P` socket with IPV6_V6ONLY: mirrored on both host loopbacks (policy), and a
/// host client over 127.0.0.1 must still reach it (the agent dials ::1, the only loopback the
/// guest socket accepts).
#[test]
fn v6only_wildcard_guest_reached_from_host_127() {
    if !privileged("v6only_wildcard_guest_reached_from_host_127") {
        return;
    }
    let mut b = Bridge::unix();
    let port = free_port();
    let l = b.ns.run(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        s.set_only_v6(true).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&sa(ANY6, port).into()).unwrap();
        s.listen(128).unwrap();
        std::net::TcpListener::from(s)
    });
    let _srv = TcpServer::echo(l);
    b.expect_tcp(LO6, port);
    if let Err(e) = echo_check(sa(LO6, port), 1, 10_000) {
        panic!("via [::1]: {e}\n{}", b.describe());
    }
    // 127.0.0.1 is mirrored too (policy for [::]); when it is, it must work.
    if b.wait_tcp(LO4, port, Duration::from_secs(1)).is_some() {
        if let Err(e) = echo_check(sa(LO4, port), 2, 10_000) {
            panic!(
                "guest [::]:{port} (v6only) mirrored on 127.0.0.1:{port}, but a client there fails: {e}\n{}",
                b.describe()
            );
        }
    }
}

/// Different guest servers on 127.0.0.1:P and [::1]:P: each host loopback reaches its own.
#[test]
fn separate_v4_and_v6_loopback_guest_servers() {
    if !privileged("separate_v4_and_v6_loopback_guest_servers") {
        return;
    }
    let mut b = Bridge::unix();
    let port = free_port();
    let _v4 = TcpServer::serve(b.ns.tcp_listener(sa(LO4, port)).unwrap(), tag_handler("v4"));
    let _v6 = TcpServer::serve(b.ns.tcp_listener(sa(LO6, port)).unwrap(), tag_handler("v6"));
    b.expect_tcp(LO4, port);
    b.expect_tcp(LO6, port);
    std::thread::sleep(Duration::from_millis(300));
    let t4 = read_tag(sa(LO4, port));
    let t6 = read_tag(sa(LO6, port));
    let d = b.describe();
    assert_eq!(t4.as_deref(), Ok("v4"), "host 127.0.0.1:{port}\n{d}");
    assert_eq!(t6.as_deref(), Ok("v6"), "host [::1]:{port}\n{d}");
}

/// 100 guest listeners appearing at once are all mirrored promptly, and all go when closed.
#[test]
fn hundred_ports_at_once() {
    if !privileged("hundred_ports_at_once") {
        return;
    }
    let mut b = Bridge::unix();
    let ports: Vec<u16> = (0..100).map(|_| free_port()).collect();
    let listeners: Vec<_> = ports
        .iter()
        .map(|p| b.ns.tcp_listener(sa(ANY4, *p)).unwrap())
        .collect();
    let want: Vec<SocketAddr> = ports
        .iter()
        .flat_map(|p| [sa(LO4, *p), sa(LO6, *p)])
        .collect();
    let t = Instant::now();
    let all = wait_until(after(Duration::from_secs(5)), || {
        let h = tcp_listeners();
        want.iter().all(|a| h.contains(a))
    });
    if !all {
        let h = tcp_listeners();
        let missing: Vec<_> = want.iter().filter(|a| !h.contains(a)).collect();
        panic!(
            "{} of 200 host listeners missing after 5 s: {:?}...\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            b.describe()
        );
    }
    eprintln!("100 ports mirrored in {:?}", t.elapsed());
    drop(listeners);
    let t = Instant::now();
    let gone = wait_until(after(Duration::from_secs(5)), || {
        let h = tcp_listeners();
        !want.iter().any(|a| h.contains(a))
    });
    assert!(
        gone,
        "host listeners left 5 s after closing 100 guest ports\n{}",
        b.describe()
    );
    eprintln!("100 ports removed in {:?}", t.elapsed());
}

/// A guest server that never reads: the host client can only write a bounded amount (socket
/// buffers along the path), the relays do not buffer without limit.
#[test]
fn backpressure_bounds_buffering() {
    if !privileged("backpressure_bounds_buffering") {
        return;
    }
    let mut b = Bridge::unix();
    let port = free_port();
    let _srv = TcpServer::serve(b.ns.tcp_listener(sa(ANY4, port)).unwrap(), |s| {
        std::thread::sleep(Duration::from_secs(6));
        drop(s);
    });
    b.expect_tcp(LO4, port);
    let mut c = try_connect(sa(LO4, port)).unwrap();
    c.set_nonblocking(true).unwrap();
    let buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    let mut last_progress = Instant::now();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4)
        && last_progress.elapsed() < Duration::from_millis(800)
    {
        match c.write(&buf) {
            Ok(n) => {
                total += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("write: {e}\n{}", b.describe()),
        }
    }
    eprintln!(
        "a never-reading guest server absorbed {} MiB before the host client blocked",
        total >> 20
    );
    assert!(
        total < 128 << 20,
        "{} MiB accepted for a guest server that never reads: the relays buffer without bound\n{}",
        total >> 20,
        b.describe()
    );
}

/// Agent `--max-streams 3`: a 4th concurrent connection is refused with a reset (not a hang),
/// and once one closes a new one works.
#[test]
fn agent_stream_limit() {
    if !privileged("agent_stream_limit") {
        return;
    }
    let mut b = Bridge::builder(Transport::Unix)
        .agent_args(["--max-streams", "3"])
        .start();
    let port = free_port();
    let _srv = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    let mut held: Vec<TcpStream> = Vec::new();
    for i in 0..3 {
        let mut s = try_connect(sa(LO4, port))
            .unwrap_or_else(|e| panic!("connection {i}: connect: {e}\n{}", b.describe()));
        if let Err(e) = hostnet_e2e::net::echo_on_open(&mut s, i, 100) {
            panic!("connection {i} within the limit: {e}\n{}", b.describe());
        }
        held.push(s);
    }
    if let Err(e) = expect_reset(sa(LO4, port)) {
        panic!(
            "4th connection over --max-streams 3 should be reset: {e}\n{}",
            b.describe()
        );
    }
    drop(held.pop());
    let ok = wait_until(after(Duration::from_secs(3)), || {
        echo_check(sa(LO4, port), 9, 100).is_ok()
    });
    assert!(
        ok,
        "no connection possible after one of 3 closed\n{}",
        b.describe()
    );
}

/// Closing a listener does not end the connections it accepted: a relayed connection outlives
/// the guest listener's removal (and the host listener's).
#[test]
fn connection_outlives_its_guest_listener() {
    if !privileged("connection_outlives_its_guest_listener") {
        return;
    }
    let mut b = Bridge::unix();
    let port = free_port();
    let mut srv = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    let mut c = try_connect(sa(LO4, port)).unwrap();
    hostnet_e2e::net::echo_on_open(&mut c, 1, 10_000).unwrap();
    srv.close();
    assert!(
        b.wait_tcp_gone(LO4, port, Duration::from_secs(2)).is_some(),
        "host listener still there 2 s after the guest closed\n{}",
        b.describe()
    );
    std::thread::sleep(Duration::from_millis(200));
    if let Err(e) = hostnet_e2e::net::echo_on(&mut c, 2, 100_000) {
        panic!(
            "the connection accepted before the guest listener closed broke when the mirror went: {e}\n{}",
            b.describe()
        );
    }
}

/// Same for the reverse direction: a namespace client's connection to a host server outlives
/// the host listener's removal.
#[test]
fn reverse_connection_outlives_its_host_listener() {
    if !privileged("reverse_connection_outlives_its_host_listener") {
        return;
    }
    let mut b = Bridge::builder(Transport::Unix).reverse().start();
    let port = free_port();
    let mut srv = TcpServer::echo(hostnet_e2e::net::host_listener(sa(LO4, port)));
    assert!(
        wait_until(after(Duration::from_secs(5)), || b
            .ns
            .run(tcp_listeners)
            .contains(&sa(LO4, port))),
        "not mirrored into the namespace\n{}",
        b.describe()
    );
    let mut c = b.ns_connect(sa(LO4, port)).unwrap();
    hostnet_e2e::net::echo_on_open(&mut c, 1, 10_000).unwrap();
    srv.close();
    assert!(
        wait_until(after(Duration::from_secs(2)), || !b
            .ns
            .run(tcp_listeners)
            .contains(&sa(LO4, port))),
        "reverse mirror still there 2 s after the host listener closed\n{}",
        b.describe()
    );
    std::thread::sleep(Duration::from_millis(200));
    if let Err(e) = hostnet_e2e::net::echo_on(&mut c, 2, 100_000) {
        panic!(
            "the namespace's connection broke when the reverse mirror went: {e}\n{}",
            b.describe()
        );
    }
}

/// Holds 127.0.0.1:`port` in the namespace without listening (another guest program's socket,
/// not something to mirror).
fn hold_ns_port(b: &Bridge, port: u16) -> socket2::Socket {
    b.ns.run(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&sa(LO4, port).into()).unwrap();
        s
    })
}

/// A namespace port held by another guest program: the agent cannot bind the reverse mirror of
/// a host listener there, logs it, retries, and makes it as soon as the port frees.
#[test]
fn reverse_conflict_retried_until_freed() {
    if !privileged("reverse_conflict_retried_until_freed") {
        return;
    }
    let port = free_port();
    let _srv = TcpServer::echo(hostnet_e2e::net::host_listener(sa(LO4, port)));
    let mut b = Bridge::builder(Transport::Unix)
        .reverse()
        .without_forwarder()
        .start();
    let holder = hold_ns_port(&b, port);
    b.start_forwarder();
    let logged = wait_until(after(Duration::from_secs(5)), || {
        b.agent().stderr().lines().any(|l| {
            l.contains(&port.to_string()) && (l.contains("in use") || l.contains("conflict"))
        })
    });
    assert!(
        logged,
        "the agent's log should say that 127.0.0.1:{port} is taken in the namespace\n{}",
        b.describe()
    );
    drop(holder);
    let t = Instant::now();
    assert!(
        wait_until(after(Duration::from_secs(10)), || b
            .ns
            .run(tcp_listeners)
            .contains(&sa(LO4, port))),
        "reverse mirror not made within 10 s of the namespace port freeing; status {:?}\n{}",
        b.status_json(),
        b.describe()
    );
    eprintln!("reverse mirror made {:?} after the port freed", t.elapsed());
    let mut s = b.ns_connect(sa(LO4, port)).unwrap();
    hostnet_e2e::net::echo_on(&mut s, 4, 10_000).unwrap();
}

/// `status` shows the state of reverse mirrors too: a host listener whose port is taken inside
/// the namespace is a conflict with the agent's reason (the agent reports its bind results in
/// `MirrorState` messages), and becomes active once the namespace's holder frees the port (the
/// agent retries the bind with back-off, 200 ms doubling to 5 s).
#[test]
fn status_shows_reverse_conflict() {
    if !privileged("status_shows_reverse_conflict") {
        return;
    }
    let port = free_port();
    let _srv = TcpServer::echo(hostnet_e2e::net::host_listener(sa(LO4, port)));
    let mut b = Bridge::builder(Transport::Unix)
        .reverse()
        .without_forwarder()
        .start();
    let holder = hold_ns_port(&b, port);
    b.start_forwarder();
    let entry = |b: &Bridge| {
        b.status_json().ok().and_then(|v| {
            v["ports"].as_array().and_then(|a| {
                a.iter()
                    .find(|p| p["port"] == port && p["direction"] == "host->guest")
                    .cloned()
            })
        })
    };
    let conflict = wait_until(after(Duration::from_secs(5)), || {
        entry(&b).is_some_and(|e| e["state"] == "conflict")
    });
    let e = entry(&b);
    assert!(
        conflict,
        "the namespace's 127.0.0.1:{port} is taken: status should show the reverse mirror in conflict, got {e:?}\n{}",
        b.describe()
    );
    let e = e.unwrap_or_default();
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("in use") && reason.contains(&format!("127.0.0.1:{port}")),
        "the conflict's reason should name the VM address and the cause: {e}"
    );
    assert_eq!(e["host"][0]["addr"], format!("127.0.0.1:{port}"), "{e}");
    assert_eq!(e["host"][0]["state"], "conflict", "{e}");
    let table = b.status_text();
    assert!(
        table
            .lines()
            .any(|l| l.contains("host→guest") && l.contains("conflict: ")),
        "the table should show the conflict and its reason:\n{table}"
    );

    drop(holder);
    let t = Instant::now();
    let active = wait_until(after(Duration::from_secs(10)), || {
        entry(&b).is_some_and(|e| e["state"] == "active")
    });
    assert!(
        active,
        "the namespace's port was freed: the agent retries and status should show the mirror active within 10 s, got {:?}\n{}",
        entry(&b),
        b.describe()
    );
    eprintln!(
        "status showed the reverse mirror active {:?} after the port freed",
        t.elapsed()
    );
    let e = entry(&b).unwrap_or_default();
    assert!(
        e.get("reason").is_none(),
        "an active mirror has no reason: {e}"
    );
    assert_eq!(e["guest"][0], format!("127.0.0.1:{port}"), "{e}");
    let mut s = b.ns_connect(sa(LO4, port)).unwrap();
    hostnet_e2e::net::echo_on(&mut s, 5, 10_000).unwrap();
}

/// Garbage on the forwarder's control (status) socket does not hurt it.
#[test]
fn garbage_on_the_control_socket() {
    if !privileged("garbage_on_the_control_socket") {
        return;
    }
    let mut b = Bridge::unix();
    let port = free_port();
    let _srv = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    assert!(
        wait_until(after(Duration::from_secs(3)), || b.control().exists()),
        "no control socket"
    );
    for i in 0..10u64 {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(b.control()) {
            s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
            let _ = s.write_all(&hostnet_e2e::payload::payload(i, 1 << (i + 4)));
        }
    }
    assert!(b.fwd().is_running(), "forwarder died\n{}", b.describe());
    echo_check(sa(LO4, port), 1, 10_000).unwrap();
    assert!(
        b.status_json().is_ok(),
        "status after garbage: {:?}",
        b.status_json()
    );
}

fn v6only_listener(b: &Bridge, port: u16) -> std::net::TcpListener {
    b.ns.run(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        s.set_only_v6(true).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&sa(ANY6, port).into()).unwrap();
        s.listen(128).unwrap();
        std::net::TcpListener::from(s)
    })
}

/// A dual-socket guest server (0.0.0.0:P and [::]:P with V6ONLY, as nginx does): both map to
/// the same host addresses, which are bound once, show no conflict with themselves, and stay
/// while either guest socket remains.
#[test]
fn dual_socket_guest_server() {
    if !privileged("dual_socket_guest_server") {
        return;
    }
    let mut b = Bridge::unix();
    let port = free_port();
    let mut v4 = TcpServer::serve(
        b.ns.tcp_listener(sa(ANY4, port)).unwrap(),
        tag_handler("v4"),
    );
    let _v6 = TcpServer::serve(v6only_listener(&b, port), tag_handler("v6"));
    b.expect_tcp(LO4, port);
    b.expect_tcp(LO6, port);
    std::thread::sleep(Duration::from_millis(400));
    let host: Vec<_> = tcp_listeners()
        .into_iter()
        .filter(|a| a.port() == port)
        .collect();
    let states = b.states(port);
    let d = format!("host listeners {host:?}; status {:?}", b.status_json());
    assert_eq!(host.len(), 2, "{d}");
    assert!(
        states.iter().all(|s| s == "active"),
        "the forwarder conflicts with itself over a dual-socket guest server: {d}\n{}",
        b.describe()
    );
    assert!(
        read_tag(sa(LO4, port)).is_ok_and(|t| t == "v4" || t == "v6"),
        "{d}"
    );
    assert!(
        read_tag(sa(LO6, port)).is_ok_and(|t| t == "v4" || t == "v6"),
        "{d}"
    );
    // The v4 socket goes; [::] (v6only) still maps to both host loopbacks.
    v4.close();
    std::thread::sleep(Duration::from_millis(600));
    let host: Vec<_> = tcp_listeners()
        .into_iter()
        .filter(|a| a.port() == port)
        .collect();
    let d = format!("host listeners {host:?}; status {:?}", b.status_json());
    let t6 = read_tag(sa(LO6, port));
    assert_eq!(
        t6.as_deref(),
        Ok("v6"),
        "via [::1] after the v4 socket closed: {d}\n{}",
        b.describe()
    );
    if host.contains(&sa(LO4, port)) {
        let t4 = read_tag(sa(LO4, port));
        assert_eq!(
            t4.as_deref(),
            Ok("v6"),
            "host 127.0.0.1:{port} still mirrored after the guest's v4 socket closed, so it must reach the v6only one: {d}\n{}",
            b.describe()
        );
    }
}

/// Forwarder `--max-streams 3`: a 4th concurrent connection is reset and counted in status.
#[test]
fn forwarder_stream_limit_is_counted() {
    if !privileged("forwarder_stream_limit_is_counted") {
        return;
    }
    let mut b = Bridge::builder(Transport::Unix)
        .fwd_args(["--max-streams", "3"])
        .start();
    let port = free_port();
    let _srv = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    let mut held = Vec::new();
    for i in 0..3 {
        let mut s = try_connect(sa(LO4, port))
            .unwrap_or_else(|e| panic!("connection {i}: connect: {e}\n{}", b.describe()));
        if let Err(e) = hostnet_e2e::net::echo_on_open(&mut s, i, 100) {
            panic!("connection {i} within the limit: {e}\n{}", b.describe());
        }
        held.push(s);
    }
    if let Err(e) = expect_reset(sa(LO4, port)) {
        panic!(
            "4th connection over --max-streams 3 should be reset: {e}\n{}",
            b.describe()
        );
    }
    let counters = b.status_json().unwrap()["counters"].clone();
    assert!(
        counters["streams_refused"].as_u64().unwrap_or(0) >= 1,
        "streams_refused not counted: {counters}"
    );
    drop(held);
}

/// Forwarder `--max-udp-flows 4`: 8 UDP clients one after the other each get their echo (the
/// least recently used flows are evicted), and the evictions are counted.
#[test]
fn forwarder_udp_flow_limit_evicts() {
    if !privileged("forwarder_udp_flow_limit_evicts") {
        return;
    }
    let mut b = Bridge::builder(Transport::Unix)
        .fwd_args(["--max-udp-flows", "4"])
        .start();
    let up = free_port();
    let _e = hostnet_e2e::net::UdpEcho::serve(b.ns.udp_socket(sa(ANY4, up)).unwrap());
    assert!(b.wait_udp(LO4, up, Duration::from_secs(5)).is_some());
    let clients: Vec<_> = (0..8)
        .map(|_| std::net::UdpSocket::bind(sa(LO4, 0)).unwrap())
        .collect();
    for (i, c) in clients.iter().enumerate() {
        if let Err(e) = hostnet_e2e::net::udp_echo_check(
            c,
            sa(LO4, up),
            format!("client {i}").as_bytes(),
            Duration::from_secs(5),
        ) {
            panic!(
                "UDP client {i} with --max-udp-flows 4: {e}\n{}",
                b.describe()
            );
        }
    }
    let counters = b.status_json().unwrap()["counters"].clone();
    assert!(
        counters["udp_flows_evicted"].as_u64().unwrap_or(0) >= 4,
        "8 flows with --max-udp-flows 4 should evict at least 4: {counters}"
    );
    assert!(b.fwd().is_running());
}
