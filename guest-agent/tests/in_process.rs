//! The agent driven in-process through its library API (`Agent::start`, `Agent::serve`).
//! In-process, discovery hides this test's own sockets (they are the agent's), which is what
//! this test checks; the black-box tests in `agent.rs` run the binary for everything else.

use hostnet_agent::{Agent, AgentConfig};
use hostnet_link::proto::{self, RelayStatus, RelayTarget, StreamHeader, StreamKind, StreamMode};
use hostnet_link::transport::{Auth, Connector, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn own_sockets_are_hidden_and_refusals_are_counted() {
    let own = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let own_addr = own.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let agent = Agent::start(AgentConfig::default(), shutdown.clone())
        .await
        .unwrap();
    assert!(
        !agent.report().iter().any(|l| l.port == own_addr.port()),
        "the agent reported its own process's listener"
    );
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix://{}", dir.path().join("a.sock").display());
    let listener = Listener::bind(uri.parse().unwrap(), Auth::none()).unwrap();
    let serve = tokio::spawn({
        let (agent, shutdown) = (agent.clone(), shutdown.clone());
        async move { agent.serve(vec![listener], shutdown).await }
    });
    let conn = Connector::connect(uri.parse().unwrap(), Auth::none()).unwrap();

    let mut junk = conn.open().await.unwrap();
    junk.write_all(b"not a hostnet stream").await.unwrap();
    let mut sink = Vec::new();
    let _ = junk.read_to_end(&mut sink).await;

    let mut s = conn.open().await.unwrap();
    let header = StreamHeader {
        kind: StreamKind::TcpRelay(RelayTarget {
            target: own_addr,
            client: "127.0.0.1:1".parse().unwrap(),
        }),
        mode: StreamMode::Framed,
    };
    proto::write_header(&mut s, &header).await.unwrap();
    let status = proto::read_status(&mut s, proto::STATUS_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(status, RelayStatus::Forbidden);

    let stats = agent.stats();
    assert_eq!(stats.streams, 2);
    assert_eq!(stats.handshake_errors, 1);
    assert_eq!(stats.forbidden, 1);
    shutdown.cancel();
    serve.await.unwrap().unwrap();
    assert!(
        !dir.path().join("a.sock").exists(),
        "socket file left behind"
    );
}
