//! The command line of `hostnet-forwarder` (the binary only calls [`main`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hostnet_link::transport::{Auth, Endpoint, TlsIdentity};
use tokio_util::sync::CancellationToken;

use crate::signal::StopSignals;
use crate::status::{self, ControlSocket};
use crate::{Config, DEFAULT_MAX_STREAMS, DEFAULT_MAX_UDP_FLOWS, Forwarder, sandbox};

/// hostnet forwarder: mirrors a VM's listening ports onto this host's loopback, and this
/// host's listeners into the VM.
#[derive(Debug, Parser)]
#[command(name = "hostnet-forwarder", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect to an agent and mirror ports until interrupted.
    Run(RunArgs),
    /// Print the mirrored ports of a running forwarder.
    Status(StatusArgs),
    /// Run a command in a new network namespace with an agent inside, mirrored like a VM.
    Sandbox(SandboxArgs),
    /// Run as a background service: install, uninstall (Windows service manager); see the
    /// README for the systemd user unit and the launchd agent.
    Service(crate::service::ServiceArgs),
    /// Generate this side's QUIC key and certificate in DIR (give DIR/cert.der to the agent).
    Keygen {
        /// The directory (created 0700; an existing key is never overwritten).
        dir: PathBuf,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings shared by `run` and `sandbox`.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Also bind ADDR:P for every mirrored guest port P (e.g. 0.0.0.0); loopback only otherwise.
    #[arg(
        long,
        value_name = "ADDR",
        env = "HOSTNET_EXPOSE",
        value_delimiter = ','
    )]
    pub expose: Vec<IpAddr>,
    /// Do not mirror this host's listeners into the guest.
    #[arg(long, env = "HOSTNET_NO_REVERSE")]
    pub no_reverse: bool,
    /// The control socket for `status` (default: $XDG_RUNTIME_DIR/hostnet/forwarder.sock,
    /// /run/hostnet/forwarder.sock as root, else /tmp/hostnet-forwarder-$UID.sock).
    #[arg(long, value_name = "PATH", env = "HOSTNET_CONTROL")]
    pub control: Option<PathBuf>,
    /// Idle timeout of a UDP flow, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub udp_timeout: u64,
    /// Limit on UDP flows (the least recently used flow of a port is evicted beyond it).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_UDP_FLOWS, value_parser = positive)]
    pub max_udp_flows: usize,
    /// Limit on concurrent link streams (relayed connections, flows, dial-backs).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_STREAMS, value_parser = positive)]
    pub max_streams: usize,
    /// Log format (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Append the log to FILE instead of standard error (services without a console).
    #[arg(long, value_name = "FILE", env = "HOSTNET_LOG_FILE")]
    pub log_file: Option<PathBuf>,
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The agent's endpoint: vsock://CID:PORT, hybrid-vsock:///PATH?port=P, unix:///PATH,
    /// tcp://HOST:PORT, quic://HOST:PORT, hvsock://VMID:PORT (which of them this host has:
    /// see the README).
    #[arg(long, value_name = "URI", env = "HOSTNET_GUEST")]
    pub guest: Endpoint,
    /// The shared token for tcp:// (a file).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// This side's QUIC key and certificate (from `keygen`), for quic://.
    #[arg(long, value_name = "DIR", requires = "peer_cert")]
    pub tls_dir: Option<PathBuf>,
    /// The agent's pinned certificate, for quic://.
    #[arg(long, value_name = "FILE", requires = "tls_dir")]
    pub peer_cert: Option<PathBuf>,
    /// Settings shared with `sandbox`.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The running forwarder's control socket.
    #[arg(long, value_name = "PATH", env = "HOSTNET_CONTROL")]
    pub control: Option<PathBuf>,
    /// Print the JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `sandbox`.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// The hostnet-agent binary (default: next to this executable, else on PATH).
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Settings shared with `run`.
    #[command(flatten)]
    pub common: CommonArgs,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

impl CommonArgs {
    fn config(&self, guest: Endpoint) -> Config {
        let mut c = Config::new(guest);
        c.expose = self.expose.clone();
        c.reverse = !self.no_reverse;
        c.udp_timeout = Duration::from_secs(self.udp_timeout);
        c.max_udp_flows = self.max_udp_flows;
        c.max_streams = self.max_streams;
        c
    }
}

/// Sets up logging: standard error, or `file` (appended) when given.
pub fn init_logs(format: LogFormat, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, ansi) = match file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("log file {}", path.display()))?;
            (BoxMakeWriter::new(std::sync::Mutex::new(f)), false)
        }
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ),
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
    Ok(())
}

/// The forwarder's runtime.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: every relay is syscall-bound, and a single event loop saves the cross-thread
    // wake-up that a work-stealing runtime adds to each hop (measured in the bridge benchmark).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("hostnet-forwarder: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs a parsed command line; returns the exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(a) => {
            init_logs(a.common.log_format, a.common.log_file.as_deref())?;
            runtime()?.block_on(async {
                let mut stop = StopSignals::new().context("cannot handle stop signals")?;
                serve(a, async move { stop.recv().await }).await
            })?;
            Ok(0)
        }
        Command::Service(a) => crate::service::dispatch(a),
        Command::Status(a) => {
            let path = a.control.unwrap_or_else(status::default_control_path);
            let report = runtime()?.block_on(status::query(&path)).context(
                "no status from a running forwarder (is one running with this --control path?)",
            )?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", status::render_table(&report));
            }
            Ok(0)
        }
        Command::Sandbox(a) => {
            init_logs(a.common.log_format, a.common.log_file.as_deref())?;
            let placeholder: Endpoint = "unix:///nonexistent".parse()?;
            let opts = sandbox::SandboxOptions {
                agent: a.agent.clone(),
                config: a.common.config(placeholder),
                control: Some(
                    a.common
                        .control
                        .clone()
                        .unwrap_or_else(status::default_control_path),
                ),
                command: a.command,
            };
            runtime()?.block_on(sandbox::run(opts))
        }
        Command::Keygen { dir } => {
            let cert = hostnet_link::transport::keygen(&dir)?;
            let der =
                std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
            println!("{}", cert.display());
            println!("fingerprint {}", hostnet_link::transport::fingerprint(&der));
            Ok(0)
        }
    }
}

/// Runs the forwarder of `a` until `stop` resolves (to the name of what stopped it).
pub async fn serve(a: RunArgs, stop: impl Future<Output = &'static str>) -> anyhow::Result<()> {
    let mut auth = Auth::none();
    if let Some(f) = &a.token_file {
        auth = auth.with_token_file(f)?;
    }
    if let (Some(dir), Some(peer)) = (&a.tls_dir, &a.peer_cert) {
        auth = auth.with_tls(TlsIdentity::from_dir(dir, peer)?);
    }
    let config = a.common.config(a.guest);
    let fwd = Forwarder::new(config, auth)?;
    let shutdown = CancellationToken::new();
    let path = a
        .common
        .control
        .clone()
        .unwrap_or_else(status::default_control_path);
    let control = ControlSocket::bind(&path)?;
    tracing::info!(path = %control.path().display(), "status on the control endpoint");
    tokio::spawn(control.serve(fwd.status_fn(), shutdown.clone()));
    let runner = {
        let fwd = fwd.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { fwd.run(shutdown).await })
    };
    let why = stop.await;
    tracing::info!(signal = why, "shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), runner).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_parse() {
        let c = Cli::try_parse_from([
            "hostnet-forwarder",
            "run",
            "--guest",
            "unix:///tmp/a.sock",
            "--expose",
            "0.0.0.0",
            "--expose",
            "::",
            "--no-reverse",
            "--udp-timeout",
            "5",
        ])
        .unwrap();
        let Command::Run(r) = c.command else { panic!() };
        assert_eq!(r.common.expose.len(), 2);
        assert!(r.common.no_reverse);
        assert_eq!(r.common.udp_timeout, 5);
        let c = Cli::try_parse_from([
            "hostnet-forwarder",
            "sandbox",
            "--",
            "python3",
            "-m",
            "http.server",
            "8000",
        ])
        .unwrap();
        let Command::Sandbox(s) = c.command else {
            panic!()
        };
        assert_eq!(s.command, ["python3", "-m", "http.server", "8000"]);
        let c = Cli::try_parse_from(["hostnet-forwarder", "sandbox", "nc", "-l", "8000"]).unwrap();
        let Command::Sandbox(s) = c.command else {
            panic!()
        };
        assert_eq!(s.command, ["nc", "-l", "8000"]);
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for args in [
            &["hostnet-forwarder", "run", "--guest", "bogus://x"][..],
            &[
                "hostnet-forwarder",
                "run",
                "--guest",
                "unix:///a",
                "--udp-timeout",
                "0",
            ],
            &[
                "hostnet-forwarder",
                "run",
                "--guest",
                "unix:///a",
                "--max-udp-flows",
                "0",
            ],
            &[
                "hostnet-forwarder",
                "run",
                "--guest",
                "unix:///a",
                "--tls-dir",
                "/x",
            ],
            &[
                "hostnet-forwarder",
                "run",
                "--guest",
                "unix:///a",
                "--expose",
                "nope",
            ],
            &["hostnet-forwarder", "sandbox"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
