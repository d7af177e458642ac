//! Starting a proxy process the way dockerd does, and making sure it goes away.
//!
//! dockerd starts `docker-proxy` with a pipe as file descriptor 3; the proxy
//! writes `0\n` on it once it is listening, or `1\n<error>` and exits 1.
//! [`Proxy::spawn`] does the same and returns only once the proxy is ready.
//! [`Proxy`] is a guard: dropping it sends SIGTERM, waits (SIGKILL after a
//! grace period) and reaps the process. The child also gets
//! `PR_SET_PDEATHSIG`, so it dies with us even if we are killed or abort.

use std::fmt;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a proxy may take to report ready on fd 3.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proxy gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Attempts with a fresh port when the chosen port turned out to be taken.
const PORT_ATTEMPTS: usize = 3;

/// Transport protocol forwarded by a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A running, ready proxy process. Dropping it stops and reaps it.
pub struct Proxy {
    pid: Pid,
    /// The address clients connect to (the proxy's host side).
    pub addr: SocketAddr,
    /// Receives the exit status from the thread that waits for the child.
    exited: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("pid", &self.pid)
            .field("addr", &self.addr)
            .finish()
    }
}

impl Proxy {
    /// Starts `bin` forwarding `proto` from a free port on 127.0.0.1 to
    /// `backend`, and waits for it to report ready on fd 3.
    pub fn spawn(bin: &Path, proto: Proto, backend: SocketAddr, verbose: bool) -> Result<Proxy> {
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port(proto)?;
            match spawn_once(bin, proto, port, backend, verbose) {
                Ok(p) => return Ok(p),
                Err(SpawnError::PortInUse(msg)) => last_err = Some(msg),
                Err(SpawnError::Other(e)) => return Err(e),
            }
        }
        bail!(
            "{}: port still in use after {PORT_ATTEMPTS} attempts: {}",
            bin.display(),
            last_err.unwrap_or_default()
        )
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.exited.try_recv() {
                Ok(st) => self.status = Some(st),
                Err(TryRecvError::Empty) => {}
                // The reaper thread is gone without a status: treat as exited.
                Err(TryRecvError::Disconnected) => {
                    self.status = Some(ExitStatus::default());
                }
            }
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit; returns its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.exited.recv_timeout(timeout) {
                Ok(st) => self.status = Some(st),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.status = Some(ExitStatus::default()),
            }
        }
        self.status
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.exit_status().is_some() {
            return;
        }
        let _ = kill(self.pid, Signal::SIGTERM);
        if self.wait_exit(TERM_GRACE).is_none() {
            eprintln!(
                "warning: proxy pid {} ignored SIGTERM for {TERM_GRACE:?}, sending SIGKILL",
                self.pid
            );
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(10));
        }
    }
}

enum SpawnError {
    /// The proxy reported that it could not bind its port: retry with another.
    PortInUse(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for SpawnError {
    fn from(e: anyhow::Error) -> Self {
        SpawnError::Other(e)
    }
}

/// Picks a currently free port by binding port 0 and closing the socket again.
fn free_port(proto: Proto) -> Result<u16> {
    let port = match proto {
        Proto::Tcp => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        Proto::Udp => UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port(),
    };
    Ok(port)
}

fn spawn_once(
    bin: &Path,
    proto: Proto,
    port: u16,
    backend: SocketAddr,
    verbose: bool,
) -> std::result::Result<Proxy, SpawnError> {
    // Both ends close-on-exec; the child gets the write end as fd 3 via dup2,
    // which clears close-on-exec on the new descriptor.
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    let write_raw = write_end.as_raw_fd();

    let mut cmd = Command::new(bin);
    cmd.arg("-proto")
        .arg(proto.as_str())
        .arg("-host-ip")
        .arg("127.0.0.1")
        .arg("-host-port")
        .arg(port.to_string())
        .arg("-container-ip")
        .arg(backend.ip().to_string())
        .arg("-container-port")
        .arg(backend.port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if verbose {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    // SAFETY: the closure runs in the forked child before exec. It only makes
    // async-signal-safe system calls (prctl, dup2, fcntl), allocates nothing
    // and touches no locks. `write_raw` is the pipe's write end, which stays
    // open in the parent until after `spawn` returns, so it is valid in the
    // child. The `OwnedFd` returned by `dup2_raw` for fd 3 is forgotten, so
    // nothing in the child ever closes it; exec keeps it open because dup2
    // does not copy the close-on-exec flag.
    unsafe {
        cmd.pre_exec(move || {
            // Die with the parent, even if it is SIGKILLed or aborts.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let src = BorrowedFd::borrow_raw(write_raw);
            if write_raw == 3 {
                // dup2(3, 3) is a no-op that keeps close-on-exec: clear it.
                fcntl(src, FcntlArg::F_SETFD(FdFlag::empty()))?;
            } else {
                let fd3: OwnedFd = nix::unistd::dup2_raw(src, 3)?;
                std::mem::forget(fd3);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    // Close our copy of the write end so we see EOF if the child dies.
    drop(write_end);

    let raw_pid = i32::try_from(child.id()).context("pid out of range")?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("reap-{raw_pid}"))
        .spawn(move || {
            if let Ok(st) = child.wait() {
                let _ = tx.send(st);
            }
        })
        .context("spawning reaper thread")?;
    let mut proxy = Proxy {
        pid: Pid::from_raw(raw_pid),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        exited: rx,
        status: None,
    };

    let msg = match read_ready(read_end) {
        Ok(m) => m,
        Err(e) => {
            // `proxy` is dropped here: SIGTERM + reap.
            let st = proxy.wait_exit(Duration::from_millis(500));
            return Err(SpawnError::Other(e.context(match st {
                Some(st) => format!("{} exited ({st})", bin.display()),
                None => format!("{} did not report ready", bin.display()),
            })));
        }
    };
    if msg == "0" {
        return Ok(proxy);
    }
    let err = msg.strip_prefix('1').unwrap_or(&msg).trim().to_string();
    let st = proxy.wait_exit(Duration::from_secs(2));
    let lower = err.to_ascii_lowercase();
    if lower.contains("address already in use") || lower.contains("addrinuse") {
        return Err(SpawnError::PortInUse(err));
    }
    Err(SpawnError::Other(anyhow!(
        "{} failed to start ({}): {}",
        bin.display(),
        st.map_or_else(|| "still running".to_string(), |s| s.to_string()),
        if err.is_empty() { msg } else { err }
    )))
}

/// Reads the readiness report from the pipe: returns `"0"` on success, or the
/// text after `1` up to EOF on failure. Stops reading at `0\n` because a proxy
/// may keep fd 3 open after reporting ready.
fn read_ready(read_end: OwnedFd) -> Result<String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut file = std::fs::File::from(read_end);
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            if got.is_empty() {
                bail!("no readiness report on fd 3 within {READY_TIMEOUT:?}");
            }
            // A failure report whose writer did not exit: use what we got.
            return Ok(String::from_utf8_lossy(&got).into_owned());
        }
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("poll on ready pipe"),
        }
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading ready pipe"),
        };
        if n == 0 {
            if got.is_empty() {
                bail!("fd 3 closed without a readiness report");
            }
            return Ok(String::from_utf8_lossy(&got).into_owned());
        }
        got.extend_from_slice(&buf[..n]);
        if got.starts_with(b"0\n") {
            return Ok("0".to_string());
        }
        if !got.starts_with(b"0") && !got.starts_with(b"1") {
            bail!(
                "unexpected readiness report {:?}",
                String::from_utf8_lossy(&got)
            );
        }
    }
}

/// Resource usage of a process, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcStats {
    pub rss_kib: u64,
    pub threads: u64,
    pub fds: u64,
}

/// Reads VmRSS and Threads from /proc/PID/status and counts /proc/PID/fd.
pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count() as u64;
    Ok(ProcStats {
        rss_kib: field("VmRSS:")?,
        threads: field("Threads:")?,
        fds,
    })
}

/// Whether `path` is an existing regular file.
pub fn exists(path: &Path) -> bool {
    path.is_file()
}

/// The default hostnet-proxy path: `target/release/hostnet-proxy` under the workspace root.
pub fn default_hostnet_path() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap_or(root);
    root.join("target/release/hostnet-proxy")
}
