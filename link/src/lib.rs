//! hostnet-link: what the forwarder (host) and the agent (VM) share.
//!
//! - [`proto`]: the wire protocol — stream preface and headers, relay status, the control
//!   stream's messages, and the framed stream mode for transports that cannot half-close.
//! - [`transport`]: one URI per transport (`vsock://`, `hybrid-vsock://`, `unix://`, `tcp://`,
//!   `quic://`), each giving authenticated byte streams that can half-close and reset.
//! - [`relay`]: the byte relay between a local TCP connection and a link stream, with
//!   half-close carried and resets passed on; both sides use it.
//! - [`discovery`]: the listening sockets of this machine, through netlink sock_diag, and a
//!   watcher that reports additions and removals.

pub mod discovery;
pub mod proto;
pub mod relay;
pub mod transport;
