//! UDP flows through the forwarder against the fake agent (which echoes each flow).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use hostnet_link::proto::{Listener, Proto};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

fn udp_guest(addr: &str, port: u16) -> Listener {
    Listener {
        proto: Proto::Udp,
        ..guest(addr, port)
    }
}

/// Sends `msg` from `s` to `to` until the echo arrives (a datagram may race the host socket's
/// bind); returns the source address of the reply.
async fn echo_once(s: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Option<SocketAddr> {
    echo_within(s, to, msg, Duration::from_millis(300)).await
}

async fn echo_within(
    s: &UdpSocket,
    to: SocketAddr,
    msg: &[u8],
    wait: Duration,
) -> Option<SocketAddr> {
    s.send_to(msg, to).await.ok()?;
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(wait, s.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    assert_eq!(&buf[..n], msg, "a reply meant for another client");
    Some(from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_reply_to_the_right_client_from_the_targeted_address_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let p = free_udp_port();
    let agent = FakeAgent::start(
        &path,
        vec![udp_guest("0.0.0.0", p)],
        vec![(p, Route::UdpEcho)],
    )
    .await;
    let fwd = forwarder_with(&path, None, |c| {
        c.udp_timeout = Duration::from_secs(3);
        c.max_udp_flows = 3;
    });
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    {
        let (f, s) = (fwd.clone(), shutdown.clone());
        tokio::spawn(async move { f.run(s).await });
    }
    let v4: SocketAddr = ([127, 0, 0, 1], p).into();
    let v6: SocketAddr = SocketAddr::new("::1".parse().unwrap(), p);
    let mut clients = Vec::new();
    for target in [v4, v4, v6] {
        let local = if target.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        let s = UdpSocket::bind(local).await.unwrap();
        let from = eventually("a UDP echo", Duration::from_secs(5), || {
            let s = &s;
            async move { echo_once(s, target, b"hello").await }
        })
        .await;
        assert_eq!(
            from, target,
            "the reply leaves from the address the client targeted"
        );
        clients.push((s, target));
    }
    // Interleaved traffic: each client gets its own datagrams back.
    for round in 0..5 {
        for (i, (s, target)) in clients.iter().enumerate() {
            let msg = format!("client {i} round {round}");
            let got = echo_within(s, *target, msg.as_bytes(), Duration::from_secs(3)).await;
            assert!(got.is_some(), "no echo for {msg}");
        }
    }
    {
        let seen = agent.state.lock().unwrap().udp_clients.clone();
        for (s, _) in &clients {
            assert!(
                seen.contains(&s.local_addr().unwrap()),
                "the header names the client"
            );
        }
    }
    // A fourth client beyond the limit of 3 evicts the least recently used flow.
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    eventually("a UDP echo", Duration::from_secs(5), || {
        let s = &s;
        async move { echo_once(s, v4, b"fourth").await }
    })
    .await;
    assert!(fwd.status().counters.udp_flows_evicted >= 1);
    // Idle flows expire (timeout 3 s here).
    eventually("flows expired", Duration::from_secs(10), || {
        let fwd = fwd.clone();
        async move {
            let st = fwd.status();
            let open: u64 = st.ports.iter().map(|r| r.connections).sum();
            (open == 0).then_some(())
        }
    })
    .await;
    assert!(fwd.status().counters.udp_flows_expired >= 1);
    // A new datagram after expiry opens a fresh flow.
    let (s, target) = &clients[0];
    assert!(
        echo_within(s, *target, b"again", Duration::from_secs(3))
            .await
            .is_some()
    );
}

/// A target the agent turns away: the forwarder counts the refusal it is told about (a CLOSE
/// frame), and the client's next datagram tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_the_agent_refuses_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let p = free_udp_port();
    // A UDP guest listener with no route: the fake agent answers Forbidden.
    let _agent = FakeAgent::start(&path, vec![udp_guest("127.0.0.1", p)], vec![]).await;
    let fwd = forwarder_with(&path, None, |_| {});
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    {
        let (f, s) = (fwd.clone(), shutdown.clone());
        tokio::spawn(async move { f.run(s).await });
    }
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to: SocketAddr = ([127, 0, 0, 1], p).into();
    eventually("a refusal counted", Duration::from_secs(5), || {
        let (s, fwd) = (&s, fwd.clone());
        async move {
            let _ = s.send_to(b"anyone?", to).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            (fwd.status().counters.udp_flows_refused >= 2).then_some(())
        }
    })
    .await;
    let c = fwd.status().counters;
    assert_eq!(c.udp_flows, 0, "a refused flow is gone: {c:?}");
}
