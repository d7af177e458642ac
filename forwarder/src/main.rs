//! `hostnet-forwarder`: see `hostnet_forwarder::cli`.

fn main() -> std::process::ExitCode {
    hostnet_forwarder::cli::main()
}
