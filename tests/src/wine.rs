//! The Windows build of `hostnet-forwarder` run under Wine, for `tests/tests/wine.rs`: the agent
//! is the Linux one in a namespace ([`crate::bridge`]), the forwarder is `hostnet-forwarder.exe`
//! (`x86_64-pc-windows-gnu`) started by `wine64`. Its sockets are the Linux host's (Wine maps
//! Winsock onto them), so the host-side helpers of [`crate::net`] see its listeners; its control
//! endpoint is a named pipe, and its reverse-direction enumerator (`GetExtendedTcpTable`) lists
//! the Linux host's sockets.
//!
//! * [`session`] checks the prerequisites (`wine64`, `wineserver`, `x86_64-w64-mingw32-gcc`, the
//!   Rust standard library for the target): like [`crate::privileged`] it panics when one is
//!   missing, unless `HOSTNET_SKIP_WINE=1` (or `HOSTNET_SKIP_PRIVILEGED=1`). Then, once per
//!   process: it builds the .exe (`$CARGO build --target x86_64-pc-windows-gnu` into a target dir
//!   of its own, `target/wine/target`, so that it never waits for the lock of the `cargo test`
//!   that runs us), builds the `bcryptprimitives.dll` stub next to it (`tests/wine/`: Wine 8 lacks
//!   `ProcessPrng`, which Rust's std imports), and creates the Wine prefix `target/wine/prefix`
//!   (`wineboot -i`; kept between runs). Each [`Session`] holds the prefix's wineserver: the first
//!   starts it (persistent, so that it does not stop and restart between two forwarders), the
//!   last to drop kills it with `wineserver -k`, which also ends every Windows process left in
//!   the prefix (Wine's `services.exe`, `explorer.exe` and the like included).
//! * [`command`] is `wine64 hostnet-forwarder.exe` in that prefix. The Windows process keeps the
//!   pid of the `wine64` started (Wine execs its preloader and the .exe runs in it), so
//!   [`crate::process::Proc`] kills it on drop, and it gets SIGKILL when the thread that started
//!   it dies (`PR_SET_PDEATHSIG`, which the execs keep). [`output`] runs one to completion with
//!   a deadline.
//! * [`pipe_name`] gives each forwarder its own control pipe, `\\.\pipe\hostnet-test-PID-N`.
//!
//! Paths: Wine maps drive `Z:` to `/` and starts a process with its current directory on `Z:`,
//! and Rust on Windows resolves `/tmp/x` against the current drive, so the Unix absolute paths
//! the bridge passes (token file, certificates) name the same files; the test checks it by using
//! them.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::{Proc, tail};
use crate::vm::{die_with_parent, scrub_cargo_env, workspace_root};

/// The Rust target of the Windows build.
pub const TARGET: &str = "x86_64-pc-windows-gnu";
/// The MinGW-w64 compiler the stub DLL (and Rust's linker for the target) needs.
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";
/// How long the wineserver lingers after its last Windows process exits: the safety net if the
/// test process dies without its [`Session`] dropping (the forwarders die with it).
const PERSIST_SECS: u32 = 10;

/// The Wine programs.
#[derive(Debug, Clone)]
struct Tools {
    wine64: PathBuf,
    wineserver: PathBuf,
    gcc: PathBuf,
}

/// What [`session`] prepared.
#[derive(Debug, Clone)]
struct Setup {
    tools: Tools,
    exe: PathBuf,
    prefix: PathBuf,
}

/// `target/wine`: the Windows target dir and the prefix.
pub fn wine_dir() -> PathBuf {
    workspace_root().join("target/wine")
}

/// The Wine prefix (created once, kept between runs).
pub fn prefix_dir() -> PathBuf {
    wine_dir().join("prefix")
}

/// `name` on `PATH`, else in one of `dirs` (Debian's `wine64` lives in `/usr/lib/wine`).
fn find_program(name: &str, dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(dirs.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn find_tools() -> Result<Tools, String> {
    let wine_dirs = ["/usr/lib/wine", "/usr/lib64/wine", "/opt/wine-stable/bin"];
    let wine64 = find_program("wine64", &wine_dirs);
    let wineserver = find_program("wineserver", &wine_dirs);
    let gcc = find_program(MINGW_GCC, &[]);
    let mut missing = Vec::new();
    if wine64.is_none() {
        missing.push("wine64 (Debian: apt-get install wine64)");
    }
    if wineserver.is_none() {
        missing.push("wineserver (Debian: apt-get install wine64)");
    }
    if gcc.is_none() {
        missing.push("x86_64-w64-mingw32-gcc (Debian: apt-get install gcc-mingw-w64-x86-64)");
    }
    if !crate::vm::target_installed(TARGET) {
        missing.push(
            "the Rust target x86_64-pc-windows-gnu (rustup target add x86_64-pc-windows-gnu)",
        );
    }
    match (wine64, wineserver, gcc) {
        (Some(wine64), Some(wineserver), Some(gcc)) if missing.is_empty() => Ok(Tools {
            wine64,
            wineserver,
            gcc,
        }),
        _ => Err(missing.join(", ")),
    }
}

/// The prerequisites, the .exe and the prefix, made once per process; `None` (with a note) when
/// a prerequisite is missing and `HOSTNET_SKIP_WINE=1` or `HOSTNET_SKIP_PRIVILEGED=1`; panics
/// with what is missing otherwise, and when the build or the prefix fails. The [`Session`] keeps
/// the prefix's wineserver running.
pub fn session(test: &str) -> Option<Session> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    let tools = match TOOLS.get_or_init(find_tools) {
        Ok(t) => t.clone(),
        Err(p) if crate::skip_requested("HOSTNET_SKIP_WINE") => {
            eprintln!(
                "note: {test} skipped: missing {p}; HOSTNET_SKIP_WINE=1 or HOSTNET_SKIP_PRIVILEGED=1"
            );
            return None;
        }
        Err(p) => panic!(
            "{test}: the Windows forwarder under Wine needs what is missing here: {p}. scripts/cross-setup.sh installs them (as root); or set HOSTNET_SKIP_WINE=1 to skip the Wine test."
        ),
    };
    if let Err(e) = SETUP.get_or_init(|| prepare(tools).map_err(|e| format!("{e:#}"))) {
        panic!("{test}: {e}");
    }
    Some(Session::acquire())
}

static SETUP: OnceLock<Result<Setup, String>> = OnceLock::new();

fn setup() -> &'static Setup {
    match SETUP.get() {
        Some(Ok(s)) => s,
        _ => panic!("wine::session() must succeed before the Windows forwarder is used"),
    }
}

fn prepare(tools: Tools) -> anyhow::Result<Setup> {
    let exe = build_exe()?;
    build_stub(&tools, exe.parent().expect("the exe has a directory"))?;
    let prefix = prefix_dir();
    make_prefix(&tools, &prefix)?;
    Ok(Setup { tools, exe, prefix })
}

/// `$CARGO build -p hostnet-forwarder --target x86_64-pc-windows-gnu` (debug) into
/// `target/wine/target`; the path of the .exe.
fn build_exe() -> anyhow::Result<PathBuf> {
    let target_dir = wine_dir().join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let t0 = Instant::now();
    let mut cmd = Command::new(&cargo);
    scrub_cargo_env(&mut cmd);
    let out = cmd
        .current_dir(workspace_root())
        .args(["build", "-p", "hostnet-forwarder", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .with_context(|| format!("running {cargo:?}"))?;
    if !out.status.success() {
        bail!(
            "building hostnet-forwarder for {TARGET} failed ({}):\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 6000)
        );
    }
    let exe = target_dir.join(TARGET).join("debug/hostnet-forwarder.exe");
    if !exe.is_file() {
        bail!("the build succeeded but {} is missing", exe.display());
    }
    eprintln!(
        "wine: hostnet-forwarder.exe built (or found fresh) in {:.1?}",
        t0.elapsed()
    );
    Ok(exe)
}

/// `bcryptprimitives.dll` from `tests/wine/` into `dir` (next to the .exe, where Wine looks
/// first), when missing or older than its sources.
fn build_stub(tools: &Tools, dir: &Path) -> anyhow::Result<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("wine");
    let (c, def) = (
        src.join("bcryptprimitives.c"),
        src.join("bcryptprimitives.def"),
    );
    let dll = dir.join("bcryptprimitives.dll");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = mtime(&dll).is_some_and(|d| [&c, &def].iter().all(|s| mtime(s) < Some(d)));
    if fresh {
        return Ok(());
    }
    let out = Command::new(&tools.gcc)
        .args(["-shared", "-o"])
        .arg(&dll)
        .arg(&c)
        .arg(&def)
        .arg("-ladvapi32")
        .output()
        .with_context(|| format!("running {}", tools.gcc.display()))?;
    if !out.status.success() {
        bail!(
            "building the {} stub failed ({}):\n{}",
            dll.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Sets the prefix and quiets Wine: no debug channels (unless `WINEDEBUG` is set), no Mono or
/// Gecko installers.
fn wine_env(cmd: &mut Command, prefix: &Path) {
    cmd.env("WINEPREFIX", prefix)
        .env("WINEDLLOVERRIDES", "mscoree,mshtml=")
        .env(
            "WINEDEBUG",
            std::env::var_os("WINEDEBUG").unwrap_or_else(|| "-all".into()),
        );
}

/// Creates the prefix with `wineboot -i` unless a previous run did (its `.hostnet-ready` marker
/// is written last, so a half-made prefix is made again).
fn make_prefix(tools: &Tools, prefix: &Path) -> anyhow::Result<()> {
    let marker = prefix.join(".hostnet-ready");
    if marker.is_file() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(prefix);
    std::fs::create_dir_all(prefix.parent().expect("the prefix has a parent"))?;
    let t0 = Instant::now();
    let mut cmd = Command::new(&tools.wine64);
    wine_env(&mut cmd, prefix);
    cmd.args(["wineboot", "-i"]);
    let mut p = Proc::spawn("wineboot", cmd);
    let status = p.wait_exit(Duration::from_secs(180));
    if !status.is_some_and(|s| s.success()) {
        p.kill9();
        bail!(
            "creating the Wine prefix {} failed or took over 180 s:\n{}",
            prefix.display(),
            p.describe()
        );
    }
    // wineboot returns before the server and the processes it started have ended.
    let mut w = Command::new(&tools.wineserver);
    w.env("WINEPREFIX", prefix).arg("-w");
    let mut wait = Proc::spawn("wineserver -w", w);
    if wait.wait_exit(Duration::from_secs(60)).is_none() {
        bail!("the Wine prefix's first wineserver did not exit within 60 s");
    }
    std::fs::write(&marker, b"")?;
    eprintln!(
        "wine: prefix {} created in {:.1?}",
        prefix.display(),
        t0.elapsed()
    );
    Ok(())
}

/// How many [`Session`]s are alive (the wineserver runs while there is one).
static SESSIONS: Mutex<usize> = Mutex::new(0);

/// The prefix's wineserver, held: started persistent by the first session, killed (with every
/// Windows process of the prefix) when the last one drops.
#[derive(Debug)]
pub struct Session {
    _private: (),
}

impl Session {
    fn acquire() -> Self {
        let mut n = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            start_server();
        }
        *n += 1;
        Session { _private: () }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut n = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            kill_server();
        }
    }
}

/// `wineserver -pN`: it daemonizes once its socket is ready (exit 0), or finds a server of
/// this prefix already running (exit 2: a leftover of a killed run, used as is). Then one
/// process warms the prefix up (the first starts Wine's services, about half a second).
fn start_server() {
    let s = setup();
    let mut cmd = Command::new(&s.tools.wineserver);
    wine_env(&mut cmd, &s.prefix);
    cmd.arg(format!("-p{PERSIST_SECS}"));
    let mut p = Proc::spawn("wineserver", cmd);
    match p.wait_exit(Duration::from_secs(30)) {
        Some(st) if st.success() || st.code() == Some(2) => {}
        other => panic!(
            "cannot start the wineserver for {} ({other:?}):\n{}",
            s.prefix.display(),
            p.describe()
        ),
    }
    let t0 = Instant::now();
    let mut cmd = command();
    cmd.arg("--version");
    match output(cmd, Duration::from_secs(60)) {
        Ok((st, out, _)) if st.success() => eprintln!(
            "wine: {} answers `--version` in {:.1?} (wineserver started)",
            out.trim(),
            t0.elapsed()
        ),
        Ok((st, out, err)) => {
            panic!("hostnet-forwarder.exe --version under Wine exited {st}:\n{out}{err}")
        }
        Err(e) => panic!("hostnet-forwarder.exe --version under Wine: {e}"),
    }
}

/// `wineserver -k` (SIGKILL to every process of the prefix, then the server), then waits for
/// the server to be gone.
fn kill_server() {
    let s = setup();
    for arg in ["-k", "-w"] {
        let mut cmd = Command::new(&s.tools.wineserver);
        cmd.env("WINEPREFIX", &s.prefix).arg(arg);
        let mut p = Proc::spawn("wineserver", cmd);
        if p.wait_exit(Duration::from_secs(15)).is_none() {
            eprintln!(
                "warning: `wineserver {arg}` for {} did not return within 15 s",
                s.prefix.display()
            );
        }
    }
}

/// `wine64 hostnet-forwarder.exe` in the prefix; add the arguments. Needs a live [`Session`].
pub fn command() -> Command {
    let s = setup();
    let mut cmd = Command::new(&s.tools.wine64);
    wine_env(&mut cmd, &s.prefix);
    cmd.arg(&s.exe);
    die_with_parent(&mut cmd);
    cmd
}

/// Runs `cmd` to completion, at most `timeout` (then kills it): exit status, stdout, stderr.
pub fn output(cmd: Command, timeout: Duration) -> Result<(ExitStatus, String, String), String> {
    let mut p = Proc::spawn("hostnet-forwarder.exe", cmd);
    match p.wait_exit(timeout) {
        Some(st) => Ok((st, p.stdout(), p.stderr())),
        None => {
            p.kill9();
            Err(format!(
                "no exit within {timeout:?}:\n{}\nstdout: {}",
                p.describe(),
                p.stdout()
            ))
        }
    }
}

/// A control pipe name of its own: `\\.\pipe\hostnet-test-PID-N`.
pub fn pipe_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        r"\\.\pipe\hostnet-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
