//! The agent's relay policy, exercised with the link protocol itself: a peer on the agent's
//! socket asks for targets it must not get. The agent dials only VM-loopback ports that are
//! currently listening and allowed; anything else is answered without a connection being made.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::net::{LO4, TcpServer, free_port, sa};
use hostnet_e2e::privileged;
use hostnet_link::proto::{
    RelayStatus, RelayTarget, StreamHeader, StreamKind, StreamMode, read_status, write_header,
};
use hostnet_link::transport::{Auth, Connector, Endpoint};

/// Opens one relay stream to `target` on the agent and returns its status.
fn ask(uri: &str, target: SocketAddr) -> Result<RelayStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ep: Endpoint = uri.parse().map_err(|e| format!("{e}"))?;
        let c = Connector::connect(ep, Auth::none()).map_err(|e| e.to_string())?;
        let mut s = c.open().await.map_err(|e| e.to_string())?;
        let header = StreamHeader {
            kind: StreamKind::TcpRelay(RelayTarget {
                target,
                client: sa(LO4, 40000),
            }),
            mode: StreamMode::Framed,
        };
        write_header(&mut s, &header)
            .await
            .map_err(|e| e.to_string())?;
        read_status(&mut s, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())
    })
}

#[test]
fn agent_relays_only_to_listening_allowed_loopback_ports() {
    if !privileged("agent_relays_only_to_listening_allowed_loopback_ports") {
        return;
    }
    let (ok, denied, veth, dead) = (free_port(), free_port(), free_port(), free_port());
    let mut b = Bridge::builder(Transport::Unix)
        .veth()
        .agent_args(["--deny".to_string(), denied.to_string()])
        .start();
    let ns_ip = b.ns.ns_ip();
    let s_ok = TcpServer::echo(b.ns.tcp_listener(sa(LO4, ok)).unwrap());
    let s_denied = TcpServer::echo(b.ns.tcp_listener(sa(LO4, denied)).unwrap());
    let s_veth = TcpServer::echo(b.ns.tcp_listener(sa(ns_ip.into(), veth)).unwrap());
    b.expect_tcp(LO4, ok);
    let uri = b.guest_uri().to_string();
    // The agent's socket is for its owner only.
    let mode = std::fs::metadata(b.dir.join("agent.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "agent socket mode {mode:o}: group/other access"
    );

    let cases = [
        ("listening loopback port", sa(LO4, ok), true),
        ("--deny'd loopback port", sa(LO4, denied), false),
        ("port on the veth address", sa(ns_ip.into(), veth), false),
        (
            "a listening loopback port asked at the veth address",
            sa(ns_ip.into(), ok),
            false,
        ),
        ("loopback port nobody listens on", sa(LO4, dead), false),
    ];
    let mut wrong = Vec::new();
    for (what, target, allowed) in cases {
        let st = ask(&uri, target);
        let good = matches!(
            (&st, allowed),
            (Ok(RelayStatus::Ok), true)
                | (Ok(RelayStatus::Forbidden | RelayStatus::Refused), false)
        );
        eprintln!("{what} {target}: {st:?}");
        if !good {
            wrong.push(format!("{what} {target}: {st:?}"));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let d = b.describe();
    assert!(wrong.is_empty(), "wrong answers: {wrong:?}\n{d}");
    assert_eq!(s_ok.accepted.load(Ordering::SeqCst), 1, "{d}");
    assert_eq!(
        s_denied.accepted.load(Ordering::SeqCst),
        0,
        "the agent connected to a --deny'd port\n{d}"
    );
    assert_eq!(
        s_veth.accepted.load(Ordering::SeqCst),
        0,
        "the agent connected to a non-loopback address\n{d}"
    );
}
