//! The sandbox on Linux: the agent's process in new namespaces (see the parent module).

use std::ffi::CString;
use std::io;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context as _;
use hostnet_link::transport::Auth;
use tokio_util::sync::CancellationToken;

use super::{SandboxOptions, find_agent};
use crate::Forwarder;
use crate::status::ControlSocket;

/// The namespace setup done in the agent's process between fork and exec; everything it
/// needs is prepared before the fork, so the child only makes system calls.
#[derive(Debug)]
struct NsPlan {
    flags: libc::c_int,
    user: bool,
    uid_map: CString,
    gid_map: CString,
}

impl NsPlan {
    fn new() -> Self {
        let uid = nix::unistd::Uid::current();
        let gid = nix::unistd::Gid::current();
        let user = !nix::unistd::Uid::effective().is_root();
        let flags = if user {
            libc::CLONE_NEWUSER | libc::CLONE_NEWNET
        } else {
            libc::CLONE_NEWNET
        };
        NsPlan {
            flags,
            user,
            uid_map: CString::new(format!("0 {uid} 1")).expect("no NUL in a number"),
            gid_map: CString::new(format!("0 {gid} 1")).expect("no NUL in a number"),
        }
    }

    /// Runs in the forked child: async-signal-safe calls only, no allocation. As root without
    /// the right to make a network namespace (e.g. in a container), falls back to a user
    /// namespace too.
    fn enter(&self) -> io::Result<()> {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number; no memory is passed.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        // SAFETY: unshare takes flags only and affects this (child) process alone.
        if unsafe { libc::unshare(self.flags) } == 0 {
            return if self.user { self.write_maps() } else { Ok(()) };
        }
        let err = io::Error::last_os_error();
        if self.user || err.raw_os_error() != Some(libc::EPERM) {
            return Err(err);
        }
        // SAFETY: as above.
        if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
            return Err(err);
        }
        self.write_maps()
    }

    fn write_maps(&self) -> io::Result<()> {
        match write_file(c"/proc/self/setgroups", b"deny") {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => r?,
        }
        write_file(c"/proc/self/uid_map", self.uid_map.as_bytes())?;
        write_file(c"/proc/self/gid_map", self.gid_map.as_bytes())
    }
}

fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `data` is valid for `data.len()` bytes; `fd` is open and ours.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` is open and closed exactly once.
    unsafe { libc::close(fd) };
    if n < 0 {
        return Err(err);
    }
    Ok(())
}

/// Explains a failed namespace setup.
fn explain(e: &io::Error, user: bool) -> String {
    if !user {
        return format!("cannot create a network namespace: {e}");
    }
    let knob = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let mut hint = String::from(
        "unprivileged user namespaces are not allowed here; run as root (sudo) instead",
    );
    if knob("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        hint.push_str(" or set kernel.unprivileged_userns_clone=1");
    }
    if knob("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        hint.push_str(" or raise user.max_user_namespaces");
    }
    if knob("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        hint.push_str(" or allow it in AppArmor (kernel.apparmor_restrict_unprivileged_userns=0)");
    }
    format!("cannot create a user and network namespace: {e} ({hint})")
}

/// The exit code for a child's status: its code, or 128 + the signal.
fn exit_code(st: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code()
        .or_else(|| st.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Runs the sandbox; returns the command's exit code.
pub(super) async fn run(opts: SandboxOptions) -> anyhow::Result<i32> {
    let agent = find_agent(opts.agent.as_deref())?;
    let dir = tempfile::Builder::new()
        .prefix("hostnet-sandbox-")
        .tempdir()
        .context("cannot create the sandbox's temporary directory")?;
    let sock = dir.path().join("agent.sock");
    let plan = NsPlan::new();
    let user = plan.user;
    let mut cmd = tokio::process::Command::new(&agent);
    cmd.arg("run")
        .arg("--lo-up")
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .arg("--exec")
        .arg("--")
        .args(&opts.command)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec; `NsPlan::enter` only makes
    // system calls (prctl, unshare, open/write/close) on data prepared before the fork, and
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || plan.enter());
    }
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow::anyhow!("cannot run the agent {}: {e}", agent.display())
        } else {
            anyhow::anyhow!(explain(&e, user))
        }
    })?;
    tracing::info!(agent = %agent.display(), socket = %sock.display(), user_namespace = user, "sandbox started");

    // Wait for the agent's socket so the forwarder's first attempt finds it (no warning).
    let ready = std::time::Instant::now();
    while !sock.exists() && ready.elapsed() < Duration::from_secs(10) {
        if let Some(st) = child.try_wait().context("waiting for the agent")? {
            // The agent failed to start, or the command was over at once: its status either way.
            tracing::info!(status = %st, "the agent exited before its socket appeared");
            return Ok(exit_code(st));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut config = opts.config;
    config.guest = format!("unix://{}", sock.display())
        .parse()
        .context("sandbox socket path")?;
    let fwd = Forwarder::new(config, Auth::none())?;
    let shutdown = CancellationToken::new();
    crate::cli::reload_rules_on_request(&fwd, &shutdown)?;
    if let Some(path) = &opts.control {
        match ControlSocket::bind(path) {
            Ok(cs) => {
                tokio::spawn(cs.serve(fwd.status_fn(), shutdown.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "no status socket for this sandbox"),
        }
    }
    let runner = {
        let fwd = fwd.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { fwd.run(shutdown).await })
    };
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.context("waiting for the agent")?,
            _ = sigint.recv() => forward_signal(&child, libc::SIGINT),
            _ = sigterm.recv() => forward_signal(&child, libc::SIGTERM),
        }
    };
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), runner).await;
    drop(dir);
    let code = exit_code(status);
    tracing::info!(code, "sandbox command exited");
    Ok(code)
}

fn forward_signal(child: &tokio::process::Child, sig: libc::c_int) {
    if let Some(pid) = child.id() {
        let pid = i32::try_from(pid).unwrap_or(0);
        if pid > 0 {
            // SAFETY: kill takes a pid and a signal number; the pid is our unreaped child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}
