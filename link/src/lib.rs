//! hostnet-link: what the forwarder (host) and the agent (VM) share.
//!
//! - [`proto`]: the wire protocol — stream preface and headers, relay status, the control
//!   stream's messages, and the framed stream mode for transports that cannot half-close.
//! - [`transport`]: one URI per transport (`vsock://`, `hybrid-vsock://`, `unix://`, `tcp://`,
//!   `quic://`, `hvsock://`), each giving authenticated byte streams that can half-close and
//!   reset; the ones a host system lacks are refused with a clear error.
//! - [`relay`]: the byte relay between a local TCP connection and a link stream, with
//!   half-close carried and resets passed on; both sides use it.
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
pub mod ports;
pub mod proto;
pub mod relay;
pub mod transport;
pub mod udp;
