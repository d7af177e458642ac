//! `hostnet-forwarder sandbox -- CMD ARGS...`: CMD in a new network namespace with an agent
//! inside, a forwarder outside, over a unix socket in a private temporary directory.
//!
//! As root the agent's process gets `unshare(CLONE_NEWNET)`; otherwise an unprivileged user
//! namespace too (`CLONE_NEWUSER | CLONE_NEWNET`, the current user mapped to root inside, like
//! `unshare -r`), where the kernel allows it. The agent (`hostnet-agent run --lo-up --listen
//! unix://DIR/agent.sock --exec -- CMD ARGS...`) brings `lo` up, runs CMD once ready and exits
//! with its status; the forwarder runs (reverse direction on) until then and exits with the
//! same status (128 + signal for a signal).

//!
//! Network namespaces are Linux's: on macOS and Windows the subcommand says so and exits 1 (run
//! an agent in a VM and `hostnet-forwarder run` instead).

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::Config;

#[cfg_attr(target_os = "linux", path = "sandbox/linux.rs")]
#[cfg_attr(not(target_os = "linux"), path = "sandbox/unsupported.rs")]
mod imp;

/// The agent binary's name.
pub const AGENT_BIN: &str = "hostnet-agent";

/// What the sandbox runs.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// The agent binary (`--agent`); else next to this executable, else on `PATH`.
    pub agent: Option<PathBuf>,
    /// The forwarder's settings (its `guest` is replaced by the sandbox's socket).
    pub config: Config,
    /// The control socket to serve status on (a failure to bind it is only a warning).
    pub control: Option<PathBuf>,
    /// The command and its arguments.
    pub command: Vec<String>,
}

/// Finds the agent binary.
pub fn find_agent(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_owned());
        }
        bail!("agent binary {} not found", p.display());
    }
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
    {
        let p = dir.join(AGENT_BIN);
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(AGENT_BIN);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("{AGENT_BIN} not found next to this executable or on PATH (give it with --agent PATH)")
}

/// Runs the sandbox; returns the command's exit code.
pub async fn run(opts: SandboxOptions) -> anyhow::Result<i32> {
    if opts.command.is_empty() {
        bail!("no command given (hostnet-forwarder sandbox -- CMD [ARGS...])");
    }
    imp::run(opts).await
}
