//! Transports over real sockets: unix, tcp, quic, and hybrid vsock against a test peer that
//! speaks the `CONNECT` protocol. Every byte is checked; every test is bounded in time.
//! (AF_VSOCK cannot be exercised here: no vsock loopback. The real-VM test covers it.)
//!
//! Unix hosts only (the unix-socket tests and their helpers are most of the file); the Windows
//! build's tcp and QUIC links are tested end to end under Wine (`tests/tests/wine.rs`).

#![cfg(unix)]

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostnet_link::transport::{
    Auth, Connector, Endpoint, Listener, Peer, Stream, Timeouts, TlsIdentity, TransportError,
    keygen,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const BIG: usize = 4 << 20;
const LIMIT: Duration = Duration::from_secs(60);
const CONCURRENT: usize = 50;

// ---------------------------------------------------------------------------------------------
// helpers

/// Deterministic pseudo-random bytes (xorshift), different per seed.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert_eq!(sha(got), sha(want), "{what}: checksum");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test exceeded its time limit")
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hn-t")
        .tempdir()
        .expect("temp dir")
}

/// Opens a stream and accepts it. The opener writes one byte first (QUIC announces a stream
/// to the peer with its first frame, and the link protocol's opener always speaks first).
async fn pair(connector: &Connector, listener: &mut Listener) -> (Stream, Stream) {
    let mut c = connector.open().await.expect("open");
    c.write_all(b"!").await.unwrap();
    let mut s = listener.accept().await.expect("accept");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"!");
    (c, s)
}

/// Writes `out` and reads `want_len` bytes at the same time.
async fn exchange<S>(s: S, out: Vec<u8>, want_len: usize) -> (S, Vec<u8>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(s);
    let (wrote, got) = tokio::join!(
        async {
            w.write_all(&out).await?;
            w.flush().await
        },
        async {
            let mut buf = vec![0u8; want_len];
            r.read_exact(&mut buf).await.map(|_| buf)
        }
    );
    wrote.expect("write");
    (r.unsplit(w), got.expect("read"))
}

/// 4 MiB each way at once.
async fn bulk_both_ways<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (pa, pb) = (payload(1, BIG), payload(2, BIG));
    let ((_a, got_a), (_b, got_b)) =
        tokio::join!(exchange(a, pa.clone(), BIG), exchange(b, pb.clone(), BIG));
    assert_same(&got_a, &pb, "opener received");
    assert_same(&got_b, &pa, "acceptor received");
}

/// Client writes, shuts down writing; server reads to EOF, then replies and shuts down; the
/// client gets the whole reply, then EOF.
async fn half_close(mut client: Stream, mut server: Stream) {
    assert!(client.carries_half_close() && server.carries_half_close());
    let request = payload(3, 300_000);
    let reply = payload(4, 200_000);
    let srv = async {
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server read to EOF");
        assert_same(&got, &request, "request");
        server.write_all(&reply).await.expect("server reply");
        server.shutdown().await.expect("server shutdown");
    };
    let cli = async {
        client.write_all(&request).await.expect("client write");
        client.shutdown().await.expect("client shutdown");
        let mut got = Vec::new();
        client
            .read_to_end(&mut got)
            .await
            .expect("client read to EOF");
        assert_same(&got, &reply, "reply");
    };
    tokio::join!(srv, cli);
}

/// Reads until an error; panics on a clean EOF.
async fn read_until_error<S: AsyncRead + Unpin>(s: &mut S) -> io::Error {
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => panic!("clean EOF where a reset was expected"),
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}

/// The peer of a reset stream sees ConnectionReset.
async fn reset_is_seen(client: Stream, mut server: Stream) {
    assert!(client.carries_reset());
    client.reset();
    let e = read_until_error(&mut server).await;
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
}

/// Echoes exactly `len` bytes, chunk by chunk.
async fn echo_n<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, len: usize) -> io::Result<S> {
    let mut buf = vec![0u8; 16384];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len());
        let n = s.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        s.write_all(&buf[..n]).await?;
        left -= n;
    }
    Ok(s)
}

const ECHO_LEN: usize = 96 * 1024;

/// 50 streams at once on one connector, each echoed by the acceptor.
async fn concurrent_streams(connector: impl Into<Arc<Connector>>, mut accept: impl AcceptStreams) {
    let connector: Arc<Connector> = connector.into();
    let server = tokio::spawn(async move {
        let mut echoes = JoinSet::new();
        for _ in 0..CONCURRENT {
            let s = accept.next().await;
            echoes.spawn(async move { echo_n(s, ECHO_LEN).await.map(drop) });
        }
        while let Some(r) = echoes.join_next().await {
            r.unwrap().expect("echo");
        }
        // Keep the listener (and so a QUIC connection) until the clients have read
        // everything: an echo is done once written, not once delivered.
        accept
    });
    let mut clients = JoinSet::new();
    for i in 0..CONCURRENT {
        let connector = connector.clone();
        clients.spawn(async move {
            let s = connector.open().await.expect("open");
            let data = payload(100 + i as u64, ECHO_LEN);
            let (_s, got) = exchange(s, data.clone(), ECHO_LEN).await;
            assert_same(&got, &data, &format!("stream {i}"));
        });
    }
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    drop(server.await.unwrap());
}

/// Where the acceptor's streams come from (a [`Listener`], or the hybrid test peer).
trait AcceptStreams: Send + 'static {
    type S: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn next(&mut self) -> impl Future<Output = Self::S> + Send;
}

impl AcceptStreams for Listener {
    type S = Stream;
    async fn next(&mut self) -> Stream {
        self.accept().await.expect("accept")
    }
}

fn assert_err_contains<T: std::fmt::Debug>(
    r: Result<T, TransportError>,
    needle: &str,
) -> TransportError {
    let e = r.expect_err("expected an error");
    let msg = e.to_string();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    e
}

// ---------------------------------------------------------------------------------------------
// unix

fn unix_endpoint(dir: &Path) -> (Endpoint, PathBuf) {
    let path = dir.join("agent.sock");
    (format!("unix://{}", path.display()).parse().unwrap(), path)
}

fn unix_pair_setup() -> (tempfile::TempDir, Connector, Listener) {
    let dir = temp_dir();
    let (ep, _) = unix_endpoint(dir.path());
    let listener = Listener::bind(ep.clone(), Auth::none()).unwrap();
    let connector = Connector::connect(ep, Auth::none()).unwrap();
    (dir, connector, listener)
}

#[tokio::test]
async fn unix_bulk_both_ways() {
    bounded(async {
        let (_d, c, mut l) = unix_pair_setup();
        let (a, b) = pair(&c, &mut l).await;
        assert!(matches!(a.peer(), Peer::Unix { .. }));
        assert!(
            matches!(b.peer(), Peer::Unix { uid: Some(_), .. }),
            "{}",
            b.peer()
        );
        bulk_both_ways(a, b).await;
    })
    .await;
}

#[tokio::test]
async fn unix_half_close() {
    bounded(async {
        let (_d, c, mut l) = unix_pair_setup();
        assert!(c.carries_half_close());
        let (a, b) = pair(&c, &mut l).await;
        half_close(a, b).await;
    })
    .await;
}

/// AF_UNIX has no RST: the peer sees ECONNRESET when the resetting side leaves unread data
/// behind (the kernel's rule), a clean EOF otherwise. `carries_reset()` says so.
#[tokio::test]
async fn unix_reset_with_unread_data_is_seen() {
    bounded(async {
        let (_d, c, mut l) = unix_pair_setup();
        let (a, mut b) = pair(&c, &mut l).await;
        assert!(!a.carries_reset());
        // A unix socket queues written bytes in the peer's receive queue synchronously:
        // once this returns, `a` has 1000 unread bytes.
        b.write_all(&payload(5, 1000)).await.unwrap();
        a.reset();
        let e = read_until_error(&mut b).await;
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    })
    .await;
}

#[tokio::test]
async fn unix_concurrent_streams() {
    bounded(async {
        let (_d, c, l) = unix_pair_setup();
        concurrent_streams(c, l).await;
    })
    .await;
}

#[tokio::test]
async fn unix_socket_file_is_0600_and_removed_on_drop() {
    let dir = temp_dir();
    let (ep, path) = unix_endpoint(dir.path());
    let l = Listener::bind(ep, Auth::none()).unwrap();
    let mode = std::fs::symlink_metadata(&path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    drop(l);
    assert!(!path.exists(), "socket file left behind");
}

#[tokio::test]
async fn unix_stale_socket_is_replaced() {
    bounded(async {
        let dir = temp_dir();
        let (ep, path) = unix_endpoint(dir.path());
        // A listener that died without removing its file.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let mut l = Listener::bind(ep.clone(), Auth::none()).unwrap();
        let c = Connector::connect(ep, Auth::none()).unwrap();
        let (mut a, mut b) = pair(&c, &mut l).await;
        a.write_all(b"after stale").await.unwrap();
        let mut buf = [0u8; 11];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after stale");
    })
    .await;
}

#[tokio::test]
async fn unix_live_socket_is_an_error() {
    bounded(async {
        let dir = temp_dir();
        let (ep, path) = unix_endpoint(dir.path());
        let mut first = Listener::bind(ep.clone(), Auth::none()).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        let e = assert_err_contains(Listener::bind(ep.clone(), Auth::none()), "address in use");
        assert!(matches!(e, TransportError::AddrInUse { .. }), "{e:?}");
        // The live listener's file is untouched and still works.
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()),
            ino
        );
        // The liveness probe was a connection: the live listener sees it as a stray
        // client that closed at once (empty stream), then serves others as before.
        let mut probe = first.accept().await.unwrap();
        assert_eq!(probe.read(&mut [0u8; 1]).await.unwrap(), 0);
        let c = Connector::connect(ep, Auth::none()).unwrap();
        pair(&c, &mut first).await;
    })
    .await;
}

#[tokio::test]
async fn unix_path_that_is_not_a_socket_is_kept() {
    let dir = temp_dir();
    let (ep, path) = unix_endpoint(dir.path());
    std::fs::write(&path, b"precious").unwrap();
    assert_err_contains(Listener::bind(ep, Auth::none()), "not a socket");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[tokio::test]
async fn unix_connect_to_nothing_is_a_clear_error() {
    let dir = temp_dir();
    let (ep, _) = unix_endpoint(dir.path());
    let c = Connector::connect(ep, Auth::none()).unwrap();
    let e = assert_err_contains(c.open().await, "connect failed");
    let TransportError::Connect { source, .. } = e else {
        panic!("{e:?}")
    };
    assert_eq!(source.kind(), io::ErrorKind::NotFound);
}

// ---------------------------------------------------------------------------------------------
// tcp

struct TcpSetup {
    _dir: tempfile::TempDir,
    token_file: PathBuf,
    listener: Listener,
}

fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, token).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn tcp_setup(timeouts: Timeouts) -> TcpSetup {
    let dir = temp_dir();
    let token_file = write_token(dir.path(), "token", "correct horse battery staple\n");
    let listener = Listener::bind_with(
        "tcp://127.0.0.1:0".parse().unwrap(),
        Auth::token_file(&token_file).unwrap(),
        timeouts,
    )
    .unwrap();
    TcpSetup {
        _dir: dir,
        token_file,
        listener,
    }
}

impl TcpSetup {
    fn connector(&self) -> Connector {
        Connector::connect(
            self.listener.local_endpoint().clone(),
            Auth::token_file(&self.token_file).unwrap(),
        )
        .unwrap()
    }

    fn port(&self) -> u16 {
        match self.listener.local_endpoint() {
            Endpoint::Tcp(hp) => hp.port,
            other => panic!("{other}"),
        }
    }
}

#[tokio::test]
async fn tcp_bulk_both_ways() {
    bounded(async {
        let mut t = tcp_setup(Timeouts::default());
        assert_ne!(t.port(), 0);
        let c = t.connector();
        let (a, b) = pair(&c, &mut t.listener).await;
        assert!(matches!(b.peer(), Peer::Tcp(_)));
        // A killed process's TCP socket ends with a FIN too: the protocol frames tcp:// streams.
        assert!(!a.eof_is_deliberate() && !b.eof_is_deliberate());
        let nodelay = a.tcp_nodelay().expect("a tcp stream").unwrap();
        assert!(nodelay, "TCP_NODELAY on");
        assert!(b.tcp_nodelay().expect("a tcp stream").unwrap());
        bulk_both_ways(a, b).await;
    })
    .await;
}

#[tokio::test]
async fn tcp_half_close() {
    bounded(async {
        let mut t = tcp_setup(Timeouts::default());
        let c = t.connector();
        let (a, b) = pair(&c, &mut t.listener).await;
        half_close(a, b).await;
    })
    .await;
}

#[tokio::test]
async fn tcp_reset() {
    bounded(async {
        let mut t = tcp_setup(Timeouts::default());
        let c = t.connector();
        let (a, b) = pair(&c, &mut t.listener).await;
        reset_is_seen(a, b).await;
        // And the other way round.
        let (a, b) = pair(&c, &mut t.listener).await;
        reset_is_seen(b, a).await;
    })
    .await;
}

#[tokio::test]
async fn tcp_concurrent_streams() {
    bounded(async {
        let t = tcp_setup(Timeouts::default());
        let c = t.connector();
        let TcpSetup { listener, _dir, .. } = t;
        concurrent_streams(c, listener).await;
        drop(_dir);
    })
    .await;
}

/// Every relayed stream over tcp:// is a TCP connection with its own handshake: the listener's
/// backlog must hold a burst beyond the handshakes it runs at once. With std's 128, a burst of
/// 500 overflowed it, and clients whose ACK was dropped waited for SYN-ACK retransmits past
/// their 5 s handshake timeout (seen in the e2e 500-connection test). `ss` shows a listening
/// socket's backlog as its Send-Q.
#[tokio::test]
async fn tcp_listener_backlog_holds_a_burst() {
    let t = tcp_setup(Timeouts::default());
    let filter = format!("sport = :{}", t.port());
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &filter])
        .output()
        .expect("ss (iproute2) is needed to read a listener's backlog");
    let text = String::from_utf8_lossy(&out.stdout);
    let backlog: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listener line for {filter} in: {text:?}"));
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        backlog >= 1024.min(somaxconn),
        "backlog {backlog} (somaxconn {somaxconn})"
    );
}

#[tokio::test]
async fn tcp_wrong_token_is_rejected_and_counted() {
    bounded(async {
        let mut t = tcp_setup(Timeouts::default());
        let wrong = write_token(t._dir.path(), "wrong", "not the token");
        let bad = Connector::connect(
            t.listener.local_endpoint().clone(),
            Auth::token_file(&wrong).unwrap(),
        )
        .unwrap();
        let e = assert_err_contains(bad.open().await, "authentication rejected");
        assert!(matches!(e, TransportError::AuthRejected { .. }), "{e:?}");
        assert_eq!(t.listener.stats().rejected, 1);
        // The listener keeps serving good clients.
        let c = t.connector();
        let (mut a, mut b) = pair(&c, &mut t.listener).await;
        a.write_all(b"ok").await.unwrap();
        let mut buf = [0u8; 2];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ok");
        assert_eq!(t.listener.stats().accepted, 1);
    })
    .await;
}

#[tokio::test]
async fn tcp_missing_or_empty_token_refuses_to_start() {
    let dir = temp_dir();
    let missing = dir.path().join("nope");
    let e = assert_err_contains(Auth::token_file(&missing), "token file");
    assert!(e.to_string().contains("nope"), "{e}");
    let TransportError::CredentialFile { source, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(source.kind(), io::ErrorKind::NotFound);

    let empty = write_token(dir.path(), "empty", " \n");
    assert_err_contains(Auth::token_file(&empty), "empty");

    let ep: Endpoint = "tcp://127.0.0.1:0".parse().unwrap();
    let e = assert_err_contains(
        Listener::bind(ep.clone(), Auth::none()),
        "refusing to start",
    );
    assert!(matches!(e, TransportError::MissingCredentials { .. }));
    assert_err_contains(Connector::connect(ep, Auth::none()), "token");
}

/// A client that connects and says nothing, and one that sends garbage, do not keep a good
/// client from connecting at the same time (handshakes run concurrently).
#[tokio::test]
async fn tcp_stray_clients_do_not_block_good_ones() {
    bounded(async {
        let handshake = Duration::from_secs(20);
        let mut t = tcp_setup(Timeouts {
            handshake,
            ..Timeouts::default()
        });
        let addr = format!("127.0.0.1:{}", t.port());
        let start = Instant::now();
        let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut garbage = tokio::net::TcpStream::connect(&addr).await.unwrap();
        garbage.write_all(&payload(9, 64)).await.unwrap();
        let c = t.connector();
        let (mut a, mut b) = pair(&c, &mut t.listener).await;
        a.write_all(b"good").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"good");
        assert!(
            start.elapsed() < handshake,
            "the good client waited for a stray one"
        );
        // The garbage client is told no and closed.
        let mut rest = Vec::new();
        let _ = garbage.read_to_end(&mut rest).await;
        assert_eq!(rest.len(), 37 + 1, "hello + reject byte, then EOF");
        assert_eq!(t.listener.stats().rejected, 1);
        // The silent one is still waiting (its handshake has not timed out).
        let mut hello = [0u8; 37];
        silent.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello[..4], b"HNLT");
    })
    .await;
}

#[tokio::test]
async fn tcp_connect_to_a_non_hostnet_server_is_a_clear_error() {
    bounded(async {
        let dir = temp_dir();
        let token = write_token(dir.path(), "token", "t");
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n-------------------")
                .await
                .unwrap();
            let _ = s.read(&mut [0u8; 64]).await;
        });
        let c = Connector::connect(
            format!("tcp://127.0.0.1:{port}").parse().unwrap(),
            Auth::token_file(&token).unwrap(),
        )
        .unwrap();
        assert_err_contains(c.open().await, "bad reply");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// quic

struct Keys {
    _dir: tempfile::TempDir,
    host: PathBuf,
    agent: PathBuf,
    other: PathBuf,
}

fn keys() -> Keys {
    let dir = temp_dir();
    let host = dir.path().join("host");
    let agent = dir.path().join("agent");
    let other = dir.path().join("other");
    keygen(&host).unwrap();
    keygen(&agent).unwrap();
    keygen(&other).unwrap();
    Keys {
        _dir: dir,
        host,
        agent,
        other,
    }
}

fn identity(own: &Path, peer: &Path) -> Auth {
    Auth::tls(TlsIdentity::from_dir(own, &peer.join("cert.der")).unwrap())
}

fn quic_setup(k: &Keys) -> (Connector, Listener) {
    let listener = Listener::bind(
        "quic://127.0.0.1:0".parse().unwrap(),
        identity(&k.agent, &k.host),
    )
    .unwrap();
    let connector = Connector::connect(
        listener.local_endpoint().clone(),
        identity(&k.host, &k.agent),
    )
    .unwrap();
    (connector, listener)
}

#[tokio::test]
async fn quic_bulk_both_ways() {
    bounded(async {
        let k = keys();
        let (c, mut l) = quic_setup(&k);
        let (a, b) = pair(&c, &mut l).await;
        assert!(matches!(b.peer(), Peer::Quic { .. }), "{}", b.peer());
        // A QUIC stream's FIN is the application's: raw mode is safe.
        assert!(a.eof_is_deliberate() && b.eof_is_deliberate());
        bulk_both_ways(a, b).await;
    })
    .await;
}

#[tokio::test]
async fn quic_half_close() {
    bounded(async {
        let k = keys();
        let (c, mut l) = quic_setup(&k);
        let (a, b) = pair(&c, &mut l).await;
        half_close(a, b).await;
    })
    .await;
}

#[tokio::test]
async fn quic_reset_both_directions() {
    bounded(async {
        let k = keys();
        let (c, mut l) = quic_setup(&k);
        let (a, b) = pair(&c, &mut l).await;
        reset_is_seen(a, b).await;
        let (a, b) = pair(&c, &mut l).await;
        reset_is_seen(b, a).await;
        // STOP_SENDING: a peer still writing into a reset stream gets an error too.
        let (a, mut b) = pair(&c, &mut l).await;
        a.reset();
        let chunk = payload(6, 65536);
        let e = loop {
            if let Err(e) = b.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    })
    .await;
}

#[tokio::test]
async fn quic_concurrent_streams_share_one_connection() {
    bounded(async {
        let k = keys();
        let (c, l) = quic_setup(&k);
        let c = Arc::new(c);
        let conn = c.quic_connection().await.unwrap().unwrap();
        let c2 = c.clone();
        concurrent_streams(c, l).await;
        assert!(conn.close_reason().is_none());
        let still = c2.current_quic_connection().await.unwrap();
        assert_eq!(
            still.stable_id(),
            conn.stable_id(),
            "one connection for all streams"
        );
    })
    .await;
}

#[tokio::test]
async fn quic_connection_is_reestablished() {
    bounded(async {
        let k = keys();
        let (c, mut l) = quic_setup(&k);
        let (mut a, mut b) = pair(&c, &mut l).await;
        let first = c.current_quic_connection().await.unwrap();
        c.close_connection().await;
        // The old stream fails on both ends.
        assert!(read_until_error_or_eof(&mut a).await.is_some());
        assert!(read_until_error_or_eof(&mut b).await.is_some());
        // A new open makes a new connection, and the listener accepts from it.
        let (mut a, mut b) = pair(&c, &mut l).await;
        let second = c.current_quic_connection().await.unwrap();
        assert_ne!(first.stable_id(), second.stable_id());
        a.write_all(b"again").await.unwrap();
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");
    })
    .await;
}

#[tokio::test]
async fn quic_datagrams() {
    bounded(async {
        let k = keys();
        let (c, mut l) = quic_setup(&k);
        let (_a, b) = pair(&c, &mut l).await;
        let host_conn = c.quic_connection().await.unwrap().unwrap();
        let agent_conn = b.quic_connection().unwrap().clone();
        let d = payload(7, 1000);
        host_conn.send_datagram(d.clone().into()).unwrap();
        let got = agent_conn.read_datagram().await.unwrap();
        assert_same(&got, &d, "datagram");
    })
    .await;
}

#[tokio::test]
async fn quic_wrong_pinned_certificate_fails_the_handshake() {
    bounded(async {
        let k = keys();
        // The host pins a certificate the agent does not have.
        let l = Listener::bind(
            "quic://127.0.0.1:0".parse().unwrap(),
            identity(&k.agent, &k.host),
        )
        .unwrap();
        let c =
            Connector::connect(l.local_endpoint().clone(), identity(&k.host, &k.other)).unwrap();
        let e = assert_err_contains(c.open().await, "QUIC connection");
        assert!(matches!(e, TransportError::QuicConnection { .. }), "{e:?}");
        eprintln!("host pinning the wrong agent cert: {e}");

        // The agent pins a certificate the host does not have.
        let l = Listener::bind(
            "quic://127.0.0.1:0".parse().unwrap(),
            identity(&k.agent, &k.other),
        )
        .unwrap();
        let c =
            Connector::connect(l.local_endpoint().clone(), identity(&k.host, &k.agent)).unwrap();
        // The listener refuses the host's certificate; open() says so (the listener's
        // welcome never comes, its close reason does).
        let e = assert_err_contains(c.open().await, "not the pinned");
        eprintln!("agent pinning the wrong host cert: {e}");
        // (The listener counts it in `rejected` too, but only after the client has seen the
        // close, so that count is not checked here to avoid a race.)
        assert_eq!(l.stats().accepted, 0);
    })
    .await;
}

/// Reads until an error (`Some`) or a clean EOF (`None`).
async fn read_until_error_or_eof<S: AsyncRead + Unpin>(s: &mut S) -> Option<io::Error> {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(e),
        }
    }
}

#[tokio::test]
async fn quic_requires_credentials() {
    let ep: Endpoint = "quic://127.0.0.1:0".parse().unwrap();
    assert_err_contains(
        Listener::bind(ep.clone(), Auth::none()),
        "refusing to start",
    );
    assert_err_contains(Connector::connect(ep, Auth::none()), "certificate");
}

// ---------------------------------------------------------------------------------------------
// hybrid vsock

/// A stand-in for Firecracker / vhost-device-vsock's host socket. Per guest port:
/// 1234 answers `OK 1234\n` and hands the stream over; 1235 answers `OK 1235\n` with the
/// guest's first bytes in the same write; 9 closes without reply (nobody listens); 10 never
/// answers; 11 answers garbage.
struct HybridPeer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    streams: mpsc::Receiver<UnixStream>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HybridPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AcceptStreams for HybridPeer {
    type S = UnixStream;
    async fn next(&mut self) -> UnixStream {
        self.streams.recv().await.expect("hybrid peer gone")
    }
}

async fn read_line(s: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await?;
        line.push(b);
        if b == b'\n' || line.len() > 64 {
            return Ok(line);
        }
    }
}

fn hybrid_peer() -> HybridPeer {
    let dir = temp_dir();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, streams) = mpsc::channel(CONCURRENT);
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(line) = read_line(&mut s).await else {
                    return;
                };
                match &line[..] {
                    b"CONNECT 1234\n" => {
                        s.write_all(b"OK 1234\n").await.unwrap();
                        let _ = tx.send(s).await;
                    }
                    b"CONNECT 1235\n" => {
                        s.write_all(b"OK 1235\nGUEST-FIRST").await.unwrap();
                        let _ = tx.send(s).await;
                    }
                    b"CONNECT 9\n" => drop(s),
                    b"CONNECT 10\n" => {
                        let _ = s.read(&mut [0u8; 1]).await;
                    }
                    b"CONNECT 11\n" => {
                        s.write_all(b"HELLO THERE\n").await.unwrap();
                        let _ = s.read(&mut [0u8; 1]).await;
                    }
                    other => panic!("unexpected request {:?}", other.escape_ascii().to_string()),
                }
            });
        }
    });
    HybridPeer {
        _dir: dir,
        path,
        streams,
        task,
    }
}

fn hybrid_connector(peer: &HybridPeer, port: u32, timeouts: Timeouts) -> Connector {
    let ep: Endpoint = format!("hybrid-vsock://{}?port={port}", peer.path.display())
        .parse()
        .unwrap();
    Connector::connect_with(ep, Auth::none(), timeouts).unwrap()
}

#[tokio::test]
async fn hybrid_bulk_both_ways() {
    bounded(async {
        let mut peer = hybrid_peer();
        let c = hybrid_connector(&peer, 1234, Timeouts::default());
        assert!(!c.carries_half_close());
        let a = c.open().await.unwrap();
        assert!(!a.carries_half_close());
        assert_eq!(
            a.peer().to_string(),
            format!("hybrid-vsock:{}:1234", peer.path.display())
        );
        let b = peer.next().await;
        bulk_both_ways(a, b).await;
    })
    .await;
}

#[tokio::test]
async fn hybrid_bytes_after_ok_belong_to_the_guest() {
    bounded(async {
        let mut peer = hybrid_peer();
        let c = hybrid_connector(&peer, 1235, Timeouts::default());
        let mut a = c.open().await.unwrap();
        let mut b = peer.next().await;
        let mut buf = [0u8; 11];
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GUEST-FIRST");
        a.write_all(b"host").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"host");
    })
    .await;
}

/// The unix leg has no RST either: the test peer sees ECONNRESET because unread data is left
/// behind (see `unix_reset_with_unread_data_is_seen`); across a real hybrid vsock backend a
/// reset is carried by the protocol's framed mode.
#[tokio::test]
async fn hybrid_reset_with_unread_data_is_seen() {
    bounded(async {
        let mut peer = hybrid_peer();
        let c = hybrid_connector(&peer, 1234, Timeouts::default());
        let a = c.open().await.unwrap();
        let mut b = peer.next().await;
        assert!(!a.carries_reset());
        b.write_all(&payload(8, 1000)).await.unwrap();
        a.reset();
        let e = read_until_error(&mut b).await;
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    })
    .await;
}

#[tokio::test]
async fn hybrid_concurrent_streams() {
    bounded(async {
        let peer = hybrid_peer();
        let c = hybrid_connector(&peer, 1234, Timeouts::default());
        concurrent_streams(c, peer).await;
    })
    .await;
}

#[tokio::test]
async fn hybrid_close_without_reply_is_no_listener() {
    bounded(async {
        let peer = hybrid_peer();
        let c = hybrid_connector(&peer, 9, Timeouts::default());
        let e = c.open().await.unwrap_err();
        assert!(
            matches!(e, TransportError::NoListener { port: 9, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .ends_with("guest port 9: no listener (connection closed without reply)"),
            "{e}"
        );
    })
    .await;
}

#[tokio::test]
async fn hybrid_no_reply_times_out_clearly() {
    bounded(async {
        let peer = hybrid_peer();
        let handshake = Duration::from_millis(300);
        let c = hybrid_connector(
            &peer,
            10,
            Timeouts {
                handshake,
                ..Timeouts::default()
            },
        );
        let start = Instant::now();
        let e = c.open().await.unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(e, TransportError::HandshakeTimeout { .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("guest port 10"), "{e}");
        assert!(e.to_string().contains("no reply"), "{e}");
        assert!(took >= handshake && took < handshake * 10, "{took:?}");
    })
    .await;
}

#[tokio::test]
async fn hybrid_garbage_reply_is_a_clear_error() {
    bounded(async {
        let peer = hybrid_peer();
        let c = hybrid_connector(&peer, 11, Timeouts::default());
        let e = c.open().await.unwrap_err();
        assert!(matches!(e, TransportError::BadReply { .. }), "{e:?}");
        assert!(e.to_string().contains("HELLO THERE"), "{e}");
        assert!(e.to_string().contains("guest port 11"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn hybrid_is_connect_side_only() {
    let ep: Endpoint = "hybrid-vsock:///tmp/x.sock?port=5".parse().unwrap();
    assert_err_contains(Listener::bind(ep, Auth::none()), "connect side only");
    let ep: Endpoint = "vsock://any:5".parse().unwrap();
    assert_err_contains(Connector::connect(ep, Auth::none()), "for listening");
}
