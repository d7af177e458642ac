//! A fake agent written with the link API, an echo server, port helpers, polling with deadlines.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostnet_link::proto::channel::CloseReason;
use hostnet_link::proto::{
    self, ControlMessage, DialBackId, Heartbeat, Hello, Listener, PayloadStream, Proto,
    RelayStatus, Role, Side, Snapshot, StreamKind, caps,
};
use hostnet_link::transport::{Auth, Listener as LinkListener, Stream};
use hostnet_link::udp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Polls `f` until it returns `Some`, or panics after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port free on both 127.0.0.1 and [::1] right now.
pub fn free_port() -> u16 {
    loop {
        let a = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if StdTcpListener::bind(("::1", p)).is_ok() {
            return p;
        }
    }
}

/// A port free for UDP on both 127.0.0.1 and [::1] right now.
pub fn free_udp_port() -> u16 {
    loop {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("::1", p)).is_ok() {
            return p;
        }
    }
}

/// Whether nothing listens on `addr` (a bind succeeds).
pub fn bindable(addr: SocketAddr) -> bool {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    s.set_reuse_address(true).unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(true).unwrap();
    }
    s.bind(&addr.into()).and_then(|()| s.listen(1)).is_ok()
}

/// Whether a connection to `addr` is accepted and relayed: an echo of one byte comes back.
pub async fn echoes(addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
    else {
        return false;
    };
    if s.write_all(b"?").await.is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await,
        Ok(Ok(_))
    ) && b == *b"?"
}

/// A TCP echo server: echoes until EOF, then half-closes.
pub async fn echo_server(addr: &str) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let a = l.local_addr().unwrap();
    let t = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (a, t)
}

/// A guest listener.
pub fn guest(addr: &str, port: u16) -> Listener {
    let addr: IpAddr = addr.parse().unwrap();
    Listener {
        proto: Proto::Tcp,
        addr,
        port,
        v6only: false,
    }
}

/// What the fake agent does with a relay to a guest port.
#[derive(Debug, Clone, Copy)]
pub enum Route {
    /// Connect to this address.
    To(SocketAddr),
    /// Answer this status.
    Refuse,
    /// UDP: accept the flow and echo every datagram.
    UdpEcho,
}

/// Shared state of the fake agent.
#[derive(Debug, Default)]
pub struct AgentState {
    pub listeners: Vec<Listener>,
    pub routes: HashMap<u16, Route>,
    pub seq: u64,
    pub udp_clients: Vec<SocketAddr>,
}

/// A fake agent on a unix socket.
#[derive(Debug)]
pub struct FakeAgent {
    pub path: PathBuf,
    pub state: Arc<Mutex<AgentState>>,
    /// Messages to send on the current control stream.
    pub ctl_tx: mpsc::UnboundedSender<ControlMessage>,
    /// Messages received from the forwarder.
    pub received: mpsc::UnboundedReceiver<ControlMessage>,
    /// DialBack streams received (after the header).
    pub dial_backs: mpsc::UnboundedReceiver<(DialBackId, proto::StreamMode, Stream)>,
    /// Whether heartbeats are sent and messages read (false: a frozen agent).
    pub alive: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAgent {
    /// Starts the agent on `path` with `listeners` and `routes`.
    pub async fn start(path: &Path, listeners: Vec<Listener>, routes: Vec<(u16, Route)>) -> Self {
        let state = Arc::new(Mutex::new(AgentState {
            listeners,
            routes: routes.into_iter().collect(),
            seq: 1,
            udp_clients: Vec::new(),
        }));
        let mut listener = LinkListener::bind(
            format!("unix://{}", path.display()).parse().unwrap(),
            Auth::none(),
        )
        .unwrap();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (rec_tx, received) = mpsc::unbounded_channel();
        let (db_tx, dial_backs) = mpsc::unbounded_channel();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let st = state.clone();
        let al = alive.clone();
        let task = tokio::spawn(async move {
            let ctl_rx = Arc::new(tokio::sync::Mutex::new(ctl_rx));
            let mut tasks = tokio::task::JoinSet::new();
            loop {
                let Ok(mut s) = listener.accept().await else {
                    return;
                };
                let (st, rec_tx, db_tx, ctl_rx, al) = (
                    st.clone(),
                    rec_tx.clone(),
                    db_tx.clone(),
                    ctl_rx.clone(),
                    al.clone(),
                );
                tasks.spawn(async move {
                    let Ok(h) = proto::read_header(&mut s, proto::HEADER_TIMEOUT).await else {
                        return;
                    };
                    match h.kind {
                        StreamKind::Control => {
                            control(s, h.mode, st, rec_tx, ctl_rx, al).await;
                        }
                        StreamKind::TcpRelay(t) => {
                            let route = st.lock().unwrap().routes.get(&t.target.port()).copied();
                            let upstream = match route {
                                Some(Route::To(a)) => TcpStream::connect(a).await.ok(),
                                _ => None,
                            };
                            let Some(mut up) = upstream else {
                                let _ = proto::write_status(&mut s, &RelayStatus::Refused).await;
                                return;
                            };
                            proto::write_status(&mut s, &RelayStatus::Ok).await.unwrap();
                            let mut link = PayloadStream::new(s, h.mode);
                            if tokio::io::copy_bidirectional(&mut up, &mut link)
                                .await
                                .is_err()
                            {
                                let _ = link.reset_framed().await;
                            }
                        }
                        StreamKind::Datagrams => {
                            // The real channel, with a dialer that sends UdpEcho routes to an
                            // echo socket of the fake agent's own.
                            let echo = udp_echo().await;
                            let dialer = Arc::new(FakeDialer { st, echo });
                            let config = udp::Config {
                                side: udp::Side::Agent,
                                max_flows: 4096,
                                idle: Duration::from_secs(120),
                                queue_bytes: udp::DEFAULT_QUEUE_BYTES,
                            };
                            let ch = udp::Channel::start(s, config, dialer, Default::default());
                            ch.closed().await;
                        }
                        StreamKind::UdpFlow(_) => {
                            let _ = proto::write_status(&mut s, &RelayStatus::Forbidden).await;
                        }
                        StreamKind::DialBack(id) => {
                            let _ = db_tx.send((id, h.mode, s));
                        }
                    }
                });
            }
        });
        FakeAgent {
            path: path.to_owned(),
            state,
            ctl_tx,
            received,
            dial_backs,
            alive,
            task,
        }
    }

    /// Sends a control message on the current control stream.
    pub fn send(&self, m: ControlMessage) {
        self.ctl_tx.send(m).unwrap();
    }

    /// The next message from the forwarder other than a heartbeat.
    pub async fn next_message(&mut self) -> ControlMessage {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), self.received.recv())
                .await
                .expect("a control message within 5 s")
                .expect("agent running");
            if !matches!(m, ControlMessage::Heartbeat(_)) {
                return m;
            }
        }
    }
}

async fn control(
    s: Stream,
    mode: proto::StreamMode,
    st: Arc<Mutex<AgentState>>,
    rec_tx: mpsc::UnboundedSender<ControlMessage>,
    ctl_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ControlMessage>>>,
    alive: Arc<std::sync::atomic::AtomicBool>,
) {
    let (mut rd, mut wr) = tokio::io::split(PayloadStream::new(s, mode));
    match proto::read_control(&mut rd).await {
        Ok(Some(ControlMessage::Hello(h))) => assert_eq!(h.role, Role::Forwarder),
        other => panic!("expected Hello, got {other:?}"),
    }
    let hello = ControlMessage::Hello(Hello {
        revision: proto::CONTROL_REVISION,
        role: Role::Agent,
        capabilities: vec![
            caps::UDP_CHANNEL.into(),
            caps::REVERSE.into(),
            caps::DIAL_BACK.into(),
        ],
        auth: None,
    });
    proto::write_control(&mut wr, &hello).await.unwrap();
    let snap = {
        let st = st.lock().unwrap();
        ControlMessage::Snapshot(Snapshot {
            side: Side::Guest,
            seq: st.seq,
            listeners: st.listeners.clone(),
        })
    };
    proto::write_control(&mut wr, &snap).await.unwrap();
    let reader = async {
        loop {
            match proto::read_control(&mut rd).await {
                Ok(Some(m)) => {
                    let _ = rec_tx.send(m);
                }
                _ => return,
            }
        }
    };
    let writer = async {
        let mut ctl = ctl_rx.lock().await;
        let mut hb = tokio::time::interval(proto::HEARTBEAT_INTERVAL);
        let mut counter = 0;
        loop {
            tokio::select! {
                m = ctl.recv() => {
                    let Some(m) = m else { return };
                    if proto::write_control(&mut wr, &m).await.is_err() { return }
                }
                _ = hb.tick() => {
                    if !alive.load(std::sync::atomic::Ordering::Relaxed) { continue }
                    counter += 1;
                    let m = ControlMessage::Heartbeat(Heartbeat { counter, unix_millis: 0 });
                    if proto::write_control(&mut wr, &m).await.is_err() { return }
                }
            }
        }
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
}

/// A forwarder against `path` with the given host listener source.
pub fn forwarder(
    path: &Path,
    host: Option<Arc<dyn hostnet_forwarder::reverse::HostListeners>>,
) -> hostnet_forwarder::Forwarder {
    forwarder_with(path, host, |_| {})
}

/// A forwarder against `path`, with `tweak` applied to its config.
pub fn forwarder_with(
    path: &Path,
    host: Option<Arc<dyn hostnet_forwarder::reverse::HostListeners>>,
    tweak: impl FnOnce(&mut hostnet_forwarder::Config),
) -> hostnet_forwarder::Forwarder {
    let mut config =
        hostnet_forwarder::Config::new(format!("unix://{}", path.display()).parse().unwrap());
    config.reverse = host.is_some();
    tweak(&mut config);
    hostnet_forwarder::Forwarder::with_host_listeners(config, Auth::none(), host).unwrap()
}

/// A deterministic pseudo-random payload.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// FNV-1a.
pub fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x100000001b3)
    })
}

/// The fake agent's end of the datagram channel: UdpEcho routes go to its echo socket.
struct FakeDialer {
    st: Arc<Mutex<AgentState>>,
    echo: SocketAddr,
}

impl udp::Dialer for FakeDialer {
    fn admit(
        &self,
        target: SocketAddr,
        client: SocketAddr,
    ) -> Result<(SocketAddr, Option<Arc<dyn udp::Tally>>), CloseReason> {
        let mut st = self.st.lock().unwrap();
        if !matches!(st.routes.get(&target.port()), Some(Route::UdpEcho)) {
            return Err(CloseReason::Forbidden);
        }
        st.udp_clients.push(client);
        Ok((self.echo, None))
    }
}

/// A UDP echo socket on 127.0.0.1 (runs until the runtime ends).
async fn udp_echo() -> SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}
