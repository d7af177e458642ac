//! The agent as a black box: its binary runs as a child process (so that its discovery, which
//! hides the agent's own sockets, sees the listeners this test process opens), listening on a
//! unix socket in a temporary directory; the test plays the forwarder with the link API.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hostnet_link::proto::channel::{self, CloseReason, Frame};
use hostnet_link::proto::{
    self, ControlMessage, DialBackId, Hello, Listener, PayloadStream, Proto, RelayStatus,
    RelayTarget, Role, Side, Snapshot, StreamHeader, StreamKind, StreamMode, caps,
};
use hostnet_link::transport::{Auth, Connector, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(5);

/// The agent binary, running until dropped; its stderr goes to a file, shown if a test fails.
struct AgentProc {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
    uri: Option<String>,
    token: Option<PathBuf>,
}

impl AgentProc {
    /// Starts `hostnet-agent run --listen unix://DIR/agent.sock ARGS` and waits for its
    /// sd_notify READY=1.
    fn start(args: &[&str]) -> Self {
        Self::start_on(None, args)
    }

    /// Like [`AgentProc::start`], listening on `listen` instead of the unix socket.
    fn start_on(listen: Option<&str>, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let notify = dir.path().join("notify.sock");
        let ready = UnixDatagram::bind(&notify).unwrap();
        ready
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let log = dir.path().join("agent.log");
        let sock = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_hostnet-agent"))
            .arg("run")
            .arg("--listen")
            .arg(listen.map_or_else(|| format!("unix://{}", sock.display()), str::to_owned))
            .args(args)
            .env("NOTIFY_SOCKET", &notify)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut me = Self {
            child,
            dir,
            log,
            uri: None,
            token: None,
        };
        let mut buf = [0u8; 256];
        let n = ready.recv(&mut buf).unwrap_or_else(|e| {
            me.dump();
            panic!("agent not ready: {e}")
        });
        assert!(
            String::from_utf8_lossy(&buf[..n]).contains("READY=1"),
            "unexpected notification"
        );
        me
    }

    fn connector(&self) -> Connector {
        let uri = self
            .uri
            .clone()
            .unwrap_or_else(|| format!("unix://{}", self.dir.path().join("agent.sock").display()));
        let auth = match &self.token {
            Some(t) => Auth::token_file(t).unwrap(),
            None => Auth::none(),
        };
        Connector::connect(uri.parse().unwrap(), auth).unwrap()
    }

    fn sock_path(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn dump(&mut self) {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        eprintln!("---- agent log ----\n{s}---- end of agent log ----");
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            self.dump();
        }
    }
}

/// A control session opened by the test, playing the forwarder.
struct Ctl {
    rx: mpsc::Receiver<ControlMessage>,
    tx: mpsc::Sender<ControlMessage>,
    hello: Hello,
    guest: proto::ListenerSet,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Ctl {
    fn drop(&mut self) {
        for t in &self._tasks {
            t.abort();
        }
    }
}

impl Ctl {
    async fn open(conn: &Connector, heartbeats: bool) -> Self {
        Self::open_with(conn, StreamMode::Framed, heartbeats).await
    }

    async fn open_with(conn: &Connector, mode: StreamMode, heartbeats: bool) -> Self {
        Self::open_caps(conn, mode, heartbeats, &[]).await
    }

    /// A session whose Hello lists `extra` capabilities besides udp, reverse and dial-back.
    async fn open_caps(
        conn: &Connector,
        mode: StreamMode,
        heartbeats: bool,
        extra: &[&str],
    ) -> Self {
        let mut s = conn.open().await.unwrap();
        proto::write_header(
            &mut s,
            &StreamHeader {
                kind: StreamKind::Control,
                mode,
            },
        )
        .await
        .unwrap();
        let (mut rd, mut wr) = tokio::io::split(PayloadStream::new(s, mode));
        let (in_tx, mut rx) = mpsc::channel(64);
        let (tx, mut out_rx) = mpsc::channel::<ControlMessage>(64);
        let reader = tokio::spawn(async move {
            while let Ok(Some(m)) = proto::read_control(&mut rd).await {
                if in_tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if proto::write_control(&mut wr, &m).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        let mut tasks = vec![reader, writer];
        tx.send(ControlMessage::Hello(Hello {
            revision: proto::CONTROL_REVISION,
            role: Role::Forwarder,
            capabilities: [caps::UDP_CHANNEL, caps::REVERSE, caps::DIAL_BACK]
                .iter()
                .chain(extra)
                .map(|c| (*c).to_owned())
                .collect(),
            auth: None,
        }))
        .await
        .unwrap();
        if heartbeats {
            let hb = tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut counter = 0;
                let mut tick = tokio::time::interval(proto::HEARTBEAT_INTERVAL);
                loop {
                    tick.tick().await;
                    counter += 1;
                    let m = ControlMessage::Heartbeat(proto::Heartbeat {
                        counter,
                        unix_millis: 0,
                    });
                    if hb.send(m).await.is_err() {
                        return;
                    }
                }
            }));
        }
        let hello = match timeout(STEP, rx.recv())
            .await
            .expect("no Hello from the agent")
        {
            Some(ControlMessage::Hello(h)) => h,
            other => panic!("expected the agent's Hello, got {other:?}"),
        };
        Self {
            rx,
            tx,
            hello,
            guest: proto::ListenerSet::awaiting_snapshot(),
            _tasks: tasks,
        }
    }

    /// The next message that is not a heartbeat; `None` when the agent closed the stream.
    async fn next(&mut self) -> Option<ControlMessage> {
        self.next_within(STEP).await
    }

    async fn next_within(&mut self, limit: Duration) -> Option<ControlMessage> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .expect("no control message in time")
            {
                Some(ControlMessage::Heartbeat(_)) => continue,
                other => return other,
            }
        }
    }

    async fn send(&self, m: ControlMessage) {
        self.tx.send(m).await.unwrap();
    }

    /// Applies guest snapshots and changes (checking their sequence) until `pred` holds.
    async fn wait_guest(&mut self, limit: Duration, pred: impl Fn(&BTreeSet<Listener>) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !(self.guest.seq().is_some() && pred(self.guest.listeners())) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Some(ControlMessage::Snapshot(s)) if s.side == Side::Guest => {
                    self.guest.replace(&s);
                }
                Some(ControlMessage::Changes(c)) if c.side == Side::Guest => {
                    self.guest.apply(&c).expect("guest changes out of sequence");
                }
                Some(other) => panic!("unexpected control message {other:?}"),
                None => panic!("agent closed the control stream"),
            }
        }
    }
}

fn tcp_listener(port: u16) -> Listener {
    Listener {
        proto: Proto::Tcp,
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        v6only: false,
    }
}

/// Opens a relay stream and reads the agent's status.
async fn open_relay(conn: &Connector, kind: StreamKind, mode: StreamMode) -> (RelayStatus, Stream) {
    let mut s = conn.open().await.unwrap();
    proto::write_header(&mut s, &StreamHeader { kind, mode })
        .await
        .unwrap();
    let status = proto::read_status(&mut s, STEP).await.unwrap();
    (status, s)
}

fn target(addr: SocketAddr) -> RelayTarget {
    RelayTarget {
        target: addr,
        client: "127.0.0.1:40000".parse().unwrap(),
    }
}

/// Deterministic pseudo-random bytes.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A channel frame, owned (as read off the datagram channel).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owned {
    Data(u32, Vec<u8>),
    Open(u32, SocketAddr, SocketAddr, Vec<u8>),
    Close(u32, CloseReason),
}

/// The test's end of a datagram channel: raw frames on a `{Datagrams, Raw}` stream.
struct Chan {
    s: Stream,
    buf: Vec<u8>,
}

impl Chan {
    async fn open(conn: &Connector) -> Self {
        let mut s = conn.open().await.unwrap();
        let header = StreamHeader {
            kind: StreamKind::Datagrams,
            mode: StreamMode::Raw,
        };
        proto::write_header(&mut s, &header).await.unwrap();
        Self { s, buf: Vec::new() }
    }

    async fn send(&mut self, f: Frame<'_>) {
        let mut b = Vec::new();
        channel::encode_frame(&f, &mut b).unwrap();
        self.s.write_all(&b).await.unwrap();
    }

    /// The next frame, or `None` when the agent closed the channel.
    async fn next(&mut self) -> Option<Owned> {
        loop {
            if let Some((f, used)) = channel::decode_frame(&self.buf).unwrap() {
                let o = match f {
                    Frame::Data { flow, payload } => Owned::Data(flow, payload.to_vec()),
                    Frame::Open {
                        flow,
                        target,
                        client,
                        payload,
                    } => Owned::Open(flow, target, client, payload.to_vec()),
                    Frame::Close { flow, reason } => Owned::Close(flow, reason),
                };
                self.buf.drain(..used);
                return Some(o);
            }
            let mut chunk = vec![0u8; 70_000];
            let n = timeout(STEP, self.s.read(&mut chunk))
                .await
                .expect("a frame within 5 s")
                .unwrap();
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const MIB: usize = 1 << 20;

/// A server that reads everything until EOF, checks it, then answers with its own megabyte
/// (so the request direction is half-closed while the answer still flows).
async fn half_close_server(l: TcpListener) {
    let (mut s, _) = l.accept().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(fnv(&got), fnv(&payload(1, MIB)), "request corrupted");
    s.write_all(&payload(2, MIB)).await.unwrap();
    s.shutdown().await.unwrap();
}

async fn tcp_round_trip(mode: StreamMode) {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let agent = AgentProc::start(&[]);
    let conn = agent.connector();
    let mut ctl = Ctl::open(&conn, true).await;
    ctl.wait_guest(STEP, |g| g.contains(&tcp_listener(addr.port())))
        .await;
    let serve = tokio::spawn(half_close_server(server));
    let (status, s) = open_relay(&conn, StreamKind::TcpRelay(target(addr)), mode).await;
    assert_eq!(status, RelayStatus::Ok);
    let (mut rd, mut wr) = tokio::io::split(PayloadStream::new(s, mode));
    let send = async {
        wr.write_all(&payload(1, MIB)).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = timeout(Duration::from_secs(30), async { tokio::join!(send, recv) })
        .await
        .expect("relay stalled");
    assert_eq!(got.len(), MIB);
    assert_eq!(fnv(&got), fnv(&payload(2, MIB)), "answer corrupted");
    timeout(STEP, serve).await.unwrap().unwrap();
}

#[tokio::test]
async fn snapshot_then_changes_follow_listeners() {
    let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p1 = first.local_addr().unwrap().port();
    let agent = AgentProc::start(&[]);
    let mut ctl = Ctl::open(&agent.connector(), true).await;
    assert_eq!(ctl.hello.role, Role::Agent);
    assert!(
        ctl.hello.has(caps::UDP_CHANNEL)
            && ctl.hello.has(caps::REVERSE)
            && ctl.hello.has(caps::DIAL_BACK)
    );
    match ctl.next().await {
        Some(ControlMessage::Snapshot(s)) => {
            assert_eq!(s.side, Side::Guest);
            assert!(s.listeners.contains(&tcp_listener(p1)), "{s:?}");
            ctl.guest.replace(&s);
        }
        other => panic!("expected the guest snapshot, got {other:?}"),
    }
    let second = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p2 = second.local_addr().unwrap().port();
    ctl.wait_guest(Duration::from_secs(2), |g| g.contains(&tcp_listener(p2)))
        .await;
    drop(second);
    ctl.wait_guest(Duration::from_secs(2), |g| !g.contains(&tcp_listener(p2)))
        .await;
    assert!(ctl.guest.listeners().contains(&tcp_listener(p1)));
    // A resync answers with a fresh snapshot continuing the sequence.
    let seq = ctl.guest.seq().unwrap();
    ctl.send(ControlMessage::Resync(proto::Resync { side: Side::Guest }))
        .await;
    loop {
        match ctl.next().await {
            Some(ControlMessage::Snapshot(s)) => {
                assert!(s.seq >= seq);
                assert!(s.listeners.contains(&tcp_listener(p1)));
                break;
            }
            Some(ControlMessage::Changes(c)) => {
                ctl.guest.apply(&c).unwrap();
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }
    drop(first);
}

#[tokio::test]
async fn tcp_relay_round_trips_with_half_close_framed() {
    tcp_round_trip(StreamMode::Framed).await;
}

#[tokio::test]
async fn tcp_relay_round_trips_with_half_close_raw() {
    tcp_round_trip(StreamMode::Raw).await;
}

#[tokio::test]
async fn tcp_relay_is_forbidden_off_policy() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let denied = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let denied_addr = denied.local_addr().unwrap();
    let unused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let deny = denied_addr.port().to_string();
    let agent = AgentProc::start(&["--deny", &deny]);
    let conn = agent.connector();
    let mut ctl = Ctl::open(&conn, true).await;
    ctl.wait_guest(STEP, |g| g.contains(&tcp_listener(addr.port())))
        .await;
    assert!(
        !ctl.guest
            .listeners()
            .iter()
            .any(|l| l.port == denied_addr.port()),
        "a denied port was reported"
    );
    let mode = StreamMode::Framed;
    for t in [
        unused,
        SocketAddr::new("10.1.2.3".parse().unwrap(), addr.port()),
        SocketAddr::new("192.0.2.1".parse().unwrap(), addr.port()),
        denied_addr,
    ] {
        let (status, _) = open_relay(&conn, StreamKind::TcpRelay(target(t)), mode).await;
        assert_eq!(status, RelayStatus::Forbidden, "target {t}");
    }
    // The allowed one still works (and an unspecified target means loopback).
    let (status, _) = open_relay(
        &conn,
        StreamKind::TcpRelay(target(SocketAddr::new(
            Ipv4Addr::UNSPECIFIED.into(),
            addr.port(),
        ))),
        mode,
    )
    .await;
    assert_eq!(status, RelayStatus::Ok);
    let _ = timeout(STEP, server.accept()).await.unwrap().unwrap();
}

/// A UDP socket on 127.0.0.1 outside the kernel's ephemeral range (which discovery ignores).
async fn udp_outside_ephemeral() -> UdpSocket {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".into());
    let first: u16 = range
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32768);
    let start = 10_000 + (std::process::id() % 5000) as u16;
    for port in (start..first).chain(1024..start) {
        if let Ok(s) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).await {
            return s;
        }
    }
    panic!("no free UDP port below the ephemeral range");
}

#[tokio::test]
async fn udp_flow_echoes() {
    let echo = udp_outside_ephemeral().await;
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = echo.recv_from(&mut buf).await.unwrap();
            echo.send_to(&buf[..n], from).await.unwrap();
        }
    });
    let agent = AgentProc::start(&[]);
    let conn = agent.connector();
    let mut ctl = Ctl::open(&conn, true).await;
    let udp = Listener {
        proto: Proto::Udp,
        ..tcp_listener(addr.port())
    };
    ctl.wait_guest(STEP, |g| g.contains(&udp)).await;
    // Not a TCP listener: a TCP relay there is forbidden.
    let (status, _) = open_relay(
        &conn,
        StreamKind::TcpRelay(target(addr)),
        StreamMode::Framed,
    )
    .await;
    assert_eq!(status, RelayStatus::Forbidden);
    let mut ch = Chan::open(&conn).await;
    let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    for i in 0..50usize {
        let d = payload(i as u64 + 10, 1 + i * 97);
        if i == 0 {
            ch.send(Frame::Open {
                flow: 1,
                target: addr,
                client,
                payload: &d,
            })
            .await;
        } else {
            ch.send(Frame::Data {
                flow: 1,
                payload: &d,
            })
            .await;
        }
        assert_eq!(ch.next().await, Some(Owned::Data(1, d)), "datagram {i}");
    }
    // A datagram near the IPv4 limit (65,507), whole, both ways.
    let big = payload(99, 65_000);
    ch.send(Frame::Data {
        flow: 1,
        payload: &big,
    })
    .await;
    assert_eq!(ch.next().await, Some(Owned::Data(1, big)));
    // A second flow of another client to the same port gets its own socket and its own replies.
    ch.send(Frame::Open {
        flow: 2,
        target: addr,
        client: "127.0.0.1:40001".parse().unwrap(),
        payload: b"two",
    })
    .await;
    assert_eq!(ch.next().await, Some(Owned::Data(2, b"two".to_vec())));
    // A port nobody listens on is forbidden, answered with CLOSE.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap();
    drop(closed);
    ch.send(Frame::Open {
        flow: 3,
        target: nobody,
        client,
        payload: b"x",
    })
    .await;
    assert_eq!(
        ch.next().await,
        Some(Owned::Close(3, CloseReason::Forbidden))
    );
    // DATA for a flow the agent does not know: CLOSE Unknown, so the opener reopens.
    ch.send(Frame::Data {
        flow: 77,
        payload: b"?",
    })
    .await;
    assert_eq!(
        ch.next().await,
        Some(Owned::Close(77, CloseReason::Unknown))
    );
    // An older forwarder's UDP flow stream is refused with a clear error.
    let (status, _) =
        open_relay(&conn, StreamKind::UdpFlow(target(addr)), StreamMode::Framed).await;
    assert!(
        matches!(&status, RelayStatus::Error(Some(m)) if m.contains("datagram channel")),
        "{status:?}"
    );
    // A malformed frame ends the channel.
    ch.s.write_all(&[0x7f, 0, 0, 0, 1]).await.unwrap();
    assert_eq!(ch.next().await, None);
}

#[tokio::test]
async fn udp_flow_ends_when_idle() {
    let echo = udp_outside_ephemeral().await;
    let addr = echo.local_addr().unwrap();
    let agent = AgentProc::start(&["--udp-timeout", "1"]);
    let conn = agent.connector();
    let mut ctl = Ctl::open(&conn, true).await;
    let udp = Listener {
        proto: Proto::Udp,
        ..tcp_listener(addr.port())
    };
    ctl.wait_guest(STEP, |g| g.contains(&udp)).await;
    let mut ch = Chan::open(&conn).await;
    ch.send(Frame::Open {
        flow: 5,
        target: addr,
        client: "127.0.0.1:40000".parse().unwrap(),
        payload: b"ping",
    })
    .await;
    // No reply (nothing echoes here): the agent closes the idle flow after about a second
    // (and at most a quarter timeout later).
    assert_eq!(ch.next().await, Some(Owned::Close(5, CloseReason::Idle)));
    drop(echo);
}

#[tokio::test]
async fn reverse_listener_dials_back() {
    let agent = AgentProc::start(&[]);
    let conn = agent.connector();
    let mut ctl = Ctl::open(&conn, true).await;
    ctl.wait_guest(STEP, |_| true).await;
    // A port free in this namespace, reported as a host listener.
    let b = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    ctl.send(ControlMessage::Snapshot(Snapshot {
        side: Side::Host,
        seq: 1,
        listeners: vec![tcp_listener(b)],
    }))
    .await;
    // Poll until the agent has bound it (bounded).
    let deadline = tokio::time::Instant::now() + STEP;
    let mut client = loop {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, b)).await {
            Ok(c) => break c,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the agent never bound the reverse port {b}: {e}"),
        }
    };
    let req = loop {
        match ctl.next().await {
            Some(ControlMessage::DialBack(d)) => break d,
            Some(ControlMessage::Changes(c)) if c.side == Side::Guest => {
                ctl.guest.apply(&c).unwrap();
            }
            other => panic!("expected a dial-back request, got {other:?}"),
        }
    };
    assert_eq!(req.proto, Proto::Tcp);
    assert_eq!(req.target, SocketAddr::new(Ipv4Addr::LOCALHOST.into(), b));
    assert_eq!(req.client, client.local_addr().unwrap());
    // Answer as the forwarder would.
    let mode = StreamMode::Framed;
    let mut s = conn.open().await.unwrap();
    proto::write_header(
        &mut s,
        &StreamHeader {
            kind: StreamKind::DialBack(req.id),
            mode,
        },
    )
    .await
    .unwrap();
    proto::write_status(&mut s, &RelayStatus::Ok).await.unwrap();
    let mut link = PayloadStream::new(s, mode);
    client.write_all(b"ping from the guest").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(STEP, link.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"ping from the guest");
    link.write_all(b"pong from the host").await.unwrap();
    link.shutdown().await.unwrap();
    let mut back = Vec::new();
    timeout(STEP, client.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"pong from the host");
    // The agent does not report its own mirror.
    assert!(!ctl.guest.listeners().iter().any(|l| l.port == b));

    // A second connection whose dial-back fails is reset.
    let mut c2 = TcpStream::connect((Ipv4Addr::LOCALHOST, b)).await.unwrap();
    let req2 = loop {
        match ctl.next().await {
            Some(ControlMessage::DialBack(d)) => break d,
            Some(ControlMessage::Changes(_)) => {}
            other => panic!("expected a dial-back request, got {other:?}"),
        }
    };
    assert_ne!(req2.id, req.id);
    let mut s = conn.open().await.unwrap();
    proto::write_header(
        &mut s,
        &StreamHeader {
            kind: StreamKind::DialBack(req2.id),
            mode,
        },
    )
    .await
    .unwrap();
    proto::write_status(&mut s, &RelayStatus::Refused)
        .await
        .unwrap();
    let mut sink = Vec::new();
    let r = timeout(STEP, c2.read_to_end(&mut sink)).await.unwrap();
    assert!(r.is_err(), "expected a reset, got {r:?}");

    // The host listener goes away: so does the mirror.
    ctl.send(ControlMessage::Changes(proto::Changes {
        side: Side::Host,
        seq: 2,
        added: vec![],
        removed: vec![tcp_listener(b)],
    }))
    .await;
    let deadline = tokio::time::Instant::now() + STEP;
    while TcpStream::connect((Ipv4Addr::LOCALHOST, b)).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "mirror not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = DialBackId(0);
}

#[tokio::test]
async fn garbage_does_not_break_the_next_session() {
    let agent = AgentProc::start(&[]);
    {
        let mut junk = tokio::net::UnixStream::connect(agent.sock_path())
            .await
            .unwrap();
        junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut sink = Vec::new();
        // The agent closes it (EOF, or a reset since it left bytes unread).
        let _ = timeout(STEP, junk.read_to_end(&mut sink)).await.unwrap();
    }
    {
        // A right preface with an oversize header length.
        let mut junk = tokio::net::UnixStream::connect(agent.sock_path())
            .await
            .unwrap();
        junk.write_all(b"HNLK\x00\x01\xff\xff\xff\xff")
            .await
            .unwrap();
        let mut sink = Vec::new();
        let _ = timeout(STEP, junk.read_to_end(&mut sink)).await.unwrap();
    }
    {
        // A DialBack stream nobody asked for.
        let conn = agent.connector();
        let mut s = conn.open().await.unwrap();
        proto::write_header(
            &mut s,
            &StreamHeader {
                kind: StreamKind::DialBack(DialBackId(424242)),
                mode: StreamMode::Framed,
            },
        )
        .await
        .unwrap();
        let mut sink = Vec::new();
        let _ = timeout(STEP, s.read_to_end(&mut sink)).await.unwrap();
    }
    let mut ctl = Ctl::open(&agent.connector(), true).await;
    assert!(matches!(
        ctl.next().await,
        Some(ControlMessage::Snapshot(_))
    ));
}

#[tokio::test]
async fn a_silent_session_is_closed_after_the_heartbeat_timeout() {
    let agent = AgentProc::start(&[]);
    let mut ctl = Ctl::open(&agent.connector(), false).await;
    assert!(matches!(
        ctl.next().await,
        Some(ControlMessage::Snapshot(_))
    ));
    let started = std::time::Instant::now();
    // Other tests open and close listeners meanwhile: skip their changes.
    let deadline = started + proto::HEARTBEAT_TIMEOUT + Duration::from_secs(3);
    while let Some(m) = ctl.next_within(deadline - std::time::Instant::now()).await {
        assert!(matches!(m, ControlMessage::Changes(_)), "unexpected {m:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= proto::HEARTBEAT_TIMEOUT - Duration::from_secs(1),
        "closed too early: {waited:?}"
    );
}

#[tokio::test]
async fn a_new_control_stream_replaces_the_old_session() {
    let agent = AgentProc::start(&[]);
    let conn = agent.connector();
    let mut first = Ctl::open(&conn, true).await;
    assert!(matches!(
        first.next().await,
        Some(ControlMessage::Snapshot(_))
    ));
    let mut second = Ctl::open(&conn, true).await;
    assert!(matches!(
        second.next().await,
        Some(ControlMessage::Snapshot(_))
    ));
    // Other tests open and close listeners meanwhile: the old session may still report
    // their changes before it ends.
    loop {
        match first.next().await {
            None => break,
            Some(ControlMessage::Changes(_)) => {}
            Some(m) => panic!("the old session stays open: {m:?}"),
        }
    }
}

#[test]
fn exec_exits_with_the_child_status() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let status = Command::new(env!("CARGO_BIN_EXE_hostnet-agent"))
        .args(["run", "--lo-up", "--listen"])
        .arg(format!("unix://{}", sock.display()))
        .args(["--exec", "--", "sh", "-c", "exit 7"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7));
}

#[test]
fn bad_command_lines_are_refused() {
    for args in [
        &["run"][..],
        &["run", "--listen", "bogus://x"],
        &["run", "--listen", "unix:///tmp/x.sock", "--allow", "80-70"],
        &[
            "run",
            "--listen",
            "unix:///tmp/x.sock",
            "--max-streams",
            "0",
        ],
        &["run", "--listen", "unix:///tmp/x.sock", "--exec"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_hostnet-agent"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn ports_prints_json() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_hostnet-agent"))
        .args(["ports", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|e| e["port"] == port && e["proto"] == "tcp" && e["addr"] == "127.0.0.1"),
        "{v}"
    );
}

fn free_tcp_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Resets in both directions: a guest server's RST reaches the link as a reset, and a link
/// reset reaches the guest server as an RST; over unix (framed) and tcp (raw) transports.
async fn resets_propagate(agent: &AgentProc, mode: StreamMode) {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let conn = agent.connector();
    let mut ctl = Ctl::open(&conn, true).await;
    ctl.wait_guest(STEP, |g| g.contains(&tcp_listener(addr.port())))
        .await;

    // The guest server resets.
    let (status, s) = open_relay(&conn, StreamKind::TcpRelay(target(addr)), mode).await;
    assert_eq!(status, RelayStatus::Ok);
    let (srv, _) = timeout(STEP, server.accept()).await.unwrap().unwrap();
    let mut link = PayloadStream::new(s, mode);
    link.write_all(b"some bytes").await.unwrap();
    link.flush().await.unwrap();
    socket2::SockRef::from(&srv)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(srv);
    let mut sink = Vec::new();
    let r = timeout(STEP, link.read_to_end(&mut sink)).await.unwrap();
    assert!(r.is_err(), "the link saw {r:?}, not a reset");

    // The link resets.
    let (status, s) = open_relay(&conn, StreamKind::TcpRelay(target(addr)), mode).await;
    assert_eq!(status, RelayStatus::Ok);
    let (mut srv, _) = timeout(STEP, server.accept()).await.unwrap().unwrap();
    let mut link = PayloadStream::new(s, mode);
    link.write_all(b"hello").await.unwrap();
    link.flush().await.unwrap();
    let mut five = [0u8; 5];
    timeout(STEP, srv.read_exact(&mut five))
        .await
        .unwrap()
        .unwrap();
    match link {
        PayloadStream::Framed(mut f) => f.reset().await.unwrap(),
        PayloadStream::Raw(s) => s.reset(),
    }
    let mut sink = Vec::new();
    let r = timeout(STEP, srv.read_to_end(&mut sink)).await.unwrap();
    assert_eq!(
        r.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn resets_propagate_framed_over_unix() {
    let agent = AgentProc::start(&[]);
    resets_propagate(&agent, StreamMode::Framed).await;
}

#[tokio::test]
async fn resets_propagate_raw_over_tcp_with_a_token() {
    let port = free_tcp_port("127.0.0.1");
    let uri = format!("tcp://127.0.0.1:{port}");
    let token_dir = tempfile::tempdir().unwrap();
    let token = token_dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let mut agent = AgentProc::start_on(Some(&uri), &["--token-file", token.to_str().unwrap()]);
    agent.uri = Some(uri.clone());
    agent.token = Some(token.clone());
    // The forwarder runs framed on tcp:// (a killed peer's FIN must not pass for an END), but
    // an opener may choose raw, and the agent follows the header: both carry resets.
    assert_eq!(
        StreamMode::for_transport(true, true, false),
        StreamMode::Framed
    );
    for mode in [StreamMode::Raw, StreamMode::Framed] {
        resets_propagate(&agent, mode).await;
    }
    // A wrong token gets nothing.
    let bad = token_dir.path().join("bad");
    std::fs::write(&bad, "wrong").unwrap();
    let c = Connector::connect(uri.parse().unwrap(), Auth::token_file(&bad).unwrap()).unwrap();
    assert!(c.open().await.is_err());
}

#[tokio::test]
async fn the_stream_limit_answers_an_error() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let agent = AgentProc::start(&["--max-streams", "1"]);
    let conn = agent.connector();
    let mut ctl = Ctl::open(&conn, true).await;
    ctl.wait_guest(STEP, |g| g.contains(&tcp_listener(addr.port())))
        .await;
    let mode = StreamMode::Framed;
    let (status, _held) = open_relay(&conn, StreamKind::TcpRelay(target(addr)), mode).await;
    assert_eq!(status, RelayStatus::Ok);
    let (status, _) = open_relay(&conn, StreamKind::TcpRelay(target(addr)), mode).await;
    assert_eq!(status, RelayStatus::Error(Some("too many streams".into())));
}

#[tokio::test]
async fn reverse_udp_flow_rides_the_channel() {
    let agent = AgentProc::start(&[]);
    let conn = agent.connector();
    let mut ctl = Ctl::open(&conn, true).await;
    ctl.wait_guest(STEP, |_| true).await;
    let b = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = Listener {
        proto: Proto::Udp,
        ..tcp_listener(b)
    };
    let mut ch = Chan::open(&conn).await;
    ctl.send(ControlMessage::Snapshot(Snapshot {
        side: Side::Host,
        seq: 7,
        listeners: vec![host],
    }))
    .await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect((Ipv4Addr::LOCALHOST, b)).await.unwrap();
    // Datagrams to a port not bound yet are lost: send until the agent opens a flow.
    let deadline = tokio::time::Instant::now() + STEP;
    let (flow, to, from, first) = loop {
        let _ = client.send(b"guest datagram").await;
        if let Ok(f) = timeout(Duration::from_millis(50), ch.next()).await {
            match f {
                Some(Owned::Open(flow, to, from, d)) => break (flow, to, from, d),
                other => panic!("expected OPEN, got {other:?}"),
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no flow opened");
    };
    assert_eq!(
        flow & channel::AGENT_FLOW,
        channel::AGENT_FLOW,
        "the agent's id bit"
    );
    assert_eq!(to, SocketAddr::new(Ipv4Addr::LOCALHOST.into(), b));
    assert_eq!(from, client.local_addr().unwrap());
    assert_eq!(first, b"guest datagram");
    ch.send(Frame::Data {
        flow,
        payload: b"host reply",
    })
    .await;
    let mut got = [0u8; 64];
    let n = timeout(STEP, client.recv(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got[..n], b"host reply");
}

#[tokio::test]
async fn a_reverse_port_taken_in_the_vm_is_retried_and_guest_ports_are_not_mirrored() {
    let agent = AgentProc::start(&[]);
    let conn = agent.connector();
    let mut ctl = Ctl::open(&conn, true).await;
    // A guest listener on 127.0.0.1:G: a host listener on [::1]:G must not be mirrored.
    let guest = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let g = guest.local_addr().unwrap().port();
    ctl.wait_guest(STEP, |l| l.contains(&tcp_listener(g))).await;
    // Port B is taken (bound, not listening: discovery does not report it).
    let b = free_tcp_port("127.0.0.1");
    let taken = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    taken
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, b)).into())
        .unwrap();
    let v6 = |port| Listener {
        addr: "::1".parse().unwrap(),
        v6only: true,
        ..tcp_listener(port)
    };
    let marker = free_tcp_port("::1");
    ctl.send(ControlMessage::Snapshot(Snapshot {
        side: Side::Host,
        seq: 1,
        listeners: vec![tcp_listener(b), v6(g), v6(marker)],
    }))
    .await;
    let connectable = |addr: SocketAddr| async move { TcpStream::connect(addr).await.is_ok() };
    let marker_addr: SocketAddr = format!("[::1]:{marker}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    while !connectable(marker_addr).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "marker mirror never bound"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let g6: SocketAddr = format!("[::1]:{g}").parse().unwrap();
    assert!(!connectable(g6).await, "a guest port was mirrored back");
    let b4 = SocketAddr::from((Ipv4Addr::LOCALHOST, b));
    assert!(!connectable(b4).await);
    drop(taken);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !connectable(b4).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed port was not taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // This forwarder did not list mirror-state: the agent sent no MirrorState.
    while let Ok(m) = timeout(Duration::from_millis(300), ctl.rx.recv()).await {
        assert!(
            !matches!(m, Some(ControlMessage::MirrorState(_))),
            "MirrorState sent to a forwarder that did not list {}: {m:?}",
            caps::MIRROR_STATE
        );
        if m.is_none() {
            break;
        }
    }
    drop(guest);
}

/// The next `MirrorState` (guest listener messages in between are skipped).
async fn next_mirror_state(ctl: &mut Ctl) -> proto::MirrorState {
    loop {
        match ctl.next().await {
            Some(ControlMessage::MirrorState(m)) => return m,
            Some(ControlMessage::Snapshot(_) | ControlMessage::Changes(_)) => continue,
            other => panic!("expected MirrorState, got {other:?}"),
        }
    }
}

/// With a forwarder that takes them, the agent reports its reverse mirrors' bind results:
/// conflict while the port is taken in the VM, active once it frees, closed when the host
/// listener goes; the hosts named as the forwarder named them.
#[tokio::test]
async fn reverse_mirror_states_are_reported_to_a_forwarder_that_takes_them() {
    use hostnet_link::proto::{BindState, MirrorState};
    let agent = AgentProc::start(&[]);
    let conn = agent.connector();
    let mut ctl = Ctl::open_caps(&conn, StreamMode::Framed, true, &[caps::MIRROR_STATE]).await;
    assert!(ctl.hello.has(caps::MIRROR_STATE), "{:?}", ctl.hello);
    ctl.wait_guest(STEP, |_| true).await;
    let b = free_tcp_port("127.0.0.1");
    let taken = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    taken
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, b)).into())
        .unwrap();
    ctl.send(ControlMessage::Snapshot(Snapshot {
        side: Side::Host,
        seq: 1,
        listeners: vec![tcp_listener(b)],
    }))
    .await;
    let m = next_mirror_state(&mut ctl).await;
    let want = |state, reason: Option<&str>| MirrorState {
        proto: Proto::Tcp,
        port: b,
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        hosts: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        state,
        reason: reason.map(str::to_owned),
    };
    assert_eq!(
        m,
        want(BindState::Conflict, Some("address in use in the VM"))
    );
    drop(taken);
    let m = timeout(Duration::from_secs(10), next_mirror_state(&mut ctl))
        .await
        .expect("no Active within 10 s of the port freeing");
    assert_eq!(m, want(BindState::Active, None));
    ctl.send(ControlMessage::Changes(proto::Changes {
        side: Side::Host,
        seq: 2,
        added: vec![],
        removed: vec![tcp_listener(b)],
    }))
    .await;
    assert_eq!(
        next_mirror_state(&mut ctl).await,
        want(BindState::Closed, None)
    );
}

#[test]
fn sigterm_stops_the_exec_child_and_the_agent() {
    let mut agent = AgentProc::start(&["--exec", "--", "sleep", "100"]);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The child died of SIGTERM: 128 + 15.
    assert_eq!(status.code(), Some(143));
}

#[test]
fn json_logs_are_one_object_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_hostnet-agent"))
        .args(["run", "--log-format", "json", "--listen"])
        .arg(format!("unix://{}", sock.display()))
        .args(["--exec", "--", "true"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(text.lines().count() >= 2, "{text}");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["level"].is_string(), "{line}");
    }
}

#[tokio::test]
async fn host_changes_out_of_sequence_ask_for_a_resync() {
    let agent = AgentProc::start(&[]);
    let mut ctl = Ctl::open(&agent.connector(), true).await;
    ctl.wait_guest(STEP, |_| true).await;
    ctl.send(ControlMessage::Changes(proto::Changes {
        side: Side::Host,
        seq: 5,
        added: vec![tcp_listener(1)],
        removed: vec![],
    }))
    .await;
    loop {
        match ctl.next().await {
            Some(ControlMessage::Resync(r)) => {
                assert_eq!(r.side, Side::Host);
                break;
            }
            Some(ControlMessage::Changes(c)) if c.side == Side::Guest => {
                ctl.guest.apply(&c).unwrap();
            }
            other => panic!("expected Resync{{Host}}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn protocol_violations_end_the_session_with_an_error() {
    let agent = AgentProc::start(&[]);
    let conn = agent.connector();
    // A second Hello.
    let mut ctl = Ctl::open(&conn, true).await;
    ctl.wait_guest(STEP, |_| true).await;
    ctl.send(ControlMessage::Hello(ctl.hello.clone())).await;
    let mut saw_error = false;
    while let Some(m) = ctl.next().await {
        match m {
            ControlMessage::Error(e) => {
                assert_eq!(e.code, proto::ErrorCode::Protocol);
                assert!(e.fatal);
                saw_error = true;
            }
            ControlMessage::Changes(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_error);

    // A peer that claims to be an agent.
    let mut s = conn.open().await.unwrap();
    let mode = StreamMode::Framed;
    proto::write_header(
        &mut s,
        &StreamHeader {
            kind: StreamKind::Control,
            mode,
        },
    )
    .await
    .unwrap();
    let mut link = PayloadStream::new(s, mode);
    let hello = ControlMessage::Hello(Hello {
        revision: 1,
        role: Role::Agent,
        capabilities: vec![],
        auth: None,
    });
    proto::write_control(&mut link, &hello).await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(m)) = timeout(STEP, proto::read_control(&mut link)).await.unwrap() {
        got.push(m);
    }
    assert!(
        matches!(got.first(), Some(ControlMessage::Hello(_))),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|m| matches!(m, ControlMessage::Error(e) if e.fatal)),
        "{got:?}"
    );
    assert!(!got.iter().any(|m| matches!(m, ControlMessage::Snapshot(_))));
}
