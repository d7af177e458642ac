//! The real-VM path: a QEMU guest (TCG) with virtio-vsock through `vhost-device-vsock`,
//! `hostnet-agent` inside listening on `vsock://any:5000`, and `hostnet-forwarder` on the host
//! speaking `hybrid-vsock://` to it. (KVM is not required: TCG boots the Debian cloud kernel to a
//! ready agent in about 3 s.)
//!
//! * [`prerequisites`] reads what `scripts/vm-setup.sh` prepared (`<cache>/env`, overridable
//!   by environment variables of the same names) and checks it; like [`crate::privileged`] it
//!   panics when something is missing unless `HOSTNET_SKIP_VM=1`.
//! * [`guest_binaries`] builds `hostnet-agent`, `hostnet-proxy` and the guest helpers `vm_guest`
//!   (`src/bin/vm_guest.rs`) and `sctp_guest` (`src/bin/sctp_guest.rs`) as static musl binaries
//!   (`$CARGO build --release --target x86_64-unknown-linux-musl`, in a target dir of its own so
//!   that it never waits for the lock of the `cargo test` that runs us).
//! * [`initramfs`] writes the guest's root: busybox and its applet links, those binaries, the
//!   host's docker-proxy (`/usr/sbin/docker-proxy`, when installed) with the shared libraries
//!   `ldd` names for it, the kernel modules for virtio-pci, vsock, sock_diag and SCTP
//!   (dependencies read from each module's `.modinfo`, loaded in dependency order) and an
//!   `/init` that starts the command server and the agent. It is a plain `newc` cpio archive
//!   (the kernel takes it uncompressed), built once per process.
//! * [`Vm::boot`] starts vhost-device-vsock and QEMU as children (killed and reaped by PID on
//!   drop, also on panic, and by `PR_SET_PDEATHSIG` if the test process dies), waits for the
//!   guest's command server, and [`Vm::start_forwarder`] runs the forwarder against the agent.
//! * The guest is driven through `vm_guest cmd` on vsock port [`CMD_PORT`], reached through the
//!   same hybrid socket: [`Vm::run`], [`Vm::spawn`], [`Vm::kill`].
//!
//! Everything waits by polling with deadlines; nothing sleeps to synchronise.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::net::{sa, tcp_listeners};
use crate::process::{Proc, bin, tail};
use crate::{TempDir, after, wait_until};

/// The vsock port the agent listens on in the guest.
pub const AGENT_PORT: u32 = 5000;
/// The vsock port of the guest's command server (`vm_guest cmd`).
pub const CMD_PORT: u32 = 10240;
/// The guest CID given to the device (the hybrid host side never sees it).
pub const GUEST_CID: u32 = 3;
/// How long one boot may take before it counts as failed (TCG on a busy 2-core CI machine; a
/// boot takes 2.5 s here).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The guest's RAM (MiB), unless a test asks for more ([`Vm::boot_with_memory`]).
const MEM_MIB: u32 = 256;
const MUSL: &str = "x86_64-unknown-linux-musl";

/// Kernel modules the guest needs (dependencies are added): virtio over PCI, the vsock
/// transport, sock_diag for the agent's listener discovery, and SCTP for the proxies' SCTP test
/// (with udp_tunnel, ip6_udp_tunnel and libcrc32c; crc32c itself is built in).
const MODULES: &[&str] = &[
    "virtio_pci",
    "vmw_vsock_virtio_transport",
    "tcp_diag",
    "udp_diag",
    "sctp",
];

/// Where the host's docker-proxy is taken from, and put in the guest.
pub const DOCKER_PROXY: &str = "/usr/sbin/docker-proxy";

/// What `scripts/vm-setup.sh` prepared.
#[derive(Debug, Clone)]
pub struct VmTools {
    pub kernel: PathBuf,
    pub modules: PathBuf,
    pub vhost_device_vsock: PathBuf,
    pub qemu: PathBuf,
    pub busybox: PathBuf,
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `${HOSTNET_VM_CACHE:-<workspace>/target/hostnet-vm}`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HOSTNET_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/hostnet-vm"))
}

fn read_tools() -> anyhow::Result<VmTools> {
    let env_file = cache_dir().join("env");
    let mut vars: HashMap<String, String> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(&env_file) {
        for l in text.lines() {
            if let Some((k, v)) = l.split_once('=') {
                vars.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    let get = |k: &str| -> anyhow::Result<PathBuf> {
        std::env::var(k)
            .ok()
            .or_else(|| vars.get(k).cloned())
            .map(PathBuf::from)
            .with_context(|| {
                format!(
                    "{k} is not set and {} does not name it: run scripts/vm-setup.sh (as root)",
                    env_file.display()
                )
            })
    };
    let tools = VmTools {
        kernel: get("HOSTNET_VM_KERNEL")?,
        modules: get("HOSTNET_VM_MODULES")?,
        vhost_device_vsock: get("HOSTNET_VM_VHOST_DEVICE_VSOCK")?,
        qemu: get("HOSTNET_VM_QEMU")?,
        busybox: get("HOSTNET_VM_BUSYBOX")?,
    };
    for (what, p) in [
        ("guest kernel", &tools.kernel),
        ("vhost-device-vsock", &tools.vhost_device_vsock),
        ("qemu-system-x86_64", &tools.qemu),
        ("busybox (static)", &tools.busybox),
    ] {
        if !p.is_file() {
            bail!(
                "{what} missing at {}: run scripts/vm-setup.sh (as root)",
                p.display()
            );
        }
    }
    if !tools.modules.join("kernel").is_dir() {
        bail!(
            "kernel modules missing at {}: run scripts/vm-setup.sh",
            tools.modules.display()
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("not running as root (the test binds host ports and runs QEMU's vhost-user backend)");
    }
    Ok(tools)
}

/// The tools, or `None` (with a note) when they are missing and `HOSTNET_SKIP_VM=1`; panics
/// with what to do when they are missing otherwise.
pub fn prerequisites(test: &str) -> Option<VmTools> {
    static TOOLS: OnceLock<Result<VmTools, String>> = OnceLock::new();
    let skip = crate::skip_requested("HOSTNET_SKIP_VM");
    match TOOLS.get_or_init(|| read_tools().map_err(|e| format!("{e:#}"))) {
        Ok(t) => Some(t.clone()),
        Err(p) if skip => {
            eprintln!("note: {test} skipped: {p}; HOSTNET_SKIP_VM=1 or HOSTNET_SKIP_PRIVILEGED=1");
            None
        }
        Err(p) => panic!(
            "{test}: {p}. Prepare the VM with scripts/vm-setup.sh, or set HOSTNET_SKIP_VM=1 to skip the real-VM test."
        ),
    }
}

/// Static musl builds of the agent, the proxy and the guest helpers.
#[derive(Debug, Clone)]
pub struct GuestBinaries {
    pub agent: PathBuf,
    pub guest: PathBuf,
    pub proxy: PathBuf,
    pub sctp: PathBuf,
}

/// Builds (once per process) `hostnet-agent`, `hostnet-proxy`, `vm_guest` and `sctp_guest` for
/// x86_64-unknown-linux-musl and checks that they are static. `HOSTNET_VM_BIN_DIR` points at
/// prebuilt ones instead.
pub fn guest_binaries() -> anyhow::Result<GuestBinaries> {
    static BINS: OnceLock<Result<GuestBinaries, String>> = OnceLock::new();
    BINS.get_or_init(|| build_guest_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn build_guest_binaries() -> anyhow::Result<GuestBinaries> {
    let dir = if let Some(d) = std::env::var_os("HOSTNET_VM_BIN_DIR") {
        PathBuf::from(d)
    } else {
        let target_dir = cache_dir().join("target");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // musl when its standard library is installed (scripts/vm-setup.sh adds it with rustup),
        // else a static glibc build of the host target: both run in the busybox guest.
        let (target, static_glibc) = match musl_installed() {
            true => (MUSL.to_string(), false),
            false => (host_target()?, true),
        };
        let t0 = Instant::now();
        let mut cmd = Command::new(&cargo);
        scrub_cargo_env(&mut cmd);
        if static_glibc {
            cmd.env("RUSTFLAGS", "-C target-feature=+crt-static");
        }
        let out = cmd
            .current_dir(workspace_root())
            .args(["build", "--release", "--target", &target, "--target-dir"])
            .arg(&target_dir)
            .args([
                "-p",
                "hostnet-agent",
                "-p",
                "hostnet-e2e",
                "-p",
                "hostnet-proxy",
            ])
            .args([
                "--bin",
                "hostnet-agent",
                "--bin",
                "vm_guest",
                "--bin",
                "sctp_guest",
            ])
            .args(["--bin", "hostnet-proxy"])
            .output()
            .with_context(|| format!("running {cargo:?}"))?;
        if !out.status.success() {
            bail!(
                "building the guest binaries for {target} failed ({}; for musl, musl-gcc \
                 (musl-tools) is needed for ring):\n{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 6000)
            );
        }
        eprintln!(
            "vm: guest binaries built for {target}{} in {:.1?}",
            if static_glibc { " (static glibc)" } else { "" },
            t0.elapsed()
        );
        target_dir.join(&target).join("release")
    };
    let bins = GuestBinaries {
        agent: dir.join("hostnet-agent"),
        guest: dir.join("vm_guest"),
        proxy: dir.join("hostnet-proxy"),
        sctp: dir.join("sctp_guest"),
    };
    for p in [&bins.agent, &bins.guest, &bins.proxy, &bins.sctp] {
        check_static(p)?;
    }
    Ok(bins)
}

/// True when rustc has the musl standard library.
fn musl_installed() -> bool {
    target_installed(MUSL)
}

/// True when rustc has the standard library of `target` (rustup installed it).
pub(crate) fn target_installed(target: &str) -> bool {
    Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            let sysroot = String::from_utf8_lossy(&o.stdout).trim().to_string();
            Path::new(&sysroot)
                .join("lib/rustlib")
                .join(target)
                .join("lib")
                .is_dir()
        })
}

/// The host's target triple (`rustc -vV`).
fn host_target() -> anyhow::Result<String> {
    let out = Command::new("rustc").arg("-vV").output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV names no host")
}

/// Removes what Cargo sets for the test (or `cargo run`) that runs us, so that the nested build
/// sees the same environment from `cargo test` and from a shell, and its artifacts stay fresh
/// between the two. The user's own Cargo settings (`CARGO_HOME`, `CARGO_NET_*`, ...) stay.
pub(crate) fn scrub_cargo_env(cmd: &mut Command) {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
        "CARGO_BUILD_",
        "CARGO_PROFILE_",
        "CARGO_UNSTABLE_",
    ];
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        let cargo_set = (k.starts_with("CARGO_") && !KEEP.iter().any(|p| k.starts_with(p)))
            || k.starts_with("__CARGO")
            || matches!(k, "OUT_DIR" | "RUST_RECURSION_COUNT" | "LD_LIBRARY_PATH");
        if cargo_set {
            cmd.env_remove(k);
        }
    }
}

/// An ELF with no `PT_INTERP` program header is static (musl static-pie included).
fn check_static(p: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        bail!("{} is not a 64-bit ELF file", p.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let phoff = u64::from_le_bytes(data[32..40].try_into().expect("8 bytes")) as usize;
    let phentsize = usize::from(u16_at(54));
    let phnum = usize::from(u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let Some(h) = data.get(o..o + 4) else {
            bail!("{}: truncated program headers", p.display());
        };
        // PT_INTERP = 3: a dynamic loader is needed.
        if u32::from_le_bytes(h.try_into().expect("4 bytes")) == 3 {
            bail!(
                "{} is dynamically linked; the guest has no libc",
                p.display()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Initramfs
// ---------------------------------------------------------------------------

/// A `newc` cpio archive being written.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: HashSet<String>,
}

impl Cpio {
    fn new() -> Self {
        Self {
            out: Vec::new(),
            ino: 1,
            dirs: HashSet::new(),
        }
    }

    /// Adds the directories above `name` that are not in the archive yet (the kernel's
    /// unpacker creates nothing implicitly).
    fn parents(&mut self, name: &str) {
        let mut at = 0;
        while let Some(i) = name[at..].find('/') {
            let d = &name[..at + i];
            if !self.dirs.contains(d) {
                self.dir(d);
            }
            at += i + 1;
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name_len = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0,
            u32::try_from(data.len()).expect("initramfs file under 4 GiB"),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name_len).expect("short name"),
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.dirs.insert(name.to_string());
        self.entry(name, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data, (0, 0));
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes(), (0, 0));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        while self.out.len() % 512 != 0 {
            self.out.push(0);
        }
        self.out
    }
}

/// The modules to load, dependencies first: `wanted` and what their `.modinfo` `depends=`
/// names, recursively, leaving out built-in ones. Returns (name, path) pairs.
pub fn module_order(modules_dir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let norm = |s: &str| s.replace('-', "_");
    let mut index: HashMap<String, PathBuf> = HashMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = stem.strip_suffix(".ko") {
                    index.insert(norm(stem), p.clone());
                }
            }
        }
    }
    let builtin: HashSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(norm)
        .collect();
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        builtin: &HashSet<String>,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> anyhow::Result<()> {
        if builtin.contains(name) || !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            bail!("kernel module {name} not found (nor built in)");
        };
        let data = std::fs::read(path)?;
        if let Some(deps) = modinfo(&data, "depends") {
            for d in deps.split(',').filter(|d| !d.is_empty()) {
                visit(&d.replace('-', "_"), index, builtin, seen, order)?;
            }
        }
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for w in wanted {
        visit(&norm(w), &index, &builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// A `key=value` string of a module's `.modinfo` section (found by scanning the file).
fn modinfo(data: &[u8], key: &str) -> Option<String> {
    let pat = format!("\0{key}=");
    let at = data.windows(pat.len()).position(|w| w == pat.as_bytes())? + pat.len();
    let end = data[at..].iter().position(|b| *b == 0)? + at;
    Some(String::from_utf8_lossy(&data[at..end]).into_owned())
}

/// The guest's `/init`. `HOSTNET_SPLICE`, when set on the host, is passed on to the guest's
/// processes (so that `HOSTNET_SPLICE=0 bash bench/vm.sh` compares copying relays on both
/// sides).
fn init_script(modules: &[String], agent_args: &str) -> String {
    let splice = std::env::var("HOSTNET_SPLICE")
        .ok()
        .filter(|v| v.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(|v| format!("export HOSTNET_SPLICE={v}\n"))
        .unwrap_or_default();
    format!(
        r#"#!/bin/sh
export PATH=/bin
{splice}mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in {mods}; do insmod /lib/modules/$m.ko || echo "HOSTNET_INSMOD_FAILED $m"; done
ip link set lo up
echo "HOSTNET_BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
vm_guest cmd {CMD_PORT} &
hostnet-agent {agent_args} &
while :; do sleep 3600; done
"#,
        mods = modules.join(" "),
    )
}

/// The agent's arguments in the guest (the same on a restart through [`Vm::restart_agent`]).
pub fn agent_args() -> String {
    format!("run --listen vsock://any:{AGENT_PORT}")
}

/// Builds the initramfs into `path`.
pub fn initramfs(tools: &VmTools, bins: &GuestBinaries, path: &Path) -> anyhow::Result<()> {
    let mut c = Cpio::new();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "etc",
        "root",
    ] {
        c.dir(d);
    }
    c.entry("dev/console", 0o020600, &[], (5, 1));
    let busybox = std::fs::read(&tools.busybox)?;
    c.file("bin/busybox", 0o755, &busybox);
    let list = Command::new(&tools.busybox)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        // `busybox --list` names busybox itself: a link would replace the binary (ELOOP at
        // boot, the recipe's pitfall).
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            c.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    c.file("bin/hostnet-agent", 0o755, &std::fs::read(&bins.agent)?);
    c.file("bin/vm_guest", 0o755, &std::fs::read(&bins.guest)?);
    c.file("bin/hostnet-proxy", 0o755, &std::fs::read(&bins.proxy)?);
    c.file("bin/sctp_guest", 0o755, &std::fs::read(&bins.sctp)?);
    if Path::new(DOCKER_PROXY).is_file() {
        // Debian's docker-proxy is linked against glibc: it goes in with its loader and
        // libraries, at the paths ldd names (the guest has no libc of its own).
        for f in std::iter::once(PathBuf::from(DOCKER_PROXY))
            .chain(shared_libraries(Path::new(DOCKER_PROXY))?)
        {
            let name = f.to_string_lossy().trim_start_matches('/').to_string();
            c.parents(&name);
            c.file(
                &name,
                0o755,
                &std::fs::read(&f).with_context(|| format!("read {}", f.display()))?,
            );
        }
    }
    let mods = module_order(&tools.modules, MODULES)?;
    for (name, p) in &mods {
        c.file(&format!("lib/modules/{name}.ko"), 0o644, &std::fs::read(p)?);
    }
    let names: Vec<String> = mods.into_iter().map(|(n, _)| n).collect();
    c.file("init", 0o755, init_script(&names, &agent_args()).as_bytes());
    std::fs::write(path, c.finish()).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// The shared libraries and the loader `ldd` names for `bin` (none for a static binary).
fn shared_libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", bin.display()))
}

/// The files in `ldd`'s output.
fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for l in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2
        // (0x...)", "linux-vdso.so.1 (0x...)" (in the kernel, no file).
        let l = l.trim();
        let path = match l.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("{} not found", name.trim());
                }
                rest.split(" (").next().unwrap_or("").trim()
            }
            None => l.split(" (").next().unwrap_or("").trim(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The initramfs of this process (built once), in the cache dir.
pub fn cached_initramfs(tools: &VmTools) -> anyhow::Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        (|| {
            let bins = guest_binaries()?;
            let dir = cache_dir();
            std::fs::create_dir_all(&dir)?;
            let p = dir.join(format!("initramfs-{}.cpio", std::process::id()));
            initramfs(tools, &bins, &p)?;
            Ok::<_, anyhow::Error>(p)
        })()
        .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

// ---------------------------------------------------------------------------
// Hybrid vsock from the test
// ---------------------------------------------------------------------------

/// Connects to guest vsock `port` through the hybrid socket `uds` (`CONNECT port\n`, `OK n\n`),
/// the reply awaited at most `timeout`. A close without a reply is `ConnectionRefused` (nothing
/// listens on that port).
pub fn hybrid_connect(uds: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) if line.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("guest port {port}: closed without a reply (no listener)"),
                ));
            }
            Ok(0) => {
                return Err(io::Error::other(format!(
                    "guest port {port}: bad reply {:?}",
                    String::from_utf8_lossy(&line)
                )));
            }
            Ok(_) => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
                if line.len() > 32 {
                    return Err(io::Error::other("reply line too long"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && line.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("guest port {port}: reset without a reply (no listener)"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::other(format!(
            "guest port {port}: bad reply {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

/// The answer of the guest's command server.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub code: i32,
    pub output: String,
}

// ---------------------------------------------------------------------------
// The VM
// ---------------------------------------------------------------------------

/// A booted guest, its backend, and (once started) the forwarder. Dropping it kills and reaps
/// all three (forwarder, QEMU, backend, in that order).
#[derive(Debug)]
pub struct Vm {
    pub fwd: Option<Proc>,
    qemu: Option<Proc>,
    backend: Option<Proc>,
    dir: TempDir,
    /// Wall time from starting QEMU until the guest's command server answered.
    pub boot_time: Duration,
    old_logs: String,
}

impl Vm {
    /// Boots the guest and waits (at most [`BOOT_TIMEOUT`]) until its command server answers;
    /// a failed boot is torn down and tried once more. Seen once in about 30 boots here: the
    /// guest came up (its console said so) but vhost-device-vsock 0.3.0 never served its
    /// hybrid socket (connects to it failed with EAGAIN, a full backlog), which is the backend's
    /// fault, not the guest's or ours; both boots' errors are reported if the second fails too.
    pub fn boot(tools: &VmTools) -> anyhow::Result<Vm> {
        Self::boot_with_memory(tools, MEM_MIB)
    }

    /// [`Vm::boot`] with `mem_mib` MiB of guest RAM (QEMU allocates pages as the guest touches
    /// them).
    pub fn boot_with_memory(tools: &VmTools, mem_mib: u32) -> anyhow::Result<Vm> {
        match Self::boot_once(tools, mem_mib) {
            Ok(vm) => Ok(vm),
            Err(first) => {
                eprintln!("vm: boot failed; booting once more. The failure: {first:#}");
                Self::boot_once(tools, mem_mib).map_err(|e| {
                    e.context(format!("the second boot failed too; the first: {first:#}"))
                })
            }
        }
    }

    fn boot_once(tools: &VmTools, mem_mib: u32) -> anyhow::Result<Vm> {
        let mem = format!("{mem_mib}M");
        let initrd = cached_initramfs(tools)?;
        let dir = TempDir::new("vm")?;
        let vhost = dir.join("vhost.sock");
        let uds = dir.join("vm.vsock");
        let mut cmd = Command::new(&tools.vhost_device_vsock);
        cmd.arg("--vm").arg(format!(
            "guest-cid={GUEST_CID},socket={},uds-path={}",
            vhost.display(),
            uds.display()
        ));
        // Its warnings and errors go to the failure report.
        cmd.env("RUST_LOG", "warn");
        die_with_parent(&mut cmd);
        let mut backend = Proc::spawn("vhost-device-vsock", cmd);
        if !wait_until(after(Duration::from_secs(10)), || {
            vhost.exists() || !backend.is_running()
        }) || !backend.is_running()
        {
            bail!(
                "vhost-device-vsock did not create its socket:\n{}",
                backend.describe()
            );
        }
        let mut cmd = Command::new(&tools.qemu);
        cmd.args([
            "-accel",
            "tcg",
            "-cpu",
            "qemu64",
            "-M",
            "pc,memory-backend=mem",
        ])
        .args(["-m", &mem, "-smp", "1"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
        .arg("-chardev")
        .arg(format!("socket,id=vvsock,path={}", vhost.display()))
        .args(["-device", "vhost-user-vsock-pci,chardev=vvsock"])
        .arg("-kernel")
        .arg(&tools.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"]);
        die_with_parent(&mut cmd);
        let t0 = Instant::now();
        let qemu = Proc::spawn("qemu", cmd);
        let mut vm = Vm {
            fwd: None,
            qemu: Some(qemu),
            backend: Some(backend),
            dir,
            boot_time: Duration::ZERO,
            old_logs: String::new(),
        };
        let uds = vm.uds();
        let mut last = String::new();
        let up = wait_until(t0 + BOOT_TIMEOUT, || {
            if !vm.qemu().is_running() {
                return true;
            }
            match hybrid_connect(&uds, CMD_PORT, Duration::from_secs(5)) {
                Ok(_) => true,
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        if !up || !vm.qemu().is_running() {
            bail!(
                "the guest's command server did not answer within {BOOT_TIMEOUT:?} (last: {last}):\n{}",
                vm.describe()
            );
        }
        vm.boot_time = t0.elapsed();
        Ok(vm)
    }

    /// The hybrid vsock socket (`uds-path` of the backend).
    pub fn uds(&self) -> PathBuf {
        self.dir.join("vm.vsock")
    }

    /// The forwarder's `--guest` URI.
    pub fn guest_uri(&self) -> String {
        format!("hybrid-vsock://{}?port={AGENT_PORT}", self.uds().display())
    }

    /// The forwarder's control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.join("fwd.sock")
    }

    fn qemu(&mut self) -> &mut Proc {
        self.qemu.as_mut().expect("qemu")
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> String {
        self.qemu.as_ref().map(Proc::stdout).unwrap_or_default()
    }

    /// Sends one request to the command server; the answer within `timeout`.
    pub fn request(&self, req: &str, timeout: Duration) -> anyhow::Result<CmdOutput> {
        let mut s = hybrid_connect(&self.uds(), CMD_PORT, Duration::from_secs(10))
            .context("connect to the guest's command server")?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(req.as_bytes())?;
        s.write_all(b"\n")?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\n") {
            if s.read(&mut b).context("read the command's answer")? == 0 {
                bail!("command server closed without an answer to {req:?}");
            }
            head.push(b[0]);
            if head.len() > 64 {
                bail!("bad answer head {:?}", String::from_utf8_lossy(&head));
            }
        }
        let head = String::from_utf8_lossy(&head);
        let mut parts = head.trim_end().split(' ');
        let (Some("EXIT"), Some(code), Some(len)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("bad answer head {head:?}");
        };
        let code: i32 = code.parse()?;
        let len: usize = len.parse()?;
        let mut out = vec![0; len];
        s.read_exact(&mut out)
            .context("read the command's output")?;
        Ok(CmdOutput {
            code,
            output: String::from_utf8_lossy(&out).into_owned(),
        })
    }

    /// `sh -c LINE` in the guest (at most 120 s).
    pub fn run(&self, line: &str) -> anyhow::Result<CmdOutput> {
        self.request(&format!("RUN {line}"), Duration::from_secs(120))
    }

    /// [`Vm::run`] that must exit 0; its output.
    pub fn run_ok(&self, line: &str) -> String {
        match self.run(line) {
            Ok(o) if o.code == 0 => o.output,
            Ok(o) => panic!("guest: `{line}` exited {}:\n{}", o.code, o.output),
            Err(e) => panic!("guest: `{line}`: {e:#}"),
        }
    }

    /// Starts `line` in the guest as child `name` (output in `/tmp/<name>.log`) and waits until
    /// it prints `READY`; its pid.
    pub fn spawn(&self, name: &str, line: &str) -> u32 {
        let o = self
            .request(&format!("SPAWN {name} {line}"), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("guest: spawn {name}: {e:#}"));
        if o.code != 0 {
            panic!("guest: spawn {name} (`{line}`) failed:\n{}", o.output);
        }
        o.output.trim().parse().unwrap_or(0)
    }

    /// SIGKILLs the guest child `name` and reaps it.
    pub fn kill(&self, name: &str) {
        let o = self
            .request(&format!("KILL {name}"), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("guest: kill {name}: {e:#}"));
        if o.code != 0 {
            panic!("guest: kill {name}: {}", o.output);
        }
    }

    /// Kills the guest's agent (`kill -9`), whichever process runs it.
    pub fn kill_agent(&self) {
        self.run_ok("kill -9 $(pidof hostnet-agent)");
    }

    /// Starts the agent again (as guest child `agent`, log in `/tmp/agent.log`).
    pub fn restart_agent(&self) {
        let o = self
            .request(
                &format!("SPAWNBG agent hostnet-agent {}", agent_args()),
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("guest: restart the agent: {e:#}"));
        if o.code != 0 {
            panic!("guest: restart the agent: {}", o.output);
        }
    }

    /// Starts (or restarts, after a SIGKILL) the forwarder and waits until its session with the
    /// agent is up.
    pub fn start_forwarder(&mut self) -> Duration {
        if let Some(mut old) = self.fwd.take() {
            old.kill9();
            self.old_logs.push_str(&old.describe());
        }
        let _ = std::fs::remove_file(self.control());
        let mut cmd = Command::new(bin("hostnet-forwarder"));
        cmd.args(["run", "--guest", &self.guest_uri()])
            .arg("--control")
            .arg(self.control());
        if let Some(l) = std::env::var_os("HOSTNET_E2E_LOG") {
            cmd.env("RUST_LOG", l);
        }
        die_with_parent(&mut cmd);
        let t0 = Instant::now();
        self.fwd = Some(Proc::spawn("hostnet-forwarder", cmd));
        self.wait_connected(true, Duration::from_secs(60));
        t0.elapsed()
    }

    /// `hostnet-forwarder status --json`.
    pub fn status(&self) -> Result<Value, String> {
        let out = Command::new(bin("hostnet-forwarder"))
            .args(["status", "--json", "--control"])
            .arg(self.control())
            .output()
            .map_err(|e| format!("run status: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "status exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status is not JSON: {e}"))
    }

    /// Waits until the forwarder's session is (or is not) connected; panics with the logs after
    /// `timeout`.
    pub fn wait_connected(&mut self, connected: bool, timeout: Duration) {
        let ok = wait_until(after(timeout), || {
            self.status()
                .is_ok_and(|v| v["session"]["connected"].as_bool() == Some(connected))
        });
        if !ok {
            panic!(
                "the forwarder's session did not become connected={connected} within {timeout:?}; status: {:?}\n{}",
                self.status(),
                self.describe()
            );
        }
    }

    /// Waits until the host has (`present`) or has not a TCP listener on `ip:port`.
    pub fn wait_host_tcp(
        &self,
        ip: IpAddr,
        port: u16,
        present: bool,
        timeout: Duration,
    ) -> Option<Duration> {
        let a: SocketAddr = sa(ip, port);
        crate::net::time_until(timeout, || tcp_listeners().contains(&a) == present)
    }

    /// Every log there is: the console, the backend's and the forwarder's stderr, the guest's
    /// `/tmp/*.log` (if the guest still answers).
    pub fn describe(&mut self) -> String {
        let mut s = self.old_logs.clone();
        if let Some(f) = self.fwd.as_mut() {
            s.push_str(&f.describe());
            s.push('\n');
        }
        if let Some(b) = self.backend.as_mut() {
            s.push_str(&b.describe());
            s.push('\n');
        }
        let console = self.console();
        s.push_str(&format!(
            "--- guest console (tail):\n{}\n--- end console\n",
            tail(&console, 6000)
        ));
        if self.qemu.as_mut().is_some_and(Proc::is_running) {
            match self.request(
                "RUN for f in /tmp/*.log; do echo \"== $f\"; tail -c 3000 $f; done",
                Duration::from_secs(10),
            ) {
                Ok(o) => s.push_str(&format!(
                    "--- guest logs:\n{}\n--- end guest logs\n",
                    o.output
                )),
                Err(e) => s.push_str(&format!("(guest logs unavailable: {e:#})\n")),
            }
        } else if let Some(q) = self.qemu.as_mut() {
            s.push_str(&q.describe());
        }
        s
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Forwarder first (it would otherwise log the lost session), then QEMU, then the
        // backend, which outlives its frontend otherwise.
        if let Some(mut f) = self.fwd.take() {
            f.kill9();
        }
        if let Some(mut q) = self.qemu.take() {
            q.kill9();
        }
        if let Some(mut b) = self.backend.take() {
            b.kill9();
        }
    }
}

/// The child gets SIGKILL if the thread that started it dies (a killed test runner must not
/// leave a VM behind; Drop covers every other exit).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
    // which is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The median of `v` (sorted in place); zero when empty.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 \
                    (0x00007f2c)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f2d)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }
}
