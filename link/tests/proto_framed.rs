//! Raw and framed payload modes over real unix socket pairs: half-close, reset, bulk data.
//! Unix hosts (unix socket pairs are what the framed mode exists for).

#![cfg(unix)]

use std::io;
use std::time::Duration;

use hostnet_link::proto::{
    self, Framed, PayloadStream, RelayStatus, RelayTarget, StreamHeader, StreamKind, StreamMode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Deterministic pseudo-random bytes (xorshift), so each side can check what it received.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, to compare large payloads by checksum.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A relay stream set up the way the protocol says: header, status, then the payload phase in
/// `mode` on both ends. Returns (opener, acceptor).
async fn relay_pair(mode: StreamMode) -> (PayloadStream<UnixStream>, PayloadStream<UnixStream>) {
    let (mut opener, mut acceptor) = UnixStream::pair().unwrap();
    let header = StreamHeader {
        kind: StreamKind::TcpRelay(RelayTarget {
            target: "127.0.0.1:8000".parse().unwrap(),
            client: "127.0.0.1:40000".parse().unwrap(),
        }),
        mode,
    };
    proto::write_header(&mut opener, &header).await.unwrap();
    let got = proto::read_header(&mut acceptor, proto::HEADER_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(got, header);
    proto::write_status(&mut acceptor, &RelayStatus::Ok)
        .await
        .unwrap();
    let status = proto::read_status(&mut opener, proto::STATUS_TIMEOUT)
        .await
        .unwrap();
    assert!(status.is_ok());
    let (opener, acceptor) = (
        PayloadStream::new(opener, mode),
        PayloadStream::new(acceptor, got.mode),
    );
    assert_eq!(acceptor.mode(), mode);
    (opener, acceptor)
}

/// Client writes a request and half-closes; the server reads it all, then EOF, then replies
/// and half-closes; the client reads the whole reply, then EOF.
async fn half_close(mode: StreamMode) {
    let (mut client, mut server) = relay_pair(mode).await;
    let request = pattern(1, 300_000);
    let reply = pattern(2, 500_000);

    let expect_request = request.clone();
    let reply_to_send = reply.clone();
    let server_task = tokio::spawn(async move {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(checksum(&got), checksum(&expect_request));
        assert_eq!(got.len(), expect_request.len());
        // EOF again on a second read.
        assert_eq!(server.read(&mut [0u8; 16]).await.unwrap(), 0);
        // The other direction still flows after the peer's half-close.
        server.write_all(&reply_to_send).await.unwrap();
        server.shutdown().await.unwrap();
        server
    });

    client.write_all(&request).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut got))
        .await
        .expect("reply in time")
        .unwrap();
    assert_eq!(got.len(), reply.len());
    assert_eq!(checksum(&got), checksum(&reply));
    let _server = server_task.await.unwrap();
}

#[tokio::test]
async fn half_close_raw() {
    half_close(StreamMode::Raw).await;
}

#[tokio::test]
async fn half_close_framed() {
    half_close(StreamMode::Framed).await;
}

/// The same exchange the other way round: the acceptor half-closes first.
async fn half_close_reversed(mode: StreamMode) {
    let (mut opener, mut acceptor) = relay_pair(mode).await;
    acceptor.write_all(b"banner\n").await.unwrap();
    acceptor.shutdown().await.unwrap();
    let mut got = Vec::new();
    opener.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"banner\n");
    opener.write_all(b"bye\n").await.unwrap();
    opener.shutdown().await.unwrap();
    let mut got = Vec::new();
    acceptor.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye\n");
}

#[tokio::test]
async fn half_close_reversed_raw() {
    half_close_reversed(StreamMode::Raw).await;
}

#[tokio::test]
async fn half_close_reversed_framed() {
    half_close_reversed(StreamMode::Framed).await;
}

#[tokio::test]
async fn reset_frame_is_connection_reset_on_the_peer() {
    let (a, b) = UnixStream::pair().unwrap();
    let (mut a, mut b) = (Framed::new(a), Framed::new(b));
    a.write_all(b"partial").await.unwrap();
    a.reset().await.unwrap();
    let mut buf = [0u8; 64];
    // Data sent before the reset is delivered, then the reset.
    let n = b.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"partial");
    let e = b.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    assert!(b.peer_reset());
    let e = b.write_all(b"x").await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    // The resetting side's own reads and writes stop too.
    assert_eq!(
        a.read(&mut buf).await.unwrap_err().kind(),
        io::ErrorKind::ConnectionAborted
    );
    assert!(a.write_all(b"y").await.is_err());
}

#[tokio::test]
async fn reset_after_half_close() {
    let (a, b) = UnixStream::pair().unwrap();
    let (mut a, mut b) = (Framed::new(a), Framed::new(b));
    a.write_all(b"req").await.unwrap();
    a.shutdown().await.unwrap();
    assert!(
        a.write_all(b"more")
            .await
            .is_err_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    );
    let mut got = Vec::new();
    b.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"req");
    assert!(b.peer_ended());
    b.reset().await.unwrap();
    let e = a.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn framed_bulk_both_ways_at_once() {
    const LEN: usize = 8 * 1024 * 1024;
    let (a, b) = UnixStream::pair().unwrap();
    let (a, b) = (Framed::new(a), Framed::new(b));

    async fn side(s: Framed<UnixStream>, send_seed: u64, recv_seed: u64) {
        let (mut r, mut w) = tokio::io::split(s);
        let out = pattern(send_seed, LEN);
        let writer = async move {
            // Uneven write sizes cross frame boundaries.
            for chunk in out.chunks(100_003) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        };
        let reader = async move {
            let mut got = Vec::with_capacity(LEN);
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got.len(), LEN);
        assert_eq!(checksum(&got), checksum(&pattern(recv_seed, LEN)));
    }

    let t1 = tokio::spawn(side(a, 11, 22));
    let t2 = tokio::spawn(side(b, 22, 11));
    tokio::time::timeout(Duration::from_secs(60), async {
        t1.await.unwrap();
        t2.await.unwrap();
    })
    .await
    .expect("bulk transfer in time");
}

#[tokio::test]
async fn framed_through_a_tiny_pipe() {
    // A 7-byte duplex forces partial frame heads and payloads on both sides.
    let (a, b) = tokio::io::duplex(7);
    let (mut a, mut b) = (Framed::new(a), Framed::new(b));
    let data = pattern(5, 200_000);
    let expect = data.clone();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expect);
    });
    a.write_all(&data).await.unwrap();
    a.shutdown().await.unwrap();
    reader.await.unwrap();
}

#[tokio::test]
async fn malformed_frames_are_errors() {
    for (bytes, kind) in [
        (&[0x09u8][..], io::ErrorKind::InvalidData), // unknown type
        (&[0x01, 0, 0, 0, 0][..], io::ErrorKind::InvalidData), // empty data frame
        (
            &[0x01, 0xff, 0xff, 0xff, 0xff][..],
            io::ErrorKind::InvalidData,
        ), // oversize
        (&[0x01, 0, 0, 0, 9, 1, 2][..], io::ErrorKind::UnexpectedEof), // truncated payload
        (&[0x01, 0, 0][..], io::ErrorKind::UnexpectedEof), // truncated head
        (&[][..], io::ErrorKind::UnexpectedEof),     // closed without END
    ] {
        let (mut w, r) = UnixStream::pair().unwrap();
        w.write_all(bytes).await.unwrap();
        drop(w);
        let mut r = Framed::new(r);
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), kind, "{bytes:?}: {e}");
        // The error sticks.
        assert!(r.read(&mut [0u8; 4]).await.is_err());
    }
}

#[tokio::test]
async fn payload_stream_reset_is_framed_only() {
    let (mut raw, _peer) = relay_pair(StreamMode::Raw).await;
    assert!(!raw.reset_framed().await.unwrap());
    let (mut framed, mut peer) = relay_pair(StreamMode::Framed).await;
    assert!(framed.reset_framed().await.unwrap());
    let e = peer.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
}

mod prop {
    use super::*;
    use proptest::prelude::*;
    use std::io::IoSlice;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

    /// A duplex end that writes vectored, and at most `limits[i]` bytes per write (cycled):
    /// short writes that cut frame heads and payloads anywhere.
    struct Short {
        inner: DuplexStream,
        limits: Vec<usize>,
        turn: usize,
        vectored: bool,
    }

    impl AsyncRead for Short {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Short {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let limit = self.limits[self.turn % self.limits.len()];
            let mut gathered = Vec::new();
            for b in bufs {
                let take = (limit - gathered.len()).min(b.len());
                gathered.extend_from_slice(&b[..take]);
            }
            let r = Pin::new(&mut self.inner).poll_write(cx, &gathered);
            if r.is_ready() {
                self.turn += 1;
            }
            r
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Reads until EOF with read sizes taken in turn from `reads`.
    async fn read_to_eof<R: AsyncRead + Unpin>(r: &mut R, reads: &[usize]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 100_000];
        for i in 0.. {
            let want = reads[i % reads.len()];
            let n = r.read(&mut buf[..want]).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any write sizes, read sizes and pipe capacity: the reader gets exactly the bytes
        /// written, then EOF, then the reverse direction still works.
        #[test]
        fn framed_carries_any_split(
            data in proptest::collection::vec(any::<u8>(), 0..300_000),
            writes in proptest::collection::vec(1usize..400_000, 1..8),
            reads in proptest::collection::vec(1usize..100_000, 1..8),
            capacity in 1usize..70_000,
            limits in proptest::collection::vec(1usize..100_000, 1..8),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (a, b) = tokio::io::duplex(capacity);
                let a = Short { inner: a, limits: limits.clone(), turn: 0, vectored: true };
                let b = Short { inner: b, limits, turn: 0, vectored: true };
                let (mut a, mut b) = (Framed::new(a), Framed::new(b));
                let expect = data.clone();
                let reader = async move {
                    let got = read_to_eof(&mut b, &reads).await;
                    assert_eq!(got, expect);
                    b.write_all(b"done").await.unwrap();
                    b.shutdown().await.unwrap();
                };
                let writer = async move {
                    let mut rest = &data[..];
                    let mut i = 0;
                    while !rest.is_empty() {
                        let n = writes[i % writes.len()].min(rest.len());
                        i += 1;
                        a.write_all(&rest[..n]).await.unwrap();
                        rest = &rest[n..];
                    }
                    a.shutdown().await.unwrap();
                    let mut reply = Vec::new();
                    a.read_to_end(&mut reply).await.unwrap();
                    assert_eq!(reply, b"done");
                };
                tokio::join!(reader, writer);
            });
        }

        /// The same with the relay's writes (`poll_write_headroom`: the frame head written in
        /// room before the payload, one plain write), on a transport without vectored writes,
        /// read with large buffers (payload straight into them, the next head read along).
        #[test]
        fn headroom_writes_carry_any_split(
            data in proptest::collection::vec(any::<u8>(), 0..300_000),
            writes in proptest::collection::vec(1usize..400_000, 1..8),
            reads in proptest::collection::vec(8192usize..100_000, 1..8),
            capacity in 1usize..70_000,
            limits in proptest::collection::vec(1usize..100_000, 1..8),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (a, b) = tokio::io::duplex(capacity);
                let a = Short { inner: a, limits: limits.clone(), turn: 0, vectored: false };
                let b = Short { inner: b, limits, turn: 0, vectored: false };
                let (mut a, mut b) = (Framed::new(a), Framed::new(b));
                let expect = data.clone();
                let reader = async move {
                    let got = read_to_eof(&mut b, &reads).await;
                    assert_eq!(got, expect);
                };
                let writer = async move {
                    let head = proto::framed::DATA_HEAD_LEN;
                    let mut pos = 0;
                    let mut i = 0;
                    while pos < data.len() {
                        let n = writes[i % writes.len()].min(data.len() - pos);
                        i += 1;
                        // Room for the head, then the chunk; the caller keeps offering the
                        // rest, with the already written bytes as room for the next head.
                        let mut frame = vec![0xeeu8; head];
                        frame.extend_from_slice(&data[pos..pos + n]);
                        let mut off = 0;
                        while off < n {
                            let took = std::future::poll_fn(|cx| {
                                a.poll_write_headroom(cx, &mut frame[off..])
                            })
                            .await
                            .unwrap();
                            assert!(took > 0);
                            off += took;
                        }
                        pos += n;
                    }
                    a.shutdown().await.unwrap();
                };
                tokio::join!(reader, writer);
            });
        }
    }
}

#[tokio::test]
async fn reset_in_the_middle_of_a_frame_still_reaches_the_peer() {
    let (a, b) = UnixStream::pair().unwrap();
    let (mut a, mut b) = (Framed::new(a), Framed::new(b));
    // Nobody reads yet: a 256 KiB write is cut short by the socket buffer.
    let big = pattern(9, proto::MAX_FRAME_DATA as usize);
    let n = a.write(&big).await.unwrap();
    assert!(n > 0 && n < big.len(), "expected a short write, got {n}");
    // Not finishing the frame: shutdown is refused, reset ends the transport stream.
    let e = a.shutdown().await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    a.reset().await.unwrap();
    let mut got = Vec::new();
    let e = b.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    assert_eq!(got, big[..n]);
}

/// Frames that arrive together are read together: with a large read buffer (a relay's), a run
/// of small frames, a head cut between two reads, a frame longer than the first read, and END
/// or RESET right behind data all come out as the same bytes and ends.
#[tokio::test]
async fn small_frames_read_in_one_go_with_a_large_buffer() {
    use proto::framed::{FRAME_DATA, FRAME_END, FRAME_RESET};
    fn data(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![FRAME_DATA];
        v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend_from_slice(payload);
        v
    }
    let big = pattern(9, 100_000);

    // Several frames and END in one write: one read gives all the payload, the next EOF.
    let (mut w, r) = UnixStream::pair().unwrap();
    let mut r = Framed::new(r);
    let mut wire = data(b"abc");
    wire.extend(data(b"de"));
    wire.push(FRAME_END);
    w.write_all(&wire).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let n = r.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"abcde");
    assert_eq!(r.read(&mut buf).await.unwrap(), 0);
    assert!(r.peer_ended());

    // A head cut in two, then a frame longer than the first read, then END.
    let (mut w, r) = UnixStream::pair().unwrap();
    let mut r = Framed::new(r);
    let wire = data(b"wxyz");
    w.write_all(&wire[..3]).await.unwrap();
    let writer = tokio::spawn({
        let big = big.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            w.write_all(&wire[3..]).await.unwrap();
            w.write_all(&data(&big)).await.unwrap();
            w.write_all(&[FRAME_END]).await.unwrap();
            w
        }
    });
    let mut got = Vec::new();
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let mut want = b"wxyz".to_vec();
    want.extend_from_slice(&big);
    assert_eq!(got.len(), want.len());
    assert!(got == want, "payload differs");
    drop(writer.await.unwrap());

    // RESET right behind data: the data first, then the reset.
    let (mut w, r) = UnixStream::pair().unwrap();
    let mut r = Framed::new(r);
    let mut wire = data(b"last words");
    wire.push(FRAME_RESET);
    w.write_all(&wire).await.unwrap();
    let n = r.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"last words");
    let e = r.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);

    // A bad type byte behind good data is an error.
    let (mut w, r) = UnixStream::pair().unwrap();
    let mut r = Framed::new(r);
    let mut wire = data(b"ok");
    wire.push(0x7f);
    w.write_all(&wire).await.unwrap();
    let e = r.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
}
