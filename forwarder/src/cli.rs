//! The command line of `hostnet-forwarder` (the binary only calls [`main`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hostnet_link::ports::{PortFilter, PortList};
use hostnet_link::transport::{Auth, Endpoint, TlsIdentity};
use tokio_util::sync::CancellationToken;

use crate::rules::{self, ReverseRules};
use crate::signal::{ReloadSignals, StopSignals};
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
    /// Do not mirror this host's listeners into the guest. (`HOSTNET_NO_REVERSE`: empty, `0`,
    /// `false`, `no` or `off` leave the reverse direction on; any other value turns it off.)
    #[arg(
        long,
        env = "HOSTNET_NO_REVERSE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub no_reverse: bool,
    /// Mirror into the guest (and dial back) only these host ports: a comma list of ports and
    /// ranges, `tcp:` or `udp:` for one protocol only (`3000-3999,tcp:5432,udp:53`). Default:
    /// every host listener on loopback or the wildcard address.
    #[arg(long, value_name = "PORTS", env = "HOSTNET_REVERSE_ALLOW")]
    pub reverse_allow: Option<PortList>,
    /// Never mirror into the guest nor dial back these host ports (wins over --reverse-allow).
    #[arg(long, value_name = "PORTS", env = "HOSTNET_REVERSE_DENY")]
    pub reverse_deny: Option<PortList>,
    /// More reverse rules, `allow PORTS` / `deny PORTS` lines in FILE, read again on SIGHUP
    /// (unix); a host port must pass these and --reverse-allow / --reverse-deny.
    #[arg(long, value_name = "FILE", env = "HOSTNET_REVERSE_RULES")]
    pub reverse_rules: Option<PathBuf>,
    /// The control socket for `status` (default: $XDG_RUNTIME_DIR/hostnet/forwarder.sock,
    /// /run/hostnet/forwarder.sock as root, else /tmp/hostnet-forwarder-$UID.sock).
    #[arg(long, value_name = "PATH", env = "HOSTNET_CONTROL")]
    pub control: Option<PathBuf>,
    /// Idle timeout of a UDP flow, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub udp_timeout: u64,
    /// Limit on UDP flows of a session (both directions); beyond it the least recently used
    /// flow is closed (and the agent told), counted.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_UDP_FLOWS, value_parser = positive)]
    pub max_udp_flows: usize,
    /// Limit on concurrent link streams (relayed connections, flows, dial-backs).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_STREAMS, value_parser = positive)]
    pub max_streams: usize,
    /// Threads of the async runtime: 1 (the default) runs every relay on one event loop, more
    /// spread the connections over a work-stealing pool (see `runtime_with`).
    #[arg(long, value_name = "N", env = "HOSTNET_THREADS", default_value_t = 1, value_parser = positive)]
    pub threads: usize,
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
    /// The forwarder's settings (reads the rules file).
    pub fn config(&self, guest: Endpoint) -> anyhow::Result<Config> {
        // Checked here rather than by clap: clap would count `HOSTNET_NO_REVERSE=false` as
        // present.
        if self.no_reverse
            && (self.reverse_allow.is_some()
                || self.reverse_deny.is_some()
                || self.reverse_rules.is_some())
        {
            anyhow::bail!(
                "--no-reverse turns the reverse direction off: --reverse-allow, --reverse-deny \
                 and --reverse-rules (HOSTNET_REVERSE_*) have nothing to filter"
            );
        }
        let mut c = Config::new(guest);
        c.expose = self.expose.clone();
        c.reverse = !self.no_reverse;
        c.reverse_rules = ReverseRules {
            flags: PortFilter {
                allow: self.reverse_allow.clone(),
                deny: self.reverse_deny.clone().unwrap_or_default(),
            },
            file: self
                .reverse_rules
                .as_deref()
                .map(rules::read_rules)
                .transpose()?,
        };
        c.udp_timeout = Duration::from_secs(self.udp_timeout);
        c.max_udp_flows = self.max_udp_flows;
        c.max_streams = self.max_streams;
        Ok(c)
    }
}

/// With a rules file (`--reverse-rules`), reads it again on each reload request (SIGHUP on
/// unix; Windows has none, the file is read at start only) until `shutdown`. Without one,
/// nothing is registered, so SIGHUP keeps its default action (a forwarder in a closed terminal
/// ends). Call before the forwarder runs: a request that comes before the handler is
/// registered would end the process.
pub fn reload_rules_on_request(
    fwd: &Forwarder,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let rules = fwd.reverse_rules();
    let Some(file) = rules.file.as_ref() else {
        return Ok(());
    };
    let mut requests = ReloadSignals::new().context("cannot handle reload signals")?;
    let reload = match ReloadSignals::NAME {
        Some(name) => format!("{name} reads it again"),
        None => "read at start only on this host (restart to change it)".to_owned(),
    };
    tracing::info!(file = %file.path.display(), rules = %rules.describe(), "reverse rules file read; {reload}");
    let (fwd, shutdown) = (fwd.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            let why = tokio::select! {
                w = requests.recv() => w,
                () = shutdown.cancelled() => return,
            };
            match fwd.reload_reverse_rules() {
                Ok(true) => {
                    tracing::info!(signal = why, rules = %fwd.reverse_rules().describe(), "reverse rules reloaded")
                }
                Ok(false) => tracing::info!(signal = why, "reverse rules reloaded: unchanged"),
                Err(e) => {
                    tracing::error!(signal = why, error = %e, "reverse rules not reloaded; the previous rules stay")
                }
            }
        }
    });
    Ok(())
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

/// The runtime of the short commands (`status`): one thread.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(1)
}

/// The forwarder's runtime with `threads` threads (see [`hostnet_link::runtime`]: one by
/// default, and why).
pub fn runtime_with(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    hostnet_link::runtime(threads).context("cannot start the async runtime")
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
            runtime_with(a.common.threads)?.block_on(async {
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
                config: a.common.config(placeholder)?,
                control: Some(
                    a.common
                        .control
                        .clone()
                        .unwrap_or_else(status::default_control_path),
                ),
                command: a.command,
            };
            runtime_with(a.common.threads)?.block_on(sandbox::run(opts))
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
    let config = a.common.config(a.guest)?;
    let fwd = Forwarder::new(config, auth)?;
    let shutdown = CancellationToken::new();
    reload_rules_on_request(&fwd, &shutdown)?;
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
            &[
                "hostnet-forwarder",
                "run",
                "--guest",
                "unix:///a",
                "--reverse-deny",
                "0",
            ],
            &[
                "hostnet-forwarder",
                "run",
                "--guest",
                "unix:///a",
                "--reverse-allow",
                "sctp:9",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn reverse_rules_from_the_command_line() {
        use hostnet_link::proto::Proto;
        let c = Cli::try_parse_from([
            "hostnet-forwarder",
            "sandbox",
            "--reverse-allow",
            "3000-3999,tcp:5432",
            "--reverse-deny",
            "udp:53, 3306",
            "--",
            "true",
        ])
        .unwrap();
        let Command::Sandbox(s) = c.command else {
            panic!()
        };
        let config = s.common.config("unix:///a".parse().unwrap()).unwrap();
        let r = &config.reverse_rules;
        assert!(r.file.is_none());
        assert!(r.check(Proto::Tcp, 3000).is_ok() && r.check(Proto::Tcp, 5432).is_ok());
        assert!(r.check(Proto::Udp, 5432).is_err() && r.check(Proto::Tcp, 3306).is_err());
        assert_eq!(
            r.describe(),
            "--reverse-allow 3000-3999,tcp:5432; --reverse-deny udp:53,3306"
        );
        // The default: no rules.
        let c = Cli::try_parse_from(["hostnet-forwarder", "run", "--guest", "unix:///a"]).unwrap();
        let Command::Run(a) = c.command else { panic!() };
        assert!(
            a.common
                .config(a.guest.clone())
                .unwrap()
                .reverse_rules
                .is_open()
        );
        // Rules with --no-reverse contradict it.
        let c = Cli::try_parse_from([
            "hostnet-forwarder",
            "run",
            "--guest",
            "unix:///a",
            "--no-reverse",
            "--reverse-deny",
            "22",
        ])
        .unwrap();
        let Command::Run(a) = c.command else { panic!() };
        let e = a.common.config(a.guest.clone()).unwrap_err();
        assert!(e.to_string().contains("--no-reverse"), "{e:#}");
        // A rules file that cannot be read is a startup error naming it.
        let c = Cli::try_parse_from([
            "hostnet-forwarder",
            "run",
            "--guest",
            "unix:///a",
            "--reverse-rules",
            "/nonexistent/hostnet-rules",
        ])
        .unwrap();
        let Command::Run(a) = c.command else { panic!() };
        let e = a.common.config(a.guest.clone()).unwrap_err();
        assert!(
            format!("{e:#}").contains("/nonexistent/hostnet-rules"),
            "{e:#}"
        );
    }
}
