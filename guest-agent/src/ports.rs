//! Port lists for `--allow` / `--deny` (`80,8000-8100`, `tcp:5432`, `udp:53`) and the filter
//! they make: the one implementation the forwarder's `--reverse-allow` / `--reverse-deny` use
//! too, in [`hostnet_link::ports`] (syntax, rules and tests there).

pub use hostnet_link::ports::{PortFilter, PortList, PortListError, PortRule, Verdict};
