//! Port lists and the allow/deny filter they make: the agent's `--allow` / `--deny` (which
//! guest ports it reports and relays) and the forwarder's `--reverse-allow` / `--reverse-deny`
//! (which host listeners it mirrors into the VM and dials back). Plain data, one parser for
//! both sides.
//!
//! # Syntax
//!
//! A list is comma-separated entries, each a port or an inclusive range, optionally for one
//! protocol only; blanks around an entry are ignored:
//!
//! | entry | matches |
//! |---|---|
//! | `5432` | TCP and UDP port 5432 |
//! | `8000-8100` | TCP and UDP ports 8000 to 8100 |
//! | `tcp:5432` | TCP port 5432 only |
//! | `udp:53` | UDP port 53 only |
//! | `udp:5000-5010` | UDP ports 5000 to 5010 only |
//!
//! e.g. `80,443,8000-8100` or `tcp:5432,udp:53`. Port 0, an empty entry, a backwards range
//! and a protocol other than `tcp` / `udp` are errors.
//!
//! # Rules
//!
//! [`PortFilter`]: a (protocol, port) passes if it is allowed (every port is when there is no
//! allow list) and not denied. Deny wins over allow.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use crate::proto::Proto;

/// One entry of a [`PortList`]: a port range, for one protocol or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    /// `None`: TCP and UDP.
    pub proto: Option<Proto>,
    /// The ports, inclusive (a single port is `p..=p`).
    pub ports: RangeInclusive<u16>,
}

impl PortRule {
    /// Whether this entry matches `port` of `proto`.
    pub fn matches(&self, proto: Proto, port: u16) -> bool {
        self.proto.is_none_or(|p| p == proto) && self.ports.contains(&port)
    }
}

impl fmt::Display for PortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            Some(Proto::Tcp) => f.write_str("tcp:")?,
            Some(Proto::Udp) => f.write_str("udp:")?,
            None => {}
        }
        let (a, b) = (self.ports.start(), self.ports.end());
        if a == b {
            write!(f, "{a}")
        } else {
            write!(f, "{a}-{b}")
        }
    }
}

/// A comma-separated list of [`PortRule`]s, e.g. `80,443,8000-8100,udp:53` (module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortList(Vec<PortRule>);

/// Why a port list did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port list {input:?}: {reason}")]
pub struct PortListError {
    input: String,
    reason: String,
}

impl PortList {
    /// Whether any entry matches `port` of `proto`.
    pub fn contains(&self, proto: Proto, port: u16) -> bool {
        self.matching(proto, port).is_some()
    }

    /// The first entry that matches `port` of `proto`.
    pub fn matching(&self, proto: Proto, port: u16) -> Option<&PortRule> {
        self.0.iter().find(|r| r.matches(proto, port))
    }

    /// The entries, as given.
    pub fn rules(&self) -> &[PortRule] {
        &self.0
    }

    /// Whether the list has no entry (only [`PortList::default`] and [`PortList::extend`] of
    /// empty lists make one: the parser refuses an empty list).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends the entries of `other`.
    pub fn extend(&mut self, other: PortList) {
        self.0.extend(other.0);
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    let s = s.trim();
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is not a port".into()),
        Ok(p) => Ok(p),
        Err(e) => Err(format!("{s:?} is not a port number (1-65535): {e}")),
    }
}

fn parse_rule(item: &str) -> Result<PortRule, String> {
    let (proto, ports) = match item.split_once(':') {
        Some((p, rest)) => {
            let proto = match p.trim().to_ascii_lowercase().as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => return Err(format!("{:?} is not a protocol (tcp or udp)", p.trim())),
            };
            (Some(proto), rest.trim())
        }
        None => (None, item),
    };
    let ports = match ports.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (parse_port(a)?, parse_port(b)?);
            if a > b {
                return Err(format!("range {a}-{b} is backwards"));
            }
            a..=b
        }
        None => {
            let p = parse_port(ports)?;
            p..=p
        }
    };
    Ok(PortRule { proto, ports })
}

impl FromStr for PortList {
    type Err = PortListError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| PortListError {
            input: input.to_owned(),
            reason,
        };
        let mut out = Vec::new();
        for item in input.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(err("empty item".into()));
            }
            out.push(parse_rule(item).map_err(err)?);
        }
        Ok(PortList(out))
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// What a [`PortFilter`] says about one (protocol, port), and which rule decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// It passes.
    Allowed,
    /// This deny entry matches it.
    Denied(&'a PortRule),
    /// There is an allow list and no entry of it matches.
    NotAllowed,
}

/// An allow list and a deny list together: a port passes if it is allowed (every port when
/// there is no allow list) and not denied. Deny wins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortFilter {
    /// `None`: every port is allowed unless denied.
    pub allow: Option<PortList>,
    /// Ports never reported nor relayed.
    pub deny: PortList,
}

impl PortFilter {
    /// Whether `port` of `proto` passes.
    pub fn permits(&self, proto: Proto, port: u16) -> bool {
        self.verdict(proto, port) == Verdict::Allowed
    }

    /// Whether `port` of `proto` passes, and if not, which rule refuses it.
    pub fn verdict(&self, proto: Proto, port: u16) -> Verdict<'_> {
        if let Some(rule) = self.deny.matching(proto, port) {
            return Verdict::Denied(rule);
        }
        match &self.allow {
            Some(a) if !a.contains(proto, port) => Verdict::NotAllowed,
            _ => Verdict::Allowed,
        }
    }

    /// Whether the filter lets every port through (no allow list, nothing denied).
    pub fn is_open(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule() -> impl Strategy<Value = PortRule> {
        let proto = prop_oneof![Just(None), Just(Some(Proto::Tcp)), Just(Some(Proto::Udp))];
        (proto, 1u16.., 1u16..).prop_map(|(proto, a, b)| PortRule {
            proto,
            ports: a.min(b)..=a.max(b),
        })
    }

    proptest! {
        /// Any text: an error or a list, never a panic; a list prints back to itself.
        #[test]
        fn any_text_parses_or_fails_cleanly(s in "[tcpud:0-9, -]{0,40}") {
            if let Ok(l) = s.parse::<PortList>() {
                prop_assert_eq!(l.to_string().parse::<PortList>().unwrap(), l);
            }
        }

        /// Every list prints as text that parses back to it, and matches as its entries do.
        #[test]
        fn lists_round_trip_and_match_their_entries(
            rules in proptest::collection::vec(rule(), 1..8),
            port in 1u16..,
        ) {
            let l = PortList(rules.clone());
            prop_assert_eq!(l.to_string().parse::<PortList>().unwrap(), l.clone());
            for proto in [Proto::Tcp, Proto::Udp] {
                prop_assert_eq!(
                    l.contains(proto, port),
                    rules.iter().any(|r| r.proto.is_none_or(|p| p == proto) && r.ports.contains(&port))
                );
            }
        }
    }

    #[test]
    fn parses_ports_and_ranges() {
        let l: PortList = "80, 8000-8100,443".parse().unwrap();
        for p in [Proto::Tcp, Proto::Udp] {
            assert!(l.contains(p, 80) && l.contains(p, 8000) && l.contains(p, 8100));
            assert!(l.contains(p, 443));
            assert!(!l.contains(p, 79) && !l.contains(p, 8101));
        }
        assert_eq!(l.to_string(), "80,8000-8100,443");
        let one: PortList = "65535".parse().unwrap();
        assert!(one.contains(Proto::Tcp, 65535));
    }

    #[test]
    fn parses_per_protocol_entries() {
        let l: PortList = "tcp:5432, udp:53 ,UDP:5000-5010,8080".parse().unwrap();
        assert!(l.contains(Proto::Tcp, 5432) && !l.contains(Proto::Udp, 5432));
        assert!(l.contains(Proto::Udp, 53) && !l.contains(Proto::Tcp, 53));
        assert!(l.contains(Proto::Udp, 5005) && !l.contains(Proto::Tcp, 5005));
        assert!(l.contains(Proto::Tcp, 8080) && l.contains(Proto::Udp, 8080));
        assert_eq!(l.to_string(), "tcp:5432,udp:53,udp:5000-5010,8080");
        assert_eq!(
            l.matching(Proto::Udp, 5001).map(ToString::to_string),
            Some("udp:5000-5010".to_owned())
        );
        // The display parses back to the same list.
        assert_eq!(l.to_string().parse::<PortList>().unwrap(), l);
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in [
            "",
            ",",
            "80,",
            "0",
            "65536",
            "a",
            "90-80",
            "1-2-3",
            "-5",
            "5-",
            "sctp:80",
            "tcp:",
            ":80",
            "tcp:0",
            "tcp:udp:80",
            "tcp:90-80",
            "tcp 80",
        ] {
            assert!(bad.parse::<PortList>().is_err(), "{bad:?} parsed");
        }
        let e = "tcp:5432,sctp:9".parse::<PortList>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid port list \"tcp:5432,sctp:9\": \"sctp\" is not a protocol (tcp or udp)"
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let f = PortFilter {
            allow: Some("8000-8100".parse().unwrap()),
            deny: "8080".parse().unwrap(),
        };
        assert!(f.permits(Proto::Tcp, 8000));
        assert!(!f.permits(Proto::Tcp, 8080));
        assert!(!f.permits(Proto::Udp, 8080));
        assert!(!f.permits(Proto::Tcp, 22));
        let open = PortFilter::default();
        assert!(open.permits(Proto::Tcp, 22) && open.is_open());
    }

    #[test]
    fn verdicts_name_the_rule_per_protocol() {
        let f = PortFilter {
            allow: Some("tcp:5000-6000,udp:53".parse().unwrap()),
            deny: "tcp:5432,5433".parse().unwrap(),
        };
        assert_eq!(f.verdict(Proto::Tcp, 5000), Verdict::Allowed);
        assert_eq!(f.verdict(Proto::Udp, 53), Verdict::Allowed);
        assert_eq!(f.verdict(Proto::Tcp, 53), Verdict::NotAllowed);
        assert_eq!(f.verdict(Proto::Udp, 5000), Verdict::NotAllowed);
        match f.verdict(Proto::Tcp, 5432) {
            Verdict::Denied(r) => assert_eq!(r.to_string(), "tcp:5432"),
            v => panic!("{v:?}"),
        }
        // udp:5432 is not denied (the deny entry is TCP only) but not allowed either.
        assert_eq!(f.verdict(Proto::Udp, 5432), Verdict::NotAllowed);
        match f.verdict(Proto::Udp, 5433) {
            Verdict::Denied(r) => assert_eq!(r.to_string(), "5433"),
            v => panic!("{v:?}"),
        }
        let deny_only = PortFilter {
            allow: None,
            deny: "udp:53".parse().unwrap(),
        };
        assert!(deny_only.permits(Proto::Tcp, 53) && !deny_only.permits(Proto::Udp, 53));
        assert!(!deny_only.is_open());
    }
}
