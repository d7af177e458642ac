//! A real dockerd for proving hostnet-proxy as a drop-in `docker-proxy`: the daemon dockerd runs
//! with private data and exec roots, its own API socket and a private bridge range under a
//! temporary directory, a busybox image imported from a local tarball (no registry), and
//! `--userland-proxy-path` pointing at the proxy under test.
//!
//! dockerd changes the host: it writes iptables rules (nat and filter tables), switches on
//! `ip_forward`, sets the bridge netfilter sysctls and creates `docker0`. [`Lab`] records all of
//! that first and puts it back when dropped (also when a test panics), then checks that
//! `iptables-save`/`ip6tables-save` print what they printed before.
//!
//! [`Lab::launch_via`] runs the daemons through a launcher instead, e.g. inside a network
//! namespace ([`crate::desktop`], where the host keeps its iptables and sysctls and the same
//! checks show it); [`Lab::with_bins`] puts more executables in the image.
//!
//! Lifetimes: a [`Dockerd`] borrows its [`Lab`], so it is always stopped (by pid) before the lab
//! restores the host. Stopping removes every container first, unless [`Dockerd::shutdown_live`]
//! is used (the `--live-restore` case), after which the next daemon of the same lab finds the
//! containers again.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{TempDir, after, wait_until};

/// The bridge range the test daemons use (`--bip`), inside RFC 2544's 198.18.0.0/15.
pub const BIP: &str = "198.19.253.1/24";

/// The image every test container runs: busybox (httpd, sh, sleep) plus socat with its shared
/// libraries (TCP and UDP echo servers; the Debian busybox has no UDP `nc`).
pub const IMAGE: &str = "hostnet-bbx:test";

/// What `index.html` of the image's `/www` holds.
pub const INDEX_HTML: &str = "<h1>hello from busybox through the userland proxy</h1>\n";

/// The installed docker-proxy, the baseline.
pub const DOCKER_PROXY: &str = "/usr/sbin/docker-proxy";

/// How long one `docker` command may take before the harness calls it hung.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(180);

/// True when the dockerd tests can run. Panics with what is missing (not root, no dockerd, no
/// docker CLI, no busybox/socat, another daemon's `docker0`) unless `HOSTNET_SKIP_DOCKER=1`, in
/// which case it prints a note and returns false.
pub fn available(test: &str) -> bool {
    let skip = crate::skip_requested("HOSTNET_SKIP_DOCKER");
    match missing() {
        None => true,
        Some(p) if skip => {
            eprintln!(
                "note: {test} skipped: {p}; HOSTNET_SKIP_DOCKER=1 or HOSTNET_SKIP_PRIVILEGED=1"
            );
            false
        }
        Some(p) => panic!(
            "{test}: {p}. `bash scripts/test-deps.sh` installs what the dockerd tests need (as \
             root); set HOSTNET_SKIP_DOCKER=1 to skip them."
        ),
    }
}

fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (dockerd needs it)".into());
    }
    for tool in [
        "dockerd",
        "docker",
        "iptables-save",
        "iptables-restore",
        "socat",
        "busybox",
        "tar",
    ] {
        if which(tool).is_none() {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    if Path::new("/sys/class/net/docker0").exists() {
        return Some(
            "a docker0 bridge exists (another dockerd runs here); the tests need the host to \
             themselves"
                .into(),
        );
    }
    None
}

/// The path of `tool` on `$PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs `cmd`, returning its output; an error when it cannot start.
fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))
}

/// Runs `cmd` and returns stdout; an error with stderr when it fails.
fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with `input` on stdin; an error with stderr when it fails.
fn run_with_input(cmd: &mut Command, input: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One packet-filter front end (`iptables` or `ip6tables`) and what it held before.
#[derive(Debug)]
struct Filter {
    tool: &'static str,
    nft_family: &'static str,
    before: String,
}

impl Filter {
    fn save(tool: &'static str, nft_family: &'static str) -> Result<Self> {
        let before = run_ok(Command::new(format!("{tool}-save")).arg("-c"))?;
        Ok(Self {
            tool,
            nft_family,
            before,
        })
    }

    fn now(&self) -> Result<String> {
        run_ok(Command::new(format!("{}-save", self.tool)).arg("-c"))
    }

    /// Puts the rules back and returns an error when the dump still differs.
    fn restore(&self) -> Result<()> {
        let now = self.now()?;
        if normalize(&now) == normalize(&self.before) {
            return Ok(());
        }
        if !tables(&self.before).is_empty() {
            run_with_input(
                Command::new(format!("{}-restore", self.tool)).arg("-c"),
                &self.before,
            )?;
        }
        // Tables that did not exist before: delete them (nftables back end) or empty them.
        let old = tables(&self.before);
        let nft = self.tool_is_nft() && which("nft").is_some();
        for table in tables(&self.now()?) {
            if old.contains(&table) {
                continue;
            }
            if nft {
                run_ok(Command::new("nft").args(["delete", "table", self.nft_family, &table]))?;
            } else {
                let t = ["-w", "-t", &table];
                run_ok(Command::new(self.tool).args(t).arg("-F"))?;
                run_ok(Command::new(self.tool).args(t).arg("-X"))?;
                for chain in builtin_chains(&self.now()?, &table) {
                    run_ok(
                        Command::new(self.tool)
                            .args(t)
                            .args(["-P", &chain, "ACCEPT"]),
                    )?;
                }
            }
        }
        let after = self.now()?;
        // Without `nft` (or on the legacy back end) a table cannot be deleted, only emptied: an
        // empty table whose built-in chains accept everything then counts as absent.
        let same = if nft {
            normalize(&after) == normalize(&self.before)
        } else {
            without_empty_tables(&normalize(&after))
                == without_empty_tables(&normalize(&self.before))
        };
        if !same {
            bail!(
                "{}-save differs after the restore:\n--- before\n{}\n--- after\n{}",
                self.tool,
                self.before,
                after
            );
        }
        Ok(())
    }

    fn tool_is_nft(&self) -> bool {
        run_ok(Command::new(self.tool).arg("--version")).is_ok_and(|v| v.contains("nf_tables"))
    }
}

/// An `*-save` dump without comments and counters.
fn normalize(dump: &str) -> Vec<String> {
    dump.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            // ":CHAIN POLICY [p:b]" and "[p:b] -A ..." carry counters.
            let mut out = String::new();
            let mut skipping = false;
            for c in l.chars() {
                match c {
                    '[' => skipping = true,
                    ']' if skipping => skipping = false,
                    _ if !skipping => out.push(c),
                    _ => {}
                }
            }
            out.trim().to_string()
        })
        .collect()
}

/// A [`normalize`]d dump without the tables that hold no rule and no chain of their own and
/// whose built-in chains all accept: such a table filters nothing, as if it were not there.
fn without_empty_tables(lines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut table: Vec<String> = Vec::new();
    for l in lines {
        if l.starts_with('*') {
            table = vec![l.clone()];
        } else if table.is_empty() {
            out.push(l.clone());
        } else if l == "COMMIT" {
            let empty = table[1..].iter().all(|c| {
                let mut it = c.split_whitespace();
                c.starts_with(':') && it.nth(1) == Some("ACCEPT") && it.next().is_none()
            });
            if !empty {
                out.append(&mut table);
                out.push(l.clone());
            }
            table.clear();
        } else {
            table.push(l.clone());
        }
    }
    out.append(&mut table);
    out
}

/// The table names of an `*-save` dump (`*nat` lines).
fn tables(dump: &str) -> Vec<String> {
    dump.lines()
        .filter_map(|l| l.strip_prefix('*'))
        .map(str::to_string)
        .collect()
}

/// The chains of `table` with a policy (built-in chains) in an `*-save` dump.
fn builtin_chains(dump: &str, table: &str) -> Vec<String> {
    let mut inside = false;
    let mut out = Vec::new();
    for l in dump.lines() {
        if let Some(t) = l.strip_prefix('*') {
            inside = t == table;
        } else if inside && let Some(rest) = l.strip_prefix(':') {
            let mut it = rest.split_whitespace();
            if let (Some(chain), Some(policy)) = (it.next(), it.next())
                && policy != "-"
            {
                out.push(chain.to_string());
            }
        }
    }
    out
}

/// The host state dockerd changes, recorded before it starts.
#[derive(Debug)]
struct HostState {
    filters: Vec<Filter>,
    sysctls: Vec<(PathBuf, String)>,
    /// Paths dockerd creates outside its roots that did not exist before (removed afterwards).
    absent: Vec<PathBuf>,
    /// dockerd's trust key, rewritten on every start: its content before, if it existed.
    trust_key: Option<Vec<u8>>,
}

/// Where dockerd 20.10 keeps its trust key whatever `--data-root` says.
const TRUST_KEY: &str = "/etc/docker/key.json";

/// What dockerd and its containerd create outside their roots: plugin and shim socket
/// directories, the trust key's directory, and a `docker` cgroup under every v1 controller.
fn outside_paths() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["/run/docker", "/run/containerd", "/etc/docker", TRUST_KEY]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
        v.extend(rd.filter_map(|e| Some(e.ok()?.path().join("docker"))));
    }
    v
}

/// Removes a cgroup directory tree (children first; `rmdir` is how cgroups are removed).
fn remove_cgroup(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// The sysctls dockerd sets (forwarding, bridge netfilter).
const SYSCTLS: [&str; 5] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
    "/proc/sys/net/ipv6/conf/default/forwarding",
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];

impl HostState {
    fn save() -> Result<Self> {
        let mut filters = vec![Filter::save("iptables", "ip")?];
        if which("ip6tables-save").is_some() {
            filters.push(Filter::save("ip6tables", "ip6")?);
        }
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|p| {
                let v = fs::read_to_string(p).ok()?;
                Some((PathBuf::from(p), v))
            })
            .collect();
        let absent = outside_paths()
            .into_iter()
            .filter(|p| !p.exists())
            .collect();
        let trust_key = fs::read(TRUST_KEY).ok();
        Ok(Self {
            filters,
            sysctls,
            absent,
            trust_key,
        })
    }

    /// Restores everything it can and reports what it could not.
    fn restore(&self) -> Result<()> {
        let mut problems = Vec::new();
        for f in &self.filters {
            if let Err(e) = f.restore() {
                problems.push(format!("{e:#}"));
            }
        }
        // br_netfilter may have been loaded by dockerd: its sysctls then exist only now.
        for (p, v) in &self.sysctls {
            if fs::read_to_string(p).ok().as_deref() != Some(v.as_str())
                && let Err(e) = fs::write(p, v)
            {
                problems.push(format!("cannot restore {}: {e}", p.display()));
            }
        }
        if Path::new("/sys/class/net/docker0").exists() {
            let _ = output(Command::new("ip").args(["link", "del", "docker0"]));
        }
        if let Some(key) = &self.trust_key
            && let Err(e) = fs::write(TRUST_KEY, key)
        {
            problems.push(format!("cannot restore {TRUST_KEY}: {e}"));
        }
        for p in &self.absent {
            if p.starts_with("/sys/fs/cgroup") {
                remove_cgroup(p);
            } else if p.is_dir() {
                let _ = fs::remove_dir_all(p);
            } else {
                let _ = fs::remove_file(p);
            }
            if p.exists() {
                problems.push(format!(
                    "cannot remove {} (dockerd created it)",
                    p.display()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(problems.join("\n")))
        }
    }
}

/// A place for dockerd daemons: a temp dir with their roots, the image tarball, and the host
/// state to put back on drop. Daemons of one lab share the data root (images, containers).
#[derive(Debug)]
pub struct Lab {
    dir: TempDir,
    host: Option<HostState>,
    image_tar: PathBuf,
    /// What runs `dockerd` (empty: it runs directly); see [`Lab::launch_via`].
    launcher: Vec<OsString>,
    storage_driver: String,
}

impl Lab {
    /// Records the host state and builds the image tarball. Call [`available`] first.
    pub fn new(tag: &str) -> Result<Self> {
        Self::with_bins(tag, &[])
    }

    /// [`Lab::new`], with the executables `bins` in the image's `/bin` too (with the shared
    /// libraries they load).
    pub fn with_bins(tag: &str, bins: &[&Path]) -> Result<Self> {
        let dir = TempDir::new(&format!("dockerd-{tag}"))?;
        let host = HostState::save()?;
        let image_tar = dir.join("image.tar");
        build_image(&dir.join("rootfs"), &image_tar, bins)?;
        Ok(Self {
            dir,
            host: Some(host),
            image_tar,
            launcher: Vec::new(),
            storage_driver: "vfs".into(),
        })
    }

    /// The daemons of this lab run as `LAUNCHER... dockerd ARGS...` (e.g. `ip netns exec NS
    /// wrapper`, which must exec dockerd so that the child is the daemon itself) with the storage
    /// driver `storage_driver` (default: `vfs`, which works on any file system).
    pub fn launch_via(&mut self, launcher: Vec<OsString>, storage_driver: &str) {
        self.launcher = launcher;
        self.storage_driver = storage_driver.into();
    }

    /// `path`, which does not exist yet, will be made by the daemons outside their roots: it is
    /// removed (a cgroup tree with `rmdir`) when the host is restored, and must be gone then.
    pub fn remove_afterwards(&mut self, path: PathBuf) {
        if let Some(h) = self.host.as_mut()
            && !path.exists()
        {
            h.absent.push(path);
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts dockerd with `proxy` as its userland proxy (`None`: dockerd's default, which is the
    /// installed docker-proxy), `extra` daemon arguments and `env` added to its environment (the
    /// proxies inherit it), waits until its API answers, and imports [`IMAGE`] if this lab's data
    /// root does not hold it yet.
    pub fn start(
        &self,
        proxy: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Dockerd<'_>> {
        let sock = self.dir.join("docker.sock");
        let log = self.dir.join("dockerd.log");
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = match self.launcher.split_first() {
            None => Command::new("dockerd"),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg("dockerd");
                c
            }
        };
        cmd.arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args(["--storage-driver", &self.storage_driver])
            .args(["--bip", BIP, "--iptables=true"]);
        let proxy = match proxy {
            Some(p) => {
                let p = p
                    .canonicalize()
                    .with_context(|| format!("proxy binary {}", p.display()))?;
                cmd.arg(format!("--userland-proxy-path={}", p.display()));
                p
            }
            None => PathBuf::from(DOCKER_PROXY),
        };
        cmd.args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            // Its own process group: a Ctrl-C of the test run reaches it only through our drop.
            .process_group(0);
        let child = cmd.spawn().context("cannot start dockerd")?;
        let mut d = Dockerd {
            lab: self,
            child,
            sock,
            log,
            proxy,
            stopped: false,
        };
        let end = after(Duration::from_secs(60));
        loop {
            if d.docker(&["version", "--format", "{{.Server.Version}}"])
                .is_ok_and(|o| o.status.success())
            {
                break;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                d.stopped = true;
                bail!(
                    "dockerd exited ({status}) while starting:\n{}",
                    d.log_tail()
                );
            }
            if Instant::now() >= end {
                bail!("dockerd did not answer within 60 s:\n{}", d.log_tail());
            }
            thread::sleep(Duration::from_millis(100));
        }
        let images = d.docker_ok(&["images", "-q", IMAGE])?;
        if images.trim().is_empty() {
            d.docker_ok(&["import", &self.image_tar.display().to_string(), IMAGE])?;
        }
        Ok(d)
    }

    /// Kills whatever still runs from this lab (containerd, shims) and unmounts what is mounted
    /// under it.
    fn sweep(&self) {
        let root = self.dir.path().display().to_string();
        for pid in pids() {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&root) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        points.reverse();
        for m in points {
            let _ = output(Command::new("umount").args(["-l", m]));
        }
    }

    /// Stops nothing (every [`Dockerd`] is already gone), sweeps, and restores the host; the
    /// error lists what could not be put back.
    pub fn finish(mut self) -> Result<()> {
        self.sweep();
        match self.host.take() {
            Some(h) => h.restore(),
            None => Ok(()),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.sweep();
        if let Some(h) = self.host.take()
            && let Err(e) = h.restore()
        {
            eprintln!("warning: the host is not as it was before dockerd ran: {e:#}");
        }
    }
}

/// Writes the image rootfs (busybox, socat and `bins` with their libraries, /www/index.html)
/// and tars it.
fn build_image(root: &Path, tar: &Path, bins: &[&Path]) -> Result<()> {
    fs::create_dir_all(root.join("bin"))?;
    fs::create_dir_all(root.join("www"))?;
    fs::create_dir_all(root.join("tmp"))?;
    let busybox = which("busybox").context("busybox")?;
    fs::copy(&busybox, root.join("bin/busybox"))?;
    for applet in ["sh", "sleep", "httpd", "cat", "wget"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    let socat = which("socat").context("socat")?;
    copy_with_libs(root, &socat)?;
    for b in bins {
        copy_with_libs(root, b)?;
    }
    fs::write(root.join("www/index.html"), INDEX_HTML)?;
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(root)
            .arg("-cf")
            .arg(tar)
            .arg("."),
    )?;
    Ok(())
}

/// Copies the executable `exe` into `root/bin` and the shared libraries it loads (as `ldd`
/// lists them) to their own paths under `root`.
fn copy_with_libs(root: &Path, exe: &Path) -> Result<()> {
    let name = exe.file_name().context("an executable has a file name")?;
    fs::copy(exe, root.join("bin").join(name))
        .with_context(|| format!("copy {}", exe.display()))?;
    let out = output(Command::new("ldd").arg(exe))?;
    let ldd = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") {
            return Ok(());
        }
        bail!(
            "ldd {} failed ({}): {}",
            exe.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    for lib in ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(Path::new)
    {
        let dest = root.join(lib.strip_prefix("/")?);
        if dest.exists() {
            continue;
        }
        fs::create_dir_all(dest.parent().expect("a library path has a directory"))?;
        fs::copy(lib, &dest).with_context(|| format!("copy {}", lib.display()))?;
    }
    Ok(())
}

/// Every pid in /proc.
fn pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A userland proxy process dockerd started.
#[derive(Debug, Clone)]
pub struct ProxyProc {
    pub pid: i32,
    pub argv: Vec<String>,
    /// Resident set, KiB (`VmRSS`).
    pub rss_kib: u64,
    pub threads: u64,
}

impl ProxyProc {
    /// The value of `-flag` in its argv.
    pub fn flag(&self, flag: &str) -> Option<&str> {
        let pos = self.argv.iter().position(|a| a == flag)?;
        self.argv.get(pos + 1).map(String::as_str)
    }
}

/// A running dockerd; stopped by pid on drop (containers removed first).
#[derive(Debug)]
pub struct Dockerd<'a> {
    lab: &'a Lab,
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    /// The userland proxy binary this daemon runs.
    pub proxy: PathBuf,
    stopped: bool,
}

impl Dockerd<'_> {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Runs `docker -H <our socket> args...`, at most [`DOCKER_TIMEOUT`]; the CLI is killed when
    /// it takes longer (an error naming the hang).
    pub fn docker(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.lab.dir.join("cli"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("cannot run docker")?;
        // Drain both pipes in threads so a chatty command cannot block on a full pipe.
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let t_out = thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut out, &mut v);
            v
        });
        let t_err = thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut err, &mut v);
            v
        });
        let end = after(DOCKER_TIMEOUT);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`docker {}` hung for {DOCKER_TIMEOUT:?}", args.join(" "));
            }
            thread::sleep(Duration::from_millis(5));
        };
        Ok(Output {
            status,
            stdout: t_out.join().unwrap_or_default(),
            stderr: t_err.join().unwrap_or_default(),
        })
    }

    /// [`Dockerd::docker`], requiring success; stdout.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.docker(args)?;
        if !out.status.success() {
            bail!(
                "`docker {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The userland proxies this daemon runs now: its children whose executable is
    /// [`Dockerd::proxy`].
    pub fn proxies(&self) -> Vec<ProxyProc> {
        let me = self.pid();
        pids()
            .into_iter()
            .filter(|&pid| ppid(pid) == Some(me))
            .filter(|&pid| {
                fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == self.proxy)
            })
            .filter_map(|pid| {
                let argv = fs::read(format!("/proc/{pid}/cmdline"))
                    .ok()?
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                Some(ProxyProc {
                    pid,
                    argv,
                    rss_kib: crate::process::status_field(&status, "VmRSS:")?,
                    threads: crate::process::status_field(&status, "Threads:")?,
                })
            })
            .collect()
    }

    /// Waits until exactly `n` proxies run, at most `timeout`; the last list seen otherwise.
    pub fn wait_proxies(&self, n: usize, timeout: Duration) -> Result<Vec<ProxyProc>> {
        let mut last = Vec::new();
        if wait_until(after(timeout), || {
            last = self.proxies();
            last.len() == n
        }) {
            Ok(last)
        } else {
            bail!(
                "expected {n} userland proxies within {timeout:?}, found {}: {:?}",
                last.len(),
                last.iter().map(|p| &p.argv).collect::<Vec<_>>()
            )
        }
    }

    /// The last 60 lines of dockerd's log.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Removes every container, then stops the daemon.
    pub fn stop(mut self) -> Result<()> {
        self.remove_all()?;
        self.terminate()
    }

    /// Stops the daemon and leaves its containers running (for `--live-restore`).
    pub fn shutdown_live(mut self) -> Result<()> {
        self.terminate()
    }

    fn remove_all(&self) -> Result<()> {
        let ids = self.docker_ok(&["ps", "-aq"])?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            self.docker_ok(&args)?;
        }
        Ok(())
    }

    /// SIGTERM, up to 60 s for dockerd to exit, then SIGKILL.
    fn terminate(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let end = after(Duration::from_secs(60));
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("dockerd ignored SIGTERM for 60 s:\n{}", self.log_tail());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dockerd<'_> {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.remove_all();
            let _ = self.terminate();
        }
    }
}

/// The parent pid of `pid`, from `/proc/<pid>/stat` (the field after the parenthesised name).
fn ppid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_dumps_compare_without_counters_and_comments() {
        let a = "# Generated by iptables-save v1.8.9 on Mon\n*nat\n:PREROUTING ACCEPT [3:180]\n[1:60] -A POSTROUTING -j MASQUERADE\nCOMMIT\n";
        let b = "# Generated by iptables-save v1.8.9 on Tue\n*nat\n:PREROUTING ACCEPT [9:540]\n[7:420] -A POSTROUTING -j MASQUERADE\nCOMMIT\n";
        assert_eq!(normalize(a), normalize(b));
        assert_ne!(normalize(a), normalize("*nat\nCOMMIT\n"));
        assert_eq!(tables(a), ["nat"]);
        let f = "*filter\n:INPUT DROP [0:0]\n:DOCKER - [0:0]\nCOMMIT\n";
        assert_eq!(builtin_chains(f, "filter"), ["INPUT"]);
    }

    #[test]
    fn empty_accepting_tables_count_as_absent() {
        let empty = "# c\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [3:9]\nCOMMIT\n";
        assert!(without_empty_tables(&normalize(empty)).is_empty());
        for kept in [
            "*filter\n:INPUT DROP [0:0]\nCOMMIT\n",
            "*filter\n:INPUT ACCEPT [0:0]\n:DOCKER - [0:0]\nCOMMIT\n",
            "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n",
        ] {
            assert_eq!(without_empty_tables(&normalize(kept)), normalize(kept));
        }
        let both = format!("{empty}*nat\n:OUTPUT DROP [0:0]\nCOMMIT\n");
        assert_eq!(
            without_empty_tables(&normalize(&both)),
            ["*nat", ":OUTPUT DROP", "COMMIT"]
        );
    }

    #[test]
    fn stat_and_status_fields_parse() {
        assert_eq!(
            crate::process::status_field("Name:\tx\nVmRSS:\t  812 kB\nThreads:\t1\n", "VmRSS:"),
            Some(812)
        );
        assert_eq!(
            crate::process::status_field("Threads:\t5\n", "Threads:"),
            Some(5)
        );
    }
}
