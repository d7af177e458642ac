//! What the relay tests share: a whole relayed connection (client ⇄ relay ⇄ framed unix link
//! stream ⇄ relay ⇄ server, both relays in this process) and a checked byte stream.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hostnet_link::proto::{self, PayloadStream, RelayTarget, StreamHeader, StreamKind, StreamMode};
use hostnet_link::relay::{RelayEnd, relay, reset_tcp};
use hostnet_link::transport::{Auth, Connector, Endpoint, Listener, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const STEP: Duration = Duration::from_secs(20);

/// A connected TCP pair.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a: SocketAddr = l.local_addr().unwrap();
    let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
    (c.unwrap(), s.unwrap().0)
}

pub fn header() -> StreamHeader {
    StreamHeader {
        kind: StreamKind::TcpRelay(RelayTarget {
            target: "127.0.0.1:8000".parse().unwrap(),
            client: "127.0.0.1:40000".parse().unwrap(),
        }),
        mode: StreamMode::Framed,
    }
}

/// The unix link: (connector, listener) in `dir`.
pub fn link(dir: &Path) -> (Connector, Listener) {
    let ep: Endpoint = format!("unix://{}", dir.join("l.sock").display())
        .parse()
        .unwrap();
    let l = Listener::bind(ep.clone(), Auth::none()).unwrap();
    (Connector::connect(ep, Auth::none()).unwrap(), l)
}

/// A whole relayed connection: `client` ⇄ relay ⇄ unix link ⇄ relay ⇄ `server`.
pub struct Chain {
    pub client: TcpStream,
    pub server: TcpStream,
    pub near: JoinHandle<RelayEnd>,
    pub far: JoinHandle<RelayEnd>,
    _dir: tempfile::TempDir,
}

pub async fn chain() -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let (client, near, a) = near_half(dir.path()).await;
    let (far_local, server) = tcp_pair().await;
    let far = tokio::spawn(async move {
        let link = PayloadStream::new(a, StreamMode::Framed);
        relay(far_local, link, &CancellationToken::new(), reset_tcp).await
    });
    Chain {
        client,
        server,
        near,
        far,
        _dir: dir,
    }
}

/// The client's half of a chain, with its link in `dir`: the client, its relay on a framed
/// unix link stream, and that stream's other end as accepted (header read and checked), for
/// the caller to play the far side.
pub async fn near_half(dir: &Path) -> (TcpStream, JoinHandle<RelayEnd>, Stream) {
    let (c, mut l) = link(dir);
    let (client, near_local) = tcp_pair().await;
    let mut s = c.open().await.unwrap();
    proto::write_header(&mut s, &header()).await.unwrap();
    let near = tokio::spawn(async move {
        let link = PayloadStream::new(s, StreamMode::Framed);
        relay(near_local, link, &CancellationToken::new(), reset_tcp).await
    });
    let mut a = tokio::time::timeout(STEP, l.accept())
        .await
        .unwrap()
        .unwrap();
    let h = proto::read_header(&mut a, STEP).await.unwrap();
    assert_eq!(h, header());
    (client, near, a)
}

/// A seeded pseudo-random byte stream (xorshift64*): the same bytes however it is cut.
pub struct Prng {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Prng {
    pub fn new(seed: u64) -> Self {
        Prng {
            state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Writes `total` bytes of the stream `seed` in writes of `chunk` bytes, then shuts down.
pub async fn send(mut w: impl AsyncWrite + Unpin, seed: u64, total: usize, chunk: usize) {
    let mut prng = Prng::new(seed);
    let mut buf = vec![0u8; chunk];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk);
        prng.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await.unwrap();
        left -= n;
    }
    w.shutdown().await.unwrap();
}

/// Reads to EOF and checks that exactly `total` bytes of the stream `seed` came.
pub async fn check(mut r: impl AsyncRead + Unpin, seed: u64, total: usize, what: &str) {
    let mut prng = Prng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(got + n <= total, "{what}: more than {total} bytes");
        prng.fill(&mut want[..n]);
        assert!(
            buf[..n] == want[..n],
            "{what}: bytes differ in {got}..{}",
            got + n
        );
        got += n;
    }
    assert_eq!(got, total, "{what}: stream ended early");
}

/// `total` bytes each way at once through a fresh chain (streams `seed` and `seed + 1`), each
/// way half-closed at its end: checks every byte and that both relays end cleanly with the
/// counts.
pub async fn bulk_both_ways(total: usize, seed: u64) {
    let c = chain().await;
    let (cr, cw) = c.client.into_split();
    let (sr, sw) = c.server.into_split();
    let jobs = [
        tokio::spawn(send(cw, seed, total, 256 * 1024)),
        tokio::spawn(send(sw, seed + 1, total, 256 * 1024)),
        tokio::spawn(check(sr, seed, total, "client to server")),
        tokio::spawn(check(cr, seed + 1, total, "server to client")),
    ];
    for j in jobs {
        tokio::time::timeout(STEP, j).await.unwrap().unwrap();
    }
    for (name, r) in [("near", c.near), ("far", c.far)] {
        match tokio::time::timeout(STEP, r).await.unwrap().unwrap() {
            RelayEnd::Done(up, down) => {
                assert_eq!((up, down), (total as u64, total as u64), "{name}")
            }
            other => panic!("{name} relay: {other:?}"),
        }
    }
}
