//! The bridge benchmark (being written).

fn main() {}
