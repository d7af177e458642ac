//! Listener discovery against real sockets of this network namespace.
//!
//! Our own sockets are excluded by default, so most tests turn `exclude_own_process` off for the
//! sockets they open; `child_process_listener_is_reported_and_own_is_not` uses a child process to
//! prove the exclusion. Nothing here needs root, except the event-mode watcher test (perf
//! tracepoints), which fails without it unless `HOSTNET_SKIP_PRIVILEGED=1`.
//!
//! sock_diag is Linux's: on other hosts this file is empty.

#![cfg(target_os = "linux")]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hostnet_link::discovery::{
    self, Event, Listener, ListenerSet, Mode, Options, Protocol, WatchConfig, Watcher,
    ephemeral_port_range,
};
use socket2::{Domain, Socket, Type};

fn own_included() -> Options {
    Options {
        exclude_own_process: false,
        ..Options::default()
    }
}

fn inode_of(fd: &impl AsRawFd) -> u32 {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    let s = target.to_str().unwrap();
    s.strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
        .unwrap()
        .parse()
        .unwrap()
}

fn uid() -> u32 {
    // The owner of /proc/self is this process's effective uid.
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap())
}

fn find(set: &ListenerSet, proto: Protocol, port: u16) -> Vec<Listener> {
    set.by_port(proto, port).copied().collect()
}

fn by_inode(set: &ListenerSet, inode: u32) -> Option<Listener> {
    set.iter().find(|l| l.inode == inode).copied()
}

/// A UDP socket bound on `ip` at a port outside the ephemeral range (so the default UDP
/// exclusion does not hide it).
fn udp_outside_ephemeral(ip: IpAddr) -> UdpSocket {
    let range = ephemeral_port_range().unwrap();
    let mut port: u16 = 20_000 + (std::process::id() % 7000) as u16;
    for _ in 0..2000 {
        port = if port >= 29_999 { 10_000 } else { port + 1 };
        if range.contains(port) {
            continue;
        }
        if let Ok(s) = UdpSocket::bind(SocketAddr::new(ip, port)) {
            return s;
        }
    }
    panic!("no free UDP port outside the ephemeral range {range:?}");
}

#[test]
fn tcp_v4_listener_reported_with_port_addr_inode_uid() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let set = discovery::snapshot(&own_included()).unwrap();
    let found = find(&set, Protocol::Tcp, port);
    assert_eq!(
        found,
        vec![Listener {
            proto: Protocol::Tcp,
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            v6only: None,
            inode: inode_of(&l),
            uid: uid(),
            ifindex: 0,
        }],
        "in {set:?}"
    );
    // The default options leave out this process's own sockets.
    let set = discovery::snapshot(&Options::default()).unwrap();
    assert!(
        find(&set, Protocol::Tcp, port).is_empty(),
        "own socket reported: {set:?}"
    );
    let ino = inode_of(&l);
    drop(l);
    let set = discovery::snapshot(&own_included()).unwrap();
    assert!(
        by_inode(&set, ino).is_none(),
        "closed socket still reported"
    );
}

fn v6_socket(ty: Type, only_v6: bool, ip: Ipv6Addr) -> Socket {
    let s = Socket::new(Domain::IPV6, ty, None).unwrap();
    s.set_only_v6(only_v6).unwrap();
    s.bind(&SocketAddr::new(IpAddr::V6(ip), 0).into()).unwrap();
    s
}

#[test]
fn tcp_and_udp_v6_report_v6only() {
    let only = v6_socket(Type::STREAM, true, Ipv6Addr::LOCALHOST);
    only.listen(16).unwrap();
    let dual = v6_socket(Type::STREAM, false, Ipv6Addr::UNSPECIFIED);
    dual.listen(16).unwrap();
    let udp_only = v6_socket(Type::DGRAM, true, Ipv6Addr::UNSPECIFIED);
    let udp_dual = v6_socket(Type::DGRAM, false, Ipv6Addr::UNSPECIFIED);
    let opts = Options {
        exclude_udp_ephemeral: false,
        ..own_included()
    };
    let set = discovery::snapshot(&opts).unwrap();
    let check = |s: &Socket, proto: Protocol, addr: Ipv6Addr, v6only: bool| {
        let port = s.local_addr().unwrap().as_socket().unwrap().port();
        let l =
            by_inode(&set, inode_of(s)).unwrap_or_else(|| panic!("{proto} {port} not in {set:?}"));
        assert_eq!(l.proto, proto);
        assert_eq!(l.port, port);
        assert_eq!(l.addr, IpAddr::V6(addr));
        assert_eq!(l.v6only, Some(v6only), "{l}");
        assert_eq!(l.accepts_ipv4(), !v6only && addr.is_unspecified());
    };
    check(&only, Protocol::Tcp, Ipv6Addr::LOCALHOST, true);
    check(&dual, Protocol::Tcp, Ipv6Addr::UNSPECIFIED, false);
    check(&udp_only, Protocol::Udp, Ipv6Addr::UNSPECIFIED, true);
    check(&udp_dual, Protocol::Udp, Ipv6Addr::UNSPECIFIED, false);
}

#[test]
fn udp_bound_reported_connected_not() {
    let bound = udp_outside_ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let connected = udp_outside_ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
    connected.connect(bound.local_addr().unwrap()).unwrap();
    let set = discovery::snapshot(&own_included()).unwrap();
    let l = by_inode(&set, inode_of(&bound)).unwrap_or_else(|| panic!("bound UDP not in {set:?}"));
    assert_eq!(l.proto, Protocol::Udp);
    assert_eq!(l.port, bound.local_addr().unwrap().port());
    assert_eq!(l.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(l.v6only, None);
    assert!(
        by_inode(&set, inode_of(&connected)).is_none(),
        "connected UDP reported: {set:?}"
    );
}

#[test]
fn udp_in_ephemeral_range_excluded_by_default() {
    let range = ephemeral_port_range().unwrap();
    // Port 0 makes the kernel pick from the ephemeral range.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    assert!(range.contains(port), "{port} not in {range:?}");
    let set = discovery::snapshot(&own_included()).unwrap();
    assert!(
        find(&set, Protocol::Udp, port).is_empty(),
        "ephemeral UDP reported"
    );
    let set = discovery::snapshot(&Options {
        exclude_udp_ephemeral: false,
        ..own_included()
    })
    .unwrap();
    assert_eq!(
        by_inode(&set, inode_of(&s)).map(|l| l.port),
        Some(port),
        "ephemeral UDP not reported with the exclusion off"
    );
    // TCP listeners on ephemeral ports are not excluded.
    let t = TcpListener::bind("127.0.0.1:0").unwrap();
    let set = discovery::snapshot(&own_included()).unwrap();
    assert!(by_inode(&set, inode_of(&t)).is_some());
}

#[test]
fn established_tcp_not_reported() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (a, _) = l.accept().unwrap();
    let set = discovery::snapshot(&own_included()).unwrap();
    assert!(by_inode(&set, inode_of(&l)).is_some());
    assert!(by_inode(&set, inode_of(&c)).is_none(), "client reported");
    assert!(by_inode(&set, inode_of(&a)).is_none(), "accepted reported");
    assert_eq!(
        find(&set, Protocol::Tcp, l.local_addr().unwrap().port()).len(),
        1
    );
}

#[test]
fn caller_exclusion_set() {
    let t = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = t.local_addr().unwrap().port();
    let u = udp_outside_ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let uport = u.local_addr().unwrap().port();
    let opts = Options {
        exclude_ports: BTreeSet::from([(Protocol::Tcp, port), (Protocol::Udp, uport)]),
        ..own_included()
    };
    let set = discovery::snapshot(&opts).unwrap();
    assert!(find(&set, Protocol::Tcp, port).is_empty());
    assert!(find(&set, Protocol::Udp, uport).is_empty());
    // The pair names a protocol: excluding UDP P leaves TCP P alone.
    let opts = Options {
        exclude_ports: BTreeSet::from([(Protocol::Udp, port), (Protocol::Tcp, uport)]),
        ..own_included()
    };
    let set = discovery::snapshot(&opts).unwrap();
    assert_eq!(find(&set, Protocol::Tcp, port).len(), 1);
    assert_eq!(find(&set, Protocol::Udp, uport).len(), 1);
}

/// A child process that listens on TCP 127.0.0.1:0 and prints the port; killed on drop.
struct PyListener {
    child: Child,
    port: u16,
}

impl PyListener {
    fn spawn() -> Self {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(
                "import socket,sys\n\
                 s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(8)\n\
                 print(s.getsockname()[1], flush=True)\n\
                 sys.stdin.read()\n",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is needed for this test");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad port line {line:?}"));
        Self { child, port }
    }

    /// Closes the child's stdin; it exits and its listener goes away.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        self.child.wait().unwrap();
    }
}

impl Drop for PyListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn child_process_listener_is_reported_and_own_is_not() {
    let own = TcpListener::bind("127.0.0.1:0").unwrap();
    let child = PyListener::spawn();
    let set = discovery::snapshot(&Options::default()).unwrap();
    let found = find(&set, Protocol::Tcp, child.port);
    assert_eq!(found.len(), 1, "child listener not in {set:?}");
    assert_eq!(found[0].addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert!(
        by_inode(&set, inode_of(&own)).is_none(),
        "own listener reported"
    );
    let ino = found[0].inode;
    child.finish();
    let set = discovery::snapshot(&Options::default()).unwrap();
    assert!(
        by_inode(&set, ino).is_none(),
        "exited child's listener still reported"
    );
}

async fn next_event(rx: &mut tokio::sync::mpsc::Receiver<Event>, deadline: Instant) -> Event {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, rx.recv())
        .await
        .expect("no event before the deadline")
        .expect("watcher ended")
}

/// Waits (bounded) until `pred` holds of the set the events describe.
async fn wait_for(
    rx: &mut tokio::sync::mpsc::Receiver<Event>,
    set: &mut ListenerSet,
    what: &str,
    pred: impl Fn(&ListenerSet) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !pred(set) {
        match next_event(rx, deadline).await {
            Event::Snapshot(s) => *set = s,
            Event::Changed(d) => {
                assert!(!d.is_empty());
                set.apply(&d);
            }
        }
        assert!(
            Instant::now() < deadline || pred(set),
            "timed out waiting for {what}"
        );
    }
}

#[tokio::test]
async fn watcher_reports_new_listener_then_removal() {
    let (handle, mut rx) = Watcher::spawn(own_included(), discovery::DEFAULT_INTERVAL).unwrap();
    let mut set = match next_event(&mut rx, Instant::now() + Duration::from_secs(2)).await {
        Event::Snapshot(s) => s,
        other => panic!("first event is not a snapshot: {other:?}"),
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ino = inode_of(&l);
    wait_for(&mut rx, &mut set, "the new listener", |s| {
        by_inode(s, ino).is_some()
    })
    .await;
    drop(l);
    wait_for(&mut rx, &mut set, "the removal", |s| {
        by_inode(s, ino).is_none()
    })
    .await;

    // The same through a child process, with default options (own sockets excluded).
    drop(handle);
    let (handle, mut rx) = Watcher::spawn(Options::default(), discovery::DEFAULT_INTERVAL).unwrap();
    let mut set = ListenerSet::new();
    wait_for(&mut rx, &mut set, "the snapshot", |_| true).await;
    let own = TcpListener::bind("127.0.0.1:0").unwrap();
    let child = PyListener::spawn();
    let port = child.port;
    wait_for(&mut rx, &mut set, "the child's listener", |s| {
        !find(s, Protocol::Tcp, port).is_empty()
    })
    .await;
    assert!(
        by_inode(&set, inode_of(&own)).is_none(),
        "own listener reported"
    );

    // Excluding the port at run time reports it removed; lifting the exclusion adds it back.
    handle.set_excluded_ports(BTreeSet::from([(Protocol::Tcp, port)]));
    wait_for(&mut rx, &mut set, "the exclusion", |s| {
        find(s, Protocol::Tcp, port).is_empty()
    })
    .await;
    handle.set_excluded_ports(BTreeSet::new());
    wait_for(&mut rx, &mut set, "the lifted exclusion", |s| {
        !find(s, Protocol::Tcp, port).is_empty()
    })
    .await;

    child.finish();
    wait_for(&mut rx, &mut set, "the child's removal", |s| {
        find(s, Protocol::Tcp, port).is_empty()
    })
    .await;
    let stats = handle.stats();
    assert!(stats.polls > 0 && stats.events >= 2, "{stats:?}");
    assert_eq!(stats.errors, 0);
    assert_eq!(stats.malformed, 0);
    handle.stop();
}

/// A watcher that can only see a change through kernel events within a test's deadline: its
/// periodic dump is an hour away.
fn events_only(force_poll: bool) -> WatchConfig {
    WatchConfig {
        force_poll,
        poll_interval: Duration::from_secs(3600),
        safety_interval: Duration::from_secs(3600),
    }
}

async fn first_snapshot(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> ListenerSet {
    match next_event(rx, Instant::now() + Duration::from_secs(2)).await {
        Event::Snapshot(s) => s,
        other => panic!("first event is not a snapshot: {other:?}"),
    }
}

/// Event mode (root: perf tracepoints): a new TCP listener, a new UDP socket, and their closing
/// are all reported although the watcher's own dump interval is an hour.
#[tokio::test]
async fn event_mode_reports_tcp_and_udp_listeners_without_polling() {
    let (handle, mut rx) = Watcher::spawn_with(own_included(), events_only(false)).unwrap();
    if handle.mode() != Mode::Events {
        let skip = std::env::var("HOSTNET_SKIP_PRIVILEGED").is_ok_and(|v| v == "1");
        assert!(
            skip,
            "the watcher fell back to polling (see the info log line; needs root, perf and \
             tracefs); HOSTNET_SKIP_PRIVILEGED=1 skips this test"
        );
        eprintln!("note: event mode unavailable; skipped (HOSTNET_SKIP_PRIVILEGED=1)");
        return;
    }
    let mut set = first_snapshot(&mut rx).await;
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_ino = inode_of(&tcp);
    wait_for(&mut rx, &mut set, "the TCP listener", |s| {
        by_inode(s, tcp_ino).is_some()
    })
    .await;
    let udp = udp_outside_ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let udp_ino = inode_of(&udp);
    wait_for(&mut rx, &mut set, "the UDP socket", |s| {
        by_inode(s, udp_ino).is_some()
    })
    .await;
    drop(tcp);
    wait_for(&mut rx, &mut set, "the TCP listener's removal", |s| {
        by_inode(s, tcp_ino).is_none()
    })
    .await;
    drop(udp);
    wait_for(&mut rx, &mut set, "the UDP socket's removal", |s| {
        by_inode(s, udp_ino).is_none()
    })
    .await;
    let stats = handle.stats();
    assert_eq!(stats.mode, Mode::Events);
    assert!(stats.kernel_events >= 4, "{stats:?}");
    handle.stop();
}

/// Forced polling (what an unprivileged process gets): additions come with the poll, removals
/// at once through the sock_diag destroy announcements, which need no privilege.
#[tokio::test]
async fn poll_mode_when_forced_polls_and_sees_removals_at_once() {
    let config = WatchConfig {
        force_poll: true,
        poll_interval: Duration::from_millis(20),
        ..WatchConfig::default()
    };
    let (handle, mut rx) = Watcher::spawn_with(own_included(), config).unwrap();
    assert_eq!(handle.mode(), Mode::Poll);
    let mut set = first_snapshot(&mut rx).await;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ino = inode_of(&l);
    wait_for(&mut rx, &mut set, "the new listener", |s| {
        by_inode(s, ino).is_some()
    })
    .await;
    assert_eq!(handle.stats().mode, Mode::Poll);
    drop(handle);

    // Removals without a poll: listeners present at the start, then closed.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = udp_outside_ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let (tcp_ino, udp_ino) = (inode_of(&tcp), inode_of(&udp));
    let (handle, mut rx) = Watcher::spawn_with(own_included(), events_only(true)).unwrap();
    assert_eq!(handle.mode(), Mode::Poll);
    let mut set = first_snapshot(&mut rx).await;
    assert!(by_inode(&set, tcp_ino).is_some() && by_inode(&set, udp_ino).is_some());
    drop(tcp);
    wait_for(&mut rx, &mut set, "the TCP listener's removal", |s| {
        by_inode(s, tcp_ino).is_none()
    })
    .await;
    drop(udp);
    wait_for(&mut rx, &mut set, "the UDP socket's removal", |s| {
        by_inode(s, udp_ino).is_none()
    })
    .await;
    // Seen through the destroy announcements (the periodic poll is an hour away); both may be
    // read in one wake-up, so at least one event.
    assert!(handle.stats().kernel_events >= 1, "{:?}", handle.stats());
    handle.stop();
}

#[tokio::test]
async fn watcher_ends_when_receiver_dropped() {
    let (handle, rx) = Watcher::spawn(Options::default(), Duration::from_millis(5)).unwrap();
    drop(rx);
    // stop() joins the thread; it must end promptly.
    let t = Instant::now();
    handle.stop();
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn wildcard_v4_listener() {
    let l = TcpListener::bind("0.0.0.0:0").unwrap();
    let set = discovery::snapshot(&own_included()).unwrap();
    let found = by_inode(&set, inode_of(&l)).unwrap();
    assert_eq!(found.addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    assert!(found.accepts_ipv4());
}

#[test]
fn many_listeners_span_several_datagrams() {
    // ~110 bytes a socket, ~32 KiB a datagram: 1,000 listeners take several datagrams.
    let ls: Vec<TcpListener> = (0..1000)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let set = discovery::snapshot(&own_included()).unwrap();
    for l in &ls {
        let got = by_inode(&set, inode_of(l)).expect("listener missing from a multi-part dump");
        assert_eq!(got.port, l.local_addr().unwrap().port());
    }
}
