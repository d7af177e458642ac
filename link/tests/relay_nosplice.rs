//! `HOSTNET_SPLICE=0` makes the relays copy: the same bulk transfer as in `relay_splice.rs`
//! arrives intact and nothing is spliced. Alone in its binary: the switch is read once per
//! process.

#![cfg(target_os = "linux")]

mod chain;

use chain::{STEP, chain, check, send};
use hostnet_link::relay::RelayEnd;
use hostnet_link::splice::{enabled, spliced_bytes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostnet_splice_0_makes_the_relays_copy() {
    // SAFETY: set before any thread of this test binary reads the environment (the runtime's
    // workers do not), and read once by `enabled` below.
    unsafe { std::env::set_var("HOSTNET_SPLICE", "0") };
    assert!(!enabled());
    const TOTAL: usize = 8 << 20;
    let c = chain().await;
    let (cr, cw) = c.client.into_split();
    let (sr, sw) = c.server.into_split();
    let jobs = [
        tokio::spawn(send(cw, 3, TOTAL, 256 * 1024)),
        tokio::spawn(send(sw, 4, TOTAL, 256 * 1024)),
        tokio::spawn(check(sr, 3, TOTAL, "client to server")),
        tokio::spawn(check(cr, 4, TOTAL, "server to client")),
    ];
    for j in jobs {
        tokio::time::timeout(STEP, j).await.unwrap().unwrap();
    }
    for r in [c.near, c.far] {
        match tokio::time::timeout(STEP, r).await.unwrap().unwrap() {
            RelayEnd::Done(up, down) => assert_eq!((up, down), (TOTAL as u64, TOTAL as u64)),
            other => panic!("relay: {other:?}"),
        }
    }
    assert_eq!(spliced_bytes(), 0);
}
