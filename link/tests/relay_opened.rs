//! The opener's relay ([`relay_opened`]): the client's bytes leave right behind the header,
//! before the status; the acceptor reads exactly the header, so they wait in the stream; a
//! refusal discards them and resets the client; no status in time resets both sides.
//! Run over real unix link streams (framed, as the forwarder uses them there), with a TCP
//! pair as the local side, in both modes where it matters.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hostnet_link::proto::{
    self, PayloadStream, RelayStatus, RelayTarget, StreamHeader, StreamKind, StreamMode,
};
use hostnet_link::relay::{OpenedEnd, RelayEnd, relay_opened, reset_tcp};
use hostnet_link::transport::{Auth, Connector, Listener, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const STEP: Duration = Duration::from_secs(10);

fn setup(dir: &Path) -> (Connector, Listener) {
    let ep: hostnet_link::transport::Endpoint = format!("unix://{}", dir.join("l.sock").display())
        .parse()
        .unwrap();
    let listener = Listener::bind(ep.clone(), Auth::none()).unwrap();
    (Connector::connect(ep, Auth::none()).unwrap(), listener)
}

/// A connected TCP pair: (the client's end, the relay's end).
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a: SocketAddr = l.local_addr().unwrap();
    let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
    (c.unwrap(), s.unwrap().0)
}

fn header(mode: StreamMode) -> StreamHeader {
    StreamHeader {
        kind: StreamKind::TcpRelay(RelayTarget {
            target: "127.0.0.1:8000".parse().unwrap(),
            client: "127.0.0.1:40000".parse().unwrap(),
        }),
        mode,
    }
}

/// Opens a stream, writes the header, and starts `relay_opened` on `local` in a task.
async fn open(
    c: &Connector,
    mode: StreamMode,
    local: TcpStream,
) -> tokio::task::JoinHandle<OpenedEnd> {
    let mut s = c.open().await.unwrap();
    proto::write_header(&mut s, &header(mode)).await.unwrap();
    let link = PayloadStream::new(s, mode);
    tokio::spawn(
        async move { relay_opened(local, link, &CancellationToken::new(), reset_tcp).await },
    )
}

async fn accept_header(l: &mut Listener) -> (Stream, StreamHeader) {
    let mut s = tokio::time::timeout(STEP, l.accept())
        .await
        .unwrap()
        .unwrap();
    let h = proto::read_header(&mut s, STEP).await.unwrap();
    (s, h)
}

async fn early_bytes_wait_for_the_status(mode: StreamMode) {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut l) = setup(dir.path());
    let (mut client, local) = tcp_pair().await;
    // The client speaks first, before anything is connected behind the relay.
    client.write_all(b"request").await.unwrap();
    let relay = open(&c, mode, local).await;
    let (mut s, h) = accept_header(&mut l).await;
    assert_eq!(h, header(mode));
    // The request is already in the stream behind the header; the status has not been sent.
    proto::write_status(&mut s, &RelayStatus::Ok).await.unwrap();
    let mut link = PayloadStream::new(s, h.mode);
    let mut got = [0u8; 7];
    tokio::time::timeout(STEP, link.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"request");
    link.write_all(b"response").await.unwrap();
    link.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(STEP, client.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"response");
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, link.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    drop(link);
    match tokio::time::timeout(STEP, relay).await.unwrap().unwrap() {
        OpenedEnd::Relayed(RelayEnd::Done(up, down)) => assert_eq!((up, down), (7, 8)),
        other => panic!("expected a clean end, got {other:?}"),
    }
}

#[tokio::test]
async fn early_bytes_wait_for_the_status_framed() {
    early_bytes_wait_for_the_status(StreamMode::Framed).await;
}

#[tokio::test]
async fn early_bytes_wait_for_the_status_raw() {
    early_bytes_wait_for_the_status(StreamMode::Raw).await;
}

/// A refusal: the acceptor answers `Refused` and closes with the early bytes unread; the
/// client is reset, and the end says why.
async fn refusal_discards_early_bytes_and_resets_the_client(mode: StreamMode) {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut l) = setup(dir.path());
    let (mut client, local) = tcp_pair().await;
    client.write_all(&[7u8; 64 * 1024]).await.unwrap();
    let relay = open(&c, mode, local).await;
    let (mut s, _) = accept_header(&mut l).await;
    proto::write_status(&mut s, &RelayStatus::Refused)
        .await
        .unwrap();
    drop(s);
    match tokio::time::timeout(STEP, relay).await.unwrap().unwrap() {
        OpenedEnd::Refused(RelayStatus::Refused) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(STEP, client.read(&mut b))
        .await
        .unwrap();
    assert_eq!(
        r.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "the client must be reset"
    );
}

#[tokio::test]
async fn refusal_discards_early_bytes_and_resets_the_client_framed() {
    refusal_discards_early_bytes_and_resets_the_client(StreamMode::Framed).await;
}

#[tokio::test]
async fn refusal_discards_early_bytes_and_resets_the_client_raw() {
    refusal_discards_early_bytes_and_resets_the_client(StreamMode::Raw).await;
}

/// The stream ends before any status: both sides reset, the end says there was no status.
#[tokio::test]
async fn no_status_resets_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut l) = setup(dir.path());
    let (mut client, local) = tcp_pair().await;
    client.write_all(b"hello").await.unwrap();
    let relay = open(&c, StreamMode::Framed, local).await;
    let (s, _) = accept_header(&mut l).await;
    drop(s);
    match tokio::time::timeout(STEP, relay).await.unwrap().unwrap() {
        OpenedEnd::NoStatus(_) => {}
        other => panic!("expected no status, got {other:?}"),
    }
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(STEP, client.read(&mut b))
        .await
        .unwrap();
    assert!(r.is_err(), "the client must be reset, got {r:?}");
}

/// A status that never comes: after STATUS_TIMEOUT the opener gives up (the acceptor sees the
/// stream reset: a RESET frame after the early bytes).
#[tokio::test(start_paused = true)]
async fn status_timeout_resets_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut l) = setup(dir.path());
    let (mut client, local) = tcp_pair().await;
    client.write_all(b"hello").await.unwrap();
    let relay = open(&c, StreamMode::Framed, local).await;
    let (s, h) = accept_header(&mut l).await;
    match relay.await.unwrap() {
        OpenedEnd::NoStatus(proto::ProtoError::Timeout { .. }) => {}
        other => panic!("expected a status timeout, got {other:?}"),
    }
    let mut link = PayloadStream::new(s, h.mode);
    let mut got = [0u8; 5];
    link.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    let e = link.read(&mut [0u8; 16]).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
}

/// A status longer than the shortest one (`Error` with a message) is read whole, and nothing
/// past it.
#[tokio::test]
async fn a_long_status_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut l) = setup(dir.path());
    let (_client, local) = tcp_pair().await;
    let relay = open(&c, StreamMode::Framed, local).await;
    let (mut s, _) = accept_header(&mut l).await;
    let why = RelayStatus::error("too many streams");
    proto::write_status(&mut s, &why).await.unwrap();
    drop(s);
    match tokio::time::timeout(STEP, relay).await.unwrap().unwrap() {
        OpenedEnd::Refused(st) => assert_eq!(st, why),
        other => panic!("expected a refusal, got {other:?}"),
    }
}
