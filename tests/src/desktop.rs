//! Docker Desktop's host networking, with Docker itself: the "VM" is a network namespace running
//! a real dockerd (Debian's, with hostnet-proxy as its userland proxy) and `hostnet-agent` side by
//! side; `hostnet-forwarder` runs on the host over a unix socket, reverse direction on. A
//! `--network host` container's servers then answer on the host's loopback, a published port
//! (`-p 8080:80`, served in the VM by hostnet-proxy) too, and a container reaches the host's
//! loopback servers at its own `localhost` — what Docker Desktop 4.34+ does on a Mac.
//!
//! How dockerd runs in the namespace (`scripts/desktop-vm-init.sh`, which
//! `scripts/try-desktop.sh` uses too): `ip netns exec` gives it a private mount namespace with a
//! fresh `/sys`, where the wrapper mounts the host's cgroup hierarchies again and tmpfs over
//! `/run` and `/etc/docker`; `--config-file` (ours, which also keeps a host `daemon.json` out)
//! moves the trust key into the lab (`deprecated-key-path`), and `--cgroup-parent` gives the
//! containers a cgroup of their own, removed afterwards. dockerd's iptables rules and sysctls
//! land in the namespace. Storage is overlay2 under the lab's temp dir (vfs works too, ~3x
//! slower per `docker run`).
//!
//! What stays on the host is checked by [`DesktopVm::finish`]: [`crate::dockerd::Lab`]'s checks
//! (iptables and ip6tables dumps, sysctls, nothing left in `/run/docker`, `/run/containerd`,
//! `/etc/docker`, no cgroup), no mount added or removed, the namespace gone.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::bridge::{Bridge, Transport};
use crate::dockerd::{Dockerd, Lab};
use crate::process::bin;

/// The servers binary the test image carries (`src/bin/desktop_servers.rs`): TCP echo, sink, UDP
/// echo.
pub const SERVERS_BIN: &str = "desktop_servers";

/// The wrapper that prepares the namespace's mount namespace for dockerd.
const VM_INIT: &str = include_str!("../../scripts/desktop-vm-init.sh");

/// The "VM": a namespace with an agent (and, once started, dockerd) inside and a forwarder on
/// the host. Dropped without [`DesktopVm::finish`] (a failing test), it still stops everything
/// and puts the host back.
#[derive(Debug)]
pub struct DesktopVm {
    /// The agent in the namespace and the forwarder on the host (reverse direction on). Declared
    /// first: they and the namespace go before the lab restores the host.
    pub bridge: Bridge,
    /// Starts dockerd in the namespace (a separate field, so that a running [`Dockerd`], which
    /// borrows it, leaves `bridge` free for `&mut` use).
    pub docker: VmDocker,
    mounts_before: BTreeMap<String, usize>,
}

/// dockerd's side of a [`DesktopVm`]: the [`Lab`] (roots, image, host state) and the daemon's
/// settings.
#[derive(Debug)]
pub struct VmDocker {
    lab: Lab,
    daemon_json: PathBuf,
    cgroup_parent: String,
}

impl DesktopVm {
    /// Records the host, builds the image (busybox, socat, [`SERVERS_BIN`]), starts the namespace
    /// with the agent and the forwarder (reverse on). Call [`crate::dockerd::available`] and
    /// [`crate::privileged`] first.
    pub fn new(tag: &str) -> Result<Self> {
        let mounts_before = mounts();
        let servers = bin(SERVERS_BIN);
        let mut lab = Lab::with_bins(&format!("desktop-{tag}"), &[&servers])?;
        let bridge = Bridge::builder(Transport::Unix).reverse().start();
        let dir = lab.path().to_path_buf();
        let init = dir.join("vm-init.sh");
        fs::write(&init, VM_INIT)?;
        // procfs files have no size: read them, do not fs::copy them.
        let mountinfo = dir.join("host.mountinfo");
        fs::write(&mountinfo, fs::read("/proc/self/mountinfo")?)?;
        let daemon_json = dir.join("daemon.json");
        fs::write(
            &daemon_json,
            serde_json::json!({ "deprecated-key-path": dir.join("key.json") }).to_string(),
        )?;
        let cgroup_parent = format!("hostnet-e2e-{}-{tag}", std::process::id());
        for h in cgroup_hierarchies() {
            lab.remove_afterwards(h.join(&cgroup_parent));
        }
        lab.launch_via(
            [
                "ip".as_ref(),
                "netns".as_ref(),
                "exec".as_ref(),
                bridge.ns.name().as_ref(),
                "sh".as_ref(),
                init.as_os_str(),
                mountinfo.as_os_str(),
            ]
            .into_iter()
            .map(OsString::from)
            .collect(),
            "overlay2",
        );
        Ok(Self {
            bridge,
            docker: VmDocker {
                lab,
                daemon_json,
                cgroup_parent,
            },
            mounts_before,
        })
    }

    /// The lab's temp dir (dockerd's roots, logs).
    pub fn path(&self) -> &Path {
        self.docker.lab.path()
    }

    /// Stops the agent and the forwarder, removes the namespace, and puts the host back (every
    /// dockerd of this VM must be stopped already); an error lists what differs from before.
    pub fn finish(self) -> Result<()> {
        let Self {
            bridge,
            docker,
            mounts_before,
        } = self;
        let ns = bridge.ns.name().to_string();
        drop(bridge);
        let mut problems = Vec::new();
        if let Err(e) = docker.lab.finish() {
            problems.push(format!("{e:#}"));
        }
        if Path::new("/run/netns").join(&ns).exists() {
            problems.push(format!("the namespace {ns} is still there"));
        }
        let after = mounts();
        // Other tests' namespaces come and go meanwhile.
        let other_test = |m: &str| {
            m.strip_prefix("/run/netns/")
                .is_some_and(|rest| !rest.starts_with(&format!("{ns} ")))
        };
        for (m, n) in &after {
            if *n > mounts_before.get(m).copied().unwrap_or(0) && !other_test(m) {
                problems.push(format!("mounted now, not before: {m}"));
            }
        }
        for (m, n) in &mounts_before {
            if after.get(m).copied().unwrap_or(0) < *n && !other_test(m) {
                problems.push(format!("mounted before, not now: {m}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "the host is not as it was:\n{}",
                problems.join("\n")
            ))
        }
    }
}

impl VmDocker {
    /// Starts dockerd in the namespace with hostnet-proxy as its userland proxy and `env` in its
    /// environment (the proxies inherit it); waits for its API and imports the image.
    pub fn start(&self, env: &[(&str, &str)]) -> Result<Dockerd<'_>> {
        let config = self.daemon_json.display().to_string();
        let parent = format!("/{}", self.cgroup_parent);
        self.lab.start(
            Some(&bin("hostnet-proxy")),
            &["--config-file", &config, "--cgroup-parent", &parent],
            env,
        )
    }
}

/// The host's mounts as "MOUNTPOINT FSTYPE", counted (a point can be mounted over).
fn mounts() -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (point, fstype) in mountinfo() {
        *m.entry(format!("{point} {fstype}")).or_insert(0) += 1;
    }
    m
}

/// (mount point, file system type) of each line of `/proc/self/mountinfo`.
fn mountinfo() -> Vec<(String, String)> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let point = head.split(' ').nth(4)?;
            let fstype = tail.split(' ').next()?;
            Some((point.to_string(), fstype.to_string()))
        })
        .collect()
}

/// Where the host's cgroup hierarchies (v1 and v2) are mounted.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .filter(|(_, t)| t == "cgroup" || t == "cgroup2")
        .map(|(p, _)| PathBuf::from(p))
        .collect()
}

/// `GET /` over HTTP/1.0 (5 s to connect, 10 s to answer); the body when the status is 200.
pub fn http_get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| format!("{addr}: write: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| format!("{addr}: read: {e}"))?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no HTTP response: {resp:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr}: {head}"));
    }
    Ok(body.to_string())
}

/// A server's answer to any request: `HTTP/1.0 200` with `body` (for the host's side of the
/// reverse direction).
pub fn http_handler(body: &'static str) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |mut s: TcpStream| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        // Read the request head (up to the blank line), then answer and close.
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let _ = write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
}

/// Context for `docker` failures: the command and the daemon's log tail.
pub fn docker_context(d: &Dockerd, what: &str) -> String {
    format!("{what}\n--- dockerd log (tail):\n{}", d.log_tail())
}

/// `docker run -d ARGS...`; the container id, or an error with dockerd's log.
pub fn run_d(d: &Dockerd, args: &[&str]) -> Result<String> {
    let mut all = vec!["run", "-d"];
    all.extend(args);
    d.docker_ok(&all)
        .map(|id| id.trim().to_string())
        .with_context(|| docker_context(d, &format!("docker {}", all.join(" "))))
}
