//! End-to-end test support for the host-networking bridge: the "VM" is a network namespace with
//! `hostnet-agent` inside, `hostnet-forwarder` runs outside, and the two talk over a unix socket
//! (which crosses the namespace boundary the way vsock crosses a VM's), or over tcp/quic on a veth
//! pair.
//!
//! Module map:
//! * [`payload`] — checksummed payloads: a PRNG stream the receiver regenerates and compares.
//! * [`netns`] — [`netns::Netns`], a named namespace (`ip netns add`) with `lo` up and an optional
//!   veth pair in 198.18.0.0/15 (RFC 2544), removed on drop; sockets are created inside it from a
//!   thread that `setns`es into it (CLONE_NEWNET only affects that thread, and a socket stays in the
//!   namespace it was created in).
//! * [`process`] — [`process::Proc`], a child process whose stderr is collected for failure
//!   messages, killed and reaped on drop; locating the binaries Cargo built.
//! * [`net`] — TCP/UDP servers (echo, duplex, tagged, reset), client helpers, free ports.
//! * [`socat`] — the socat chain (host TCP → unix → namespace TCP) the benchmark compares with.
//! * [`scenario`] — scenarios shared by the test files, run over whichever transport a test picks.
//! * [`bridge`] — [`bridge::Bridge`], an agent in a namespace plus a forwarder on the host over a
//!   chosen transport, with `status --json` helpers.
//! * [`vm`] — the real path: a QEMU guest (TCG, virtio-vsock through vhost-device-vsock) with the
//!   static musl agent inside and the forwarder on the host over `hybrid-vsock://`; the guest is
//!   driven by `src/bin/vm_guest.rs` (command server, echo and bulk servers, a client); the SCTP
//!   test runs hostnet-proxy and docker-proxy there through `src/bin/sctp_guest.rs`.
//! * [`dockerd`] — [`dockerd::Lab`] and [`dockerd::Dockerd`]: a real dockerd with private roots
//!   whose userland proxy is hostnet-proxy (or docker-proxy), the host's iptables and sysctls put
//!   back afterwards.
//! * [`desktop`] — [`desktop::DesktopVm`]: Docker Desktop's host networking with Docker itself,
//!   a real dockerd (hostnet-proxy as its userland proxy) and the agent in the namespace, the
//!   forwarder on the host (reverse on); the host checked unchanged afterwards. Containers run
//!   `src/bin/desktop_servers.rs` (TCP echo, sink, UDP echo) from the test image.
//! * [`measure`] — the benchmarks' servers and clients (bulk, 64 B round trips, connection rate,
//!   UDP rate), percentiles and table formats.
//! * [`wine`] — the Windows build of the forwarder (`x86_64-pc-windows-gnu`, built once into
//!   `target/wine/target`) run by Wine 8 in a prefix under `target/wine/prefix`, with the
//!   `ProcessPrng` stub DLL Wine 8 lacks (`tests/wine/`); one wineserver per test process.
//!
//! Test files (`tests/tests/`): `forward` (the `nc localhost 8000` workflow: policy, 64 MiB both
//! ways, 500 connections, half-close, resets, refused, discovery timing, status), `udp_reverse`
//! (UDP both ways, the reverse direction, loops), `reverse_policy` (the reverse rules: allowed,
//! denied and default ports, a port denied while mirrored, SIGHUP), `faults` (kill -9, SIGSTOP,
//! restarts, conflicts, stray clients, tokens, UDP expiry), `transports` (tcp and quic), `edges` (v6only, limits,
//! backpressure, 100 ports), `sandbox`, `harness`, `vm` (the real VM: one boot, the scenario list
//! in order; and hostnet-proxy's SCTP against docker-proxy's in a guest of its own), `wine` (the
//! Windows forwarder under Wine against a real agent: forward, reverse, UDP, half-close, resets,
//! status over the named pipe, agent restart, Ctrl-C, the Windows service), `desktop` (dockerd in
//! the namespace: `--network host` and `-p` containers reached from the host, the reverse
//! direction from a container, a dockerd restart, 16 MiB each way).
//! The benchmarks are `src/bin/bridge_bench.rs`, run by `bench/bridge.sh`,
//! `src/bin/vm_bench.rs`, run by `bench/vm.sh`, `src/bin/sctp_bench.rs`, run by `bench/sctp.sh`,
//! and `src/bin/desktop_bench.rs`, run by `bench/desktop.sh`.
//!
//! Environment: `HOSTNET_SKIP_PRIVILEGED=1` skips the privileged tests (namespaces, dockerd, the
//! real VM) when they cannot run; `HOSTNET_SKIP_DOCKER=1` only the dockerd tests (and the
//! docker-proxy half of the SCTP test);
//! `HOSTNET_E2E_LOG=debug` sets `RUST_LOG` for the agent and the forwarder; `HOSTNET_BIN_DIR`
//! points at other binaries than Cargo's. The real-VM test: `HOSTNET_SKIP_VM=1` skips it when its
//! prerequisites (`scripts/vm-setup.sh`, root) are missing; `HOSTNET_VM_CACHE` is the setup's
//! cache dir (default `target/hostnet-vm`); `HOSTNET_VM_BIN_DIR` holds prebuilt static guest
//! binaries (`hostnet-agent`, `hostnet-proxy`, `vm_guest`, `sctp_guest`) instead of building
//! them. `HOSTNET_SKIP_WINE=1` skips the Wine test when wine64, MinGW-w64 or the Windows target are missing (`scripts/cross-setup.sh`).
//!
//! The namespace tests need root. [`privileged`] decides: without root (or when `ip netns` fails)
//! it panics, unless `HOSTNET_SKIP_PRIVILEGED=1`, in which case it prints a note and the test
//! returns early.

pub mod bridge;
pub mod desktop;
pub mod dockerd;
pub mod measure;
pub mod net;
pub mod netns;
pub mod payload;
pub mod process;
pub mod scenario;
pub mod socat;
pub mod vm;
pub mod wine;

use std::thread;
use std::time::{Duration, Instant};

/// Polls `cond` every few milliseconds until it holds (true) or `deadline` passes (false).
pub fn wait_until(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// `Instant::now() + d`.
pub fn after(d: Duration) -> Instant {
    Instant::now() + d
}

/// True when `var=1` or `HOSTNET_SKIP_PRIVILEGED=1` (which covers every privileged test: network
/// namespaces, the real dockerd, the real VM).
pub fn skip_requested(var: &str) -> bool {
    [var, "HOSTNET_SKIP_PRIVILEGED"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| v == "1"))
}

/// True when the test may run its privileged part. Panics when it cannot (not root, or
/// `ip netns` does not work) unless `HOSTNET_SKIP_PRIVILEGED=1`, in which case it prints a note
/// and returns false.
pub fn privileged(test: &str) -> bool {
    let skip = std::env::var("HOSTNET_SKIP_PRIVILEGED").is_ok_and(|v| v == "1");
    // Probed once per test process.
    static PROBLEM: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let problem = PROBLEM.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            Some("not running as root (network namespaces need CAP_SYS_ADMIN)".to_string())
        } else {
            netns::probe()
                .err()
                .map(|e| format!("`ip netns` does not work here: {e:#}"))
        }
    });
    match problem {
        None => true,
        Some(p) if skip => {
            eprintln!("note: {test} skipped: {p}; HOSTNET_SKIP_PRIVILEGED=1");
            false
        }
        Some(p) => panic!(
            "{test}: {p}. Run the end-to-end tests as root, or set HOSTNET_SKIP_PRIVILEGED=1 to skip them."
        ),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (tests with hundreds of connections; children
/// inherit it).
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A directory under the system temp dir, removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hne-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn join(&self, p: &str) -> std::path::PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
