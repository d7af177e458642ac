//! hostnet-link: what the forwarder (host) and the agent (VM) share.
//!
//! - [`proto`]: the wire protocol — stream preface and headers, relay status, the control
//!   stream's messages, and the framed stream mode for transports that cannot half-close.
//! - [`transport`]: one URI per transport (`vsock://`, `hybrid-vsock://`, `unix://`, `tcp://`,
//!   `quic://`, `hvsock://`), each giving authenticated byte streams that can half-close and
//!   reset; the ones a host system lacks are refused with a clear error.
//! - [`relay`]: the byte relay between a local TCP connection and a link stream, with
//!   half-close carried and resets passed on; both sides use it. It moves bulk data with
//!   [`splice`] where the system and both ends allow (Linux, unix link streams).
//! - [`discovery`]: the listener set and its diff (every host); on Linux, the listening sockets
//!   of this machine through netlink sock_diag, and a watcher that reports additions and
//!   removals.
//! - [`udp`]: UDP flows over the session's datagram channel (one per session, every flow,
//!   both directions; QUIC datagrams where the transport has them).
//! - [`ports`]: port lists (`80,8000-8100,tcp:5432,udp:53`) and the allow/deny filter they
//!   make: the agent's `--allow`/`--deny` and the forwarder's `--reverse-allow`/`--reverse-deny`.
//!
//! The crate builds for Linux, macOS and Windows hosts: the protocol, the relay and the unix,
//! tcp, QUIC and hybrid-vsock transports are portable; sock_diag and AF_VSOCK are Linux-only and
//! AF_HYPERV Windows-only, each behind `cfg(target_os)` on its code and its dependencies.

pub mod discovery;
mod pool;
pub mod ports;
pub mod proto;
pub mod relay;
pub mod splice;
pub mod transport;
pub mod udp;

/// The async runtime of the forwarder and the agent, with `threads` threads: a current-thread
/// runtime for 1, a work-stealing pool for more.
///
/// Both use one thread by default. Measured with `bench/bridge.sh --threads 1|2` on 2 vCPUs,
/// both sides alike (README, "Bridge benchmark"): two threads make a 64-byte round trip 3-25 %
/// faster (the second worker, searching for work after each wake-up, keeps its vCPU from
/// halting, and waking a halted vCPU is what a hop costs most here), but open about 10 % fewer
/// connections a second (each connection's task may cross threads), do not move bulk with 4
/// streams (both cores are already busy: the relays' copies are the limit), and wake an idle
/// forwarder about twice as often (0.65 against 1.1 times a second). One thread also keeps a
/// one-vCPU guest from paying for a pool it cannot use.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build()
}
