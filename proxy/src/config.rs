//! Tunables from `HOSTNET_PROXY_*` environment variables.
//!
//! dockerd gives the proxy a fixed argv and its own environment, so the environment (set for
//! docker.service through a systemd drop-in) is the one channel for settings.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `HOSTNET_PROXY_UDP_TIMEOUT` | `90s` | a UDP flow idle this long (no datagram either way) is closed |
//! | `HOSTNET_PROXY_UDP_MAX_FLOWS` | `4096` | UDP flow cap; the least recently used flow is evicted |
//! | `HOSTNET_PROXY_UDP_MAX_DATAGRAM` | `65535` | largest datagram received; larger ones are counted and dropped |
//! | `HOSTNET_PROXY_CONNECT_TIMEOUT` | `30s` | bound on the TCP or SCTP connect to the container |
//! | `HOSTNET_PROXY_SCTP_MAX_MESSAGE` | `4194304` | largest SCTP message reassembled (bytes); a larger one aborts the association |
//! | `HOSTNET_PROXY_PROXY_PROTOCOL` | `off` | `v2`: send a PROXY protocol v2 header to the container (TCP) |
//! | `HOSTNET_PROXY_LOG` | `info` | log filter: `off`, `error`, `warn`, `info`, `debug`, `trace`, or `target=level,...` |
//! | `HOSTNET_PROXY_LOG_FILE` | (stderr) | append log lines to this file (dockerd discards stderr) |
//!
//! Durations are a number of seconds (`90`, `0.5`) or a number with `ms` or `s` (`1500ms`).

use std::path::PathBuf;
use std::time::Duration;

/// Every tunable, validated once at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// UDP flow idle timeout, refreshed by traffic in either direction.
    pub udp_timeout: Duration,
    /// Most UDP flows held at once.
    pub udp_max_flows: usize,
    /// Receive buffer per datagram; a larger datagram is dropped and counted.
    pub udp_max_datagram: usize,
    /// Bound on connecting to the container.
    pub connect_timeout: Duration,
    /// Largest SCTP message the relay reassembles before passing it on whole.
    pub sctp_max_message: usize,
    /// Send a PROXY protocol v2 header to the container before the client's bytes.
    pub proxy_protocol: bool,
    /// Log filter directives.
    pub log: String,
    /// Log destination; `None` is stderr.
    pub log_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            udp_timeout: Duration::from_secs(90),
            udp_max_flows: 4096,
            udp_max_datagram: MAX_DATAGRAM,
            connect_timeout: Duration::from_secs(30),
            sctp_max_message: SCTP_MAX_MESSAGE,
            proxy_protocol: false,
            log: "info".to_owned(),
            log_file: None,
        }
    }
}

/// The largest UDP payload there is (IPv6 without jumbograms carries 65,527; the buffer holds
/// one byte more than any IPv4 or IPv6 datagram can so that nothing real is ever cut).
pub const MAX_DATAGRAM: usize = 65_535;

/// Default for `HOSTNET_PROXY_SCTP_MAX_MESSAGE`: 4 MiB, far above what SCTP signalling protocols
/// send (Diameter, SIGTRAN), held only while such a message is in flight.
pub const SCTP_MAX_MESSAGE: usize = 4 << 20;
/// Bounds of `HOSTNET_PROXY_SCTP_MAX_MESSAGE`: at least one receive buffer, at most 1 GiB.
const SCTP_MAX_MESSAGE_RANGE: std::ops::RangeInclusive<usize> = 65_536..=1 << 30;

/// A variable that is set but unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {name}={value:?}: {reason}")]
pub struct ConfigError {
    name: &'static str,
    value: String,
    reason: &'static str,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `get`, so that tests need not touch the environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        let var = |name: &'static str| get(name).filter(|v| !v.is_empty()).map(|v| (name, v));
        let err = |name, value: &str, reason| ConfigError {
            name,
            value: value.to_owned(),
            reason,
        };
        let duration = |name: &'static str, default: Duration| match var(name) {
            None => Ok(default),
            Some((n, v)) => parse_duration(&v).filter(|d| !d.is_zero()).ok_or_else(|| {
                err(
                    n,
                    &v,
                    "expected a positive duration such as 30, 30s or 500ms",
                )
            }),
        };
        c.udp_timeout = duration("HOSTNET_PROXY_UDP_TIMEOUT", c.udp_timeout)?;
        c.connect_timeout = duration("HOSTNET_PROXY_CONNECT_TIMEOUT", c.connect_timeout)?;
        if let Some((n, v)) = var("HOSTNET_PROXY_UDP_MAX_FLOWS") {
            c.udp_max_flows = v
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| err(n, &v, "expected a whole number of at least 1"))?;
        }
        if let Some((n, v)) = var("HOSTNET_PROXY_UDP_MAX_DATAGRAM") {
            c.udp_max_datagram = v
                .parse()
                .ok()
                .filter(|n| (1..=MAX_DATAGRAM).contains(n))
                .ok_or_else(|| err(n, &v, "expected a whole number from 1 to 65535"))?;
        }
        if let Some((n, v)) = var("HOSTNET_PROXY_SCTP_MAX_MESSAGE") {
            c.sctp_max_message = v
                .parse()
                .ok()
                .filter(|n| SCTP_MAX_MESSAGE_RANGE.contains(n))
                .ok_or_else(|| err(n, &v, "expected a whole number from 65536 to 1073741824"))?;
        }
        if let Some((n, v)) = var("HOSTNET_PROXY_PROXY_PROTOCOL") {
            c.proxy_protocol = match v.as_str() {
                "v2" | "2" => true,
                "off" | "0" | "false" | "no" => false,
                _ => return Err(err(n, &v, "expected v2 or off")),
            };
        }
        if let Some((_, v)) = var("HOSTNET_PROXY_LOG") {
            c.log = v;
        }
        if let Some((_, v)) = var("HOSTNET_PROXY_LOG_FILE") {
            c.log_file = Some(PathBuf::from(v));
        }
        Ok(c)
    }
}

/// `90`, `0.5`, `90s`, `1500ms`.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = number.trim().parse().ok()?;
    Duration::try_from_secs_f64(value * scale).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_when_unset_or_empty() {
        assert_eq!(with(&[]).unwrap(), Config::default());
        assert_eq!(
            with(&[("HOSTNET_PROXY_UDP_TIMEOUT", "")]).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn values_and_errors() {
        let c = with(&[
            ("HOSTNET_PROXY_UDP_TIMEOUT", "1s"),
            ("HOSTNET_PROXY_UDP_MAX_FLOWS", "4"),
            ("HOSTNET_PROXY_PROXY_PROTOCOL", "v2"),
            ("HOSTNET_PROXY_UDP_MAX_DATAGRAM", "1000"),
            ("HOSTNET_PROXY_SCTP_MAX_MESSAGE", "65536"),
        ])
        .unwrap();
        assert_eq!(c.sctp_max_message, 65_536);
        assert_eq!(c.udp_timeout, Duration::from_secs(1));
        assert_eq!(c.udp_max_flows, 4);
        assert_eq!(c.udp_max_datagram, 1000);
        assert!(c.proxy_protocol);
        for bad in [
            ("HOSTNET_PROXY_UDP_TIMEOUT", "0"),
            ("HOSTNET_PROXY_UDP_MAX_FLOWS", "0"),
            ("HOSTNET_PROXY_UDP_MAX_DATAGRAM", "70000"),
            ("HOSTNET_PROXY_CONNECT_TIMEOUT", "x"),
            ("HOSTNET_PROXY_PROXY_PROTOCOL", "v3"),
            ("HOSTNET_PROXY_SCTP_MAX_MESSAGE", "1000"),
            ("HOSTNET_PROXY_SCTP_MAX_MESSAGE", "big"),
        ] {
            let e = with(&[bad]).unwrap_err().to_string();
            assert!(e.contains(bad.0), "{e}");
        }
    }
}
