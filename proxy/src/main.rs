//! `hostnet-proxy`: see the library crate for what it does.

fn main() {
    std::process::exit(hostnet_proxy::cli::main());
}
