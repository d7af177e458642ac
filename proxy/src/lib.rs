//! hostnet-proxy: a drop-in replacement for Docker's `docker-proxy`.
//!
//! dockerd starts one userland proxy per published port and address family
//! (`--userland-proxy-path`). This crate keeps docker-proxy's process contract to the letter —
//! argv in Go `flag` grammar, the readiness pipe on fd 3, the bound socket on fd 4 with
//! `-use-listen-fd`, exit codes 0/1/2, exit 0 at once on SIGINT/SIGTERM — and does the relaying
//! with less: one thread, a few hundred KiB, two descriptors per idle TCP connection, zero-copy
//! splice(2) for TCP, batched receive and a bounded flow table for UDP, and SCTP relayed message
//! by message with stream ids and PPIDs kept and no message cut in two.
//!
//! Module map:
//! - [`args`]: the command line (Go `flag` grammar).
//! - [`config`]: `HOSTNET_PROXY_*` tunables from the environment.
//! - [`status`]: the readiness pipe on fd 3.
//! - [`frontend`]: the front socket, from fd 4 or bound here.
//! - [`tcp`]: accept loop (survives descriptor exhaustion), backend connect, PROXY header.
//! - [`relay`]: the TCP byte relay (splice, half-close, reset propagation).
//! - [`flows`]: the UDP flow table (pure: LRU, idle expiry).
//! - [`udp`]: the UDP proxy (recvmmsg, PKTINFO replies, epoll over flow sockets).
//! - [`sctp`]: the SCTP proxy (accept loop, container connect, message relay with reassembly,
//!   ABORT passed on as ABORT); [`sctp_sys`]: its socket calls (`SCTP_RCVINFO` / `SCTP_SNDINFO`).
//! - [`cli`]: the process: signals, descriptors, logging, runtime, exit codes.

pub mod args;
pub mod cli;
pub mod config;
pub mod flows;
pub mod frontend;
pub mod relay;
pub mod sctp;
pub mod sctp_sys;
pub mod status;
pub mod tcp;
pub mod udp;
