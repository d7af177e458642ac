//! The forwarder against a fake agent (link API over a unix socket): real sockets, bounded
//! waits, no sleeps for synchronisation. Unix hosts (the Windows build is tested end to end
//! under Wine, `tests/tests/wine.rs`).

#![cfg(unix)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hostnet_forwarder::reverse::StaticHostListeners;
use hostnet_forwarder::status::{ControlSocket, Direction, query};
use hostnet_link::proto::{
    self, Changes, ControlMessage, DialBack, DialBackId, Listener, PayloadStream, Proto,
    RelayStatus, Side,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

fn v4(p: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], p))
}

fn v6(p: u16) -> SocketAddr {
    SocketAddr::new("::1".parse().unwrap(), p)
}

struct Running {
    fwd: hostnet_forwarder::Forwarder,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn run(fwd: hostnet_forwarder::Forwarder) -> Running {
    let shutdown = CancellationToken::new();
    let f = fwd.clone();
    let s = shutdown.clone();
    tokio::spawn(async move { f.run(s).await });
    Running { fwd, shutdown }
}

async fn round_trip(addr: SocketAddr, len: usize, seed: u64) {
    let data = payload(len, seed);
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        // Half-close: the echo still flows back after this.
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got))
        .await
        .expect("echo within 20 s")
        .unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(checksum(&got), checksum(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_guest_listener_mirrored_on_both_loopbacks_with_1mib_half_close_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (echo, _e) = echo_server("127.0.0.1:0").await;
    let p = free_port();
    let _agent =
        FakeAgent::start(&path, vec![guest("0.0.0.0", p)], vec![(p, Route::To(echo))]).await;
    let _fwd = run(forwarder(&path, None));
    for a in [v4(p), v6(p)] {
        eventually(
            "the host listener relays",
            Duration::from_secs(5),
            || async move { echoes(a).await.then_some(()) },
        )
        .await;
    }
    round_trip(v4(p), 1 << 20, 1).await;
    round_trip(v6(p), 1 << 20, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_status_resets_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let p = free_port();
    let _agent =
        FakeAgent::start(&path, vec![guest("127.0.0.1", p)], vec![(p, Route::Refuse)]).await;
    let _fwd = run(forwarder(&path, None));
    eventually("the host listener", Duration::from_secs(5), || async move {
        (!bindable(v4(p))).then_some(())
    })
    .await;
    let e = reset_error(v4(p)).await;
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

/// Connects and reads: the error (the reset may even arrive before connect() returns).
async fn reset_error(addr: SocketAddr) -> std::io::Error {
    let mut b = [0u8; 8];
    match TcpStream::connect(addr).await {
        Ok(mut s) => tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("an answer within 5 s")
            .expect_err("a reset, not data or EOF"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_removing_the_listener_free_the_host_port_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (echo, _e) = echo_server("127.0.0.1:0").await;
    let p = free_port();
    let l = guest("0.0.0.0", p);
    let agent = FakeAgent::start(&path, vec![l], vec![(p, Route::To(echo))]).await;
    let _fwd = run(forwarder(&path, None));
    eventually(
        "the host listener relays",
        Duration::from_secs(5),
        || async move { echoes(v4(p)).await.then_some(()) },
    )
    .await;
    let start = Instant::now();
    agent.send(ControlMessage::Changes(Changes {
        side: Side::Guest,
        seq: 2,
        added: vec![],
        removed: vec![l],
    }));
    eventually(
        "both host ports free",
        Duration::from_secs(1),
        || async move { (bindable(v4(p)) && bindable(v6(p))).then_some(()) },
    )
    .await;
    eprintln!("host ports free {:?} after the Changes", start.elapsed());
    // A gap makes the forwarder ask for a snapshot.
    let mut agent = agent;
    agent.send(ControlMessage::Changes(Changes {
        side: Side::Guest,
        seq: 9,
        added: vec![l],
        removed: vec![],
    }));
    match agent.next_message().await {
        ControlMessage::Resync(r) => assert_eq!(r.side, Side::Guest),
        other => panic!("expected Resync, got {other:?}"),
    }
    assert!(bindable(v4(p)), "a change after a gap is ignored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_host_port_is_a_conflict_in_status_then_taken_when_free() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let ctl = dir.path().join("ctl").join("forwarder.sock");
    let (echo, _e) = echo_server("127.0.0.1:0").await;
    let p = free_port();
    let squatter = std::net::TcpListener::bind(v4(p)).unwrap();
    let _agent =
        FakeAgent::start(&path, vec![guest("0.0.0.0", p)], vec![(p, Route::To(echo))]).await;
    let run = run(forwarder(&path, None));
    let cs = ControlSocket::bind(&ctl).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(
        ControlSocket::bind(&ctl).is_err(),
        "a second forwarder on the same socket"
    );
    tokio::spawn(cs.serve(run.fwd.status_fn(), run.shutdown.clone()));
    let ctl2 = ctl.clone();
    let row = eventually("a conflict in status", Duration::from_secs(5), || {
        let ctl = ctl2.clone();
        async move {
            let r = query(&ctl).await.ok()?;
            let row = r.ports.into_iter().find(|r| r.port == p)?;
            (row.state == "conflict").then_some(row)
        }
    })
    .await;
    assert_eq!(row.reason.as_deref(), Some("address in use"));
    let v6row = row
        .host
        .iter()
        .find(|h| h.addr == v6(p).to_string())
        .unwrap();
    assert_eq!(v6row.state, "active");
    assert!(echoes(v6(p)).await, "the free address is served meanwhile");
    // The CLI prints the same document.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hostnet-forwarder"))
        .args(["status", "--json", "--control"])
        .arg(&ctl)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["session"]["connected"], true);
    assert!(
        doc["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["state"] == "conflict")
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hostnet-forwarder"))
        .args(["status", "--control"])
        .arg(&ctl)
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("conflict: address in use"), "{table}");
    drop(squatter);
    eventually(
        "the freed port taken and relayed",
        Duration::from_secs(8),
        || async move { echoes(v4(p)).await.then_some(()) },
    )
    .await;
    let r = query(&ctl).await.unwrap();
    let row = r.ports.iter().find(|r| r.port == p).unwrap();
    assert_eq!(row.state, "active");
    assert!(
        row.connections_total >= 2 && row.bytes_to_guest >= 2,
        "{row:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_loss_closes_host_listeners_and_resets_then_reconnect_restores() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (echo, _e) = echo_server("127.0.0.1:0").await;
    let p = free_port();
    let agent =
        FakeAgent::start(&path, vec![guest("0.0.0.0", p)], vec![(p, Route::To(echo))]).await;
    let _fwd = run(forwarder(&path, None));
    eventually(
        "the host listener relays",
        Duration::from_secs(5),
        || async move { echoes(v4(p)).await.then_some(()) },
    )
    .await;
    // A connection open while the agent dies gets a reset.
    let mut open = TcpStream::connect(v4(p)).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    open.read_exact(&mut b).await.unwrap();
    let start = Instant::now();
    drop(agent);
    eventually(
        "host ports closed",
        Duration::from_millis(3500),
        || async move { (bindable(v4(p)) && bindable(v6(p))).then_some(()) },
    )
    .await;
    eprintln!(
        "host ports closed {:?} after the agent went away",
        start.elapsed()
    );
    let r = tokio::time::timeout(Duration::from_secs(3), open.read(&mut b))
        .await
        .unwrap();
    assert!(r.is_err(), "the open connection is reset, got {r:?}");
    // The agent comes back: the forwarder reconnects and resynchronises.
    let _agent = FakeAgent::start(
        &path,
        vec![guest("0.0.0.0", p), guest("::", p)],
        vec![(p, Route::To(echo))],
    )
    .await;
    eventually(
        "host listeners back",
        Duration::from_secs(5),
        || async move { (echoes(v4(p)).await && echoes(v6(p)).await).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_times_out_within_the_heartbeat_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (echo, _e) = echo_server("127.0.0.1:0").await;
    let p = free_port();
    let agent = FakeAgent::start(
        &path,
        vec![guest("127.0.0.1", p)],
        vec![(p, Route::To(echo))],
    )
    .await;
    let _fwd = run(forwarder(&path, None));
    eventually(
        "the host listener relays",
        Duration::from_secs(5),
        || async move { echoes(v4(p)).await.then_some(()) },
    )
    .await;
    let start = Instant::now();
    agent
        .alive
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually(
        "host ports closed",
        proto::HEARTBEAT_TIMEOUT + Duration::from_millis(1500),
        || async move { bindable(v4(p)).then_some(()) },
    )
    .await;
    let took = start.elapsed();
    eprintln!("closed {took:?} after the agent went silent");
    assert!(
        took >= proto::HEARTBEAT_TIMEOUT - Duration::from_secs(1),
        "closed before the heartbeat timeout: {took:?}"
    );
    // The forwarder reconnects (the agent still accepts) and the listener returns.
    agent
        .alive
        .store(true, std::sync::atomic::Ordering::Relaxed);
    eventually(
        "host listener back",
        Duration::from_secs(5),
        || async move { echoes(v4(p)).await.then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_back_is_served_for_reported_host_listeners_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (host_srv, _e) = echo_server("127.0.0.1:0").await;
    let reported = Listener {
        proto: Proto::Tcp,
        addr: host_srv.ip(),
        port: host_srv.port(),
        v6only: false,
    };
    let host = Arc::new(StaticHostListeners::new([reported].into_iter().collect()));
    let mut agent = FakeAgent::start(&path, vec![], vec![]).await;
    let _fwd = run(forwarder(&path, Some(host.clone())));
    match agent.next_message().await {
        ControlMessage::Snapshot(s) => {
            assert_eq!(s.side, Side::Host);
            assert_eq!(s.listeners, vec![reported]);
        }
        other => panic!("expected Snapshot{{Host}}, got {other:?}"),
    }
    agent.send(ControlMessage::DialBack(DialBack {
        id: DialBackId(7),
        proto: Proto::Tcp,
        target: host_srv,
        client: "127.0.0.1:5555".parse().unwrap(),
    }));
    let (id, mode, mut s) = tokio::time::timeout(Duration::from_secs(5), agent.dial_backs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, DialBackId(7));
    assert_eq!(
        proto::read_status(&mut s, proto::STATUS_TIMEOUT)
            .await
            .unwrap(),
        RelayStatus::Ok
    );
    let mut link = PayloadStream::new(s, mode);
    let data = payload(100_000, 3);
    link.write_all(&data).await.unwrap();
    link.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), link.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checksum(&got), checksum(&data));
    // A port that is not reported: Forbidden.
    agent.send(ControlMessage::DialBack(DialBack {
        id: DialBackId(8),
        proto: Proto::Tcp,
        target: "127.0.0.1:1".parse().unwrap(),
        client: "127.0.0.1:5555".parse().unwrap(),
    }));
    let (id, _, mut s) = tokio::time::timeout(Duration::from_secs(5), agent.dial_backs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, DialBackId(8));
    assert_eq!(
        proto::read_status(&mut s, proto::STATUS_TIMEOUT)
            .await
            .unwrap(),
        RelayStatus::Forbidden
    );
    // The host set changes: Changes{Host} with the next seq.
    host.set(BTreeSet::new());
    match agent.next_message().await {
        ControlMessage::Changes(c) => {
            assert_eq!((c.side, c.seq), (Side::Host, 2));
            assert_eq!(c.removed, vec![reported]);
        }
        other => panic!("expected Changes{{Host}}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_mirrored_for_the_guest_are_never_reported_back_and_resync_answers_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (echo, _e) = echo_server("127.0.0.1:0").await;
    let p = free_port();
    let host_only = Listener {
        proto: Proto::Tcp,
        addr: "127.0.0.1".parse().unwrap(),
        port: 1,
        v6only: false,
    };
    // The host has a listener on P too (as if the forwarder's own mirror were seen).
    let same = Listener {
        port: p,
        ..host_only
    };
    let host = Arc::new(StaticHostListeners::new(
        [host_only, same].into_iter().collect(),
    ));
    let mut agent =
        FakeAgent::start(&path, vec![guest("0.0.0.0", p)], vec![(p, Route::To(echo))]).await;
    let _fwd = run(forwarder(&path, Some(host.clone())));
    // Snapshot{Host} (sent right after Hello, before the guest's snapshot arrived), then the
    // guest's port disappears from the host set as soon as it is mirrored.
    let mut current: BTreeSet<Listener> = match agent.next_message().await {
        ControlMessage::Snapshot(s) => {
            assert_eq!(s.side, Side::Host);
            s.listeners.into_iter().collect()
        }
        other => panic!("expected Snapshot{{Host}}, got {other:?}"),
    };
    let mut seq = 1;
    while current.contains(&same) {
        match agent.next_message().await {
            ControlMessage::Changes(c) => {
                assert_eq!(c.seq, seq + 1);
                seq = c.seq;
                for l in &c.removed {
                    current.remove(l);
                }
                current.extend(c.added);
            }
            other => panic!("expected Changes{{Host}}, got {other:?}"),
        }
    }
    assert_eq!(current, [host_only].into_iter().collect());
    agent.send(ControlMessage::Resync(proto::Resync { side: Side::Host }));
    match agent.next_message().await {
        ControlMessage::Snapshot(s) => {
            assert_eq!((s.side, s.seq), (Side::Host, seq));
            assert_eq!(s.listeners, vec![host_only]);
        }
        other => panic!("expected Snapshot{{Host}}, got {other:?}"),
    }
    // A dial-back to the excluded port is forbidden.
    agent.send(ControlMessage::DialBack(DialBack {
        id: DialBackId(1),
        proto: Proto::Tcp,
        target: v4(p),
        client: "127.0.0.1:5555".parse().unwrap(),
    }));
    let (_, _, mut s) = tokio::time::timeout(Duration::from_secs(5), agent.dial_backs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        proto::read_status(&mut s, proto::STATUS_TIMEOUT)
            .await
            .unwrap(),
        RelayStatus::Forbidden
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_limit_resets_extra_clients_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (echo, _e) = echo_server("127.0.0.1:0").await;
    let p = free_port();
    let _agent = FakeAgent::start(
        &path,
        vec![guest("127.0.0.1", p)],
        vec![(p, Route::To(echo))],
    )
    .await;
    let run = run(forwarder_with(&path, None, |c| c.max_streams = 1));
    let mut held = eventually(
        "a relayed connection",
        Duration::from_secs(5),
        || async move {
            let mut s = TcpStream::connect(v4(p)).await.ok()?;
            s.write_all(b"a").await.ok()?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.ok()?;
            Some(s)
        },
    )
    .await;
    let e = reset_error(v4(p)).await;
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    let mut b = [0u8; 1];
    assert!(run.fwd.status().counters.streams_refused >= 1);
    held.write_all(b"b").await.unwrap();
    held.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"b", "the held connection is unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hello_is_a_fatal_protocol_error_then_the_forwarder_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (echo, _e) = echo_server("127.0.0.1:0").await;
    let p = free_port();
    let mut agent = FakeAgent::start(
        &path,
        vec![guest("127.0.0.1", p)],
        vec![(p, Route::To(echo))],
    )
    .await;
    let run = run(forwarder(&path, None));
    eventually(
        "the host listener relays",
        Duration::from_secs(5),
        || async move { echoes(v4(p)).await.then_some(()) },
    )
    .await;
    agent.send(ControlMessage::Hello(proto::Hello {
        revision: 1,
        role: proto::Role::Agent,
        capabilities: vec![],
        auth: None,
    }));
    match agent.next_message().await {
        ControlMessage::Error(e) => {
            assert!(e.fatal);
            assert_eq!(e.code, proto::ErrorCode::Protocol);
        }
        other => panic!("expected Error, got {other:?}"),
    }
    eventually("a second session", Duration::from_secs(5), || {
        let fwd = run.fwd.clone();
        async move { (fwd.status().counters.sessions >= 2).then_some(()) }
    })
    .await;
    eventually(
        "the host listener relays again",
        Duration::from_secs(5),
        || async move { echoes(v4(p)).await.then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_mirror_states_show_in_status_for_reported_host_listeners_only() {
    use hostnet_link::proto::{BindState, MirrorState};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let port = free_port();
    let wildcard = Listener {
        proto: Proto::Tcp,
        addr: "0.0.0.0".parse().unwrap(),
        port,
        v6only: false,
    };
    let host = Arc::new(StaticHostListeners::new([wildcard].into_iter().collect()));
    let mut agent = FakeAgent::start(&path, vec![], vec![]).await;
    let running = run(forwarder(&path, Some(host.clone())));
    assert!(matches!(
        agent.next_message().await,
        ControlMessage::Snapshot(_)
    ));
    let state = |bind: &str, state, reason: Option<&str>| {
        ControlMessage::MirrorState(MirrorState {
            proto: Proto::Tcp,
            port,
            bind: bind.parse().unwrap(),
            hosts: vec![wildcard.addr],
            state,
            reason: reason.map(str::to_owned),
        })
    };
    let row = |fwd: &hostnet_forwarder::Forwarder| {
        fwd.status()
            .ports
            .into_iter()
            .find(|p| p.port == port && p.direction == Direction::HostToGuest)
    };
    // Nothing from the agent yet: reported.
    let r = eventually("a reverse row", Duration::from_secs(5), || async {
        row(&running.fwd)
    })
    .await;
    assert_eq!(r.state, "reported");
    // The wildcard is mirrored on both VM loopbacks: the worst of the two states shows.
    agent.send(state("::1", BindState::Active, None));
    agent.send(state(
        "127.0.0.1",
        BindState::Conflict,
        Some("address in use in the VM"),
    ));
    // A state for a port the forwarder does not report is ignored.
    agent.send(ControlMessage::MirrorState(MirrorState {
        proto: Proto::Udp,
        port,
        bind: "127.0.0.1".parse().unwrap(),
        hosts: vec![wildcard.addr],
        state: BindState::Active,
        reason: None,
    }));
    let r = eventually("the conflict in status", Duration::from_secs(5), || async {
        row(&running.fwd).filter(|r| r.state == "conflict")
    })
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some(format!("127.0.0.1:{port} in the VM: address in use in the VM").as_str())
    );
    assert_eq!(r.host.len(), 1);
    assert_eq!(r.host[0].addr, format!("0.0.0.0:{port}"));
    assert_eq!(
        r.guest,
        vec![format!("127.0.0.1:{port}"), format!("[::1]:{port}")]
    );
    let table = hostnet_forwarder::status::render_table(&running.fwd.status());
    assert!(
        table.contains("conflict: 127.0.0.1:"),
        "the table shows the conflict:\n{table}"
    );
    assert!(
        !running
            .fwd
            .status()
            .ports
            .iter()
            .any(|p| p.proto == "udp" && p.port == port),
        "no row for an unreported UDP port"
    );
    // Freed: active, no reason.
    agent.send(state("127.0.0.1", BindState::Active, None));
    let r = eventually("active in status", Duration::from_secs(5), || async {
        row(&running.fwd).filter(|r| r.state == "active")
    })
    .await;
    assert_eq!(r.reason, None);
    // Closed mirrors are forgotten: back to reported.
    agent.send(state("127.0.0.1", BindState::Closed, None));
    agent.send(state("::1", BindState::Closed, None));
    eventually("reported again", Duration::from_secs(5), || async {
        row(&running.fwd).filter(|r| r.state == "reported" && r.guest.is_empty())
    })
    .await;
    // The host listener goes and comes back: no stale state survives it.
    agent.send(state("127.0.0.1", BindState::Conflict, Some("x")));
    eventually("conflict", Duration::from_secs(5), || async {
        row(&running.fwd).filter(|r| r.state == "conflict")
    })
    .await;
    host.set(BTreeSet::new());
    eventually("the row gone", Duration::from_secs(5), || async {
        row(&running.fwd).is_none().then_some(())
    })
    .await;
    host.set([wildcard].into_iter().collect());
    let r = eventually("the row back", Duration::from_secs(5), || async {
        row(&running.fwd)
    })
    .await;
    assert_eq!(r.state, "reported");
    assert!(running.fwd.status().session.connected);
}
