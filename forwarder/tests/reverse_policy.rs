//! The reverse rules (`--reverse-allow`, `--reverse-deny`, `--reverse-rules FILE`) against a
//! fake agent: what is reported, what `status` shows, dial-backs refused at dial time, and rules
//! changed while the forwarder runs. Real sockets, bounded waits, no sleeps for synchronisation.
//! Unix hosts (the fake agent listens on a unix socket).

#![cfg(unix)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hostnet_forwarder::Forwarder;
use hostnet_forwarder::reverse::StaticHostListeners;
use hostnet_forwarder::rules::{ReverseRules, RulesFile, read_rules};
use hostnet_forwarder::status::{self, Direction, PortRow};
use hostnet_link::ports::PortFilter;
use hostnet_link::proto::{
    self, ControlMessage, DialBack, DialBackId, Listener, PayloadStream, Proto, RelayStatus, Side,
};
use hostnet_link::transport::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Running {
    fwd: Forwarder,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn run(fwd: Forwarder) -> Running {
    let shutdown = CancellationToken::new();
    let f = fwd.clone();
    let s = shutdown.clone();
    tokio::spawn(async move { f.run(s).await });
    Running { fwd, shutdown }
}

fn tcp(addr: SocketAddr) -> Listener {
    Listener {
        proto: Proto::Tcp,
        addr: addr.ip(),
        port: addr.port(),
        v6only: false,
    }
}

fn deny(list: &str) -> ReverseRules {
    ReverseRules {
        flags: PortFilter {
            allow: None,
            deny: list.parse().unwrap(),
        },
        file: None,
    }
}

fn host_row(fwd: &Forwarder, proto: &str, port: u16) -> Option<PortRow> {
    fwd.status()
        .ports
        .into_iter()
        .find(|p| p.direction == Direction::HostToGuest && p.proto == proto && p.port == port)
}

/// Asks for a dial-back and returns the status the forwarder answers on its stream, and the
/// stream.
async fn dial_back(
    agent: &mut FakeAgent,
    id: u64,
    proto: Proto,
    target: SocketAddr,
) -> (RelayStatus, PayloadStream<Stream>) {
    agent.send(ControlMessage::DialBack(DialBack {
        id: DialBackId(id),
        proto,
        target,
        client: "127.0.0.1:5555".parse().unwrap(),
    }));
    let (got, mode, mut s) = tokio::time::timeout(Duration::from_secs(5), agent.dial_backs.recv())
        .await
        .expect("a dial-back stream within 5 s")
        .unwrap();
    assert_eq!(got, DialBackId(id));
    let st = proto::read_status(&mut s, proto::STATUS_TIMEOUT)
        .await
        .unwrap();
    (st, PayloadStream::new(s, mode))
}

/// One checksummed round trip on a dial-back relay to an echo server, the link left open.
async fn echo_round(link: &mut PayloadStream<Stream>, len: usize, seed: u64) {
    let data = payload(len, seed);
    link.write_all(&data).await.unwrap();
    let mut got = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(10), link.read_exact(&mut got))
        .await
        .expect("the echo within 10 s")
        .unwrap();
    assert_eq!(checksum(&got), checksum(&data));
}

/// The next host-side change the agent is told about.
async fn next_changes(agent: &mut FakeAgent) -> proto::Changes {
    match agent.next_message().await {
        ControlMessage::Changes(c) => {
            assert_eq!(c.side, Side::Host);
            c
        }
        other => panic!("expected Changes{{Host}}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_listeners_are_not_reported_show_as_denied_and_are_refused_at_dial_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (allowed, _a) = echo_server("127.0.0.1:0").await;
    let (denied, _d) = echo_server("127.0.0.1:0").await;
    // The denied port's UDP twin is not denied (the rule is TCP only).
    let udp_twin = Listener {
        proto: Proto::Udp,
        ..tcp(denied)
    };
    let udp_denied = Listener {
        proto: Proto::Udp,
        addr: "127.0.0.1".parse().unwrap(),
        port: 53,
        v6only: false,
    };
    let host = Arc::new(StaticHostListeners::new(
        [tcp(allowed), tcp(denied), udp_twin, udp_denied]
            .into_iter()
            .collect(),
    ));
    let mut agent = FakeAgent::start(&path, vec![], vec![]).await;
    let rules = deny(&format!("tcp:{},udp:53", denied.port()));
    let running = run(forwarder_with(&path, Some(host.clone()), |c| {
        c.reverse_rules = rules;
    }));
    match agent.next_message().await {
        ControlMessage::Snapshot(s) => {
            assert_eq!(s.side, Side::Host);
            let got: BTreeSet<Listener> = s.listeners.into_iter().collect();
            assert_eq!(got, [tcp(allowed), udp_twin].into_iter().collect());
        }
        other => panic!("expected Snapshot{{Host}}, got {other:?}"),
    }
    // status: the denied listener as a host→guest row, `denied`, the rule as the reason.
    let row = host_row(&running.fwd, "tcp", denied.port()).expect("a row for the denied port");
    assert_eq!(row.state, status::DENIED);
    assert_eq!(
        row.reason,
        Some(format!("--reverse-deny tcp:{}", denied.port()))
    );
    assert_eq!(row.host.len(), 1);
    assert_eq!(row.host[0].addr, denied.to_string());
    let udp_row = host_row(&running.fwd, "udp", 53).expect("a row for udp 53");
    assert_eq!(udp_row.state, status::DENIED);
    assert_eq!(udp_row.reason.as_deref(), Some("--reverse-deny udp:53"));
    assert_eq!(
        host_row(&running.fwd, "udp", denied.port()).map(|r| r.state),
        Some("reported".to_owned()),
        "the UDP twin of the TCP-denied port is reported"
    );
    let report = running.fwd.status();
    let rules = report.reverse_rules.as_ref().expect("the rules in status");
    assert_eq!(
        rules.rules,
        format!("--reverse-deny tcp:{},udp:53", denied.port())
    );
    let table = status::render_table(&report);
    assert!(
        table.contains(&format!("denied: --reverse-deny tcp:{}", denied.port())),
        "{table}"
    );
    assert!(table.contains("reverse rules: --reverse-deny"), "{table}");
    // A dial-back to the denied port (which the forwarder never reported) is refused by the
    // rule itself, and counted; TCP to the allowed one is served.
    let (st, _) = dial_back(&mut agent, 1, Proto::Tcp, denied).await;
    assert_eq!(st, RelayStatus::Forbidden);
    let (st, _) = dial_back(&mut agent, 2, Proto::Udp, "127.0.0.1:53".parse().unwrap()).await;
    assert_eq!(st, RelayStatus::Forbidden);
    let c = running.fwd.status().counters;
    assert_eq!((c.dial_backs_denied, c.dial_backs_failed), (2, 2));
    let (st, mut link) = dial_back(&mut agent, 3, Proto::Tcp, allowed).await;
    assert_eq!(st, RelayStatus::Ok);
    echo_round(&mut link, 200_000, 5).await;
    let c = running.fwd.status().counters;
    assert_eq!((c.dial_backs, c.dial_backs_denied), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_denied_at_run_time_is_withdrawn_its_relays_reset_and_its_dial_backs_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let (srv, _e) = echo_server("127.0.0.1:0").await;
    let (other, _o) = echo_server("127.0.0.1:0").await;
    let host = Arc::new(StaticHostListeners::new(
        [tcp(srv), tcp(other)].into_iter().collect(),
    ));
    let mut agent = FakeAgent::start(&path, vec![], vec![]).await;
    let running = run(forwarder(&path, Some(host.clone())));
    match agent.next_message().await {
        ControlMessage::Snapshot(s) => {
            assert_eq!(s.listeners.len(), 2, "no rules: both reported");
        }
        other => panic!("expected Snapshot{{Host}}, got {other:?}"),
    }
    assert_eq!(
        running.fwd.status().reverse_rules.map(|r| r.rules),
        Some("all ports".to_owned())
    );
    // A relay to each port runs.
    let (st, mut doomed) = dial_back(&mut agent, 1, Proto::Tcp, srv).await;
    assert_eq!(st, RelayStatus::Ok);
    echo_round(&mut doomed, 64 * 1024, 1).await;
    let (st, mut kept) = dial_back(&mut agent, 2, Proto::Tcp, other).await;
    assert_eq!(st, RelayStatus::Ok);
    echo_round(&mut kept, 64 * 1024, 2).await;

    // The port becomes denied.
    assert!(
        running
            .fwd
            .set_reverse_rules(deny(&format!("tcp:{}", srv.port())))
    );
    let c = next_changes(&mut agent).await;
    assert_eq!((c.added.len(), c.removed), (0, vec![tcp(srv)]));
    // Its running relay is reset (not closed cleanly); the other one carries on.
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), doomed.read(&mut b))
        .await
        .expect("the relay of the denied port ends within 5 s");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the relay of the denied port: {r:?}"
    );
    echo_round(&mut kept, 64 * 1024, 3).await;
    // A new dial-back to it is refused at dial time.
    let (st, _) = dial_back(&mut agent, 3, Proto::Tcp, srv).await;
    assert_eq!(st, RelayStatus::Forbidden);
    assert_eq!(running.fwd.status().counters.dial_backs_denied, 2);
    let row = host_row(&running.fwd, "tcp", srv.port()).expect("a row");
    assert_eq!(
        (row.state.as_str(), row.reason.as_deref()),
        (
            status::DENIED,
            Some(format!("--reverse-deny tcp:{}", srv.port()).as_str())
        )
    );
    // The same rules again change nothing.
    assert!(
        !running
            .fwd
            .set_reverse_rules(deny(&format!("tcp:{}", srv.port())))
    );
    // Allowed again: reported again and served.
    assert!(running.fwd.set_reverse_rules(ReverseRules::default()));
    let c = next_changes(&mut agent).await;
    assert_eq!((c.added, c.removed.len()), (vec![tcp(srv)], 0));
    let (st, mut link) = dial_back(&mut agent, 4, Proto::Tcp, srv).await;
    assert_eq!(st, RelayStatus::Ok);
    echo_round(&mut link, 64 * 1024, 4).await;
    assert_eq!(
        host_row(&running.fwd, "tcp", srv.port()).map(|r| r.state),
        Some("reported".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_file_is_read_again_on_reload_and_a_bad_one_keeps_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let rules_path = dir.path().join("rules");
    let (srv, _e) = echo_server("127.0.0.1:0").await;
    let p = srv.port();
    std::fs::write(&rules_path, format!("# test\ndeny {p}\n")).unwrap();
    let host = Arc::new(StaticHostListeners::new([tcp(srv)].into_iter().collect()));
    let mut agent = FakeAgent::start(&path, vec![], vec![]).await;
    let file: RulesFile = read_rules(&rules_path).unwrap();
    let running = run(forwarder_with(&path, Some(host.clone()), |c| {
        c.reverse_rules.file = Some(file);
    }));
    match agent.next_message().await {
        ControlMessage::Snapshot(s) => assert!(s.listeners.is_empty(), "{s:?}"),
        other => panic!("expected Snapshot{{Host}}, got {other:?}"),
    }
    let shown = |fwd: &Forwarder| fwd.status().reverse_rules.expect("rules in status");
    assert_eq!(
        shown(&running.fwd).rules,
        format!("{}: deny {p}", rules_path.display())
    );
    assert_eq!(
        host_row(&running.fwd, "tcp", p).and_then(|r| r.reason),
        Some(format!("deny {p} in {}", rules_path.display()))
    );
    // Emptied: everything allowed.
    std::fs::write(&rules_path, "").unwrap();
    assert!(running.fwd.reload_reverse_rules().unwrap());
    let c = next_changes(&mut agent).await;
    assert_eq!(c.added, vec![tcp(srv)]);
    // A file that does not parse: an error, shown in status; the rules stay.
    std::fs::write(&rules_path, "deny 0\n").unwrap();
    let e = running.fwd.reload_reverse_rules().unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
    let s = shown(&running.fwd);
    assert!(
        s.reload_error
            .as_deref()
            .is_some_and(|r| r.contains("line 1")),
        "{s:?}"
    );
    assert_eq!(
        host_row(&running.fwd, "tcp", p).map(|r| r.state),
        Some("reported".to_owned())
    );
    let (st, _) = dial_back(&mut agent, 1, Proto::Tcp, srv).await;
    assert_eq!(st, RelayStatus::Ok);
    // Fixed: applied, the error gone.
    std::fs::write(&rules_path, format!("deny tcp:{p}\n")).unwrap();
    assert!(running.fwd.reload_reverse_rules().unwrap());
    let c = next_changes(&mut agent).await;
    assert_eq!(c.removed, vec![tcp(srv)]);
    assert_eq!(shown(&running.fwd).reload_error, None);
    let (st, _) = dial_back(&mut agent, 2, Proto::Tcp, srv).await;
    assert_eq!(st, RelayStatus::Forbidden);
    // The file gone: an error, the rules stay.
    std::fs::remove_file(&rules_path).unwrap();
    assert!(running.fwd.reload_reverse_rules().is_err());
    assert_eq!(
        host_row(&running.fwd, "tcp", p).map(|r| r.state),
        Some(status::DENIED.to_owned())
    );
}
