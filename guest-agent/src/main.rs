//! `hostnet-agent`: see the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    hostnet_agent::app::main(hostnet_agent::app::Cli::parse())
}
