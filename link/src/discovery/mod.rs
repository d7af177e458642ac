//! Listener discovery: the listener set and its diff on every host; on Linux, the listening sockets of the caller's network namespace, through
//! netlink sock_diag, and a watcher that reports additions and removals.
//!
//! # What counts as a listener
//!
//! - TCP sockets in `LISTEN`.
//! - UDP sockets that are bound and unconnected. sock_diag reports an unconnected UDP socket in
//!   state `TCP_CLOSE` (7) and a connected one in `TCP_ESTABLISHED` (1); the dump asks for
//!   `CLOSE` only, and a record with a remote address or port, or no local port, is dropped too.
//! - IPv4 and IPv6. An IPv6 socket carries `v6only` from the `INET_DIAG_SKV6ONLY` attribute,
//!   which the kernel (4.16+) attaches to every `AF_INET6` socket in `LISTEN` or `CLOSE` without
//!   an extension bit being requested. A dual-stack `[::]:P` socket is reported once, as IPv6
//!   with `v6only == Some(false)`.
//!
//! The filtering by state happens in the kernel (the request's state bitmask): a TCP dump asking
//! for `LISTEN` only walks the listening hash and never the established one, so a poll costs the
//! same with 10 or 100,000 established connections.
//!
//! # Exclusions ([`Options`])
//!
//! - Sockets owned by the calling process (`exclude_own_process`, default on): the socket inodes
//!   of `/proc/self/fd` (links `socket:[N]`). `/proc/self/fd` is read only when the dump shows an
//!   inode not classified before, so an idle poll reads nothing but netlink.
//! - UDP sockets whose port is in the kernel's ephemeral range (`exclude_udp_ephemeral`, default
//!   on; `net.ipv4.ip_local_port_range`, read when a [`Discovery`] is made): DNS clients and other
//!   autobound UDP sockets come and go with every query.
//! - A caller-supplied set of (protocol, port) pairs (`exclude_ports`): loop prevention, for the
//!   ports this side is itself mirroring for the other side. A watcher can change it while running
//!   ([`WatcherHandle::set_excluded_ports`]).
//!
//! # Watching
//!
//! [`Watcher::spawn`] runs a thread that takes a filtered dump when something says the set may
//! have changed, and sends [`Event`]s: first a full [`Event::Snapshot`], then one
//! [`Event::Changed`] per dump that found a change. What says so depends on the [`Mode`], decided
//! once when the watcher starts and logged at info:
//!
//! - [`Mode::Events`] (root, or `CAP_PERFMON` with a readable tracefs): perf tracepoint events,
//!   system-wide, filtered in the kernel: `sock:inet_sock_set_state` for a TCP socket entering or
//!   leaving `LISTEN`, `syscalls:sys_enter_bind` for a bind of an inet address (a UDP socket's
//!   start); and the sock_diag destroy announcements for UDP (`SKNLGRP_INET*_UDP_DESTROY`; UDP has no
//!   close tracepoint). An event only triggers a dump, in the watcher's own namespace, so events
//!   from other namespaces cost a dump and nothing else. Dumps are debounced: at once, then at
//!   most one per [`DEBOUNCE`] (2 ms) while events keep coming, plus one re-check a gap after
//!   (the listen tracepoint fires just before the socket is in the listening hash); events that
//!   keep coming double the gap up to [`MAX_DEBOUNCE`] (8 ms), so a machine busy binding
//!   sockets costs at most ~125 dumps and wake-ups a second (about 1% of a core) and a change
//!   is still seen within ~10 ms. A dump every [`SAFETY_INTERVAL`] (2 s) catches what no event
//!   announces.
//! - [`Mode::Poll`] (no perf or tracefs, not privileged, or [`MODE_ENV`]`=poll`): a dump every
//!   [`DEFAULT_INTERVAL`] (1 s), and at once when the sock_diag destroy announcements (no
//!   privilege needed) say a listener's socket was freed: additions within a second, removals
//!   within milliseconds, about one wake-up a second when idle.
//!
//! Tracefs is looked for at `/sys/kernel/tracing` and `/sys/kernel/debug/tracing`; where neither
//! is mounted and the process runs as root, tracefs is mounted on a private temporary directory
//! just long enough to read the two tracepoint ids, then unmounted.
//!
//! Measured by `examples/discovery_bench` (2 shared cores, 1,000 established loopback
//! connections, 200 cycles each; root): in event mode a new or closed TCP or UDP listener is
//! reported with p50 0.1-0.2 ms and p99 2.7-4.0 ms; the polling fallback reports additions with
//! p99 988 ms and removals with p99 3.9 ms; idle, either costs ~0.01 CPU s a minute. The 50 ms
//! poll this replaced had p99 49 ms (appear) and 50 ms (disappear), 0.17 CPU s a minute and 20
//! wake-ups a second. End to end through the bridge (`bench/bridge.sh`, bind in the namespace →
//! connectable on the host, on a machine busy with other work): p99 8-9 ms both ways, against
//! 87 ms and 51 ms before. `bench/idle.sh` counts the wake-ups of an idle agent and forwarder.
//! One snapshot (four dumps) takes ~70 µs; reading /proc/net/tcp{,6} with those connections
//! takes ~15 ms, which is why the dump, not /proc, is the source.
//!
//! Nothing here knows about network namespaces: the dump, the destroy announcements and
//! `/proc/sys/net` describe the namespace of the calling thread (the tracepoints see every
//! namespace's listens and binds, but only ever trigger a dump of this one).
//!
//! The set and its diff ([`ListenerSet`], [`diff`]) are plain data, tested without sockets, and
//! exist on every host (the forwarder's macOS and Windows enumerators report into them); the
//! sock_diag dump and the watcher are Linux-only.

#[cfg(target_os = "linux")]
mod diag;
#[cfg(target_os = "linux")]
mod events;
#[cfg(target_os = "linux")]
mod filter;
mod set;
#[cfg(target_os = "linux")]
mod watch;

use std::io;

#[cfg(target_os = "linux")]
pub use filter::{Discovery, Options, ephemeral_port_range, own_socket_inodes};
pub use set::{Diff, Listener, ListenerSet, PortRange, Protocol, diff};
#[cfg(target_os = "linux")]
pub use watch::{
    DEBOUNCE, DEFAULT_INTERVAL, Event, MAX_DEBOUNCE, MODE_ENV, Mode, SAFETY_INTERVAL, Stats,
    WatchConfig, Watcher, WatcherHandle,
};

/// What can go wrong in discovery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NETLINK_SOCK_DIAG socket could not be opened or set up.
    #[error("discovery: cannot open the netlink sock_diag socket: {0}")]
    NetlinkOpen(#[source] io::Error),
    /// Sending a dump request or receiving its answer failed.
    #[error("discovery: netlink sock_diag I/O failed: {0}")]
    NetlinkIo(#[source] io::Error),
    /// The kernel answered a dump request with an error.
    #[error("discovery: the kernel refused the sock_diag dump: {0}")]
    Kernel(#[source] io::Error),
    /// A file of /proc could not be read or made sense of.
    #[error("discovery: cannot read {path}: {source}")]
    Proc {
        /// The file.
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The watcher thread could not be started.
    #[error("discovery: cannot start the watcher thread: {0}")]
    Spawn(#[source] io::Error),
}

#[cfg(target_os = "linux")]
/// One snapshot with these options: a convenience for [`Discovery::new`] then
/// [`Discovery::snapshot`].
pub fn snapshot(options: &Options) -> Result<ListenerSet, Error> {
    Discovery::new(options.clone())?.snapshot()
}
