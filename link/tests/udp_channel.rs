//! The datagram channel with both ends in this process, over a real unix socket: a listener on
//! one side, a dialed target on the other, real UDP sockets at both ends. Every datagram is
//! checked byte by byte, and each must arrive as the datagram it was (bursts of equal-sized
//! datagrams go out as one GSO send on Linux, which the kernel must cut back exactly).

#![cfg(unix)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hostnet_link::proto::channel::CloseReason;
use hostnet_link::proto::{self, StreamHeader, StreamKind, StreamMode};
use hostnet_link::transport::{Auth, Connector, Listener};
use hostnet_link::udp::{self, Channel, Dialer, Tally};
use tokio::net::UdpSocket;

/// Sends every flow to one address.
struct To(SocketAddr);

impl Dialer for To {
    fn admit(
        &self,
        target: SocketAddr,
        _client: SocketAddr,
    ) -> Result<(SocketAddr, Option<Arc<dyn Tally>>), CloseReason> {
        if target.port() == self.0.port() {
            Ok((self.0, None))
        } else {
            Err(CloseReason::Forbidden)
        }
    }
}

fn config(side: udp::Side) -> udp::Config {
    udp::Config {
        side,
        max_flows: 16,
        idle: Duration::from_secs(60),
        queue_bytes: udp::DEFAULT_QUEUE_BYTES,
    }
}

/// A forwarder-side channel and an agent-side one joined by a unix socket; the agent side sends
/// flows to `target`.
async fn pair(target: SocketAddr) -> (tempfile::TempDir, Channel, Channel) {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix://{}", dir.path().join("link.sock").display());
    let mut l = Listener::bind(uri.parse().unwrap(), Auth::none()).unwrap();
    let c = Connector::connect(uri.parse().unwrap(), Auth::none()).unwrap();
    let (opened, accepted) = tokio::join!(c.open(), l.accept());
    let (mut fwd_end, mut agent_end) = (opened.unwrap(), accepted.unwrap());
    let header = StreamHeader {
        kind: StreamKind::Datagrams,
        mode: StreamMode::Raw,
    };
    proto::write_header(&mut fwd_end, &header).await.unwrap();
    let got = proto::read_header(&mut agent_end, proto::HEADER_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(got, header);
    let fwd = Channel::start(
        fwd_end,
        config(udp::Side::Forwarder),
        Arc::new(udp::RefuseAll),
        Arc::default(),
    );
    let agent = Channel::start(
        agent_end,
        config(udp::Side::Agent),
        Arc::new(To(target)),
        Arc::default(),
    );
    (dir, fwd, agent)
}

fn datagram(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_arrive_datagram_by_datagram_and_replies_find_their_client() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket2::SockRef::from(&server)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    let target = server.local_addr().unwrap();
    let (_dir, fwd, agent) = pair(target).await;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    // As the forwarder's mirrors do: the burst waits here instead of being dropped.
    socket2::SockRef::from(&*front)
        .set_recv_buffer_size(udp::LISTENER_RECV_BUFFER)
        .unwrap();
    let listener = fwd.listener(front.clone(), target, None);
    let pump = {
        let front = front.clone();
        tokio::spawn(async move {
            listener.pump(&front).await;
        })
    };
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    // Bursts of equal-sized datagrams, the last of each shorter, several sizes.
    let mut sent = Vec::new();
    for (burst, size) in [(0, 1), (1, 64), (2, 1000), (3, 1472), (4, 9000)] {
        for i in 0..40 {
            let len = if i == 39 { size / 2 + 1 } else { size };
            let d = datagram(burst * 100 + i, len);
            client.send_to(&d, front_addr).await.unwrap();
            sent.push(d);
        }
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while got.len() < sent.len() {
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), server.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{} of {} datagrams arrived", got.len(), sent.len()))
            .unwrap();
        got.push(buf[..n].to_vec());
        // Replies go back on the flow, to the client that sent, from the address it targeted.
        if got.len() == 1 {
            server.send_to(b"reply", from).await.unwrap();
            let (n, src) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!((&buf[..n], src), (&b"reply"[..], front_addr));
        }
    }
    // UDP on loopback keeps the order of one sender's datagrams.
    assert_eq!(got.len(), sent.len());
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(
            g,
            s,
            "datagram {i} ({} bytes) arrived as {} bytes",
            s.len(),
            g.len()
        );
    }
    assert_eq!(fwd.flows(), 1);
    assert_eq!(agent.flows(), 1);
    assert_eq!(fwd.counters().datagrams_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(
        agent.counters().datagrams_dropped.load(Ordering::Relaxed),
        0
    );
    // Closing one end ends the other's channel and every flow.
    fwd.close();
    tokio::time::timeout(Duration::from_secs(5), agent.closed())
        .await
        .expect("the agent's channel ends with the stream");
    assert_eq!(agent.flows(), 0);
    pump.abort();
}

#[tokio::test]
async fn a_forbidden_target_is_closed_and_counted_on_both_sides() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_dir, fwd, agent) = pair(server.local_addr().unwrap()).await;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    // A target the agent's dialer refuses (another port).
    let elsewhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let listener = fwd.listener(front.clone(), elsewhere, None);
    listener.datagram("127.0.0.1:40000".parse().unwrap(), b"x");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while fwd.counters().flows_refused_by_peer.load(Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no CLOSE came back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(agent.counters().flows_refused.load(Ordering::Relaxed), 1);
    assert_eq!(fwd.flows(), 0);
    assert_eq!(agent.flows(), 0);
}
