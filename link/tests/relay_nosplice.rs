//! `HOSTNET_SPLICE=0` makes the relays copy: the same bulk transfer as in `relay_splice.rs`
//! arrives intact and nothing is spliced. Alone in its binary: the switch is read once per
//! process.

#![cfg(target_os = "linux")]

mod chain;

use chain::bulk_both_ways;
use hostnet_link::splice::{enabled, spliced_bytes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostnet_splice_0_makes_the_relays_copy() {
    // SAFETY: set before any thread of this test binary reads the environment (the runtime's
    // workers do not), and read once by `enabled` below.
    unsafe { std::env::set_var("HOSTNET_SPLICE", "0") };
    assert!(!enabled());
    bulk_both_ways(8 << 20, 3).await;
    assert_eq!(spliced_bytes(), 0);
}
