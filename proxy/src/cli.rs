//! The process around the proxy: the order of startup steps is part of the contract.
//!
//! 1. SIGINT/SIGTERM handlers first, so a stop at any moment exits 0 (docker-proxy has a window
//!    where an early SIGINT kills it by signal).
//! 2. fd 3 (status pipe) and, with `-use-listen-fd`, fd 4 are taken before the process opens any
//!    descriptor of its own, so neither number can be confused with ours.
//! 3. Flags: an error prints usage and exits 2 with nothing on fd 3.
//! 4. RLIMIT_NOFILE soft raised to hard; tunables read; logging set up.
//! 5. The front socket is adopted or bound; a failure is `1\n<reason>` on fd 3 and exit 1.
//! 6. `0\n` on fd 3 in one write, then serve on a single-threaded runtime.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Mutex;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use tracing::{error, info};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::args::{self, Command, Proto};
use crate::config::Config;
use crate::frontend::{self, Frontend, Transport};
use crate::sctp::{self, SctpProxy};
use crate::status::StatusPipe;
use crate::tcp::{self, TcpProxy};
use crate::udp::UdpProxy;

/// The line `-v` prints.
pub const VERSION_LINE: &str = concat!(
    "hostnet-proxy (docker-proxy compatible) version ",
    env!("CARGO_PKG_VERSION")
);

extern "C" fn exit_now(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe; the kernel closes every socket as docker-proxy's
    // os.Exit(0) does.
    unsafe { libc::_exit(0) }
}

fn install_stop_handlers() {
    let action = SigAction::new(
        SigHandler::Handler(exit_now),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only calls _exit, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

fn raise_nofile() {
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Runs the process; returns the exit status.
pub fn main() -> i32 {
    install_stop_handlers();
    let status = StatusPipe::take();
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(Command::Run(a)) => a,
        Ok(Command::Help) => {
            print!("{}", args::USAGE);
            return 0;
        }
        Ok(Command::Version) => {
            println!("{VERSION_LINE}");
            return 0;
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{e}\n{}", args::USAGE);
            return 2;
        }
    };
    raise_nofile();
    let transport = match &args.proto {
        Proto::Tcp => Transport::Tcp,
        Proto::Udp => Transport::Udp,
        Proto::Sctp => Transport::Sctp,
        Proto::Other(p) => {
            status.fail(&format!("unsupported protocol {p}"));
            return 1;
        }
    };
    // fd 4 before any descriptor of ours exists.
    let adopted = args.use_listen_fd.then(|| frontend::from_fd4(transport));
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            status.fail(&e.to_string());
            return 1;
        }
    };
    if let Err(e) = init_logging(&config) {
        status.fail(&e);
        return 1;
    }
    let front =
        match adopted.unwrap_or_else(|| frontend::bind(transport, args.host_ip, args.host_port)) {
            Ok(f) => f,
            Err(e) => {
                error!("{e}");
                status.fail(&e);
                return 1;
            }
        };
    let backend = match u16::try_from(args.container_port) {
        Ok(port) => SocketAddr::new(args.container_ip, port),
        Err(_) => {
            let e = format!("invalid container port {}", args.container_port);
            status.fail(&e);
            return 1;
        }
    };
    let front_addr = front
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            status.fail(&format!("cannot start the event loop: {e}"));
            return 1;
        }
    };
    let local = tokio::task::LocalSet::new();
    let proto = transport_name(transport);
    let shown = front_addr.clone();
    let fatal = local.block_on(&rt, async move {
        match front {
            Frontend::Tcp(l) => {
                let listener = match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => return Err(e),
                };
                status.ready();
                info!(front = %front_addr, %backend, "proxying tcp");
                let proxy = Rc::new(TcpProxy { backend, config });
                Ok(tcp::serve(listener, proxy).await)
            }
            Frontend::Sctp(s) => {
                let listener = sctp::Listener::new(s)?;
                status.ready();
                info!(front = %front_addr, %backend, "proxying sctp");
                let proxy = Rc::new(SctpProxy { backend, config });
                Ok(sctp::serve(listener, proxy).await)
            }
            Frontend::Udp(u) => {
                let mut proxy = UdpProxy::new(u, backend, &config)?;
                status.ready();
                info!(front = %front_addr, %backend, "proxying udp");
                let e = proxy.serve().await;
                proxy.log_counters();
                Ok(e)
            }
        }
    });
    match fatal {
        Ok(e) => {
            error!("Stopping proxy on {proto}/{shown} for {proto}/{backend} ({e})");
            1
        }
        Err(e) => {
            // The status pipe was consumed only on success; report what we can.
            error!("cannot serve {proto}/{shown}: {e}");
            1
        }
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
        Transport::Sctp => "sctp",
    }
}

fn init_logging(config: &Config) -> Result<(), String> {
    // `Targets` rather than `EnvFilter`: the same `info` / `target=debug` syntax without a regex
    // engine, which would double the binary and the pages an idle proxy keeps resident.
    let filter: Targets = config
        .log
        .parse()
        .map_err(|e| format!("invalid HOSTNET_PROXY_LOG={:?}: {e}", config.log))?;
    // The fmt builder's own maximum level is INFO unless raised: raise it to TRACE and let
    // `filter` alone decide (else `HOSTNET_PROXY_LOG=debug` printed nothing below info).
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_target(false);
    let result = match &config.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    format!("cannot open HOSTNET_PROXY_LOG_FILE {}: {e}", path.display())
                })?;
            builder
                .with_writer(Mutex::new(file))
                .with_ansi(false)
                .finish()
                .with(filter)
                .try_init()
        }
        None => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .with(filter)
            .try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}
