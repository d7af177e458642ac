//! Port lists for `--allow` / `--deny` (`80,8000-8100`) and the filter they make. Plain data.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

/// A comma-separated list of ports and inclusive ranges, e.g. `80,443,8000-8100`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortList(Vec<RangeInclusive<u16>>);

/// Why a port list did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port list {input:?}: {reason}")]
pub struct PortListError {
    input: String,
    reason: String,
}

impl PortList {
    /// Whether `port` is in the list.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }

    /// The ranges, as given.
    pub fn ranges(&self) -> &[RangeInclusive<u16>] {
        &self.0
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
            let range = match item.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (parse_port(a).map_err(err)?, parse_port(b).map_err(err)?);
                    if a > b {
                        return Err(err(format!("range {a}-{b} is backwards")));
                    }
                    a..=b
                }
                None => {
                    let p = parse_port(item).map_err(err)?;
                    p..=p
                }
            };
            out.push(range);
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
            if r.start() == r.end() {
                write!(f, "{}", r.start())?;
            } else {
                write!(f, "{}-{}", r.start(), r.end())?;
            }
        }
        Ok(())
    }
}

/// `--allow` and `--deny` together: a port passes if it is allowed (every port when no
/// `--allow` was given) and not denied. Deny wins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortFilter {
    /// `None`: every port is allowed unless denied.
    pub allow: Option<PortList>,
    /// Ports never reported nor relayed.
    pub deny: PortList,
}

impl PortFilter {
    /// Whether `port` passes.
    pub fn permits(&self, port: u16) -> bool {
        self.allow.as_ref().is_none_or(|a| a.contains(port)) && !self.deny.contains(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_and_ranges() {
        let l: PortList = "80, 8000-8100,443".parse().unwrap();
        assert!(l.contains(80) && l.contains(8000) && l.contains(8100) && l.contains(443));
        assert!(!l.contains(79) && !l.contains(8101));
        assert_eq!(l.to_string(), "80,8000-8100,443");
        let one: PortList = "65535".parse().unwrap();
        assert!(one.contains(65535));
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in [
            "", ",", "80,", "0", "65536", "a", "90-80", "1-2-3", "-5", "5-",
        ] {
            assert!(bad.parse::<PortList>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn deny_wins_over_allow() {
        let f = PortFilter {
            allow: Some("8000-8100".parse().unwrap()),
            deny: "8080".parse().unwrap(),
        };
        assert!(f.permits(8000));
        assert!(!f.permits(8080));
        assert!(!f.permits(22));
        let open = PortFilter::default();
        assert!(open.permits(22));
    }
}
