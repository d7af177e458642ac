//! Running the forwarder as a background service, one module per OS.
//!
//! * Linux: a systemd **user** unit, `forwarder/service/hostnet-forwarder.service` (the journal
//!   keeps the log).
//! * macOS: a launchd user agent, `forwarder/service/io.hostnet.forwarder.plist` (the log goes to
//!   `~/Library/Logs/hostnet-forwarder.log`).
//! * Windows: a Windows service, `hostnet-forwarder service install -- run ARGS...` (the service
//!   manager starts `hostnet-forwarder service run ARGS...`; see `service/windows.rs`).
//!
//! On Linux and macOS the files are installed by hand (README); the `service` subcommand says so.

use clap::{Args, Subcommand};

#[cfg_attr(windows, path = "service/windows.rs")]
#[cfg_attr(not(windows), path = "service/unix.rs")]
mod imp;

/// `service`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ServiceAction,
}

/// The service actions.
#[derive(Debug, Subcommand)]
pub enum ServiceAction {
    /// Install (and start) the service, which runs `hostnet-forwarder run ARGS...`.
    Install {
        /// The service name.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// The arguments of `run` (after `--`), e.g. `-- --guest tcp://... --token-file ...`.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        run_args: Vec<String>,
    },
    /// Stop and remove the service.
    Uninstall {
        /// The service name.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// What the service manager starts (not for interactive use).
    Run {
        /// The service name.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// The arguments of `run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        run_args: Vec<String>,
    },
}

/// The default service name.
pub const DEFAULT_NAME: &str = "hostnet-forwarder";

/// Runs a `service` subcommand; returns the exit code.
pub fn dispatch(args: ServiceArgs) -> anyhow::Result<i32> {
    imp::dispatch(args.action)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::ServiceAction;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("hostnet-forwarder").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn systemd_unit_runs_a_valid_command() {
        let unit = include_str!("../service/hostnet-forwarder.service");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        let mut words = exec.split_whitespace();
        assert!(words.next().unwrap().ends_with("/hostnet-forwarder"));
        let mut args: Vec<&str> = words.collect();
        // The guest comes from the environment file (HOSTNET_GUEST), shown in the unit's header.
        let guest = unit
            .lines()
            .find_map(|l| l.split("HOSTNET_GUEST=").nth(1))
            .and_then(|rest| rest.split('\'').next())
            .expect("an example HOSTNET_GUEST");
        args.extend(["--guest", guest]);
        assert!(matches!(parse(&args).command, Command::Run(_)));
        assert!(unit.contains("WantedBy=default.target"), "a user unit");
    }

    #[test]
    fn launchd_agent_runs_a_valid_command() {
        let plist = include_str!("../service/io.hostnet.forwarder.plist");
        let array = plist
            .split("<key>ProgramArguments</key>")
            .nth(1)
            .and_then(|rest| rest.split("</array>").next())
            .expect("ProgramArguments");
        let strings: Vec<&str> = array
            .split("<string>")
            .skip(1)
            .filter_map(|s| s.split("</string>").next())
            .collect();
        assert!(strings[0].ends_with("/hostnet-forwarder"));
        let Command::Run(run) = parse(&strings[1..]).command else {
            panic!("not run: {strings:?}")
        };
        assert_eq!(run.guest.scheme(), "unix");
        assert!(plist.contains("<key>Label</key>\n    <string>io.hostnet.forwarder</string>"));
    }

    #[test]
    fn windows_service_command_lines_parse() {
        let install = parse(&[
            "service",
            "install",
            "--",
            "--guest",
            "tcp://172.20.0.2:7000",
            "--token-file",
            r"C:\ProgramData\hostnet\token",
        ]);
        let Command::Service(s) = install.command else {
            panic!()
        };
        let ServiceAction::Install { name, run_args } = s.action else {
            panic!()
        };
        assert_eq!(name, super::DEFAULT_NAME);
        assert_eq!(run_args[0], "--guest");
        // What the service manager runs: `service run --name N -- RUN-ARGS...`.
        let mut argv = vec!["service", "run", "--name", "hn", "--"];
        argv.extend(run_args.iter().map(String::as_str));
        let Command::Service(s) = parse(&argv).command else {
            panic!()
        };
        let ServiceAction::Run { name, run_args } = s.action else {
            panic!()
        };
        assert_eq!(name, "hn");
        let mut run = vec!["run"];
        run.extend(run_args.iter().map(String::as_str));
        assert!(matches!(parse(&run).command, Command::Run(_)));
    }
}
