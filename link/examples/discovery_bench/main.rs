//! Listener discovery benchmark: how fast a new and a closed listener are reported, and what
//! watching costs while nothing changes, for the sock_diag watcher (kernel events, and its
//! 1 s polling fallback) and for /proc/net/tcp pollers at 1 s (pasta's period) and 3 s (Lima's).
//!
//! `cargo run --release -p hostnet-link --example discovery_bench [-- --quick]` (as root for the
//! event mode; unprivileged, the "events" rows show the polling fallback: the stats line says).
//!
//! Method
//! - 1,000 established TCP connections on loopback (2,000 sockets) stay open for the whole run.
//! - Latency: a listener is bound on 127.0.0.1 at a random phase of a period, and the time until
//!   the watcher's event names its inode is taken; then it is closed, again at a random phase,
//!   and the time until its removal is reported is taken. The event-mode watcher runs 200 TCP and
//!   200 UDP cycles one after another (phases over 50 ms). The pollers run 200 TCP cycles too,
//!   but 10 (1 s) or 40 (3 s) listeners at a time, each bound and closed at its own random phase
//!   of one period, so the run stays short; each listener's latency is independent of the others'.
//! - The bench binds its listeners itself, so the watcher runs with `exclude_own_process` off.
//! - Idle CPU: each poller runs alone in a child process for 20 s with nothing changing (the
//!   1,000 connections present); the child reports its own getrusage (user + system) and the
//!   figure is scaled to CPU seconds per minute. The sock_diag children use the default options.

#[cfg(target_os = "linux")]
mod linux;

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("discovery_bench measures netlink sock_diag, which only Linux has");
    std::process::exit(1);
}
