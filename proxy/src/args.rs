//! docker-proxy's command line, parsed with the grammar of Go's `flag` package.
//!
//! dockerd runs `<path> -proto P -host-ip IP -host-port N -container-ip IP -container-port N
//! [-use-listen-fd]`. Go's `flag` accepts `-name value`, `-name=value`, `--name value` and
//! `--name=value`; a bool flag takes a value only with `=`; parsing stops at the first non-flag
//! argument or at `--`; integers are read in base 0 (`0x1f`, `010` octal). Errors exit with 2.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The transport protocol named by `-proto`. Unknown names are kept so that the error is a
/// startup error reported on fd 3 (exit 1), as docker-proxy does, not a flag error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proto {
    /// `-proto tcp`
    Tcp,
    /// `-proto udp`
    Udp,
    /// `-proto sctp` (one-to-one SCTP sockets; the kernel needs the `sctp` module).
    Sctp,
    /// Anything else; refused at startup with `unsupported protocol X`.
    Other(String),
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proto::Tcp => f.write_str("tcp"),
            Proto::Udp => f.write_str("udp"),
            Proto::Sctp => f.write_str("sctp"),
            Proto::Other(s) => f.write_str(s),
        }
    }
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// `-proto`, default `tcp`.
    pub proto: Proto,
    /// `-host-ip`, default `0.0.0.0`. With `-use-listen-fd` only used in log lines.
    pub host_ip: IpAddr,
    /// `-host-port`, default -1. Only used to bind without `-use-listen-fd`.
    pub host_port: i64,
    /// `-container-ip`, default `0.0.0.0` (dialling it reaches the local host, as in Go).
    pub container_ip: IpAddr,
    /// `-container-port`, default -1; checked per connection, as docker-proxy does.
    pub container_port: i64,
    /// `-use-listen-fd`: fd 4 holds the bound socket.
    pub use_listen_fd: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            proto: Proto::Tcp,
            host_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            host_port: -1,
            container_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            container_port: -1,
            use_listen_fd: false,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the proxy.
    Run(Args),
    /// `-v` / `-version`: print the version line, exit 0.
    Version,
    /// `-h` / `-help`: print usage, exit 0.
    Help,
}

/// A flag error: printed with the usage on stderr, exit status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FlagError(String);

/// The usage text, in the shape Go's `flag.PrintDefaults` gives it.
pub const USAGE: &str = "\
Usage of hostnet-proxy:
  -container-ip value
    \tcontainer ip (default 0.0.0.0)
  -container-port int
    \tcontainer port (default -1)
  -host-ip value
    \thost ip (default 0.0.0.0)
  -host-port int
    \thost port (default -1)
  -proto string
    \tproxy protocol (default \"tcp\")
  -use-listen-fd
    \tuse a bound socket passed in as file descriptor 4
  -v\tshow version information
  -version
    \tshow version information
";

/// Parses `args` (without argv\[0\]).
pub fn parse<I, S>(args: I) -> Result<Command, FlagError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let args: Vec<String> = args.into_iter().map(|s| s.as_ref().to_owned()).collect();
    let mut out = Args::default();
    let mut version = false;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        // Go: a non-flag (no leading '-', or just "-") ends parsing; "--" ends it and is consumed.
        if arg.len() < 2 || !arg.starts_with('-') {
            break;
        }
        let mut name = &arg[1..];
        if let Some(rest) = name.strip_prefix('-') {
            if rest.is_empty() {
                break; // "--"
            }
            name = rest;
        }
        if name.is_empty() || name.starts_with('-') || name.starts_with('=') {
            return Err(FlagError(format!("bad flag syntax: {arg}")));
        }
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (name, None),
        };
        i += 1;
        match name {
            "h" | "help" => return Ok(Command::Help),
            "use-listen-fd" | "v" | "version" => {
                let value = match inline {
                    Some(v) => parse_bool(&v).ok_or_else(|| {
                        FlagError(format!(
                            "invalid boolean value {v:?} for -{name}: parse error"
                        ))
                    })?,
                    None => true,
                };
                if name == "use-listen-fd" {
                    out.use_listen_fd = value;
                } else {
                    version = value;
                }
            }
            "proto" | "host-ip" | "host-port" | "container-ip" | "container-port" => {
                let value = match inline {
                    Some(v) => v,
                    None => {
                        let v = args
                            .get(i)
                            .ok_or_else(|| FlagError(format!("flag needs an argument: -{name}")))?;
                        i += 1;
                        v.clone()
                    }
                };
                let bad = |what: &str| {
                    FlagError(format!("invalid value {value:?} for flag -{name}: {what}"))
                };
                match name {
                    "proto" => out.proto = parse_proto(&value),
                    "host-ip" => out.host_ip = parse_ip(&value).ok_or_else(|| bad("invalid IP"))?,
                    "container-ip" => {
                        out.container_ip = parse_ip(&value).ok_or_else(|| bad("invalid IP"))?
                    }
                    "host-port" => {
                        out.host_port = parse_int(&value).ok_or_else(|| bad("parse error"))?
                    }
                    _ => {
                        out.container_port = parse_int(&value).ok_or_else(|| bad("parse error"))?
                    }
                }
            }
            _ => return Err(FlagError(format!("flag provided but not defined: -{name}"))),
        }
    }
    if version {
        return Ok(Command::Version);
    }
    Ok(Command::Run(out))
}

fn parse_proto(s: &str) -> Proto {
    match s {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "sctp" => Proto::Sctp,
        other => Proto::Other(other.to_owned()),
    }
}

/// Go's `strconv.ParseBool`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`: optional sign, `0x`/`0o`/`0b` prefixes, leading `0` for
/// octal, `_` separators only with a prefix.
fn parse_int(s: &str) -> Option<i64> {
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_owned(), true)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_owned(), true)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_owned(), true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_owned(), true)
    } else {
        (10, lower, false)
    };
    let digits = if prefixed {
        if digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
            return None;
        }
        digits.replace('_', "")
    } else {
        digits
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let magnitude = i128::from(u64::from_str_radix(&digits, radix).ok()?);
    let value = if neg { -magnitude } else { magnitude };
    i64::try_from(value).ok()
}

/// Go's `net.IP.UnmarshalText`: an empty string is a nil IP, which the proxy treats as `[::]`.
/// IPv4-mapped IPv6 text is unmapped, as Go's `To4` does.
fn parse_ip(s: &str) -> Option<IpAddr> {
    if s.is_empty() {
        return Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
    match s.parse::<IpAddr>().ok()? {
        IpAddr::V6(v6) => Some(match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }),
        v4 => Some(v4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Args {
        match parse(args).unwrap() {
            Command::Run(a) => a,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn dockerd_argv() {
        let a = run(&[
            "-proto",
            "udp",
            "-host-ip",
            "::",
            "-host-port",
            "8080",
            "-container-ip",
            "172.17.0.2",
            "-container-port",
            "80",
            "-use-listen-fd",
        ]);
        assert_eq!(a.proto, Proto::Udp);
        assert_eq!(a.host_ip, "::".parse::<IpAddr>().unwrap());
        assert_eq!(a.host_port, 8080);
        assert_eq!(a.container_ip, "172.17.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(a.container_port, 80);
        assert!(a.use_listen_fd);
    }

    #[test]
    fn defaults() {
        assert_eq!(run(&[]), Args::default());
    }

    #[test]
    fn every_spelling() {
        for form in [
            &["-host-port", "5"][..],
            &["--host-port", "5"],
            &["-host-port=5"],
            &["--host-port=5"],
        ] {
            assert_eq!(run(form).host_port, 5, "{form:?}");
        }
    }

    #[test]
    fn bool_takes_value_only_with_equals() {
        assert!(!run(&["-use-listen-fd=false"]).use_listen_fd);
        assert!(run(&["-use-listen-fd=true"]).use_listen_fd);
        // "true" after a bare bool flag is a positional argument: parsing stops there.
        let a = run(&["-use-listen-fd", "true", "-host-port", "9"]);
        assert!(a.use_listen_fd);
        assert_eq!(a.host_port, -1);
        assert!(parse(["-use-listen-fd=yes"]).is_err());
    }

    #[test]
    fn stops_at_non_flag_and_double_dash() {
        assert_eq!(run(&["x", "-host-port", "1"]).host_port, -1);
        assert_eq!(run(&["--", "-host-port", "1"]).host_port, -1);
        assert_eq!(run(&["-", "-host-port", "1"]).host_port, -1);
        assert_eq!(run(&["-host-port", "2", "--", "-bogus"]).host_port, 2);
    }

    #[test]
    fn go_integers() {
        assert_eq!(parse_int("0x1F"), Some(31));
        assert_eq!(parse_int("010"), Some(8));
        assert_eq!(parse_int("-1"), Some(-1));
        assert_eq!(parse_int("0b101"), Some(5));
        assert_eq!(parse_int("0x_1"), None);
        assert_eq!(parse_int("1_000"), None);
        assert_eq!(parse_int("0x1_0"), Some(16));
        assert_eq!(parse_int(""), None);
        assert_eq!(parse_int("9223372036854775808"), None);
        assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int("08"), None);
    }

    #[test]
    fn errors() {
        for bad in [
            &["-bogus"][..],
            &["-host-port"],
            &["-host-port", "x"],
            &["-host-ip", "999.1.1.1"],
            &["---host-port", "1"],
            &["-=x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn version_help_and_ips() {
        assert_eq!(parse(["-v"]).unwrap(), Command::Version);
        assert_eq!(parse(["--version"]).unwrap(), Command::Version);
        assert_eq!(parse(["-h"]).unwrap(), Command::Help);
        assert_eq!(parse(["-help"]).unwrap(), Command::Help);
        assert_eq!(
            run(&["-host-ip", "::ffff:10.0.0.1"]).host_ip,
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            run(&["-container-ip", ""]).container_ip,
            "::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(run(&["-proto", "dccp"]).proto, Proto::Other("dccp".into()));
    }
}
