//! The Windows build of the forwarder (`x86_64-pc-windows-gnu`, run by Wine: see
//! `hostnet_e2e::wine`) against the Linux agent in a namespace, over tcp:// (token) and quic://
//! (pinned certificates): guest TCP servers reached on the host's 127.0.0.1 and ::1 with 16 MiB
//! each way, half-close and resets; UDP with several clients; the reverse direction (the Windows
//! enumerator, `GetExtendedTcpTable`/`GetExtendedUdpTable`, which Wine answers with the Linux
//! host's sockets); a conflict in `status` (through the named pipe); an agent killed and
//! restarted; Ctrl-C (SIGINT, which Wine turns into a console event). One test per transport;
//! they share the Wine prefix's wineserver. `--nocapture` shows the timings.
//!
//! What Wine 8 cannot do, and how the test treats it: resets are lost on non-blocking sockets
//! ([`WINE_LOSES_RESETS`]: the reset scenarios accept a clean close and print a note), and
//! quinn's UDP sockets cannot be set up ([`QUIC_UNDER_WINE`]: the quic test checks that this is
//! the error the forwarder reports, prints it, and runs nothing else).
//!
//! `HOSTNET_E2E_LOG=debug` gives the forwarder (and the agent) `RUST_LOG=debug`; their logs are
//! in the failure messages.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostnet_e2e::bridge::{Bridge, ForwarderBuild, Transport};
use hostnet_e2e::net::{
    ANY4, LO4, LO6, TcpServer, UdpEcho, echo_check, echo_on, free_port, host_listener, host_udp,
    sa, set_timeouts, tcp_listeners, try_connect, udp_bound, udp_echo_check,
};
use hostnet_e2e::payload::{expect_eof, read_prng, write_prng};
use hostnet_e2e::{after, privileged, scenario, wait_until, wine};

/// The size of each bulk transfer.
const BULK: u64 = 16 << 20;

/// Wine 8 loses TCP resets on non-blocking sockets, which are the only kind tokio uses: after
/// the peer's RST, `recv` returns 0 (a clean EOF) and `SO_ERROR` is 0, where Windows returns
/// WSAECONNRESET (a blocking `recv` under Wine does get 10054; `SO_LINGER` 0 + `closesocket`
/// does send a RST). So a reset reaching the Windows forwarder, from a host client or from the
/// agent over the raw tcp:// link, is relayed as a close. While this is true, the reset
/// scenarios accept a clean EOF on the far side (and say so); a reset is accepted too, and
/// anything else (data, a hang) fails. Set to false on a Wine that passes resets on.
const WINE_LOSES_RESETS: bool = true;

#[test]
fn windows_forwarder_under_wine_over_tcp() {
    run(Transport::Tcp, "windows_forwarder_under_wine_over_tcp");
}

#[test]
fn windows_forwarder_under_wine_over_quic() {
    run(Transport::Quic, "windows_forwarder_under_wine_over_quic");
}

fn run(t: Transport, test: &str) {
    if !privileged(test) {
        return;
    }
    let Some(_wine) = wine::session(test) else {
        return;
    };
    let name = format!("{t:?}").to_lowercase();
    let t0 = Instant::now();
    let mut summary = Vec::new();

    let mut b = Bridge::builder(t).forwarder(ForwarderBuild::Wine).start();
    let known = |e: &str| t == Transport::Quic && quic_blocked_by_wine(e);
    match wait_connected(&mut b, known) {
        Ok(d) => summary.push(format!("forwarder.exe connected {d:.1?} after its start")),
        Err(e) => {
            assert!(
                b.fwd().is_running(),
                "the forwarder exited\n{}",
                b.describe()
            );
            eprintln!(
                "note: {test}: WINE LIMITATION, quic:// scenarios not run: {QUIC_UNDER_WINE}\n  the forwarder's status says: {e}"
            );
            return;
        }
    }
    forward_tcp(&mut b, &mut summary);
    scenario::half_close(&mut b);
    summary.push(reset_from_guest(&mut b));
    summary.push(reset_from_host(&mut b));
    scenario::udp_forward(&mut b);
    conflict_in_status(&mut b);
    summary.push(agent_restart(&mut b));
    summary.push(ctrl_c_stops(&mut b));
    drop(b);

    let mut r = Bridge::builder(t)
        .forwarder(ForwarderBuild::Wine)
        .reverse()
        .start();
    wait_connected(&mut r, |_| false).unwrap();
    summary.extend(reverse(&mut r));
    drop(r);

    summary.push(format!("all scenarios in {:.1?}", t0.elapsed()));
    eprintln!("wine {name}:\n  {}", summary.join("\n  "));
}

/// Why quic:// cannot run under Wine 8 (found with a small Winsock probe built by mingw).
const QUIC_UNDER_WINE: &str = "quinn-udp 0.5's UdpSocketState::new (Windows) reads IPV6_V6ONLY \
    with getsockopt on every UDP socket, and Wine 8 answers WSAEOPNOTSUPP (10045) for an AF_INET \
    one, so quinn::Endpoint::client(0.0.0.0:0) fails (`bind failed: os error 10045`); on an \
    AF_INET6 socket the getsockopt works but the next step, setsockopt IPV6_RECVECN (like \
    IP_RECVECN), gets WSAENOPROTOOPT (10042). Windows has all three; Wine 8 cannot carry QUIC \
    through quinn at all, whatever the forwarder does";

/// True for the session errors of [`QUIC_UNDER_WINE`].
fn quic_blocked_by_wine(last_error: &str) -> bool {
    last_error.contains("bind failed")
        && (last_error.contains("os error 10045") || last_error.contains("os error 10042"))
}

/// Waits (30 s at most) until `status` through the named pipe says the session is up: how long
/// that took. `Err(last_error)` at once when the session's last error is one `known` expects.
fn wait_connected(b: &mut Bridge, known: impl Fn(&str) -> bool) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut known_error = None;
    let ok = wait_until(after(Duration::from_secs(30)), || {
        let Ok(v) = b.status_json() else {
            return false;
        };
        if let Some(e) = v["session"]["last_error"].as_str().filter(|e| known(e)) {
            known_error = Some(e.to_string());
            return true;
        }
        v["session"]["connected"].as_bool() == Some(true)
    });
    if let Some(e) = known_error {
        return Err(e);
    }
    if !ok {
        panic!(
            "the Windows forwarder's session is not up 30 s after its start; status: {:?}\n{}",
            b.status_json(),
            b.describe()
        );
    }
    Ok(t0.elapsed())
}

/// A guest server for one-way bulk transfers; the client's first byte says which way. `U`: the
/// client sends [`BULK`] bytes of seed 1 and half-closes, the server checks them all and answers
/// `OK` (or what went wrong). `D`: the server sends [`BULK`] bytes of seed 2 and half-closes.
fn bulk_handler(mut s: TcpStream) {
    set_timeouts(&s, Duration::from_secs(60));
    let mut way = [0u8; 1];
    if s.read_exact(&mut way).is_err() {
        return;
    }
    match &way {
        b"U" => {
            let r = read_prng(&mut s, 1, BULK, "the guest reads the upload")
                .and_then(|()| expect_eof(&mut s, "the guest after the upload"));
            let answer = r.err().unwrap_or_else(|| "OK".into());
            let _ = s.write_all(answer.as_bytes());
        }
        b"D" => {
            let _ = write_prng(&mut s, 2, BULK);
        }
        _ => return,
    }
    let _ = s.shutdown(Shutdown::Write);
    let _ = hostnet_e2e::net::read_to_end_or_err(&mut s);
}

/// Sends [`BULK`] bytes through `ip:port`; the time until the guest confirmed every byte.
fn upload(ip: IpAddr, port: u16) -> Result<Duration, String> {
    let mut c = try_connect(sa(ip, port)).map_err(|e| format!("connect: {e}"))?;
    set_timeouts(&c, Duration::from_secs(60));
    let t0 = Instant::now();
    c.write_all(b"U").map_err(|e| format!("write: {e}"))?;
    write_prng(&mut c, 1, BULK).map_err(|e| format!("upload: {e}"))?;
    c.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut answer = String::new();
    c.read_to_string(&mut answer)
        .map_err(|e| format!("reading the guest's answer: {e}"))?;
    match answer.as_str() {
        "OK" => Ok(t0.elapsed()),
        other => Err(format!("the guest says: {other:?}")),
    }
}

/// Receives [`BULK`] bytes through `ip:port`, checking each; the time until the EOF after them.
fn download(ip: IpAddr, port: u16) -> Result<Duration, String> {
    let mut c = try_connect(sa(ip, port)).map_err(|e| format!("connect: {e}"))?;
    set_timeouts(&c, Duration::from_secs(60));
    let t0 = Instant::now();
    c.write_all(b"D").map_err(|e| format!("write: {e}"))?;
    read_prng(&mut c, 2, BULK, "the host reads the download")?;
    expect_eof(&mut c, "the host after the download")?;
    Ok(t0.elapsed())
}

fn rate(d: Duration) -> String {
    format!(
        "{:.2?} ({:.0} MiB/s)",
        d,
        BULK as f64 / f64::from(1 << 20) / d.as_secs_f64()
    )
}

/// A guest echo server on 0.0.0.0:P reached on the host's 127.0.0.1:P and [::1]:P, then 16 MiB
/// up and down through each, timed.
fn forward_tcp(b: &mut Bridge, summary: &mut Vec<String>) {
    let port = free_port();
    let _echo = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    let bulk = free_port();
    let _bulk = TcpServer::serve(b.ns.tcp_listener(sa(ANY4, bulk)).unwrap(), bulk_handler);
    for ip in [LO4, LO6] {
        b.expect_tcp(ip, port);
        b.expect_tcp(ip, bulk);
        if let Err(e) = echo_check(sa(ip, port), 10, 256 * 1024) {
            panic!("echo via {}: {e}\n{}", sa(ip, port), b.describe());
        }
    }
    for ip in [LO4, LO6] {
        let up = upload(ip, bulk)
            .unwrap_or_else(|e| panic!("16 MiB up via {}: {e}\n{}", sa(ip, bulk), b.describe()));
        let down = download(ip, bulk)
            .unwrap_or_else(|e| panic!("16 MiB down via {}: {e}\n{}", sa(ip, bulk), b.describe()));
        let line = format!(
            "16 MiB via {ip}: host->guest {}, guest->host {}",
            rate(up),
            rate(down)
        );
        eprintln!("{line}");
        summary.push(line);
    }
}

/// What the far side of a reset saw: a reset, or (under [`WINE_LOSES_RESETS`]) a clean EOF.
fn judge_reset(what: &str, seen: &std::io::Result<usize>, b: &mut Bridge) -> String {
    match seen {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => format!("{what}: passed on as a reset"),
        Ok(0) if WINE_LOSES_RESETS => {
            let note = format!(
                "{what}: seen as a clean EOF, not a reset (WINE LIMITATION: Wine 8's non-blocking recv returns 0 after a RST; see WINE_LOSES_RESETS)"
            );
            eprintln!("note: {note}");
            note
        }
        other => panic!(
            "{what}: the far side should see ECONNRESET, got {other:?}\n{}",
            b.describe()
        ),
    }
}

/// A guest server reads 5 bytes and resets: the host client must see a reset.
fn reset_from_guest(b: &mut Bridge) -> String {
    let port = free_port();
    let _srv = TcpServer::serve(b.ns.tcp_listener(sa(ANY4, port)).unwrap(), |mut s| {
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf);
        hostnet_e2e::net::set_linger_zero(&s);
    });
    b.expect_tcp(LO4, port);
    let mut c = try_connect(sa(LO4, port)).unwrap();
    set_timeouts(&c, Duration::from_secs(5));
    let seen = c
        .write_all(b"hello")
        .and_then(|()| hostnet_e2e::net::read_to_end_or_err(&mut c));
    judge_reset("a reset by the guest server", &seen, b)
}

/// A host client sends 5 bytes and resets: the guest server must see a reset.
fn reset_from_host(b: &mut Bridge) -> String {
    let port = free_port();
    type Seen = Arc<Mutex<(bool, Option<std::io::Result<usize>>)>>;
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let _srv = TcpServer::serve(b.ns.tcp_listener(sa(ANY4, port)).unwrap(), move |mut s| {
        set_timeouts(&s, Duration::from_secs(5));
        let mut buf = [0u8; 5];
        let r = s.read_exact(&mut buf);
        s2.lock().unwrap().0 = r.is_ok();
        let r = r.and_then(|()| hostnet_e2e::net::read_to_end_or_err(&mut s));
        s2.lock().unwrap().1 = Some(r);
    });
    b.expect_tcp(LO4, port);
    let mut c = try_connect(sa(LO4, port)).unwrap();
    c.write_all(b"hello").unwrap();
    // The 5 bytes are through before the reset (a reset could otherwise overtake them).
    let through = wait_until(after(Duration::from_secs(5)), || seen.lock().unwrap().0);
    assert!(through, "the guest never got 5 bytes\n{}", b.describe());
    hostnet_e2e::net::set_linger_zero(&c);
    drop(c);
    let done = wait_until(after(Duration::from_secs(10)), || {
        seen.lock().unwrap().1.is_some()
    });
    assert!(
        done,
        "the guest server's connection did not end within 10 s of the host client's reset\n{}",
        b.describe()
    );
    let r = seen.lock().unwrap().1.take().unwrap();
    judge_reset("a reset by the host client", &r, b)
}

/// The host's 127.0.0.1:P is held by a Linux process when the guest opens P: `status` shows that
/// address in conflict while [::1]:P is mirrored and works; once freed, the forwarder takes it.
fn conflict_in_status(b: &mut Bridge) {
    let port = free_port();
    let blocker = host_listener(sa(LO4, port));
    let _echo = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO6, port);
    echo_check(sa(LO6, port), 30, 10_000).unwrap();
    let addr_state = |b: &Bridge| {
        b.status_entries(port).iter().find_map(|e| {
            e["host"].as_array()?.iter().find_map(|h| {
                (h["addr"] == format!("127.0.0.1:{port}"))
                    .then(|| h["state"].as_str().unwrap_or_default().to_string())
            })
        })
    };
    let conflict = wait_until(after(Duration::from_secs(10)), || {
        addr_state(b).as_deref() == Some("conflict")
    });
    if !conflict {
        panic!(
            "host 127.0.0.1:{port} is taken by another process: status should show it in conflict, got {:?}\n{}",
            b.status_json(),
            b.describe()
        );
    }
    let table = b.status_text();
    eprintln!("status with 127.0.0.1:{port} taken:\n{table}");
    drop(blocker);
    if b.wait_tcp(LO4, port, Duration::from_secs(15)).is_none() {
        panic!(
            "127.0.0.1:{port} not mirrored within 15 s of being freed; status {:?}\n{}",
            b.status_json(),
            b.describe()
        );
    }
    echo_check(sa(LO4, port), 31, 10_000).unwrap();
    let active = wait_until(after(Duration::from_secs(10)), || {
        addr_state(b).as_deref() == Some("active")
    });
    assert!(
        active,
        "127.0.0.1:{port} mirrored but status does not say active: {:?}",
        b.status_json()
    );
}

/// kill -9 of the agent: the mirrors go; a new agent: the port is served again. Reports the
/// time from the new agent's start to a working echo.
fn agent_restart(b: &mut Bridge) -> String {
    let port = free_port();
    let _echo = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    echo_check(sa(LO4, port), 40, 10_000).unwrap();
    b.agent().kill9();
    let gone = b.wait_tcp_gone(LO4, port, Duration::from_secs(15));
    if gone.is_none() {
        panic!(
            "127.0.0.1:{port} still mirrored 15 s after the agent was killed\n{}",
            b.describe()
        );
    }
    let t0 = Instant::now();
    b.start_agent();
    let served = wait_until(after(Duration::from_secs(60)), || {
        echo_check(sa(LO4, port), 41, 10_000).is_ok()
    });
    if !served {
        panic!(
            "127.0.0.1:{port} not served 60 s after the agent restarted; status {:?}\n{}",
            b.status_json(),
            b.describe()
        );
    }
    let back = t0.elapsed();
    echo_check(sa(LO6, port), 42, 100_000).unwrap();
    let line = format!(
        "agent kill -9: mirrors gone after {:.1?}; restarted agent served again after {back:.1?}",
        gone.unwrap()
    );
    eprintln!("{line}");
    line
}

/// SIGINT to the Windows process (Wine delivers it as a console Ctrl-C event): the forwarder
/// exits 0 promptly and its host listeners are gone.
fn ctrl_c_stops(b: &mut Bridge) -> String {
    let port = free_port();
    let _echo = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    let t0 = Instant::now();
    b.fwd().signal(nix::sys::signal::Signal::SIGINT);
    let exit = b.fwd().wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(
        exit.is_some_and(|s| s.success()),
        "the Windows forwarder should exit 0 within 10 s of a Ctrl-C (SIGINT), got {exit:?}\n{}",
        b.describe()
    );
    let listeners: Vec<_> = tcp_listeners()
        .into_iter()
        .filter(|a| a.port() == port)
        .collect();
    assert!(
        listeners.is_empty(),
        "host listeners left after the forwarder exited: {listeners:?}"
    );
    let line = format!("Ctrl-C (SIGINT): forwarder.exe exited 0 after {took:.1?}");
    eprintln!("{line}");
    line
}

/// The reverse direction: Linux listeners on the host's 127.0.0.1, found by the Windows
/// enumerator, are mirrored by the agent into the namespace and reached there.
fn reverse(b: &mut Bridge) -> Vec<String> {
    let mut out = Vec::new();
    let port = free_port();
    let t0 = Instant::now();
    let _srv = TcpServer::echo(host_listener(sa(LO4, port)));
    let ok = wait_until(after(Duration::from_secs(10)), || {
        b.ns.run(tcp_listeners).contains(&sa(LO4, port))
    });
    if !ok {
        panic!(
            "host TCP 127.0.0.1:{port} not mirrored into the namespace within 10 s; status {:?}\n{}",
            b.status_json(),
            b.describe()
        );
    }
    out.push(format!(
        "reverse TCP 127.0.0.1:{port} mirrored in the namespace after {:.1?}",
        t0.elapsed()
    ));
    let mut s = b.ns_connect(sa(LO4, port)).unwrap();
    if let Err(e) = echo_on(&mut s, 50, 1 << 20) {
        panic!("namespace -> host echo: {e}\n{}", b.describe());
    }

    let uport = free_port();
    let t0 = Instant::now();
    let _u = UdpEcho::serve(host_udp(sa(LO4, uport)));
    let ok = wait_until(after(Duration::from_secs(10)), || {
        b.ns.run(udp_bound).contains(&sa(LO4, uport))
    });
    if !ok {
        panic!(
            "host UDP 127.0.0.1:{uport} not mirrored into the namespace within 10 s; status {:?}\n{}",
            b.status_json(),
            b.describe()
        );
    }
    out.push(format!(
        "reverse UDP 127.0.0.1:{uport} mirrored in the namespace after {:.1?}",
        t0.elapsed()
    ));
    let c = b.ns.udp_socket(sa(LO4, 0)).unwrap();
    for i in 0..5 {
        let msg = format!("reverse datagram {i}");
        if let Err(e) = udp_echo_check(&c, sa(LO4, uport), msg.as_bytes(), Duration::from_secs(5)) {
            panic!("namespace -> host UDP echo: {e}\n{}", b.describe());
        }
    }
    out
}

/// The Windows service under Wine's service manager: `service install -- RUN-ARGS` registers
/// and starts it, it serves `status` on its named pipe and logs to its `--log-file`, and
/// `service uninstall` stops it (the pipe goes away) and removes it. The forwarder's link points
/// at a closed port: what is checked is the service life cycle, not the relay (the tests above
/// do that). On a fresh prefix Wine's services.exe has been seen to time out the first start
/// (the install then says "did not start") and start it anyway, so the install's exit code is
/// reported, not asserted: the running service is.
#[test]
fn windows_service_under_wine() {
    let test = "windows_service_under_wine";
    let Some(_wine) = wine::session(test) else {
        return;
    };
    let dir = hostnet_e2e::TempDir::new("wine-service").unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "service-test-token\n").unwrap();
    let log = dir.join("forwarder.log");
    let pipe = wine::pipe_name();
    let name = format!("hostnet-test-{}", std::process::id());
    let closed = free_port();
    let run_args = [
        "--guest".to_string(),
        format!("tcp://127.0.0.1:{closed}"),
        "--token-file".into(),
        token.display().to_string(),
        "--no-reverse".into(),
        "--control".into(),
        pipe.clone(),
        "--log-file".into(),
        log.display().to_string(),
    ];
    let mut install = wine::command();
    install.args(["service", "install", "--name", &name, "--"]);
    install.args(&run_args);
    let t0 = Instant::now();
    let (st, out, err) = wine::output(install, Duration::from_secs(60)).unwrap();
    eprintln!("service install: {st}\n{out}{err}");
    let status = || {
        let mut cmd = wine::command();
        cmd.args(["status", "--json", "--control", &pipe]);
        match wine::output(cmd, Duration::from_secs(20)) {
            Ok((st, out, _)) if st.success() => {
                serde_json::from_str::<serde_json::Value>(&out).ok()
            }
            _ => None,
        }
    };
    let mut doc = None;
    let up = wait_until(after(Duration::from_secs(30)), || {
        doc = status();
        doc.is_some()
    });
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        up,
        "the service does not answer on {pipe} 30 s after `service install`\ninstall: {st}\n{out}{err}\nlog:\n{}",
        log_text()
    );
    let doc = doc.unwrap();
    assert_eq!(
        doc["session"]["guest"].as_str(),
        Some(format!("tcp://127.0.0.1:{closed}").as_str()),
        "{doc}"
    );
    assert!(
        log_text().contains("running as a Windows service"),
        "log:\n{}",
        log_text()
    );
    let started = t0.elapsed();

    let mut uninstall = wine::command();
    uninstall.args(["service", "uninstall", "--name", &name]);
    let (st, out, err) = wine::output(uninstall, Duration::from_secs(60)).unwrap();
    assert!(st.success(), "service uninstall: {st}\n{out}{err}");
    assert!(
        wait_until(after(Duration::from_secs(15)), || status().is_none()),
        "the service still answers on {pipe} after `service uninstall`\nlog:\n{}",
        log_text()
    );
    assert!(
        log_text().contains("shutting down signal=\"service stop\""),
        "log:\n{}",
        log_text()
    );
    let mut again = wine::command();
    again.args(["service", "uninstall", "--name", &name]);
    let (st, _, err) = wine::output(again, Duration::from_secs(60)).unwrap();
    assert!(!st.success() && err.contains("no service"), "{st}: {err}");
    eprintln!(
        "wine service: installed and answering in {started:.1?}, stopped and removed in {:.1?}",
        t0.elapsed() - started
    );
}
