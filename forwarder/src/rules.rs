//! Which host listeners the reverse direction may mirror into the VM and dial back: the
//! `--reverse-allow` / `--reverse-deny` port lists (fixed for the process) and an optional
//! rules file (`--reverse-rules FILE`, read at start and again on each reload), as pure
//! functions.
//!
//! The lists have the agent's syntax ([`hostnet_link::ports`]: `80,8000-8100`, `tcp:5432`,
//! `udp:53`). A (protocol, port) passes if both sources let it through: allowed by each (every
//! port is allowed by a source without an allow list) and denied by neither. With no rules at
//! all every host listener passes, as before these options existed.
//!
//! # The rules file
//!
//! One rule a line, `allow PORTS` or `deny PORTS`; several lines of a kind add up; `#` starts a
//! comment; blank lines are ignored. An empty file allows everything.
//!
//! ```text
//! # the VM may reach the dev servers, never the database
//! allow 3000-3999, 8000-8100, tcp:5432
//! deny tcp:5432
//! deny udp:53
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use hostnet_link::ports::{PortFilter, PortList, Verdict};
use hostnet_link::proto::{Listener, Proto};

/// The rules of the reverse direction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReverseRules {
    /// `--reverse-allow` / `--reverse-deny` (or their environment variables).
    pub flags: PortFilter,
    /// `--reverse-rules FILE`: its path and its rules as last read.
    pub file: Option<RulesFile>,
}

/// A rules file and the rules read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesFile {
    /// Where it is.
    pub path: PathBuf,
    /// What it said when last read.
    pub filter: PortFilter,
}

/// Why a (protocol, port) is refused: the rule that refuses it, in words for logs and
/// `status` (e.g. `--reverse-deny tcp:5432`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// A rules file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesFileError {
    /// It cannot be read.
    #[error("reverse rules file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// A line is not a rule.
    #[error("reverse rules file {}, line {line}: {reason}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

impl ReverseRules {
    /// Whether `port` of `proto` may be mirrored and dialed back; if not, which rule says no.
    pub fn check(&self, proto: Proto, port: u16) -> Result<(), Denied> {
        match self.flags.verdict(proto, port) {
            Verdict::Allowed => {}
            Verdict::Denied(rule) => return Err(Denied(format!("--reverse-deny {rule}"))),
            Verdict::NotAllowed => {
                let allow = self.flags.allow.as_ref().map(ToString::to_string);
                return Err(Denied(format!(
                    "not in --reverse-allow {}",
                    allow.unwrap_or_default()
                )));
            }
        }
        let Some(file) = &self.file else {
            return Ok(());
        };
        match file.filter.verdict(proto, port) {
            Verdict::Allowed => Ok(()),
            Verdict::Denied(rule) => Err(Denied(format!("deny {rule} in {}", file.path.display()))),
            Verdict::NotAllowed => {
                let allow = file.filter.allow.as_ref().map(ToString::to_string);
                Err(Denied(format!(
                    "not in allow {} of {}",
                    allow.unwrap_or_default(),
                    file.path.display()
                )))
            }
        }
    }

    /// Whether every port passes (no rules, or only empty ones).
    pub fn is_open(&self) -> bool {
        self.flags.is_open() && self.file.as_ref().is_none_or(|f| f.filter.is_open())
    }

    /// The rules in one line, for `status` and the log: `all ports` when there are none.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(a) = &self.flags.allow {
            parts.push(format!("--reverse-allow {a}"));
        }
        if !self.flags.deny.is_empty() {
            parts.push(format!("--reverse-deny {}", self.flags.deny));
        }
        if let Some(f) = &self.file {
            let mut sub = Vec::new();
            if let Some(a) = &f.filter.allow {
                sub.push(format!("allow {a}"));
            }
            if !f.filter.deny.is_empty() {
                sub.push(format!("deny {}", f.filter.deny));
            }
            if sub.is_empty() {
                sub.push("no rules".to_owned());
            }
            parts.push(format!("{}: {}", f.path.display(), sub.join("; ")));
        }
        if parts.is_empty() {
            "all ports".to_owned()
        } else {
            parts.join("; ")
        }
    }

    /// Splits a host listener set into the listeners that pass (reported to the agent) and
    /// those refused, each with its reason (shown as `denied` in `status`).
    pub fn split(
        &self,
        set: &BTreeSet<Listener>,
    ) -> (BTreeSet<Listener>, BTreeMap<Listener, Denied>) {
        let mut pass = BTreeSet::new();
        let mut denied = BTreeMap::new();
        for l in set {
            match self.check(l.proto, l.port) {
                Ok(()) => {
                    pass.insert(*l);
                }
                Err(d) => {
                    denied.insert(*l, d);
                }
            }
        }
        (pass, denied)
    }
}

/// Parses the text of a rules file (module docs); `path` names it in errors.
pub fn parse_rules(path: &Path, text: &str) -> Result<PortFilter, RulesFileError> {
    let mut allow: Option<PortList> = None;
    let mut deny = PortList::default();
    for (i, raw) in text.lines().enumerate() {
        let syntax = |reason: String| RulesFileError::Syntax {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let list = || -> Result<PortList, RulesFileError> {
            if rest.trim().is_empty() {
                return Err(syntax(format!("{word} needs a port list")));
            }
            rest.trim().parse().map_err(|e| syntax(format!("{e}")))
        };
        match word {
            "allow" => allow.get_or_insert_with(PortList::default).extend(list()?),
            "deny" => deny.extend(list()?),
            _ => {
                return Err(syntax(format!(
                    "{word:?} is not a rule (allow PORTS or deny PORTS)"
                )));
            }
        }
    }
    Ok(PortFilter { allow, deny })
}

/// Reads and parses a rules file.
pub fn read_rules(path: &Path) -> Result<RulesFile, RulesFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| RulesFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    Ok(RulesFile {
        path: path.to_owned(),
        filter: parse_rules(path, &text)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(proto: Proto, addr: &str, port: u16) -> Listener {
        Listener {
            proto,
            addr: addr.parse().unwrap(),
            port,
            v6only: addr.contains(':'),
        }
    }

    fn filter(allow: Option<&str>, deny: &str) -> PortFilter {
        PortFilter {
            allow: allow.map(|a| a.parse().unwrap()),
            deny: if deny.is_empty() {
                PortList::default()
            } else {
                deny.parse().unwrap()
            },
        }
    }

    #[test]
    fn no_rules_let_everything_through() {
        let r = ReverseRules::default();
        assert!(r.is_open());
        assert_eq!(r.check(Proto::Tcp, 5432), Ok(()));
        assert_eq!(r.check(Proto::Udp, 53), Ok(()));
        assert_eq!(r.describe(), "all ports");
    }

    #[test]
    fn flags_deny_wins_and_reasons_name_the_rule() {
        let r = ReverseRules {
            flags: filter(Some("8000-8100,udp:53"), "tcp:8080"),
            file: None,
        };
        assert!(!r.is_open());
        assert_eq!(r.check(Proto::Tcp, 8000), Ok(()));
        assert_eq!(r.check(Proto::Udp, 8080), Ok(()));
        assert_eq!(
            r.check(Proto::Tcp, 8080),
            Err(Denied("--reverse-deny tcp:8080".into()))
        );
        assert_eq!(
            r.check(Proto::Tcp, 53),
            Err(Denied("not in --reverse-allow 8000-8100,udp:53".into()))
        );
        assert_eq!(r.check(Proto::Udp, 53), Ok(()));
        assert_eq!(
            r.describe(),
            "--reverse-allow 8000-8100,udp:53; --reverse-deny tcp:8080"
        );
    }

    #[test]
    fn both_sources_must_pass() {
        let r = ReverseRules {
            flags: filter(None, "22"),
            file: Some(RulesFile {
                path: "/etc/hostnet/rules".into(),
                filter: filter(Some("1-1000"), "udp:53"),
            }),
        };
        assert_eq!(
            r.check(Proto::Tcp, 22),
            Err(Denied("--reverse-deny 22".into()))
        );
        assert_eq!(
            r.check(Proto::Udp, 53),
            Err(Denied("deny udp:53 in /etc/hostnet/rules".into()))
        );
        assert_eq!(r.check(Proto::Tcp, 53), Ok(()));
        assert_eq!(
            r.check(Proto::Tcp, 5432),
            Err(Denied("not in allow 1-1000 of /etc/hostnet/rules".into()))
        );
        assert_eq!(
            r.describe(),
            "--reverse-deny 22; /etc/hostnet/rules: allow 1-1000; deny udp:53"
        );
    }

    #[test]
    fn split_keeps_what_passes_and_says_why_for_the_rest() {
        let r = ReverseRules {
            flags: filter(None, "tcp:5432"),
            file: None,
        };
        let set: BTreeSet<Listener> = [
            l(Proto::Tcp, "127.0.0.1", 5432),
            l(Proto::Tcp, "::1", 5432),
            l(Proto::Udp, "127.0.0.1", 5432),
            l(Proto::Tcp, "0.0.0.0", 8000),
        ]
        .into_iter()
        .collect();
        let (pass, denied) = r.split(&set);
        assert_eq!(
            pass,
            [
                l(Proto::Udp, "127.0.0.1", 5432),
                l(Proto::Tcp, "0.0.0.0", 8000)
            ]
            .into_iter()
            .collect()
        );
        assert_eq!(denied.len(), 2);
        assert!(
            denied
                .iter()
                .all(|(l, d)| l.port == 5432 && d.0 == "--reverse-deny tcp:5432")
        );
    }

    #[test]
    fn rules_files_parse_with_comments_and_repeated_lines() {
        let p = Path::new("rules");
        let text = "# a comment\n\nallow 3000-3999, 8000   # dev servers\nallow tcp:5432\n\tdeny tcp:5432\ndeny udp:53\n";
        let f = parse_rules(p, text).unwrap();
        assert_eq!(
            f,
            filter(Some("3000-3999,8000,tcp:5432"), "tcp:5432,udp:53")
        );
        assert!(parse_rules(p, "").unwrap().is_open());
        assert!(parse_rules(p, "# nothing\n\n").unwrap().is_open());
        assert_eq!(parse_rules(p, "deny 22\n").unwrap(), filter(None, "22"));
    }

    #[test]
    fn rules_file_errors_name_the_line() {
        let p = Path::new("/x/rules");
        for (text, want) in [
            ("deny 22\nallow\n", "line 2: allow needs a port list"),
            ("permit 22\n", "line 1: \"permit\" is not a rule"),
            ("\n\ndeny 22,,23\n", "line 3: invalid port list"),
            ("deny sctp:9\n", "\"sctp\" is not a protocol"),
        ] {
            let e = parse_rules(p, text).unwrap_err().to_string();
            assert!(e.starts_with("reverse rules file /x/rules"), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = read_rules(Path::new("/nonexistent/hostnet-rules")).unwrap_err();
        assert!(matches!(e, RulesFileError::Read { .. }), "{e}");
    }
}
