//! `hostnet-forwarder`

fn main() {}
