//! The reverse direction under the user's rules (`--reverse-allow`, `--reverse-deny`,
//! `HOSTNET_REVERSE_*`, `--reverse-rules FILE` re-read on SIGHUP): host servers reached from
//! inside the namespace when allowed, never mirrored there when denied, shown as `denied` in
//! `status`; a port denied while its mirror is up is closed in the namespace, its open
//! connections are reset and a dial-back to it is refused.

use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::net::{
    LO4, TcpServer, UdpEcho, echo_on, echo_on_open, free_port, host_listener, host_udp, sa,
    tcp_listeners, udp_bound, udp_echo_check,
};
use hostnet_e2e::{after, privileged, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The host→guest row of `status --json` for `proto`/`port`.
fn reverse_row(b: &Bridge, proto: &str, port: u16) -> Option<Value> {
    let doc = b.status_json().ok()?;
    doc["ports"].as_array()?.iter().find_map(|r| {
        (r["direction"] == "host->guest" && r["proto"] == proto && r["port"] == port)
            .then(|| r.clone())
    })
}

/// Waits (5 s) for the host→guest row of `proto`/`port` to be `denied`; its reason.
fn expect_denied(b: &mut Bridge, proto: &str, port: u16) -> String {
    let mut row = None;
    let ok = wait_until(after(Duration::from_secs(5)), || {
        row = reverse_row(b, proto, port);
        row.as_ref().is_some_and(|r| r["state"] == "denied")
    });
    if !ok {
        panic!(
            "status shows no denied {proto} row for port {port} (last: {row:?})\n{}\n{}",
            b.status_text(),
            b.describe()
        );
    }
    row.unwrap()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn ns_has_tcp(b: &Bridge, port: u16) -> bool {
    b.ns.run(tcp_listeners).iter().any(|a| a.port() == port)
}

/// Waits (5 s) until the namespace has a TCP listener on 127.0.0.1:port.
fn expect_mirrored(b: &mut Bridge, port: u16) {
    if !wait_until(after(Duration::from_secs(5)), || {
        b.ns.run(tcp_listeners).contains(&sa(LO4, port))
    }) {
        panic!(
            "host 127.0.0.1:{port} not mirrored into the namespace within 5 s\n{}\n{}",
            b.status_text(),
            b.describe()
        );
    }
}

/// Watches the namespace for a while: no TCP listener on `port` may show up.
fn never_mirrored(b: &mut Bridge, port: u16, watch: Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < watch {
        if ns_has_tcp(b, port) {
            panic!(
                "denied host port {port} was mirrored into the namespace\n{}\n{}",
                b.status_text(),
                b.describe()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A connect from inside the namespace is refused (nothing listens there).
fn ns_refused(b: &Bridge, addr: SocketAddr) -> bool {
    matches!(b.ns_connect(addr), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

fn write_rules(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn counter(b: &Bridge, name: &str) -> u64 {
    b.status_json()
        .ok()
        .and_then(|v| v["counters"][name].as_u64())
        .unwrap_or(0)
}

/// `--reverse-allow` with a port that `--reverse-deny` takes back for TCP only: the allowed
/// port is mirrored and carries a checksummed echo, the denied TCP port and a port outside the
/// allow list are never mirrored (refused inside, `denied` in status with the rule), and the
/// UDP port of the same number as the denied TCP one is mirrored (the rule is per protocol).
#[test]
fn allowed_ports_are_mirrored_denied_ones_are_not() {
    if !privileged("allowed_ports_are_mirrored_denied_ones_are_not") {
        return;
    }
    let (pa, pd, po) = (free_port(), free_port(), free_port());
    let _a = TcpServer::echo(host_listener(sa(LO4, pa)));
    let _d = TcpServer::echo(host_listener(sa(LO4, pd)));
    let _du = UdpEcho::serve(host_udp(sa(LO4, pd)));
    let _o = TcpServer::echo(host_listener(sa(LO4, po)));
    let mut b = Bridge::builder(Transport::Unix)
        .reverse()
        .fwd_args([
            "--reverse-allow".to_owned(),
            format!("{pa},{pd}"),
            "--reverse-deny".to_owned(),
            format!("tcp:{pd}"),
        ])
        .start();
    expect_mirrored(&mut b, pa);
    let udp_up = wait_until(after(Duration::from_secs(5)), || {
        b.ns.run(udp_bound).contains(&sa(LO4, pd))
    });
    assert!(
        udp_up,
        "UDP 127.0.0.1:{pd} (allowed: the deny rule is TCP only) not mirrored\n{}",
        b.describe()
    );
    let mut s = b.ns_connect(sa(LO4, pa)).unwrap();
    if let Err(e) = echo_on(&mut s, 11, 1 << 20) {
        panic!("namespace -> allowed host port {pa}: {e}\n{}", b.describe());
    }
    let u = b.ns.udp_socket(sa(LO4, 0)).unwrap();
    if let Err(e) = udp_echo_check(&u, sa(LO4, pd), b"udp is allowed", Duration::from_secs(5)) {
        panic!("namespace -> host UDP {pd}: {e}\n{}", b.describe());
    }
    assert_eq!(
        expect_denied(&mut b, "tcp", pd),
        format!("--reverse-deny tcp:{pd}")
    );
    assert_eq!(
        expect_denied(&mut b, "tcp", po),
        format!("not in --reverse-allow {pa},{pd}")
    );
    never_mirrored(&mut b, pd, Duration::from_millis(500));
    assert!(!ns_has_tcp(&b, po), "port {po} mirrored\n{}", b.describe());
    assert!(ns_refused(&b, sa(LO4, pd)), "namespace connect to {pd}");
    assert!(ns_refused(&b, sa(LO4, po)), "namespace connect to {po}");
    let udp_state = reverse_row(&b, "udp", pd).map(|r| r["state"].clone());
    assert!(
        udp_state.as_ref().is_some_and(|s| s != "denied"),
        "udp {pd} row: {udp_state:?}"
    );
    let rules = b.status_json().unwrap()["reverse_rules"]["rules"].clone();
    assert_eq!(
        rules,
        format!("--reverse-allow {pa},{pd}; --reverse-deny tcp:{pd}")
    );
    let table = b.status_text();
    assert!(
        table.contains(&format!("denied: --reverse-deny tcp:{pd}")),
        "{table}"
    );
}

/// The rules from the environment (`HOSTNET_REVERSE_DENY`, as a service file sets them), and a
/// port no rule names next to the denied one: mirrored as by default.
#[test]
fn deny_from_the_environment_leaves_other_ports_mirrored() {
    if !privileged("deny_from_the_environment_leaves_other_ports_mirrored") {
        return;
    }
    let (pd, pf) = (free_port(), free_port());
    let _d = TcpServer::echo(host_listener(sa(LO4, pd)));
    let _f = TcpServer::echo(host_listener(sa(LO4, pf)));
    let mut b = Bridge::builder(Transport::Unix)
        .reverse()
        .fwd_env("HOSTNET_REVERSE_DENY", pd.to_string())
        .start();
    expect_mirrored(&mut b, pf);
    let mut s = b.ns_connect(sa(LO4, pf)).unwrap();
    if let Err(e) = echo_on(&mut s, 12, 256 << 10) {
        panic!("namespace -> host port {pf}: {e}\n{}", b.describe());
    }
    assert_eq!(
        expect_denied(&mut b, "tcp", pd),
        format!("--reverse-deny {pd}")
    );
    never_mirrored(&mut b, pd, Duration::from_millis(300));
    assert!(ns_refused(&b, sa(LO4, pd)));
}

/// No rules: every host listener is mirrored (the default, as before the rules existed).
#[test]
fn without_rules_every_port_is_mirrored() {
    if !privileged("without_rules_every_port_is_mirrored") {
        return;
    }
    let p = free_port();
    let _s = TcpServer::echo(host_listener(sa(LO4, p)));
    let mut b = Bridge::builder(Transport::Unix).reverse().start();
    expect_mirrored(&mut b, p);
    let mut s = b.ns_connect(sa(LO4, p)).unwrap();
    if let Err(e) = echo_on(&mut s, 13, 1 << 20) {
        panic!("namespace -> host port {p}: {e}\n{}", b.describe());
    }
    let row = reverse_row(&b, "tcp", p).expect("a host->guest row");
    assert_ne!(row["state"], "denied", "{row}");
    assert_eq!(
        b.status_json().unwrap()["reverse_rules"]["rules"],
        "all ports"
    );
}

/// `--reverse-rules FILE` and SIGHUP: a port denied while its mirror is up is closed in the
/// namespace, the connection open through it is reset, a new one is refused; the other port
/// carries on. A file that does not parse keeps the rules (and says so in status); allowed
/// again, the port is mirrored again.
#[test]
fn a_port_denied_while_mirrored_is_closed_and_its_connections_reset() {
    if !privileged("a_port_denied_while_mirrored_is_closed_and_its_connections_reset") {
        return;
    }
    let (p, q) = (free_port(), free_port());
    let _p = TcpServer::echo(host_listener(sa(LO4, p)));
    let _q = TcpServer::echo(host_listener(sa(LO4, q)));
    let dir = hostnet_e2e::TempDir::new("reverse-rules").unwrap();
    let rules = dir.join("rules");
    write_rules(&rules, "# nothing denied yet\n");
    let mut b = Bridge::builder(Transport::Unix)
        .reverse()
        .fwd_args(["--reverse-rules".to_owned(), rules.display().to_string()])
        .start();
    expect_mirrored(&mut b, p);
    expect_mirrored(&mut b, q);
    let mut open = b.ns_connect(sa(LO4, p)).unwrap();
    echo_on_open(&mut open, 14, 64 << 10).unwrap();
    let mut other = b.ns_connect(sa(LO4, q)).unwrap();
    echo_on_open(&mut other, 15, 64 << 10).unwrap();

    write_rules(&rules, &format!("deny tcp:{p}\n"));
    b.fwd().signal(Signal::SIGHUP);
    let gone = wait_until(after(Duration::from_secs(5)), || !ns_has_tcp(&b, p));
    assert!(
        gone,
        "the mirror of {p} is still in the namespace 5 s after SIGHUP\n{}",
        b.describe()
    );
    let r = open
        .write_all(b"more")
        .and_then(|()| hostnet_e2e::net::read_to_end_or_err(&mut open));
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the connection open through the denied port: {r:?} (want a reset)\n{}",
        b.describe()
    );
    assert!(ns_refused(&b, sa(LO4, p)), "a new connect to {p}");
    assert_eq!(
        expect_denied(&mut b, "tcp", p),
        format!("deny tcp:{p} in {}", rules.display())
    );
    assert!(counter(&b, "dial_backs_denied") >= 1, "{}", b.status_text());
    let log = b.fwd().stderr();
    assert!(
        log.contains("reverse rules reloaded")
            && log.contains("the reverse rules now deny this port; dial-back relay reset")
            && log.contains(&format!("deny tcp:{p} in ")),
        "the forwarder's log says what was reset and why:\n{log}"
    );
    echo_on(&mut other, 16, 64 << 10).unwrap();
    assert!(b.fwd().is_running(), "{}", b.describe());

    // A file that does not parse: the rules stay, status says why.
    write_rules(&rules, "deny tcp:0\n");
    b.fwd().signal(Signal::SIGHUP);
    let mut doc = Value::Null;
    let reported = wait_until(after(Duration::from_secs(5)), || {
        doc = b.status_json().unwrap_or_default();
        doc["reverse_rules"]["reload_error"].is_string()
    });
    assert!(reported, "no reload error in status: {doc}");
    assert!(
        doc["reverse_rules"]["reload_error"]
            .as_str()
            .unwrap()
            .contains("line 1"),
        "{doc}"
    );
    assert_eq!(reverse_row(&b, "tcp", p).unwrap()["state"], "denied");
    assert!(b.status_text().contains("reverse rules reload failed"));

    // Allowed again.
    write_rules(&rules, "");
    b.fwd().signal(Signal::SIGHUP);
    expect_mirrored(&mut b, p);
    let mut s = b.ns_connect(sa(LO4, p)).unwrap();
    echo_on(&mut s, 17, 256 << 10).unwrap();
    assert!(
        b.status_json().unwrap()["reverse_rules"]["reload_error"].is_null(),
        "{}",
        b.status_text()
    );
}

/// A dial-back that reaches the forwarder after the port was denied is refused at dial time,
/// even though the agent had accepted the guest's connection on a mirror that was still up:
/// the forwarder is stopped (SIGSTOP) while a namespace client connects and the agent asks for
/// the dial-back, and the rules change (SIGHUP, delivered on SIGCONT) before it reads the
/// request. The client is reset, and status counts the refusal.
#[test]
fn a_dial_back_after_the_port_is_denied_is_refused() {
    if !privileged("a_dial_back_after_the_port_is_denied_is_refused") {
        return;
    }
    let p = free_port();
    let _p = TcpServer::echo(host_listener(sa(LO4, p)));
    let dir = hostnet_e2e::TempDir::new("reverse-rules").unwrap();
    let rules = dir.join("rules");
    write_rules(&rules, "");
    let mut b = Bridge::builder(Transport::Unix)
        .reverse()
        .fwd_args(["--reverse-rules".to_owned(), rules.display().to_string()])
        .start();
    expect_mirrored(&mut b, p);
    let served_before = counter(&b, "dial_backs");
    b.fwd().signal(Signal::SIGSTOP);
    let mut c = b.ns_connect(sa(LO4, p)).unwrap();
    // The agent has accepted the connection (its socket has an owner) and so asks for the
    // dial-back, which waits in the stopped forwarder's socket.
    let accepted = wait_until(after(Duration::from_secs(2)), || {
        let out =
            b.ns.command("ss")
                .args(["-Htnp", "state", "established"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
        out.lines()
            .any(|l| l.contains(&format!("127.0.0.1:{p} ")) && l.contains("hostnet-agent"))
    });
    write_rules(&rules, &format!("deny {p}\n"));
    b.fwd().signal(Signal::SIGHUP);
    b.fwd().signal(Signal::SIGCONT);
    assert!(
        accepted,
        "the agent did not accept the namespace client\n{}",
        b.describe()
    );
    let r = c
        .write_all(b"hello")
        .and_then(|()| hostnet_e2e::net::read_to_end_or_err(&mut c));
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the namespace client of the denied port: {r:?} (want a reset)\n{}",
        b.describe()
    );
    let mut denied = 0;
    let counted = wait_until(after(Duration::from_secs(5)), || {
        denied = counter(&b, "dial_backs_denied");
        denied >= 1
    });
    assert!(
        counted,
        "no dial-back counted as denied\n{}\n{}",
        b.status_text(),
        b.describe()
    );
    let log = b.fwd().stderr();
    assert!(
        log.contains(&format!("deny {p} in "))
            && (log.contains("dial-back to a port the reverse rules deny; forbidden")
                || log.contains("the reverse rules now deny this port")),
        "the forwarder's log names the refusal and the rule:\n{log}"
    );
    let served = counter(&b, "dial_backs") - served_before;
    eprintln!(
        "dial-back after the denial: {} (dial_backs_denied {denied}, served {served})",
        if served == 0 {
            "refused at dial time"
        } else {
            "served before the reload, then reset by it"
        }
    );
    let gone = wait_until(after(Duration::from_secs(5)), || !ns_has_tcp(&b, p));
    assert!(gone, "the mirror of {p} stayed\n{}", b.describe());
    assert!(b.fwd().is_running(), "{}", b.describe());
}
