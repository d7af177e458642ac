//! Transport URIs: one string names where and how a link is made.
//!
//! | URI | side |
//! |---|---|
//! | `vsock://CID:PORT` | connect (host) |
//! | `vsock://any:PORT` | listen (VM) |
//! | `hybrid-vsock:///path/to/v.sock?port=PORT` | connect only (host) |
//! | `unix:///path/to/agent.sock` | both |
//! | `tcp://HOST:PORT` | both (`HOST` may be a name, an IPv4 or a bracketed IPv6 address) |
//! | `quic://HOST:PORT` | both |
//! | `hvsock://VMID:PORT` | connect only (Windows host; `VMID` a GUID, `PORT` the guest's vsock port) |
//!
//! Parsing only checks syntax; whether an endpoint fits a side (connect or listen) is checked by
//! [`Connector::connect`](super::Connector::connect) and [`Listener::bind`](super::Listener::bind).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::error::TransportError;
use super::hvsock::Guid;

/// A vsock context id as written in a URI: a number or `any` (`VMADDR_CID_ANY`, listen side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VsockCid {
    /// `any`: listen on every CID of this machine.
    Any,
    /// A context id (2 is the host).
    Id(u32),
}

impl fmt::Display for VsockCid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VsockCid::Any => f.write_str("any"),
            VsockCid::Id(cid) => write!(f, "{cid}"),
        }
    }
}

/// A vsock address `{cid, port}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VsockEndpoint {
    /// The context id (or `any`).
    pub cid: VsockCid,
    /// The vsock port.
    pub port: u32,
}

/// A host name or IP literal and a port, as written in a `tcp://` or `quic://` URI.
///
/// Names are resolved when connecting or binding, not when parsing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// A DNS name, an IPv4 literal or an IPv6 literal (without brackets).
    pub host: String,
    /// The port; 0 is allowed on the listen side (the kernel picks one).
    pub port: u16,
}

impl HostPort {
    /// `host:port`, with brackets around an IPv6 literal; what `lookup_host` takes.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.authority())
    }
}

/// Where a link is made: one of the transport URIs (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `vsock://CID:PORT` or `vsock://any:PORT`.
    Vsock(VsockEndpoint),
    /// `hybrid-vsock:///path?port=PORT`: the hypervisor's unix socket and the guest's vsock port.
    HybridVsock {
        /// The hypervisor's (or vhost-device-vsock's) unix socket.
        path: PathBuf,
        /// The guest's vsock port, sent in `CONNECT PORT\n`.
        port: u32,
    },
    /// `unix:///path`.
    Unix(PathBuf),
    /// `tcp://HOST:PORT`.
    Tcp(HostPort),
    /// `quic://HOST:PORT`.
    Quic(HostPort),
    /// `hvsock://VMID:PORT`: a Hyper-V socket to the vsock port `PORT` of the VM `VMID`.
    Hvsock {
        /// The VM's id (`hcsdiag list`, `Get-VM NAME | select Id`).
        vm: Guid,
        /// The guest's vsock port.
        port: u32,
    },
}

impl Endpoint {
    /// The URI scheme (`"vsock"`, `"hybrid-vsock"`, `"unix"`, `"tcp"`, `"quic"`, `"hvsock"`).
    pub fn scheme(&self) -> &'static str {
        match self {
            Endpoint::Vsock(_) => "vsock",
            Endpoint::HybridVsock { .. } => "hybrid-vsock",
            Endpoint::Unix(_) => "unix",
            Endpoint::Tcp(_) => "tcp",
            Endpoint::Quic(_) => "quic",
            Endpoint::Hvsock { .. } => "hvsock",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Vsock(v) => write!(f, "vsock://{}:{}", v.cid, v.port),
            Endpoint::HybridVsock { path, port } => {
                write!(f, "hybrid-vsock://{}?port={port}", path.display())
            }
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::Tcp(hp) => write!(f, "tcp://{hp}"),
            Endpoint::Quic(hp) => write!(f, "quic://{hp}"),
            Endpoint::Hvsock { vm, port } => write!(f, "hvsock://{vm}:{port}"),
        }
    }
}

fn invalid(uri: &str, reason: impl Into<String>) -> TransportError {
    TransportError::InvalidUri {
        uri: uri.to_owned(),
        reason: reason.into(),
    }
}

/// An absolute path without query or fragment.
fn parse_path<'a>(uri: &str, rest: &'a str) -> Result<&'a Path, TransportError> {
    if rest.is_empty() {
        return Err(invalid(uri, "missing socket path"));
    }
    if !rest.starts_with('/') {
        return Err(invalid(
            uri,
            "the socket path must be absolute (three slashes: scheme:///path)",
        ));
    }
    if rest.contains('\0') {
        return Err(invalid(uri, "the socket path contains a NUL byte"));
    }
    Ok(Path::new(rest))
}

fn parse_host_port(uri: &str, rest: &str) -> Result<HostPort, TransportError> {
    if rest.contains(['/', '?', '#', '@']) {
        return Err(invalid(
            uri,
            "expected HOST:PORT with no path, query or user info",
        ));
    }
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let (host, tail) = after
            .split_once(']')
            .ok_or_else(|| invalid(uri, "unterminated '[' in IPv6 address"))?;
        let port = tail
            .strip_prefix(':')
            .ok_or_else(|| invalid(uri, "missing :PORT after the IPv6 address"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid(uri, format!("{host:?} is not an IPv6 address")));
        }
        (host, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| invalid(uri, "missing :PORT"))?;
        if host.contains(':') {
            return Err(invalid(
                uri,
                "an IPv6 address must be written in brackets: [::1]:PORT",
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(invalid(uri, "missing host"));
    }
    let port = parse_number::<u16>(uri, port, "port")?;
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

fn parse_number<T: FromStr>(uri: &str, s: &str, what: &str) -> Result<T, TransportError> {
    // `u32::from_str` accepts a leading '+'; a URI should not.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(uri, format!("{what} {s:?} is not a number")));
    }
    s.parse::<T>()
        .map_err(|_| invalid(uri, format!("{what} {s:?} is out of range")))
}

impl FromStr for Endpoint {
    type Err = TransportError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| invalid(uri, "expected SCHEME://..."))?;
        match scheme {
            "vsock" => {
                if rest.contains(['/', '?', '#']) {
                    return Err(invalid(uri, "expected vsock://CID:PORT"));
                }
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| invalid(uri, "expected vsock://CID:PORT"))?;
                let cid = if cid.eq_ignore_ascii_case("any") {
                    VsockCid::Any
                } else {
                    VsockCid::Id(parse_number(uri, cid, "CID")?)
                };
                let port = parse_number(uri, port, "port")?;
                Ok(Endpoint::Vsock(VsockEndpoint { cid, port }))
            }
            "hybrid-vsock" => {
                let (path, query) = rest
                    .split_once('?')
                    .ok_or_else(|| invalid(uri, "missing ?port=PORT (the guest's vsock port)"))?;
                let path = parse_path(uri, path)?;
                let port = query
                    .strip_prefix("port=")
                    .ok_or_else(|| invalid(uri, "the query must be port=PORT"))?;
                let port = parse_number(uri, port, "port")?;
                Ok(Endpoint::HybridVsock {
                    path: path.to_owned(),
                    port,
                })
            }
            "unix" => {
                if rest.contains(['?', '#']) {
                    return Err(invalid(uri, "unix:// takes a path only (no query)"));
                }
                Ok(Endpoint::Unix(parse_path(uri, rest)?.to_owned()))
            }
            "tcp" => Ok(Endpoint::Tcp(parse_host_port(uri, rest)?)),
            "quic" => Ok(Endpoint::Quic(parse_host_port(uri, rest)?)),
            "hvsock" => {
                let (vm, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| invalid(uri, "expected hvsock://VMID:PORT"))?;
                let vm = vm.parse().map_err(|e| invalid(uri, format!("VMID: {e}")))?;
                let port = parse_number(uri, port, "port")?;
                Ok(Endpoint::Hvsock { vm, port })
            }
            other => Err(invalid(
                uri,
                format!(
                    "unknown scheme {other:?} (expected vsock, hybrid-vsock, unix, tcp, quic or hvsock)"
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(uri: &str) -> Endpoint {
        let e: Endpoint = uri.parse().unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert_eq!(e.to_string(), uri, "display round trip");
        e
    }

    fn bad(uri: &str, needle: &str) {
        match uri.parse::<Endpoint>() {
            Ok(e) => panic!("{uri} parsed as {e:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(needle), "{uri}: {msg:?} lacks {needle:?}");
                assert!(msg.contains(uri), "{msg:?} does not name the URI");
            }
        }
    }

    #[test]
    fn good_uris() {
        assert_eq!(
            ok("vsock://3:1024"),
            Endpoint::Vsock(VsockEndpoint {
                cid: VsockCid::Id(3),
                port: 1024
            })
        );
        assert_eq!(
            ok("vsock://any:1024"),
            Endpoint::Vsock(VsockEndpoint {
                cid: VsockCid::Any,
                port: 1024
            })
        );
        assert_eq!(
            ok("vsock://4294967295:4294967295"),
            Endpoint::Vsock(VsockEndpoint {
                cid: VsockCid::Id(u32::MAX),
                port: u32::MAX
            })
        );
        assert_eq!(
            ok("hybrid-vsock:///run/vm/v.sock?port=1024"),
            Endpoint::HybridVsock {
                path: "/run/vm/v.sock".into(),
                port: 1024
            }
        );
        assert_eq!(
            ok("unix:///tmp/agent.sock"),
            Endpoint::Unix("/tmp/agent.sock".into())
        );
        assert_eq!(
            ok("tcp://127.0.0.1:0"),
            Endpoint::Tcp(HostPort {
                host: "127.0.0.1".into(),
                port: 0
            })
        );
        assert_eq!(
            ok("tcp://vm.local:7000"),
            Endpoint::Tcp(HostPort {
                host: "vm.local".into(),
                port: 7000
            })
        );
        assert_eq!(
            ok("quic://[::1]:4433"),
            Endpoint::Quic(HostPort {
                host: "::1".into(),
                port: 4433
            })
        );
        assert_eq!(ok("quic://[::1]:4433").scheme(), "quic");
        assert_eq!(
            ok("hvsock://11223344-5566-7788-99aa-bbccddeeff00:5000"),
            Endpoint::Hvsock {
                vm: "11223344-5566-7788-99aa-bbccddeeff00".parse().unwrap(),
                port: 5000
            }
        );
        // `ANY` in any case is accepted, and printed back in lower case.
        assert_eq!(
            "vsock://ANY:5".parse::<Endpoint>().unwrap().to_string(),
            "vsock://any:5"
        );
    }

    #[test]
    fn bad_uris() {
        bad("", "SCHEME://");
        bad("/tmp/agent.sock", "SCHEME://");
        bad("http://x:1", "unknown scheme");
        bad("vsock://3", "CID:PORT");
        bad("vsock://:5", "CID");
        bad("vsock://host:5", "CID");
        bad("vsock://3:", "port");
        bad("vsock://3:+5", "not a number");
        bad("vsock://-1:5", "not a number");
        bad("vsock://3:4294967296", "out of range");
        bad("vsock://3:5/x", "CID:PORT");
        bad("hybrid-vsock:///v.sock", "port=PORT");
        bad("hybrid-vsock:///v.sock?prt=5", "port=PORT");
        bad("hybrid-vsock:///v.sock?port=", "port");
        bad("hybrid-vsock:///v.sock?port=x", "not a number");
        bad("hybrid-vsock://v.sock?port=5", "absolute");
        bad("hybrid-vsock://?port=5", "missing socket path");
        bad("unix://", "missing socket path");
        bad("unix://relative.sock", "absolute");
        bad("unix:///a.sock?x=1", "no query");
        bad("tcp://127.0.0.1", "missing :PORT");
        bad("tcp://:80", "missing host");
        bad("tcp://127.0.0.1:65536", "out of range");
        bad("tcp://127.0.0.1:http", "not a number");
        bad("tcp://::1:80", "brackets");
        bad("tcp://[::1]", "missing :PORT");
        bad("tcp://[::1:80", "unterminated");
        bad("tcp://[nope]:80", "not an IPv6 address");
        bad("tcp://h:80/path", "no path");
        bad("tcp://user@h:80", "user info");
        bad("quic://h", "missing :PORT");
        bad("hvsock://5000", "VMID:PORT");
        bad("hvsock://vm:5000", "not a GUID");
        bad("hvsock://11223344-5566-7788-99aa-bbccddeeff00:", "port");
        bad(
            "hvsock://11223344-5566-7788-99aa-bbccddeeff00:-1",
            "not a number",
        );
    }

    fn arb_endpoint() -> impl proptest::strategy::Strategy<Value = Endpoint> {
        use proptest::prelude::*;
        let path = "(/[a-zA-Z0-9._-]{1,12}){1,4}".prop_map(PathBuf::from);
        let host = prop_oneof![
            "[a-z][a-z0-9-]{0,10}(\\.[a-z]{2,5}){0,2}",
            any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
        ];
        let hp = (host, any::<u16>()).prop_map(|(host, port)| HostPort { host, port });
        let cid = prop_oneof![Just(VsockCid::Any), any::<u32>().prop_map(VsockCid::Id)];
        prop_oneof![
            (cid, any::<u32>())
                .prop_map(|(cid, port)| Endpoint::Vsock(VsockEndpoint { cid, port })),
            (path.clone(), any::<u32>())
                .prop_map(|(path, port)| Endpoint::HybridVsock { path, port }),
            path.prop_map(Endpoint::Unix),
            hp.clone().prop_map(Endpoint::Tcp),
            hp.prop_map(Endpoint::Quic),
            (any::<(u32, u16, u16, [u8; 8])>(), any::<u32>()).prop_map(
                |((data1, data2, data3, data4), port)| {
                    Endpoint::Hvsock {
                        vm: Guid {
                            data1,
                            data2,
                            data3,
                            data4,
                        },
                        port,
                    }
                }
            ),
        ]
    }

    proptest::proptest! {
        #[test]
        fn display_parses_back(e in arb_endpoint()) {
            let shown = e.to_string();
            let back: Endpoint = shown.parse().unwrap();
            proptest::prop_assert_eq!(back, e);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in "\\PC{0,64}") {
            let _ = s.parse::<Endpoint>();
        }

        #[test]
        fn arbitrary_uris_never_panic(
            scheme in "(vsock|hybrid-vsock|unix|tcp|quic|hvsock)",
            rest in "[\\[\\]:/?=#@a-z0-9.+-]{0,40}",
        ) {
            let _ = format!("{scheme}://{rest}").parse::<Endpoint>();
        }
    }

    #[test]
    fn authority_brackets_ipv6() {
        let hp = HostPort {
            host: "::1".into(),
            port: 9,
        };
        assert_eq!(hp.authority(), "[::1]:9");
        let hp = HostPort {
            host: "localhost".into(),
            port: 9,
        };
        assert_eq!(hp.authority(), "localhost:9");
    }
}
