//! The hostnet agent: runs in the Linux VM (or a network namespace), reports the VM's
//! listening sockets to the forwarder on the host, connects relayed streams to them, and
//! mirrors the host's listeners onto the VM's loopback (the reverse direction).
//!
//! # Module map
//!
//! * [`app`]: the command line (`run`, `ports`), logging, `--exec`, signals.
//! * [`agent`]: [`Agent`]: discovery feed, accept loops, per-stream dispatch by header kind.
//! * `shared`: what every task shares ([`AgentConfig`], the discovery feed, limits, counters,
//!   the current session and datagram channel); the other modules depend on it, it on none
//!   of them.
//! * `control`: the control session (Hello, guest snapshot and changes, resync, heartbeats,
//!   host listener set, dial-back requests); one at a time, a new one replaces the old.
//! * `relay`: TCP relays (half-close and reset carried both ways).
//! * `udp`: the datagram channel's agent end (UDP flows both ways, see
//!   [`hostnet_link::udp`]).
//! * `reverse`: host listeners bound on the VM's loopback, dial-back.
//! * [`policy`]: pure rules: what is reported, which relay targets are allowed, where host
//!   listeners are mirrored.
//! * [`ports`]: `--allow` / `--deny` port lists.
//! * [`sys`]: `--lo-up` (ioctl) and sd_notify.
//!
//! The wire protocol is specified in [`hostnet_link::proto`].

pub mod agent;
pub mod app;
mod control;
pub mod policy;
pub mod ports;
mod relay;
mod reverse;
mod shared;
pub mod sys;
mod udp;

pub use agent::{Agent, AgentConfig, ServeError, StartError, Stats};
