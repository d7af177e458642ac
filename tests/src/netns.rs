//! Network namespaces made with `ip netns`, removed on drop.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Checks that namespaces can be made here (a throw-away one).
pub fn probe() -> Result<()> {
    Netns::new().map(drop)
}

/// The veth pair of a [`Netns`]: `host_ip/30` on the host, `ns_ip/30` inside.
#[derive(Debug, Clone)]
pub struct Veth {
    pub host_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

/// A named network namespace with `lo` up; deleted (with its veth pair) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    veth: Option<Veth>,
}

impl Netns {
    /// `hne-<pid>-<n>` with `lo` up.
    pub fn new() -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("hne-{}-{n}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Self { name, veth: None };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Like [`Netns::new`], plus a veth pair in its own /30 of 198.18.0.0/15 (host .1, namespace
    /// .2), distinct per process and namespace.
    pub fn with_veth() -> Result<Self> {
        let mut ns = Self::new()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id() as usize;
        // 32768 /30 subnets in 198.18.0.0/15.
        let idx = ((pid % 4093) * 8 + n) % 32768;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (idx as u32) * 4;
        let host_ip = Ipv4Addr::from(base + 1);
        let ns_ip = Ipv4Addr::from(base + 2);
        let host_if = format!("hn{}x{n}h", pid % 10_000_000);
        let ns_if = format!("hn{}x{n}n", pid % 10_000_000);
        let _ = ip(&["link", "del", &host_if]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns.name,
        ])?;
        ns.veth = Some(Veth {
            host_if: host_if.clone(),
            host_ip,
            ns_ip,
        });
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn veth(&self) -> Option<&Veth> {
        self.veth.as_ref()
    }

    /// The namespace side of the veth pair.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.veth
            .as_ref()
            .expect("namespace has no veth pair")
            .ns_ip
    }

    /// Runs `f` on a thread that has entered the namespace, and returns its result. Sockets made
    /// there stay in the namespace when used from any other thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns({path}): {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A TCP listener bound inside the namespace (std semantics: SO_REUSEADDR, `[::]` dual-stack).
    pub fn tcp_listener(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.run(|| crate::net::listen_tcp(addr))
    }

    /// A UDP socket bound inside the namespace.
    pub fn udp_socket(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.run(|| UdpSocket::bind(addr))
    }

    /// A TCP connection made from inside the namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&addr, timeout))
    }

    /// True when something listens on TCP (or binds UDP) port `port` inside the namespace, read
    /// from `/proc/thread-self/net/{tcp,tcp6,udp,udp6}` of a thread in it.
    pub fn has_socket(&self, udp: bool, port: u16) -> bool {
        self.run(|| {
            let files: &[&str] = if udp {
                &["udp", "udp6"]
            } else {
                &["tcp", "tcp6"]
            };
            files.iter().any(|f| {
                let text = std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                    .unwrap_or_default();
                text.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3
                        && cols[1].ends_with(&format!(":{port:04X}"))
                        && (udp || cols[3] == "0A")
                })
            })
        })
    }

    /// `ip netns exec NAME PROGRAM`; add arguments with `.args`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(v) = &self.veth {
            let _ = ip(&["link", "del", &v.host_if]);
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: cannot remove namespace {}: {e:#}", self.name);
        }
    }
}
