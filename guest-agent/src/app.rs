//! The command line: `hostnet-agent run` and `hostnet-agent ports`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hostnet_link::discovery;
use hostnet_link::proto::{self, Proto};
use hostnet_link::transport::{Auth, Endpoint, Listener, TlsIdentity};
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentConfig};
use crate::ports::{PortFilter, PortList};
use crate::{policy, sys};

/// The hostnet agent: runs in the Linux VM, reports its listening sockets to the forwarder on
/// the host, and connects relayed streams to them.
#[derive(Debug, Parser)]
#[command(name = "hostnet-agent", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the forwarder (the background service).
    Run(RunArgs),
    /// Print what discovery sees right now, as the agent would report it.
    Ports(PortsArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// `--allow` / `--deny`.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Report and relay only these ports (comma list of ports and ranges, `tcp:` or `udp:` for
    /// one protocol only: `80,8000-8100,udp:53`).
    #[arg(long, value_name = "PORTS", env = "HOSTNET_ALLOW")]
    pub allow: Option<PortList>,
    /// Never report nor relay these ports (wins over --allow).
    #[arg(long, value_name = "PORTS", env = "HOSTNET_DENY")]
    pub deny: Option<PortList>,
}

impl FilterArgs {
    fn filter(&self) -> PortFilter {
        PortFilter {
            allow: self.allow.clone(),
            deny: self.deny.clone().unwrap_or_default(),
        }
    }
}

/// `hostnet-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Link endpoint to listen on (vsock://any:PORT, unix:///path, tcp://HOST:PORT,
    /// quic://HOST:PORT); repeat for several.
    #[arg(long = "listen", value_name = "URI", required = true)]
    pub listen: Vec<Endpoint>,
    /// Shared token for tcp:// listeners.
    #[arg(long, value_name = "FILE", env = "HOSTNET_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Directory with this agent's certificate and key (hostnet-keygen) for quic://.
    #[arg(long, value_name = "DIR", requires = "peer_cert")]
    pub tls_dir: Option<PathBuf>,
    /// The forwarder's pinned certificate for quic://.
    #[arg(long, value_name = "FILE", requires = "tls_dir")]
    pub peer_cert: Option<PathBuf>,
    /// Port filter.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Idle timeout of a UDP flow, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub udp_timeout: u64,
    /// Concurrent TCP relays (forward and reverse); more are refused and counted.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams: u32,
    /// UDP flows open at once (forward and reverse); beyond it the least recently used is
    /// closed (and the forwarder told), counted.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_udp_flows: u32,
    /// Threads of the async runtime: 1 (the default) runs every relay on one event loop, more
    /// spread the connections over a work-stealing pool (the forwarder's `runtime_with` says
    /// what each costs, as measured).
    #[arg(long, value_name = "N", env = "HOSTNET_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,
    /// Bring the loopback interface up first (in a fresh network namespace).
    #[arg(long)]
    pub lo_up: bool,
    /// Log format (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Once ready, run the command after `--` as a child; exit with its status when it exits.
    #[arg(long, requires = "command")]
    pub exec: bool,
    /// The command for --exec.
    #[arg(last = true, value_name = "CMD", requires = "exec")]
    pub command: Vec<OsString>,
}

/// `hostnet-agent ports`.
#[derive(Debug, Args)]
pub struct PortsArgs {
    /// JSON output (an array of {proto, addr, port, v6only}).
    #[arg(long)]
    pub json: bool,
    /// Port filter, as for `run`.
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// Runs the command line; returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    let format = match &cli.command {
        Command::Run(a) => a.log_format,
        Command::Ports(_) => LogFormat::Text,
    };
    init_logging(format);
    let result = match cli.command {
        Command::Ports(a) => ports(&a).map(|()| 0),
        // One thread by default: see `hostnet_link::runtime` (measured: a second thread
        // shortens round trips a little on 2 vCPUs but costs connections a second and idle
        // wake-ups).
        Command::Run(a) => hostnet_link::runtime(usize::from(a.threads))
            .context("starting the tokio runtime")
            .and_then(|rt| rt.block_on(run(a))),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hostnet-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[derive(serde::Serialize)]
struct PortJson {
    proto: &'static str,
    addr: std::net::IpAddr,
    port: u16,
    v6only: bool,
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn ports(args: &PortsArgs) -> anyhow::Result<()> {
    let set = discovery::snapshot(&discovery::Options::default()).context("discovery")?;
    let report = policy::report(set.iter(), &args.filter.filter());
    if args.json {
        let rows: Vec<PortJson> = report
            .iter()
            .map(|l: &proto::Listener| PortJson {
                proto: proto_name(l.proto),
                addr: l.addr,
                port: l.port,
                v6only: l.v6only,
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<5} {:<40} {:>5}  V6ONLY", "PROTO", "ADDRESS", "PORT");
        for l in &report {
            println!(
                "{:<5} {:<40} {:>5}  {}",
                proto_name(l.proto),
                l.addr,
                l.port,
                if l.addr.is_ipv6() {
                    if l.v6only { "yes" } else { "no" }
                } else {
                    "-"
                }
            );
        }
    }
    Ok(())
}

fn auth(args: &RunArgs) -> anyhow::Result<Auth> {
    let mut auth = Auth::none();
    if let Some(f) = &args.token_file {
        auth = auth
            .with_token_file(f)
            .with_context(|| format!("--token-file {}", f.display()))?;
    }
    if let (Some(dir), Some(peer)) = (&args.tls_dir, &args.peer_cert) {
        let id = TlsIdentity::from_dir(dir, peer).context("--tls-dir / --peer-cert")?;
        auth = auth.with_tls(id);
    }
    Ok(auth)
}

/// `hostnet-agent run`: returns the exit code (the child's with --exec).
pub async fn run(args: RunArgs) -> anyhow::Result<u8> {
    if args.lo_up {
        sys::lo_up().context("--lo-up: cannot bring the loopback interface up")?;
    }
    let auth = auth(&args)?;
    let config = AgentConfig {
        filter: args.filter.filter(),
        udp_timeout: Duration::from_secs(args.udp_timeout),
        max_streams: args.max_streams as usize,
        max_udp_flows: args.max_udp_flows as usize,
        ..AgentConfig::default()
    };
    let shutdown = CancellationToken::new();
    let agent = Agent::start(config, shutdown.clone())
        .await
        .context("starting listener discovery")?;
    let mut listeners = Vec::new();
    for ep in &args.listen {
        let l =
            Listener::bind(ep.clone(), auth.clone()).with_context(|| format!("--listen {ep}"))?;
        listeners.push(l);
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let mut serve = tokio::spawn({
        let agent = agent.clone();
        let shutdown = shutdown.clone();
        async move { agent.serve(listeners, shutdown).await }
    });
    sys::notify_ready();
    tracing::info!(
        listen = ?args.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
        reporting = agent.report().len(),
        "agent ready"
    );

    let code = if args.exec {
        let Some((cmd, rest)) = args.command.split_first() else {
            bail!("--exec needs a command after --");
        };
        let mut child = tokio::process::Command::new(cmd)
            .args(rest)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("--exec: cannot run {}", cmd.to_string_lossy()))?;
        tracing::info!(pid = child.id(), command = %cmd.to_string_lossy(), "child started");
        let status = tokio::select! {
            s = child.wait() => s.context("waiting for the child")?,
            _ = term.recv() => stop_child(&mut child, "SIGTERM").await?,
            _ = int.recv() => stop_child(&mut child, "SIGINT").await?,
            r = &mut serve => {
                stop_child(&mut child, "the agent stopped serving").await?;
                return served(r);
            }
        };
        tracing::info!(%status, "child exited");
        exit_code(status)
    } else {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
            r = &mut serve => return served(r),
        }
        0
    };
    sys::notify_stopping();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut serve).await;
    Ok(code)
}

/// The agent stopped serving by itself (its listeners died): an error, so that a supervisor
/// restarts it.
fn served(r: Result<Result<(), crate::ServeError>, tokio::task::JoinError>) -> anyhow::Result<u8> {
    sys::notify_stopping();
    match r {
        Ok(Ok(())) => Ok(0),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(anyhow::anyhow!("the serving task failed: {e}")),
    }
}

/// Stops the --exec child: SIGTERM, then SIGKILL after a grace period.
async fn stop_child(
    child: &mut tokio::process::Child,
    why: &str,
) -> anyhow::Result<std::process::ExitStatus> {
    tracing::info!("{why}: stopping the child");
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(s) => s.context("waiting for the child"),
        Err(_) => {
            tracing::warn!("child ignored SIGTERM; killing it");
            child.kill().await.context("killing the child")?;
            child.wait().await.context("waiting for the child")
        }
    }
}

/// A shell-style exit code: the child's code, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from((128 + sig) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}
