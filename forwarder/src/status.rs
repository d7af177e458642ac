//! `status`: what the running forwarder mirrors, served as JSON on a control endpoint and
//! printed as a table.
//!
//! The control endpoint answers every connection with one JSON document ([`StatusReport`])
//! followed by a newline, then closes; the client sends nothing. It is a unix socket (mode 0600)
//! on Linux and macOS and a named pipe on Windows, one module per OS ([`default_control_path`]
//! says where).

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::ctx::CountersView;

#[cfg_attr(unix, path = "status/unix.rs")]
#[cfg_attr(windows, path = "status/windows.rs")]
mod endpoint;

pub use endpoint::{ControlSocket, default_control_path, query};

/// How long a control connection may take, either side.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Version of the status document.
pub const STATUS_VERSION: u32 = 1;

/// The state of a host listener the reverse rules hold back (host→guest rows; the reason names
/// the rule).
pub const DENIED: &str = "denied";

/// Direction of a mirrored port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// A guest listener mirrored on the host.
    #[serde(rename = "guest->host")]
    GuestToHost,
    /// A host listener reported to the agent, which mirrors it in the guest.
    #[serde(rename = "host->guest")]
    HostToGuest,
}

impl Direction {
    fn arrow(self) -> &'static str {
        match self {
            Direction::GuestToHost => "guest→host",
            Direction::HostToGuest => "host→guest",
        }
    }
}

/// One host address of a mirrored port and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAddr {
    /// The host address.
    pub addr: String,
    /// `active`, `conflict`, `retrying`, `starting`. For host→guest rows, the state of the
    /// agent's mirror(s) of this host listener in the VM (`active`, `conflict`, `retrying`, as
    /// the agent reports them), or `reported` while the agent has reported none (an agent
    /// without the `mirror-state` capability never does), or `denied` for a host listener the
    /// reverse rules hold back (never reported to the agent).
    pub state: String,
    /// Why, for `conflict` and `retrying`; for `denied`, the rule (e.g. `--reverse-deny
    /// tcp:5432`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

/// One mirrored port (protocol and port, one direction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRow {
    /// Which way.
    pub direction: Direction,
    /// `tcp` or `udp`.
    pub proto: String,
    /// The port.
    pub port: u16,
    /// The guest listeners (guest→host rows); the VM addresses the agent binds as mirrors
    /// (host→guest rows, once it has reported their state).
    pub guest: Vec<String>,
    /// The host addresses.
    pub host: Vec<HostAddr>,
    /// The worst state of the host addresses (conflict > retrying > starting, reported >
    /// active).
    pub state: String,
    /// The reason of that state, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// Connections (UDP: flows) open now.
    pub connections: u64,
    /// Connections (flows) relayed in total.
    pub connections_total: u64,
    /// Bytes from the host side towards the guest.
    pub bytes_to_guest: u64,
    /// Bytes from the guest towards the host side.
    pub bytes_from_guest: u64,
}

/// The control session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    /// The agent's endpoint.
    pub guest: String,
    /// Whether a session is up.
    pub connected: bool,
    /// Whether the reverse direction runs in this session.
    pub reverse: bool,
    /// The last session error, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
}

/// The whole document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// [`STATUS_VERSION`].
    pub version: u32,
    /// The session.
    pub session: SessionStatus,
    /// Every mirrored port.
    pub ports: Vec<PortRow>,
    /// Counters of limits and failures.
    pub counters: CountersView,
    /// The reverse direction's rules, when the reverse direction runs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reverse_rules: Option<RulesStatus>,
}

/// The reverse direction's rules as `status` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesStatus {
    /// The rules in one line (`all ports` when there are none).
    pub rules: String,
    /// The rules file (`--reverse-rules`), if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub file: Option<String>,
    /// Why the last reload of the rules file failed (the rules before it stay in force).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reload_error: Option<String>,
}

/// How bad a state is, for a row's summary: conflict > retrying > starting, reported > active.
pub(crate) fn state_rank(s: &str) -> u8 {
    match s {
        "conflict" => 3,
        "retrying" => 2,
        "starting" | "reported" => 1,
        _ => 0,
    }
}

impl PortRow {
    /// Sets `state` and `reason` from the host addresses.
    pub fn summarize(&mut self) {
        if let Some(worst) = self.host.iter().max_by_key(|h| state_rank(&h.state)) {
            self.state = worst.state.clone();
            self.reason = worst.reason.clone();
        }
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The table `hostnet-forwarder status` prints.
pub fn render_table(r: &StatusReport) -> String {
    let mut out = String::new();
    let s = &r.session;
    let _ = writeln!(
        out,
        "guest {}: {}{}",
        s.guest,
        if s.connected {
            "connected"
        } else {
            "not connected"
        },
        s.last_error
            .as_ref()
            .filter(|_| !s.connected)
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    let header = [
        "DIRECTION",
        "PROTO",
        "GUEST",
        "HOST",
        "STATE",
        "CONNS",
        "TO GUEST",
        "FROM GUEST",
    ];
    let mut rows: Vec<[String; 8]> = Vec::new();
    for p in &r.ports {
        let host = p
            .host
            .iter()
            .map(|h| {
                if p.host.iter().all(|o| o.state == h.state) {
                    h.addr.clone()
                } else {
                    format!("{} ({})", h.addr, h.state)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let state = match &p.reason {
            Some(reason) => format!("{}: {reason}", p.state),
            None => p.state.clone(),
        };
        let guest = if p.guest.is_empty() {
            format!("port {}", p.port)
        } else {
            p.guest.join(", ")
        };
        rows.push([
            p.direction.arrow().to_owned(),
            p.proto.clone(),
            guest,
            host,
            state,
            p.connections.to_string(),
            human_bytes(p.bytes_to_guest),
            human_bytes(p.bytes_from_guest),
        ]);
    }
    if rows.is_empty() {
        out.push_str("no mirrored ports\n");
    } else {
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut line = |cells: &[String]| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(c);
                } else {
                    let pad = w - c.chars().count();
                    let _ = write!(l, "{c}{}  ", " ".repeat(pad));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&header.map(String::from));
        for row in &rows {
            line(row);
        }
    }
    if let Some(rules) = &r.reverse_rules {
        if rules.rules != "all ports" {
            let _ = writeln!(out, "reverse rules: {}", rules.rules);
        }
        if let Some(e) = &rules.reload_error {
            let _ = writeln!(
                out,
                "reverse rules reload failed (previous rules kept): {e}"
            );
        }
    }
    let c = &r.counters;
    if c.udp_flows > 0 || c.udp_flows_opened > 0 || c.udp_flows_accepted > 0 {
        let _ = writeln!(
            out,
            "UDP flows: {} open ({} from host clients, {} from the guest so far)",
            c.udp_flows, c.udp_flows_opened, c.udp_flows_accepted
        );
    }
    let limits = [
        ("streams refused (limit)", c.streams_refused),
        ("UDP flows refused", c.udp_flows_refused),
        ("UDP flows evicted", c.udp_flows_evicted),
        ("UDP flows closed idle", c.udp_flows_expired),
        ("datagrams dropped", c.udp_datagrams_dropped),
        ("link open failures", c.link_open_failed),
        ("dial-backs denied (reverse rules)", c.dial_backs_denied),
    ];
    for (name, v) in limits {
        if v > 0 {
            let _ = writeln!(out, "{name}: {v}");
        }
    }
    out
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another forwarder answers on the path.
    #[error("control socket {0}: another forwarder is running there (use --control PATH)")]
    InUse(PathBuf),
    /// Creating, binding or reading the socket failed.
    #[error("control socket {path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// The forwarder's answer was not a status document.
    #[error("control socket {path}: bad status document: {error}")]
    Decode {
        /// The path.
        path: PathBuf,
        /// The parser's error.
        error: serde_json::Error,
    },
}

/// Answers one control connection: the document, then close (bounded in time).
async fn answer<S: AsyncWrite + Unpin>(mut s: S, doc: Vec<u8>) {
    let _ = tokio::time::timeout(CONTROL_TIMEOUT, async {
        s.write_all(&doc).await?;
        s.shutdown().await
    })
    .await;
}

/// The status document of `report()`, newline-terminated, for one connection.
fn document(report: &(impl Fn() -> StatusReport + ?Sized)) -> Option<Vec<u8>> {
    match serde_json::to_vec(&report()) {
        Ok(mut d) => {
            d.push(b'\n');
            Some(d)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode the status");
            None
        }
    }
}

/// Reads a status document from a connected control endpoint.
async fn read_report<S: AsyncRead + Unpin>(
    mut s: S,
    path: &Path,
) -> Result<StatusReport, ControlError> {
    let io_err = |error| ControlError::Io {
        path: path.to_owned(),
        error,
    };
    // The document ends with a newline: read up to it (a Windows pipe instance stays open until
    // the client closes it).
    let mut buf = Vec::new();
    let mut s = tokio::io::BufReader::new(&mut s);
    tokio::time::timeout(CONTROL_TIMEOUT, s.read_until(b'\n', &mut buf))
        .await
        .map_err(|_| io_err(io::ErrorKind::TimedOut.into()))?
        .map_err(io_err)?;
    serde_json::from_slice(&buf).map_err(|error| ControlError::Decode {
        path: path.to_owned(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_states_and_reasons() {
        let mut row = PortRow {
            direction: Direction::GuestToHost,
            proto: "tcp".into(),
            port: 8000,
            guest: vec!["0.0.0.0:8000".into()],
            host: vec![
                HostAddr {
                    addr: "127.0.0.1:8000".into(),
                    state: "conflict".into(),
                    reason: Some("address in use".into()),
                },
                HostAddr {
                    addr: "[::1]:8000".into(),
                    state: "active".into(),
                    reason: None,
                },
            ],
            state: String::new(),
            reason: None,
            connections: 2,
            connections_total: 5,
            bytes_to_guest: 2048,
            bytes_from_guest: 10,
        };
        row.summarize();
        assert_eq!(row.state, "conflict");
        let r = StatusReport {
            version: STATUS_VERSION,
            session: SessionStatus {
                guest: "unix:///x".into(),
                connected: true,
                ..Default::default()
            },
            ports: vec![row],
            counters: CountersView::default(),
            reverse_rules: None,
        };
        let t = render_table(&r);
        assert!(t.contains("guest→host"), "{t}");
        assert!(t.contains("conflict: address in use"), "{t}");
        assert!(t.contains("127.0.0.1:8000 (conflict)"), "{t}");
        assert!(t.contains("2.0 KiB"), "{t}");
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"guest->host\""), "{json}");
        let back: StatusReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
