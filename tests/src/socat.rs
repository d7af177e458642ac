//! The socat chain the benchmark compares against: `socat TCP-LISTEN` on the host's loopback →
//! unix socket → `socat UNIX-LISTEN` inside the namespace → TCP to the namespace's 127.0.0.1.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::net::{LO4, sa, tcp_listeners};
use crate::netns::Netns;
use crate::process::Proc;
use crate::{after, wait_until};

/// The two socat processes; killed on drop.
#[derive(Debug)]
pub struct SocatChain {
    pub host: Proc,
    pub guest: Proc,
    pub port: u16,
}

/// True when `socat` is on PATH.
pub fn available() -> bool {
    Command::new("socat")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl SocatChain {
    /// Host 127.0.0.1:`host_port` → `sock` → namespace 127.0.0.1:`ns_port`.
    pub fn start(ns: &Netns, sock: &Path, host_port: u16, ns_port: u16) -> Self {
        let mut g = ns.command("socat");
        g.arg(format!("UNIX-LISTEN:{},fork", sock.display()))
            .arg(format!("TCP:127.0.0.1:{ns_port}"));
        let mut guest = Proc::spawn("socat (namespace)", g);
        if !wait_until(after(Duration::from_secs(5)), || sock.exists()) {
            panic!(
                "socat in the namespace did not create {}:\n{}",
                sock.display(),
                guest.describe()
            );
        }
        let mut h = Command::new("socat");
        h.arg(format!(
            "TCP-LISTEN:{host_port},bind=127.0.0.1,fork,reuseaddr"
        ))
        .arg(format!("UNIX-CONNECT:{}", sock.display()));
        let mut host = Proc::spawn("socat (host)", h);
        let a = sa(LO4, host_port);
        if !wait_until(after(Duration::from_secs(5)), || {
            tcp_listeners().contains(&a)
        }) {
            panic!(
                "socat on the host did not listen on {a}:\n{}",
                host.describe()
            );
        }
        Self {
            host,
            guest,
            port: host_port,
        }
    }
}
