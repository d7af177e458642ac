//! Child processes (the agent, the forwarder, socat, python) with collected output, killed and
//! reaped on drop; locating the binaries Cargo built.

use std::io::{ErrorKind, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{after, wait_until};

/// Where Cargo puts the workspace's binaries for the running executable: `target/<profile>/`,
/// which is the executable's own directory (a `[[bin]]` such as the benchmark) or its parent (a
/// test in `target/<profile>/deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe has a directory").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir
    }
}

/// The path of workspace binary `name` (e.g. `hostnet-agent`); panics with what to build when it
/// is missing. `HOSTNET_BIN_DIR` overrides the directory.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("HOSTNET_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(bin_dir);
    let p = dir.join(name);
    if !p.is_file() {
        panic!(
            "{} is missing: run `cargo test --workspace` (which builds every package's binaries) \
             or `cargo build -p hostnet-agent -p hostnet-forwarder` first",
            p.display()
        );
    }
    p
}

/// Drains a pipe in a thread.
#[derive(Debug, Clone, Default)]
pub struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
}

impl Collector {
    pub fn spawn(mut r: impl Read + Send + 'static) -> Self {
        let c = Self::default();
        let c2 = c.clone();
        thread::spawn(move || {
            let mut b = [0u8; 8192];
            loop {
                match r.read(&mut b) {
                    Ok(0) => break,
                    Ok(n) => c2.buf.lock().unwrap().extend_from_slice(&b[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            c2.done.store(true, Ordering::SeqCst);
        });
        c
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    pub fn len(&self) -> usize {
        self.buf.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
}

/// A running child; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub argv: Vec<String>,
    child: Child,
    stdout: Collector,
    stderr: Collector,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin null and stdout/stderr collected.
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let argv: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({argv:?}): {e}"));
        let stdout = Collector::spawn(child.stdout.take().unwrap());
        let stderr = Collector::spawn(child.stderr.take().unwrap());
        Self {
            name: name.to_string(),
            argv,
            child,
            stdout,
            stderr,
            exit: None,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    pub fn stderr_collector(&self) -> &Collector {
        &self.stderr
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = after(timeout);
        loop {
            if let Some(s) = self.try_exit() {
                wait_until(after(Duration::from_secs(1)), || {
                    self.stdout.is_done() && self.stderr.is_done()
                });
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(self.pid(), sig);
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.try_exit().is_none() {
            self.signal(Signal::SIGTERM);
            if self.wait_exit(grace).is_none() {
                self.kill9();
            }
        }
        self.exit
    }

    /// The last `max` bytes of stderr, with the command line and exit status.
    pub fn describe(&mut self) -> String {
        let exit = self.try_exit();
        let err = self.stderr();
        let tail = tail(&err, 4000);
        format!(
            "--- {} {:?} (exit: {:?}) stderr ({} bytes, tail):\n{tail}\n--- end {}",
            self.name,
            self.argv,
            exit,
            err.len(),
            self.name
        )
    }
}

/// The last `max` bytes of `s` (on a char boundary).
/// A numeric field of `/proc/<pid>/status` (`VmRSS:   123 kB` gives 123).
pub fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The resident set of a process, KiB.
pub fn rss_kib(pid: Pid) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&status, "VmRSS:")
}

pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
