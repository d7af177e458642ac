//! A bridge under test: `hostnet-agent` inside a [`Netns`], `hostnet-forwarder` on the host,
//! connected over unix, tcp (token) or quic (pinned certificates). The forwarder is the native
//! binary, or the Windows build under Wine ([`ForwarderBuild::Wine`], see [`crate::wine`]).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::net::{LO4, sa, tcp_listeners, udp_bound};
use crate::netns::Netns;
use crate::process::{Proc, bin};
use crate::{TempDir, after, wait_until};

/// The link between the forwarder and the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
    Quic,
}

/// The port the agent listens on inside the namespace for tcp and quic.
pub const AGENT_PORT: u16 = 7000;

/// Which build of the forwarder a [`Bridge`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwarderBuild {
    /// The workspace's binary for this host; `status` on a unix socket.
    #[default]
    Native,
    /// `hostnet-forwarder.exe` under Wine ([`crate::wine`]; hold a [`crate::wine::Session`]
    /// while the bridge lives); `status` on a named pipe. tcp and quic transports only.
    Wine,
}

/// How long one `status` of the Wine forwarder may take (a Windows process start included).
const WINE_STATUS_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a [`Bridge`].
#[derive(Debug, Clone)]
pub struct BridgeBuilder {
    transport: Transport,
    reverse: bool,
    agent_args: Vec<String>,
    fwd_args: Vec<String>,
    fwd_env: Vec<(String, String)>,
    agent_env: Vec<(String, String)>,
    wrong_token: bool,
    start_forwarder: bool,
    veth: bool,
    expose_veth: bool,
    forwarder: ForwarderBuild,
}

impl BridgeBuilder {
    /// Run this build of the forwarder (default: [`ForwarderBuild::Native`]).
    pub fn forwarder(mut self, f: ForwarderBuild) -> Self {
        self.forwarder = f;
        self
    }

    /// `--expose` the host end of the veth pair (tcp/quic transports, or with [`Self::veth`]).
    pub fn expose_veth(mut self) -> Self {
        self.expose_veth = true;
        self
    }

    /// Give the namespace a veth pair even on the unix transport (the benchmark's direct path).
    pub fn veth(mut self) -> Self {
        self.veth = true;
        self
    }

    /// Keep the reverse direction on (the tests turn it off by default: with it, every
    /// forwarder of a parallel test mirrors every other test's host ports into its namespace).
    pub fn reverse(mut self) -> Self {
        self.reverse = true;
        self
    }

    pub fn agent_args<S: Into<String>>(mut self, a: impl IntoIterator<Item = S>) -> Self {
        self.agent_args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn fwd_args<S: Into<String>>(mut self, a: impl IntoIterator<Item = S>) -> Self {
        self.fwd_args.extend(a.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the forwarder (e.g. `HOSTNET_REVERSE_DENY`).
    pub fn fwd_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.fwd_env.push((key.into(), value.into()));
        self
    }

    /// An environment variable for the agent.
    pub fn agent_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.agent_env.push((key.into(), value.into()));
        self
    }

    /// tcp transport only: the forwarder gets a different token than the agent.
    pub fn wrong_token(mut self) -> Self {
        self.wrong_token = true;
        self
    }

    /// quic transport only: the forwarder pins a certificate that is not the agent's (and the
    /// agent pins the forwarder's real one).
    pub fn wrong_cert(mut self) -> Self {
        self.wrong_token = true;
        self
    }

    /// Start only the agent.
    pub fn without_forwarder(mut self) -> Self {
        self.start_forwarder = false;
        self
    }

    pub fn start(self) -> Bridge {
        let ns = match self.transport {
            Transport::Unix if !self.veth => Netns::new(),
            _ => Netns::with_veth(),
        }
        .unwrap_or_else(|e| panic!("namespace: {e:#}"));
        let dir = TempDir::new("bridge").expect("temp dir");
        let mut fwd_args = self.fwd_args;
        if self.expose_veth {
            let v = ns.veth().expect("--expose of the veth needs a veth pair");
            fwd_args.extend(["--expose".to_string(), v.host_ip.to_string()]);
        }
        let (agent_uri, guest_uri) = match self.transport {
            Transport::Unix => {
                let u = format!("unix://{}", dir.join("agent.sock").display());
                (u.clone(), u)
            }
            Transport::Tcp => {
                let a = format!("tcp://{}:{AGENT_PORT}", ns.ns_ip());
                (a.clone(), a)
            }
            Transport::Quic => {
                let a = format!("quic://{}:{AGENT_PORT}", ns.ns_ip());
                (a.clone(), a)
            }
        };
        let mut agent_auth = Vec::new();
        let mut fwd_auth = Vec::new();
        match self.transport {
            Transport::Unix => {}
            Transport::Tcp => {
                let tok = dir.join("agent.token");
                write_secret(&tok, "e2e-token-0123456789abcdef");
                let ftok = if self.wrong_token {
                    let f = dir.join("fwd.token");
                    write_secret(&f, "some-other-token-fedcba9876543210");
                    f
                } else {
                    tok.clone()
                };
                agent_auth = vec!["--token-file".into(), tok.display().to_string()];
                fwd_auth = vec!["--token-file".into(), ftok.display().to_string()];
            }
            Transport::Quic => {
                let a = dir.join("agent-tls");
                let f = dir.join("fwd-tls");
                keygen(&a);
                keygen(&f);
                let pinned = if self.wrong_token {
                    let o = dir.join("other-tls");
                    keygen(&o);
                    o
                } else {
                    a.clone()
                };
                agent_auth = vec![
                    "--tls-dir".into(),
                    a.display().to_string(),
                    "--peer-cert".into(),
                    f.join("cert.der").display().to_string(),
                ];
                fwd_auth = vec![
                    "--tls-dir".into(),
                    f.display().to_string(),
                    "--peer-cert".into(),
                    pinned.join("cert.der").display().to_string(),
                ];
            }
        }
        let control = match self.forwarder {
            ForwarderBuild::Native => dir.join("control.sock"),
            ForwarderBuild::Wine => {
                assert!(
                    self.transport != Transport::Unix,
                    "the Windows forwarder has no unix:// transport"
                );
                PathBuf::from(crate::wine::pipe_name())
            }
        };
        let mut b = Bridge {
            ns,
            transport: self.transport,
            agent: None,
            fwd: None,
            agent_uri,
            guest_uri,
            agent_auth,
            fwd_auth,
            control,
            forwarder: self.forwarder,
            reverse: self.reverse,
            agent_args: self.agent_args,
            fwd_args,
            fwd_env: self.fwd_env,
            agent_env: self.agent_env,
            dir,
            old_logs: String::new(),
        };
        b.start_agent();
        if self.start_forwarder {
            b.start_forwarder();
        }
        b
    }
}

fn write_secret(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `hostnet-forwarder keygen DIR` (cert.der, key.der).
pub fn keygen(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(bin("hostnet-forwarder"))
        .arg("keygen")
        .arg(dir)
        .output()
        .expect("run hostnet-forwarder keygen");
    assert!(
        out.status.success() && dir.join("cert.der").is_file() && dir.join("key.der").is_file(),
        "hostnet-forwarder keygen {} failed ({}): {}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An agent in a namespace and a forwarder on the host. Processes are killed, then the namespace
/// and the temp dir removed, on drop.
#[derive(Debug)]
pub struct Bridge {
    pub agent: Option<Proc>,
    pub fwd: Option<Proc>,
    pub ns: Netns,
    pub transport: Transport,
    pub dir: TempDir,
    agent_uri: String,
    guest_uri: String,
    agent_auth: Vec<String>,
    fwd_auth: Vec<String>,
    control: PathBuf,
    forwarder: ForwarderBuild,
    reverse: bool,
    agent_args: Vec<String>,
    fwd_args: Vec<String>,
    fwd_env: Vec<(String, String)>,
    agent_env: Vec<(String, String)>,
    old_logs: String,
}

impl Bridge {
    pub fn builder(transport: Transport) -> BridgeBuilder {
        BridgeBuilder {
            transport,
            reverse: false,
            agent_args: Vec::new(),
            fwd_args: Vec::new(),
            fwd_env: Vec::new(),
            agent_env: Vec::new(),
            wrong_token: false,
            start_forwarder: true,
            veth: false,
            expose_veth: false,
            forwarder: ForwarderBuild::Native,
        }
    }

    /// Unix transport, reverse off.
    pub fn unix() -> Self {
        Self::builder(Transport::Unix).start()
    }

    pub fn guest_uri(&self) -> &str {
        &self.guest_uri
    }

    /// The forwarder's `--control`: a socket path, or a pipe name for the Wine forwarder.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The forwarder binary of this bridge, without arguments.
    pub fn fwd_command(&self) -> Command {
        match self.forwarder {
            ForwarderBuild::Native => Command::new(bin("hostnet-forwarder")),
            ForwarderBuild::Wine => crate::wine::command(),
        }
    }

    /// Starts (or restarts) the agent and waits until it listens.
    pub fn start_agent(&mut self) {
        if let Some(mut old) = self.agent.take() {
            old.kill9();
            self.old_logs.push_str(&old.describe());
        }
        let mut cmd = self.ns.command(bin("hostnet-agent"));
        cmd.args(["run", "--listen", &self.agent_uri])
            .args(&self.agent_auth)
            .args(&self.agent_args)
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        log_env(&mut cmd);
        let mut p = Proc::spawn("hostnet-agent", cmd);
        let ready = wait_until(after(Duration::from_secs(10)), || {
            if !p.is_running() {
                return true;
            }
            match self.transport {
                Transport::Unix => self.dir.join("agent.sock").exists(),
                Transport::Tcp => self
                    .ns
                    .run(tcp_listeners)
                    .iter()
                    .any(|a| a.port() == AGENT_PORT),
                Transport::Quic => self
                    .ns
                    .run(udp_bound)
                    .iter()
                    .any(|a| a.port() == AGENT_PORT),
            }
        });
        if !ready || !p.is_running() {
            panic!(
                "agent not ready (listening on {}):\n{}",
                self.agent_uri,
                p.describe()
            );
        }
        self.agent = Some(p);
    }

    /// Starts (or restarts) the forwarder.
    pub fn start_forwarder(&mut self) {
        if let Some(mut old) = self.fwd.take() {
            old.kill9();
            self.old_logs.push_str(&old.describe());
        }
        let mut cmd = self.fwd_command();
        cmd.args(["run", "--guest", &self.guest_uri])
            .arg("--control")
            .arg(&self.control)
            .args(&self.fwd_auth);
        if !self.reverse {
            cmd.arg("--no-reverse");
        }
        cmd.args(&self.fwd_args);
        cmd.envs(self.fwd_env.iter().map(|(k, v)| (k, v)));
        log_env(&mut cmd);
        let name = match self.forwarder {
            ForwarderBuild::Native => "hostnet-forwarder",
            ForwarderBuild::Wine => "hostnet-forwarder.exe (wine)",
        };
        self.fwd = Some(Proc::spawn(name, cmd));
    }

    pub fn agent(&mut self) -> &mut Proc {
        self.agent.as_mut().expect("agent not started")
    }

    pub fn fwd(&mut self) -> &mut Proc {
        self.fwd.as_mut().expect("forwarder not started")
    }

    /// Both processes' stderr (and those of earlier incarnations) for a failure message.
    pub fn describe(&mut self) -> String {
        let mut s = self.old_logs.clone();
        if let Some(a) = self.agent.as_mut() {
            s.push_str(&a.describe());
            s.push('\n');
        }
        if let Some(f) = self.fwd.as_mut() {
            s.push_str(&f.describe());
        }
        s
    }

    /// Waits until the host has a TCP listener on `ip:port` (the forwarder mirrored it), without
    /// connecting to it.
    pub fn wait_tcp(&mut self, ip: IpAddr, port: u16, timeout: Duration) -> Option<Duration> {
        let a = sa(ip, port);
        crate::net::time_until(timeout, || tcp_listeners().contains(&a))
    }

    /// [`Bridge::wait_tcp`] within 5 s or panic with the logs.
    pub fn expect_tcp(&mut self, ip: IpAddr, port: u16) {
        if self.wait_tcp(ip, port, Duration::from_secs(5)).is_none() {
            panic!(
                "{} was not mirrored onto the host within 5 s; host listeners on that port: {:?}; status: {:?}\n{}",
                sa(ip, port),
                tcp_listeners()
                    .into_iter()
                    .filter(|a| a.port() == port)
                    .collect::<Vec<_>>(),
                self.status_json().map(|v| v.to_string()),
                self.describe()
            );
        }
    }

    /// Waits until the host has no TCP listener on `ip:port` left.
    pub fn wait_tcp_gone(&mut self, ip: IpAddr, port: u16, timeout: Duration) -> Option<Duration> {
        let a = sa(ip, port);
        crate::net::time_until(timeout, || !tcp_listeners().contains(&a))
    }

    /// Waits until the host has a bound UDP socket on `ip:port`.
    pub fn wait_udp(&mut self, ip: IpAddr, port: u16, timeout: Duration) -> Option<Duration> {
        let a = sa(ip, port);
        crate::net::time_until(timeout, || udp_bound().contains(&a))
    }

    /// `hostnet-forwarder status --control PATH [--json]` with this bridge's build: exit
    /// status, stdout, stderr.
    fn run_status(&self, json: bool) -> Result<(std::process::ExitStatus, String, String), String> {
        let mut cmd = self.fwd_command();
        cmd.arg("status").arg("--control").arg(&self.control);
        if json {
            cmd.arg("--json");
        }
        match self.forwarder {
            ForwarderBuild::Native => cmd
                .output()
                .map(|o| {
                    (
                        o.status,
                        String::from_utf8_lossy(&o.stdout).into_owned(),
                        String::from_utf8_lossy(&o.stderr).into_owned(),
                    )
                })
                .map_err(|e| format!("run status: {e}")),
            ForwarderBuild::Wine => crate::wine::output(cmd, WINE_STATUS_TIMEOUT)
                .map_err(|e| format!("run status under Wine: {e}")),
        }
    }

    /// `hostnet-forwarder status --control PATH --json`, parsed.
    pub fn status_json(&self) -> Result<Value, String> {
        let (status, stdout, stderr) = self.run_status(true)?;
        if !status.success() {
            return Err(format!("status exited {status}: {stderr}"));
        }
        serde_json::from_str(&stdout)
            .map_err(|e| format!("status --json is not JSON ({e}): {stdout}"))
    }

    /// `status` without `--json` (the table), for messages.
    pub fn status_text(&self) -> String {
        self.run_status(false)
            .map(|(_, out, err)| format!("{out}{err}"))
            .unwrap_or_else(|e| e)
    }

    /// The status entries (JSON objects) that concern `port`.
    pub fn status_entries(&self, port: u16) -> Vec<Value> {
        self.status_json()
            .map(|v| entries_for_port(&v, port))
            .unwrap_or_default()
    }

    /// The `state` fields of the status entries for `port` (lower case).
    pub fn states(&self, port: u16) -> Vec<String> {
        self.status_entries(port)
            .iter()
            .filter_map(find_state)
            .collect()
    }

    /// Connects from inside the namespace.
    pub fn ns_connect(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
        let s = self.ns.connect(addr, Duration::from_secs(5))?;
        crate::net::set_timeouts(&s, crate::net::IO_TIMEOUT);
        Ok(s)
    }

    /// 127.0.0.1:port on the host.
    pub fn host4(port: u16) -> SocketAddr {
        sa(LO4, port)
    }
}

fn log_env(cmd: &mut Command) {
    if let Some(l) = std::env::var_os("HOSTNET_E2E_LOG") {
        cmd.env("RUST_LOG", l);
    }
}

/// True when `v` (a status entry) mentions `port`: a number field equal to it, or a string field
/// that is an address with that port.
fn mentions_port(v: &Value, port: u16) -> bool {
    match v {
        Value::Number(n) => n.as_u64() == Some(u64::from(port)),
        Value::String(s) => s.parse::<SocketAddr>().is_ok_and(|a| a.port() == port),
        Value::Array(a) => a.iter().any(|x| mentions_port(x, port)),
        Value::Object(o) => o
            .iter()
            .any(|(k, x)| !k.contains("byte") && !k.contains("conn") && mentions_port(x, port)),
        _ => false,
    }
}

/// The innermost objects that have a `state` field and mention `port`.
pub fn entries_for_port(v: &Value, port: u16) -> Vec<Value> {
    let mut out = Vec::new();
    walk(v, &mut |o| {
        if o.get("state").is_some() && mentions_port(&Value::Object(o.clone()), port) {
            out.push(Value::Object(o.clone()));
        }
    });
    out
}

fn walk(v: &Value, f: &mut impl FnMut(&serde_json::Map<String, Value>)) {
    match v {
        Value::Object(o) => {
            f(o);
            for x in o.values() {
                walk(x, f);
            }
        }
        Value::Array(a) => {
            for x in a {
                walk(x, f);
            }
        }
        _ => {}
    }
}

/// The `state` of an entry as a lower-case string (a string, or an object's single key / `kind`).
pub fn find_state(e: &Value) -> Option<String> {
    match e.get("state")? {
        Value::String(s) => Some(s.to_lowercase()),
        Value::Object(o) => o
            .get("kind")
            .and_then(|k| k.as_str())
            .map(str::to_lowercase)
            .or_else(|| o.keys().next().map(|k| k.to_lowercase())),
        other => Some(other.to_string().to_lowercase()),
    }
}
