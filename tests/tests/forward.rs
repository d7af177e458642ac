//! Forward direction over the unix transport: guest servers in the namespace reached from the
//! host's loopback (the `nc localhost 8000` workflow).

use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use hostnet_e2e::bridge::Bridge;
use hostnet_e2e::net::{
    ANY4, LO4, LO6, TcpServer, echo_on, free_port, sa, tcp_listeners, try_connect,
};
use hostnet_e2e::payload::payload;
use hostnet_e2e::{privileged, scenario};

#[test]
fn wildcard_and_loopback_guest_listeners_reach_host_v4_and_v6() {
    if !privileged("wildcard_and_loopback_guest_listeners_reach_host_v4_and_v6") {
        return;
    }
    let mut b = Bridge::unix();
    scenario::reach_all(&mut b);
}

#[test]
fn sixty_four_mib_both_ways_at_once() {
    if !privileged("sixty_four_mib_both_ways_at_once") {
        return;
    }
    let mut b = Bridge::unix();
    scenario::duplex_through(&mut b, LO4, 64 << 20);
}

#[test]
fn half_close_both_ways_round() {
    if !privileged("half_close_both_ways_round") {
        return;
    }
    let mut b = Bridge::unix();
    scenario::half_close(&mut b);
}

#[test]
fn guest_reset_reaches_host_client_as_reset() {
    if !privileged("guest_reset_reaches_host_client_as_reset") {
        return;
    }
    let mut b = Bridge::unix();
    scenario::reset_from_guest(&mut b);
}

#[test]
fn five_hundred_concurrent_connections() {
    if !privileged("five_hundred_concurrent_connections") {
        return;
    }
    let mut b = Bridge::unix();
    scenario::concurrent(&mut b, 500);
}

/// A host connection to a mirrored port whose guest server has just closed: the agent's connect
/// is refused, so the host client must see a reset (or, if the host listener is already gone,
/// a refused connect) — never a clean EOF that looks like an empty answer.
#[test]
fn refused_in_guest_resets_host_client() {
    if !privileged("refused_in_guest_resets_host_client") {
        return;
    }
    let mut b = Bridge::unix();
    let mut resets = 0;
    let mut refusals = 0;
    for round in 0..5 {
        let port = free_port();
        let mut srv = TcpServer::echo(b.ns.tcp_listener(sa(LO4, port)).unwrap());
        b.expect_tcp(LO4, port);
        srv.close();
        match scenario::connect_raw(sa(LO4, port)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => refusals += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => resets += 1,
            Err(e) => panic!("round {round}: connect: {e}"),
            Ok(mut s) => match scenario::poke(&mut s) {
                Err(e) if e.kind() == ErrorKind::ConnectionReset => resets += 1,
                other => panic!(
                    "round {round}: connection to a mirrored port whose guest server is closed: expected a reset, got {other:?}\n{}",
                    b.describe()
                ),
            },
        }
    }
    eprintln!(
        "refused guest port: {resets} resets, {refusals} refused connects (listener already gone)"
    );
}

/// Listeners appear on the host within 200 ms of the guest binding and disappear within 200 ms
/// of it closing (asserted with a generous 2 s; the measured times are printed).
#[test]
fn discovery_timing() {
    if !privileged("discovery_timing") {
        return;
    }
    let mut b = Bridge::unix();
    // Let the link come up first (a first mirrored port).
    let warm = free_port();
    let _w = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, warm)).unwrap());
    b.expect_tcp(LO4, warm);
    let mut times = Vec::new();
    for _ in 0..5 {
        let port = free_port();
        let mut srv = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
        let up = b.wait_tcp(LO4, port, Duration::from_secs(2));
        let Some(up) = up else {
            panic!("127.0.0.1:{port} not mirrored within 2 s\n{}", b.describe());
        };
        let mut s = try_connect(sa(LO6, port)).unwrap();
        echo_on(&mut s, 9, 1000).unwrap();
        srv.close();
        let Some(down) = b.wait_tcp_gone(LO4, port, Duration::from_secs(2)) else {
            panic!(
                "127.0.0.1:{port} still listening 2 s after the guest closed; host listeners: {:?}\n{}",
                tcp_listeners()
                    .into_iter()
                    .filter(|a| a.port() == port)
                    .collect::<Vec<_>>(),
                b.describe()
            );
        };
        assert!(
            b.wait_tcp_gone(LO6, port, Duration::from_secs(2)).is_some(),
            "[::1]:{port} still listening 2 s after the guest closed"
        );
        times.push((up, down));
    }
    eprintln!("discovery (appear, disappear): {times:?}");
}

/// `status --json` describes a mirrored port: direction, proto, guest address, host addresses
/// with their state, open connections and bytes each way; `status` prints a table with it.
#[test]
fn status_reports_a_mirrored_port() {
    if !privileged("status_reports_a_mirrored_port") {
        return;
    }
    let mut b = Bridge::unix();
    let port = free_port();
    let _e = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    b.expect_tcp(LO6, port);
    let mut held = try_connect(sa(LO4, port)).unwrap();
    held.write_all(&payload(1, 5000)).unwrap();
    let mut back = [0u8; 5000];
    held.read_exact(&mut back).unwrap();
    let v = b.status_json().unwrap();
    let ports: Vec<&serde_json::Value> = v["ports"]
        .as_array()
        .map(|a| a.iter().filter(|p| p["port"] == port).collect())
        .unwrap_or_default();
    let d = format!("status: {v}");
    assert_eq!(ports.len(), 1, "one entry for port {port}: {d}");
    let p = ports[0];
    assert_eq!(p["proto"], "tcp", "{d}");
    assert_eq!(p["direction"], "guest->host", "{d}");
    assert_eq!(p["state"], "active", "{d}");
    assert!(
        p["guest"].to_string().contains(&format!("0.0.0.0:{port}")),
        "guest address: {d}"
    );
    let mut hosts: Vec<String> = p["host"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            format!(
                "{} {}",
                h["addr"].as_str().unwrap_or("?"),
                h["state"].as_str().unwrap_or("?")
            )
        })
        .collect();
    hosts.sort();
    assert_eq!(
        hosts,
        vec![
            format!("127.0.0.1:{port} active"),
            format!("[::1]:{port} active")
        ],
        "{d}"
    );
    assert_eq!(p["connections"], 1, "one connection open: {d}");
    assert!(
        p["bytes_to_guest"].as_u64().unwrap_or(0) >= 5000
            && p["bytes_from_guest"].as_u64().unwrap_or(0) >= 5000,
        "bytes each way: {d}"
    );
    let table = b.status_text();
    assert!(
        table.contains(&port.to_string()) && table.to_lowercase().contains("active"),
        "status table:\n{table}"
    );
    drop(held);
    let closed = hostnet_e2e::wait_until(hostnet_e2e::after(Duration::from_secs(3)), || {
        b.status_entries(port)
            .iter()
            .any(|e| e.get("connections") == Some(&serde_json::json!(0)))
    });
    assert!(
        closed,
        "connections back to 0 after close: {:?}",
        b.status_json()
    );
}

/// `hostnet-agent ports --json` inside the namespace lists what discovery sees (wildcard and
/// loopback listeners, TCP and UDP), and not the veth-bound one.
#[test]
fn agent_ports_lists_namespace_listeners() {
    if !privileged("agent_ports_lists_namespace_listeners") {
        return;
    }
    let ns = hostnet_e2e::netns::Netns::with_veth().unwrap();
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let _t = ns.tcp_listener(sa(ANY4, p1)).unwrap();
    let _u = ns.udp_socket(sa(LO6, p2)).unwrap();
    let _v = ns.tcp_listener(sa(ns.ns_ip().into(), p3)).unwrap();
    let out = ns
        .command(hostnet_e2e::process::bin("hostnet-agent"))
        .args(["ports", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ports --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let has = |proto: &str, addr: &str, port: u16| {
        v.as_array().is_some_and(|a| {
            a.iter()
                .any(|l| l["proto"] == proto && l["addr"] == addr && l["port"] == port)
        })
    };
    assert!(has("tcp", "0.0.0.0", p1), "{v}");
    assert!(has("udp", "::1", p2), "{v}");
    assert!(
        !v.to_string().contains(&format!("\"port\":{p3}")),
        "a listener on the veth address is not the agent's to report: {v}"
    );
}

#[test]
fn host_reset_reaches_guest_server_as_reset() {
    if !privileged("host_reset_reaches_guest_server_as_reset") {
        return;
    }
    let mut b = Bridge::unix();
    scenario::reset_from_host(&mut b);
}

#[test]
fn udp_datagram_sizes() {
    if !privileged("udp_datagram_sizes") {
        return;
    }
    let mut b = Bridge::unix();
    scenario::udp_sizes(&mut b);
}

/// `--deny` on the agent: the port is neither reported nor relayed; `--allow`: only those.
#[test]
fn agent_allow_and_deny() {
    if !privileged("agent_allow_and_deny") {
        return;
    }
    let (p_ok, p_denied, p_outside) = (free_port(), free_port(), free_port());
    let mut b = Bridge::builder(hostnet_e2e::bridge::Transport::Unix)
        .agent_args([
            "--allow".to_string(),
            format!("{p_ok},{p_denied}"),
            "--deny".to_string(),
            p_denied.to_string(),
        ])
        .start();
    let _a = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, p_ok)).unwrap());
    let _b = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, p_denied)).unwrap());
    let _c = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, p_outside)).unwrap());
    b.expect_tcp(LO4, p_ok);
    hostnet_e2e::net::echo_check(sa(LO4, p_ok), 1, 1000).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let host = tcp_listeners();
    for p in [p_denied, p_outside] {
        assert!(
            !host.iter().any(|a| a.port() == p),
            "port {p} mirrored despite --allow {p_ok},{p_denied} --deny {p_denied}\n{}",
            b.describe()
        );
    }
}
