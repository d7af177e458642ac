//! The relay splices bulk data (Linux, framed unix link streams): both relays of a connection
//! run here, a TCP pair on each side and a real unix link stream between them, as the
//! forwarder and the agent run them. Every byte is checked (a seeded pseudo-random stream);
//! what matters is that splicing keeps the frames, the order, half-close and resets exactly as
//! copying does, and that bulk data is in fact spliced.

#![cfg(target_os = "linux")]

use std::net::SocketAddr;
use std::time::Duration;

use hostnet_link::proto::framed::FRAME_DATA;
use hostnet_link::proto::{self, PayloadStream, RelayTarget, StreamHeader, StreamKind, StreamMode};
use hostnet_link::relay::{RelayEnd, relay, reset_tcp};
use hostnet_link::splice::spliced_bytes;
use hostnet_link::transport::{Auth, Connector, Endpoint, Listener};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const STEP: Duration = Duration::from_secs(20);

/// A connected TCP pair.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a: SocketAddr = l.local_addr().unwrap();
    let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
    (c.unwrap(), s.unwrap().0)
}

fn header() -> StreamHeader {
    StreamHeader {
        kind: StreamKind::TcpRelay(RelayTarget {
            target: "127.0.0.1:8000".parse().unwrap(),
            client: "127.0.0.1:40000".parse().unwrap(),
        }),
        mode: StreamMode::Framed,
    }
}

/// The unix link: (connector, listener) in `dir`.
fn link(dir: &std::path::Path) -> (Connector, Listener) {
    let ep: Endpoint = format!("unix://{}", dir.join("l.sock").display())
        .parse()
        .unwrap();
    let l = Listener::bind(ep.clone(), Auth::none()).unwrap();
    (Connector::connect(ep, Auth::none()).unwrap(), l)
}

/// A whole relayed connection: `client` ⇄ relay ⇄ unix link ⇄ relay ⇄ `server`.
struct Chain {
    client: TcpStream,
    server: TcpStream,
    near: JoinHandle<RelayEnd>,
    far: JoinHandle<RelayEnd>,
    _dir: tempfile::TempDir,
}

async fn chain() -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut l) = link(dir.path());
    let (client, near_local) = tcp_pair().await;
    let (far_local, server) = tcp_pair().await;
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

/// A seeded pseudo-random byte stream (xorshift64*): the same bytes however it is cut.
struct Prng {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Prng {
    fn new(seed: u64) -> Self {
        Prng {
            state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
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
async fn send(mut w: impl AsyncWrite + Unpin, seed: u64, total: usize, chunk: usize) {
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
async fn check(mut r: impl AsyncRead + Unpin, seed: u64, total: usize, what: &str) {
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

/// 24 MiB each way at once, half-closed each way: intact, both relays end cleanly with the
/// counts, and most of it was spliced rather than copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_is_spliced_and_intact() {
    const TOTAL: usize = 24 << 20;
    let before = spliced_bytes();
    let c = chain().await;
    let (cr, cw) = c.client.into_split();
    let (sr, sw) = c.server.into_split();
    let jobs = [
        tokio::spawn(send(cw, 1, TOTAL, 256 * 1024)),
        tokio::spawn(send(sw, 2, TOTAL, 256 * 1024)),
        tokio::spawn(check(sr, 1, TOTAL, "client to server")),
        tokio::spawn(check(cr, 2, TOTAL, "server to client")),
    ];
    for j in jobs {
        tokio::time::timeout(STEP, j).await.unwrap().unwrap();
    }
    for (name, r) in [("near", c.near), ("far", c.far)] {
        match tokio::time::timeout(STEP, r).await.unwrap().unwrap() {
            RelayEnd::Done(up, down) => {
                assert_eq!((up, down), (TOTAL as u64, TOTAL as u64), "{name}")
            }
            other => panic!("{name} relay: {other:?}"),
        }
    }
    // Four relay directions moved TOTAL each; the first bytes of a burst and the heads of
    // frames are copied.
    let spliced = spliced_bytes() - before;
    assert!(
        spliced >= 2 * TOTAL as u64,
        "only {spliced} of {} bytes spliced",
        4 * TOTAL
    );
}

/// Small writes and bursts in turn on one connection, echoed back by the server: each
/// direction goes from copying to splicing and back, and the bytes stay in order.
#[tokio::test]
async fn small_writes_and_bursts_interleave_in_order() {
    let c = chain().await;
    let (mut sr, mut sw) = c.server.into_split();
    let echo = tokio::spawn(async move {
        let n = tokio::io::copy(&mut sr, &mut sw).await.unwrap();
        sw.shutdown().await.unwrap();
        n
    });
    let (cr, mut cw) = c.client.into_split();
    // Sizes: a round of small writes, a 3 MiB burst, small again, a burst of odd size...
    let sizes: Vec<usize> = (0..12)
        .flat_map(|i| {
            let burst = if i % 2 == 0 {
                3 << 20
            } else {
                (1 << 20) + 4099
            };
            [100, 1, 7000, burst, 64, 20_000 + i]
        })
        .collect();
    let total: usize = sizes.iter().sum();
    let reader = tokio::spawn(check(cr, 9, total, "echo"));
    let mut prng = Prng::new(9);
    for s in sizes {
        let mut buf = vec![0u8; s];
        prng.fill(&mut buf);
        cw.write_all(&buf).await.unwrap();
        if s < 100_000 {
            // Let a small write go through on its own (a request/response pattern).
            tokio::task::yield_now().await;
        }
    }
    cw.shutdown().await.unwrap();
    tokio::time::timeout(STEP, reader).await.unwrap().unwrap();
    assert_eq!(
        tokio::time::timeout(STEP, echo).await.unwrap().unwrap(),
        total as u64
    );
    for r in [c.near, c.far] {
        match tokio::time::timeout(STEP, r).await.unwrap().unwrap() {
            RelayEnd::Done(up, down) => assert_eq!((up, down), (total as u64, total as u64)),
            other => panic!("relay: {other:?}"),
        }
    }
}

/// The server resets while bulk data is being spliced towards it: the client's writes fail
/// (its connection was reset in turn), and both relays end with a reset, not a clean end.
#[tokio::test]
async fn reset_while_splicing_resets_the_client() {
    let c = chain().await;
    let mut client = c.client;
    let mut server = c.server;
    let writer = tokio::spawn(async move {
        let buf = vec![5u8; 1 << 20];
        // Until the reset comes back through the chain (bounded: 4 GiB).
        for _ in 0..4096 {
            if let Err(e) = client.write_all(&buf).await {
                return e;
            }
        }
        panic!("4 GiB written and no reset");
    });
    // Let bulk data flow (so the relays splice), then reset.
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 20];
    while got < 16 << 20 {
        got += server.read(&mut buf).await.unwrap();
    }
    reset_tcp(server);
    let e = tokio::time::timeout(STEP, writer).await.unwrap().unwrap();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "client write after the reset: {e}"
    );
    for r in [c.near, c.far] {
        match tokio::time::timeout(STEP, r).await.unwrap().unwrap() {
            RelayEnd::Reset(_) => {}
            other => panic!("relay: {other:?}"),
        }
    }
}

/// The link ends inside a large data frame whose payload is being spliced: that is a broken
/// stream, never a clean end — the client is reset after the bytes that came.
#[tokio::test]
async fn link_cut_inside_a_spliced_frame_resets_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut l) = link(dir.path());
    let (mut client, local) = tcp_pair().await;
    let mut s = c.open().await.unwrap();
    proto::write_header(&mut s, &header()).await.unwrap();
    let near = tokio::spawn(async move {
        let link = PayloadStream::new(s, StreamMode::Framed);
        relay(local, link, &CancellationToken::new(), reset_tcp).await
    });
    let mut a = tokio::time::timeout(STEP, l.accept())
        .await
        .unwrap()
        .unwrap();
    proto::read_header(&mut a, STEP).await.unwrap();
    // A frame announcing 200,000 bytes, of which 150,000 come; then the stream closes.
    let mut frame = vec![FRAME_DATA];
    frame.extend_from_slice(&200_000u32.to_be_bytes());
    frame.extend(std::iter::repeat_n(3u8, 150_000));
    a.write_all(&frame).await.unwrap();
    a.flush().await.unwrap();
    drop(a);
    let mut got = Vec::new();
    let r = tokio::time::timeout(STEP, client.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "client after a cut frame: {r:?} ({} bytes)",
        got.len()
    );
    assert!(got.len() <= 150_000 && got.iter().all(|&b| b == 3));
    match tokio::time::timeout(STEP, near).await.unwrap().unwrap() {
        RelayEnd::Reset(e) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}"),
        other => panic!("relay: {other:?}"),
    }
}
