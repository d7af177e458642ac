//! The relay splices bulk data (Linux, framed unix link streams): both relays of a connection
//! run here, a TCP pair on each side and a real unix link stream between them, as the
//! forwarder and the agent run them. Every byte is checked (a seeded pseudo-random stream);
//! what matters is that splicing keeps the frames, the order, half-close and resets exactly as
//! copying does, and that bulk data is in fact spliced.

#![cfg(target_os = "linux")]

mod chain;

use chain::{Prng, STEP, bulk_both_ways, chain, check, near_half};
use hostnet_link::proto::framed::FRAME_DATA;
use hostnet_link::relay::{RelayEnd, reset_tcp};
use hostnet_link::splice::spliced_bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 24 MiB each way at once, half-closed each way: intact, both relays end cleanly with the
/// counts, and most of it was spliced rather than copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_is_spliced_and_intact() {
    const TOTAL: usize = 24 << 20;
    let before = spliced_bytes();
    bulk_both_ways(TOTAL, 1).await;
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
    let (mut client, near, mut a) = near_half(dir.path()).await;
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
