//! `hostnet-agent`

fn main() {}
