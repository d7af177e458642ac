//! Faults: the agent killed mid-transfer, the forwarder restarted, a host port taken by another
//! process, stray garbage on the agent's socket, a wrong token.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::net::{
    ANY4, LO4, LO6, TcpServer, echo_check, free_port, is_timeout, sa, set_timeouts, tcp_listeners,
    try_connect,
};
use hostnet_e2e::payload::{Prng, payload};
use hostnet_e2e::{after, privileged, wait_until};
use hostnet_link::proto::HEARTBEAT_TIMEOUT;

/// Streams bytes until the peer goes away.
fn source_handler(mut s: TcpStream) {
    let mut p = Prng::new(5);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        p.fill(&mut buf);
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

#[test]
fn agent_killed_mid_transfer_then_restarted_over_unix() {
    agent_killed_mid_transfer_then_restarted(Transport::Unix);
}

#[test]
fn agent_killed_mid_transfer_then_restarted_over_tcp() {
    agent_killed_mid_transfer_then_restarted(Transport::Tcp);
}

#[test]
fn agent_killed_mid_transfer_then_restarted_over_quic() {
    agent_killed_mid_transfer_then_restarted(Transport::Quic);
}

/// How soon a restarted agent must be served again, counted from the moment it listens: a
/// lost session leaves no connection behind (QUIC's included), and the first reconnect
/// attempts come 100, 200, 400 ms apart.
const BACK_AFTER_RESTART: Duration = Duration::from_secs(2);

/// kill -9 of the agent while three clients stream through it: every client gets an error, the
/// host ports go within the heartbeat timeout, and a restarted agent is served again within
/// [`BACK_AFTER_RESTART`].
fn agent_killed_mid_transfer_then_restarted(t: Transport) {
    if !privileged(&format!(
        "agent_killed_mid_transfer_then_restarted over {t:?}"
    )) {
        return;
    }
    let mut b = Bridge::builder(t).start();
    let src = free_port();
    let echo = free_port();
    let _s = TcpServer::serve(b.ns.tcp_listener(sa(ANY4, src)).unwrap(), source_handler);
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, echo)).unwrap());
    b.expect_tcp(LO4, src);
    b.expect_tcp(LO6, echo);
    let mut clients: Vec<TcpStream> = (0..3)
        .map(|i| try_connect(sa(if i == 0 { LO6 } else { LO4 }, src)).unwrap())
        .collect();
    let mut buf = vec![0u8; 64 * 1024];
    for c in &mut clients {
        let mut got = 0;
        while got < 256 * 1024 {
            got += c.read(&mut buf).expect("streaming before the kill");
        }
    }
    b.agent().kill9();
    let killed = Instant::now();
    // Every client ends with an error (reset) — not a hang, not a clean EOF that would pass for
    // a complete transfer.
    let mut outcomes = Vec::new();
    for c in &mut clients {
        set_timeouts(c, Duration::from_secs(10));
        let r = loop {
            match c.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        outcomes.push((r, killed.elapsed()));
    }
    let bad: Vec<_> = outcomes
        .iter()
        .filter(|(r, _)| match r {
            Ok(()) => true,
            Err(e) => is_timeout(e),
        })
        .collect();
    assert!(
        bad.is_empty(),
        "after kill -9 of the agent, host clients must get a reset/error, got {outcomes:?}\n{}",
        b.describe()
    );
    // Host listeners go at once (the link's EOF), over QUIC within its idle timeout (6 s).
    let allowed = Duration::from_secs(if t == Transport::Quic { 8 } else { 5 });
    for ip in [LO4, LO6] {
        for p in [src, echo] {
            if b.wait_tcp_gone(ip, p, allowed).is_none() {
                panic!(
                    "{} still mirrored {allowed:?} after the agent was killed\n{}",
                    sa(ip, p),
                    b.describe()
                );
            }
        }
    }
    eprintln!(
        "after kill -9: client outcomes {outcomes:?}; listeners gone after {:?}",
        killed.elapsed()
    );
    // Restart the agent (stale socket file left by the killed one): everything comes back.
    b.start_agent();
    let restarted = Instant::now();
    let Some(back) = b.wait_tcp(LO4, echo, Duration::from_secs(10)) else {
        panic!(
            "{t:?}: 127.0.0.1:{echo} not back 10 s after the agent restarted\n{}",
            b.describe()
        );
    };
    eprintln!(
        "{t:?}: listeners back {:?} after the agent restarted",
        restarted.elapsed()
    );
    assert!(
        back <= BACK_AFTER_RESTART,
        "{t:?}: 127.0.0.1:{echo} back only {back:?} after the agent restarted (want <= {BACK_AFTER_RESTART:?})\n{}",
        b.describe()
    );
    b.expect_tcp(LO6, echo);
    echo_check(sa(LO4, echo), 6, 100_000).unwrap();
    echo_check(sa(LO6, echo), 7, 100_000).unwrap();
}

fn host_addrs(port: u16) -> Vec<std::net::SocketAddr> {
    let mut v: Vec<_> = tcp_listeners()
        .into_iter()
        .filter(|a| a.port() == port)
        .collect();
    v.sort();
    v
}

#[test]
fn forwarder_restart_converges_over_unix() {
    forwarder_restart_converges(Transport::Unix);
}

#[test]
fn forwarder_restart_converges_over_tcp() {
    forwarder_restart_converges(Transport::Tcp);
}

#[test]
fn forwarder_restart_converges_over_quic() {
    forwarder_restart_converges(Transport::Quic);
}

/// The forwarder stopped with SIGTERM, then three rounds of start and kill -9: each new
/// forwarder serves the guest's port on both loopbacks within [`BACK_AFTER_RESTART`] of its
/// start, and exactly those two host sockets exist.
fn forwarder_restart_converges(t: Transport) {
    if !privileged(&format!("forwarder_restart_converges over {t:?}")) {
        return;
    }
    let mut b = Bridge::builder(t).start();
    let port = free_port();
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    b.expect_tcp(LO6, port);
    // Graceful stop: exits promptly and frees the ports.
    let mut old = b.fwd.take().unwrap();
    let st = old.terminate(Duration::from_secs(3));
    assert!(
        st.is_some_and(|s| s.code().is_some()),
        "forwarder did not exit on SIGTERM within 3 s: {st:?}\n{}",
        old.describe()
    );
    assert!(host_addrs(port).is_empty());
    for round in 0..3 {
        b.start_forwarder();
        let Some(up) = b.wait_tcp(LO4, port, Duration::from_secs(10)) else {
            panic!(
                "{t:?} round {round}: 127.0.0.1:{port} not served 10 s after the forwarder started\n{}",
                b.describe()
            );
        };
        eprintln!("{t:?} round {round}: served {up:?} after the forwarder started");
        assert!(
            up <= BACK_AFTER_RESTART,
            "{t:?} round {round}: served only {up:?} after the forwarder started\n{}",
            b.describe()
        );
        b.expect_tcp(LO6, port);
        std::thread::sleep(Duration::from_millis(300));
        let want = vec![sa(LO4, port), sa(LO6, port)];
        assert_eq!(
            host_addrs(port),
            want,
            "round {round}: host listeners\n{}",
            b.describe()
        );
        if let Err(e) = echo_check(sa(LO4, port), round, 50_000) {
            panic!("round {round}: {e}\n{}", b.describe());
        }
        let entries = b.status_entries(port);
        assert!(
            !entries.is_empty(),
            "round {round}: status has no entry for {port}: {:?}",
            b.status_json()
        );
        // Then kill -9 (stale control socket left behind) and start again.
        b.fwd().kill9();
    }
}

#[test]
fn host_port_taken_then_freed() {
    if !privileged("host_port_taken_then_freed") {
        return;
    }
    let port = free_port();
    let blocker = TcpListener::bind(sa(LO4, port)).unwrap();
    let mut b = Bridge::unix();
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    // [::1] is free: mirrored.
    b.expect_tcp(LO6, port);
    echo_check(sa(LO6, port), 1, 10_000).unwrap();
    let conflict = wait_until(after(Duration::from_secs(5)), || {
        b.states(port)
            .iter()
            .any(|s| s == "conflict" || s == "retrying")
    });
    let status = b.status_json();
    if !conflict {
        panic!(
            "host 127.0.0.1:{port} is taken by another process: status should show a conflict for it, got {status:?}\n{}",
            b.describe()
        );
    }
    eprintln!("status with the port taken: {status:?}");
    let log = b.fwd().stderr();
    assert!(
        log.lines().any(|l| l.contains(&port.to_string())),
        "the forwarder's log does not mention the taken port {port}:\n{log}"
    );
    drop(blocker);
    let t = Instant::now();
    if b.wait_tcp(LO4, port, Duration::from_secs(10)).is_none() {
        panic!(
            "127.0.0.1:{port} not taken by the forwarder within 10 s of being freed; status {:?}\n{}",
            b.status_json(),
            b.describe()
        );
    }
    eprintln!("port taken {:?} after being freed", t.elapsed());
    echo_check(sa(LO4, port), 2, 10_000).unwrap();
    let active = wait_until(after(Duration::from_secs(3)), || {
        let s = b.states(port);
        !s.is_empty() && s.iter().all(|s| s == "active")
    });
    assert!(
        active,
        "status should be active for {port} once the port is free: {:?}",
        b.status_json()
    );
}

#[test]
fn stray_garbage_on_agent_socket_leaves_good_sessions_alone() {
    if !privileged("stray_garbage_on_agent_socket_leaves_good_sessions_alone") {
        return;
    }
    let mut b = Bridge::unix();
    let port = free_port();
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    // A long transfer runs while the strays come and go.
    let long = std::thread::spawn(move || echo_check(sa(LO4, port), 11, 8 << 20));
    let sock = b.dir.join("agent.sock");
    let mut strays = Vec::new();
    for i in 0..20u64 {
        let mut s = UnixStream::connect(&sock).expect("connect to the agent's socket");
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let junk = match i % 4 {
            0 => payload(i, 64 * 1024),
            1 => vec![0xff; 4096],
            2 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            _ => Vec::new(), // connect and stay silent
        };
        let _ = s.write_all(&junk);
        if i % 2 == 0 {
            let _ = s.shutdown(Shutdown::Write);
        }
        strays.push(s);
    }
    let r = long.join().unwrap();
    if let Err(e) = r {
        panic!("echo during the strays: {e}\n{}", b.describe());
    }
    // Still serving: existing and new ports.
    let p2 = free_port();
    let _e2 = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, p2)).unwrap());
    b.expect_tcp(LO4, p2);
    echo_check(sa(LO4, p2), 12, 100_000).unwrap();
    echo_check(sa(LO6, port), 13, 100_000).unwrap();
    assert!(b.agent().is_running(), "agent died\n{}", b.describe());
    // The agent does not keep the strays forever (handshake timeout): they are closed.
    let closed = wait_until(after(Duration::from_secs(15)), || {
        strays.iter_mut().all(|s| {
            s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) => return false,
                    Err(_) => return true,
                }
            }
        })
    });
    eprintln!("strays closed by the agent within 15 s: {closed}");
}

#[test]
fn wrong_token_gets_no_session_and_a_clear_log_line() {
    if !privileged("wrong_token_gets_no_session_and_a_clear_log_line") {
        return;
    }
    let mut b = Bridge::builder(Transport::Tcp).wrong_token().start();
    let port = free_port();
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    let mirrored = b.wait_tcp(LO4, port, Duration::from_secs(3));
    let d = b.describe();
    assert!(mirrored.is_none(), "mirrored despite a wrong token\n{d}");
    let logs = format!("{}\n{}", b.agent().stderr(), b.fwd().stderr()).to_lowercase();
    let line = logs
        .lines()
        .find(|l| l.contains("token") || l.contains("auth"));
    assert!(
        line.is_some(),
        "no log line mentions the token/authentication failure\n{d}"
    );
    eprintln!("log line: {}", line.unwrap());
    assert!(
        b.agent().is_running() && b.fwd().is_running(),
        "a process exited\n{d}"
    );
}

/// Refusing to relay a connection to the agent's tcp port without the token: a raw client sees
/// the connection closed, never a session.
#[test]
fn tcp_transport_rejects_tokenless_client() {
    if !privileged("tcp_transport_rejects_tokenless_client") {
        return;
    }
    let mut b = Bridge::builder(Transport::Tcp).start();
    let addr = sa(b.ns.ns_ip().into(), hostnet_e2e::bridge::AGENT_PORT);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    set_timeouts(&s, Duration::from_secs(15));
    let _ = s.write_all(&payload(1, 64));
    let mut buf = [0u8; 1024];
    let mut total = 0;
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(total),
            Ok(n) => total += n,
            Err(e) => break Err(e),
        }
    };
    assert!(
        !matches!(end, Err(ref e) if is_timeout(e)),
        "the agent kept a tokenless client open for 15 s\n{}",
        b.describe()
    );
    assert!(
        total <= 64,
        "the agent sent {total} bytes to a client that never authenticated"
    );
    // And a proper forwarder still gets through.
    let port = free_port();
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    echo_check(sa(LO4, port), 3, 10_000).unwrap();
}

/// A paused VM looks like a stopped agent: the link stays open but goes silent. The forwarder
/// must notice through the heartbeat timeout (15 s), close the host listeners, and converge again
/// once the agent runs again.
#[test]
fn stopped_agent_hits_heartbeat_timeout_then_recovers() {
    stopped_agent_recovers(Transport::Unix);
}

/// A paused VM, as QUIC sees it: the peer is silent but its connection is not closed.
#[test]
fn stopped_agent_hits_heartbeat_timeout_then_recovers_over_quic() {
    stopped_agent_recovers(Transport::Quic);
}

/// SIGSTOP of the agent (a paused VM): the heartbeat timeout closes the mirrored ports and
/// resets their connections; after SIGCONT the ports come back.
fn stopped_agent_recovers(t: Transport) {
    if !privileged(&format!(
        "stopped_agent_hits_heartbeat_timeout_then_recovers over {t:?}"
    )) {
        return;
    }
    let mut b = Bridge::builder(t).start();
    let port = free_port();
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    let mut held = try_connect(sa(LO4, port)).unwrap();
    hostnet_e2e::net::echo_on_open(&mut held, 20, 10_000).unwrap();
    b.agent().signal(nix::sys::signal::Signal::SIGSTOP);
    let t = Instant::now();
    let gone = b.wait_tcp_gone(LO4, port, HEARTBEAT_TIMEOUT + Duration::from_secs(3));
    // While the agent is still stopped: the connection that was open through the dead link must
    // have been reset (not closed cleanly: that would look like a complete answer).
    // (Read without writing first: a write would consume the pending ECONNRESET.)
    set_timeouts(&held, Duration::from_secs(3));
    let mut buf = [0u8; 16];
    let r = held.read(&mut buf);
    let d = b.describe();
    b.agent().signal(nix::sys::signal::Signal::SIGCONT);
    let Some(gone) = gone else {
        panic!(
            "127.0.0.1:{port} still mirrored {:?} after the agent stopped (heartbeat timeout {HEARTBEAT_TIMEOUT:?})\n{d}",
            HEARTBEAT_TIMEOUT + Duration::from_secs(3)
        );
    };
    assert!(
        gone >= Duration::from_millis(1500),
        "listeners closed after {gone:?}: faster than a heartbeat timeout could have noticed"
    );
    eprintln!(
        "stopped agent: listeners gone after {:?}; open connection: {r:?}",
        t.elapsed()
    );
    assert!(
        matches!(r, Err(ref e) if e.kind() == ErrorKind::ConnectionReset),
        "a connection over the timed-out link should be reset, got {r:?}\n{d}"
    );
    if b.wait_tcp(LO4, port, Duration::from_secs(10)).is_none() {
        panic!(
            "127.0.0.1:{port} not back 10 s after the agent continued\n{}",
            b.describe()
        );
    }
    echo_check(sa(LO4, port), 21, 100_000).unwrap();
}

/// UDP flows expire after the forwarder's `--udp-timeout` idle seconds (counted in its status;
/// the agent keeps its default, so the forwarder is the side that expires the flow) and a new datagram
/// after that opens a fresh flow.
#[test]
fn udp_flows_expire_when_idle() {
    if !privileged("udp_flows_expire_when_idle") {
        return;
    }
    let mut b = Bridge::builder(Transport::Unix)
        .fwd_args(["--udp-timeout", "1"])
        .start();
    let port = free_port();
    let echo = hostnet_e2e::net::UdpEcho::serve(b.ns.udp_socket(sa(ANY4, port)).unwrap());
    assert!(
        b.wait_udp(LO4, port, Duration::from_secs(5)).is_some(),
        "{}",
        b.describe()
    );
    let c = std::net::UdpSocket::bind(sa(LO4, 0)).unwrap();
    hostnet_e2e::net::udp_echo_check(&c, sa(LO4, port), b"one", Duration::from_secs(5)).unwrap();
    let expired = wait_until(after(Duration::from_secs(5)), || {
        b.status_json()
            .ok()
            .and_then(|v| v["counters"]["udp_flows_expired"].as_u64())
            .is_some_and(|n| n >= 1)
    });
    assert!(
        expired,
        "no UDP flow expired 5 s after going idle with --udp-timeout 1: {:?}",
        b.status_json()
    );
    hostnet_e2e::net::udp_echo_check(&c, sa(LO4, port), b"two", Duration::from_secs(5)).unwrap();
    // The guest saw two different flows' source addresses (the agent's sockets) or one reused;
    // either way every datagram arrived.
    assert!(echo.count.load(std::sync::atomic::Ordering::Relaxed) >= 2);
}

/// quic with a pinned certificate that is not the agent's: no session, a clear log line.
#[test]
fn wrong_quic_certificate_gets_no_session() {
    if !privileged("wrong_quic_certificate_gets_no_session") {
        return;
    }
    let mut b = Bridge::builder(Transport::Quic).wrong_cert().start();
    let port = free_port();
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    let mirrored = b.wait_tcp(LO4, port, Duration::from_secs(3));
    let d = b.describe();
    assert!(
        mirrored.is_none(),
        "mirrored although the forwarder pins another certificate\n{d}"
    );
    let logs = format!("{}\n{}", b.agent().stderr(), b.fwd().stderr()).to_lowercase();
    let line = logs
        .lines()
        .find(|l| l.contains("certificate") || l.contains("tls") || l.contains("handshake"));
    assert!(
        line.is_some(),
        "no log line explains the certificate mismatch\n{d}"
    );
    eprintln!("log line: {}", line.unwrap());
    assert!(
        b.agent().is_running() && b.fwd().is_running(),
        "a process exited\n{d}"
    );
}
