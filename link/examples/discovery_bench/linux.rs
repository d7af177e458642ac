//! The benchmark itself (Linux: netlink sock_diag and /proc/net); see `main.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use hostnet_link::discovery::{
    self, Diff, Discovery, Event, Listener, ListenerSet, Options, Protocol, WatchConfig, Watcher,
};
use tokio::sync::mpsc;

const CONNECTIONS: usize = 1000;
const CYCLES: usize = 200;
const IDLE_SECS: u64 = 20;

/// A small xorshift generator for the random phases (no need for a crate).
struct Rng(u64);

impl Rng {
    fn below(&mut self, d: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        Duration::from_nanos(self.0 % nanos)
    }
}

fn inode_of(fd: &impl AsRawFd) -> u32 {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("readlink");
    target
        .to_str()
        .and_then(|s| s.strip_prefix("socket:["))
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse().ok())
        .expect("socket inode")
}

// ---------------------------------------------------------------- the /proc/net/tcp baseline

/// Parses /proc/net/tcp or tcp6 lines in LISTEN (state 0A), as pasta and Lima do.
fn parse_proc_net_tcp(text: &str, v6: bool, out: &mut ListenerSet) {
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(inode), Ok(uid)) = (
            u16::from_str_radix(port, 16),
            f[9].parse::<u32>(),
            f[7].parse::<u32>(),
        ) else {
            continue;
        };
        let word = |i: usize| {
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8).unwrap_or("0"), 16)
                .unwrap_or(0)
                .to_ne_bytes()
        };
        let addr = if v6 {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i));
            }
            IpAddr::V6(Ipv6Addr::from(b))
        } else {
            IpAddr::V4(Ipv4Addr::from(word(0)))
        };
        out.insert(Listener {
            proto: Protocol::Tcp,
            addr,
            port,
            v6only: None,
            inode,
            uid,
            ifindex: 0,
        });
    }
}

fn proc_snapshot() -> ListenerSet {
    let mut set = ListenerSet::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(text) = std::fs::read_to_string(path) {
            parse_proc_net_tcp(&text, v6, &mut set);
        }
    }
    set
}

/// A /proc poller thread with the watcher's event interface; runs until the receiver is dropped.
fn spawn_proc_poller(period: Duration) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(1024);
    std::thread::spawn(move || {
        let mut old: Option<ListenerSet> = None;
        loop {
            let now = proc_snapshot();
            let ev = match &old {
                None => Some(Event::Snapshot(now.clone())),
                Some(o) => {
                    let d = discovery::diff(o, &now);
                    (!d.is_empty()).then_some(Event::Changed(d))
                }
            };
            if let Some(ev) = ev {
                if tx.blocking_send(ev).is_err() {
                    return;
                }
            }
            old = Some(now);
            std::thread::sleep(period);
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

// ---------------------------------------------------------------- latency measurement

#[derive(Default)]
struct Samples {
    appear: Vec<Duration>,
    disappear: Vec<Duration>,
}

/// Waits for the first event of a poller, its snapshot.
async fn first_snapshot(rx: &mut mpsc::Receiver<Event>) {
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(Event::Snapshot(_))) => {}
        other => panic!("no snapshot from the poller: {other:?}"),
    }
}

/// A new listener of `proto` (UDP on a port below the ephemeral range, which discovery leaves
/// out): its inode and the socket.
fn bind(proto: Protocol, rng: &mut Rng) -> (u32, OwnedFd) {
    match proto {
        Protocol::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            (inode_of(&l), l.into())
        }
        Protocol::Udp => loop {
            let port = 20_000 + (rng.below(Duration::from_nanos(10_000)).as_nanos() as u16);
            if let Ok(s) = UdpSocket::bind(("127.0.0.1", port)) {
                break (inode_of(&s), s.into());
            }
        },
    }
}

/// Runs `cycles` bind/close cycles, `per_round` listeners of `proto` at a time, each bound and
/// closed at a random phase of `period`, timing the events of `rx` that name them.
async fn measure(
    rx: &mut mpsc::Receiver<Event>,
    proto: Protocol,
    period: Duration,
    cycles: usize,
    per_round: usize,
    rng: &mut Rng,
) -> Samples {
    let mut samples = Samples::default();
    let limit = period * 3 + Duration::from_secs(2);
    while samples.appear.len() < cycles {
        let k = per_round.min(cycles - samples.appear.len());
        // Bind k listeners at random phases, collecting their appearance as events come.
        let mut offsets: Vec<Duration> = (0..k).map(|_| rng.below(period)).collect();
        offsets.sort();
        let mut pending: HashMap<u32, Instant> = HashMap::new();
        let mut listeners: HashMap<u32, OwnedFd> = HashMap::new();
        let start = Instant::now();
        let mut next = 0;
        while next < k || !pending.is_empty() {
            if next < k {
                tokio::select! {
                    _ = tokio::time::sleep_until((start + offsets[next]).into()) => {
                        let (ino, l) = bind(proto, rng);
                        pending.insert(ino, Instant::now());
                        listeners.insert(ino, l);
                        next += 1;
                    }
                    ev = rx.recv() => take(ev, &mut pending, &mut samples.appear, true),
                }
            } else {
                let ev = tokio::time::timeout(limit, rx.recv())
                    .await
                    .expect("a listener was never reported");
                take(ev, &mut pending, &mut samples.appear, true);
            }
        }
        // Close them at random phases, collecting their removal.
        let mut order: Vec<(Duration, u32)> = listeners
            .keys()
            .map(|&ino| (rng.below(period), ino))
            .collect();
        order.sort();
        let start = Instant::now();
        let mut next = 0;
        while next < order.len() || !pending.is_empty() {
            if next < order.len() {
                tokio::select! {
                    _ = tokio::time::sleep_until((start + order[next].0).into()) => {
                        let ino = order[next].1;
                        pending.insert(ino, Instant::now());
                        drop(listeners.remove(&ino));
                        next += 1;
                    }
                    ev = rx.recv() => take(ev, &mut pending, &mut samples.disappear, false),
                }
            } else {
                let ev = tokio::time::timeout(limit, rx.recv())
                    .await
                    .expect("a removal was never reported");
                take(ev, &mut pending, &mut samples.disappear, false);
            }
        }
    }
    samples
}

fn take(
    ev: Option<Event>,
    pending: &mut HashMap<u32, Instant>,
    out: &mut Vec<Duration>,
    added: bool,
) {
    let now = Instant::now();
    let Some(Event::Changed(Diff {
        added: a,
        removed: r,
    })) = ev
    else {
        return;
    };
    for l in if added { a } else { r } {
        if let Some(t) = pending.remove(&l.inode) {
            out.push(now - t);
        }
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn row(name: &str, what: &str, v: &mut [Duration]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "| {name:<28} | {what:<9} | {:>5} | {:>8.1} | {:>8.1} | {:>8.1} | {:>8.1} |",
        v.len(),
        ms(pct(v, 0.50)),
        ms(pct(v, 0.90)),
        ms(pct(v, 0.99)),
        ms(pct(v, 1.0)),
    );
}

// ---------------------------------------------------------------- idle CPU (child processes)

fn cpu_seconds() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    s(u.user_time()) + s(u.system_time())
}

/// Child mode: run one poller for `secs` seconds and print the CPU seconds it used.
fn idle_child(kind: &str, secs: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let before = cpu_seconds();
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let (_handle, mut rx) = match kind {
            "sockdiag" | "sockdiag-poll" => {
                let config = WatchConfig {
                    force_poll: kind == "sockdiag-poll",
                    ..WatchConfig::default()
                };
                let (h, rx) = Watcher::spawn_with(Options::default(), config).expect("watcher");
                (Some(h), rx)
            }
            "proc1" => (None, spawn_proc_poller(Duration::from_secs(1))),
            "proc3" => (None, spawn_proc_poller(Duration::from_secs(3))),
            other => panic!("unknown kind {other}"),
        };
        while tokio::time::timeout_at(deadline, rx.recv()).await.is_ok() {}
    });
    println!("{:.6}", cpu_seconds() - before);
}

fn per_poll_cost(secs: f64, what: &str, mut f: impl FnMut() -> usize) {
    let start = Instant::now();
    let mut n = 0;
    let mut found = 0;
    while start.elapsed().as_secs_f64() < secs {
        found = f();
        n += 1;
    }
    println!(
        "  one {what}: {:.1} us wall ({n} runs; {found} listeners seen)",
        start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );
}

pub fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("idle-child") {
        idle_child(&args[2], args[3].parse().expect("secs"));
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (cycles, idle_secs) = if quick { (20, 3) } else { (CYCLES, IDLE_SECS) };

    // 1,000 established connections on loopback, kept for the whole run.
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = server.local_addr().expect("addr");
    let mut conns = Vec::with_capacity(2 * CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let c = TcpStream::connect(addr).expect("connect");
        let (s, _) = server.accept().expect("accept");
        conns.push(c);
        conns.push(s);
    }
    println!(
        "discovery_bench: {CONNECTIONS} established TCP connections on loopback present throughout; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    println!("\ncost of one poll with this load:");
    let mut d = Discovery::new(Options::default()).expect("discovery");
    per_poll_cost(1.0, "sock_diag snapshot (tcp+udp, v4+v6: 4 dumps)", || {
        d.snapshot().expect("snapshot").len()
    });
    per_poll_cost(1.0, "/proc/net/tcp + tcp6 read and parse", || {
        proc_snapshot().len()
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let opts = Options {
        exclude_own_process: false,
        ..Options::default()
    };
    // Event mode: the phase period only spreads the binds; nothing waits for a poll.
    let spread = Duration::from_millis(50);
    let poll = discovery::DEFAULT_INTERVAL;
    let (mut ev_tcp, mut ev_udp, mut poll_tcp, mut proc1, mut proc3) = rt.block_on(async {
        let (handle, mut rx) =
            Watcher::spawn_with(opts.clone(), WatchConfig::default()).expect("watcher");
        let mode = handle.mode();
        first_snapshot(&mut rx).await;
        let ev_tcp = measure(&mut rx, Protocol::Tcp, spread, cycles, 1, &mut rng).await;
        let ev_udp = measure(&mut rx, Protocol::Udp, spread, cycles, 1, &mut rng).await;
        let stats = handle.stats();
        drop(rx);
        handle.stop();
        println!("\nsock_diag watcher ({mode} mode) stats: {stats:?}");
        let config = WatchConfig {
            force_poll: true,
            ..WatchConfig::default()
        };
        let (handle, mut rx) = Watcher::spawn_with(opts, config).expect("watcher");
        first_snapshot(&mut rx).await;
        let poll_tcp = measure(&mut rx, Protocol::Tcp, poll, cycles, 10, &mut rng).await;
        drop(rx);
        handle.stop();
        let mut rx = spawn_proc_poller(Duration::from_secs(1));
        first_snapshot(&mut rx).await;
        let proc1 = measure(
            &mut rx,
            Protocol::Tcp,
            Duration::from_secs(1),
            cycles,
            10,
            &mut rng,
        )
        .await;
        drop(rx);
        let mut rx = spawn_proc_poller(Duration::from_secs(3));
        first_snapshot(&mut rx).await;
        let proc3 = measure(
            &mut rx,
            Protocol::Tcp,
            Duration::from_secs(3),
            cycles,
            40,
            &mut rng,
        )
        .await;
        (ev_tcp, ev_udp, poll_tcp, proc1, proc3)
    });

    println!("\ndiscovery latency (ms), listeners on 127.0.0.1");
    println!(
        "| {:<28} | {:<9} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "poller", "event", "n", "p50", "p90", "p99", "max"
    );
    println!(
        "|{:-<30}|{:-<11}|{:-<7}|{:-<10}|{:-<10}|{:-<10}|{:-<10}|",
        "", "", "", "", "", "", ""
    );
    row("sock_diag, events: TCP", "appear", &mut ev_tcp.appear);
    row("sock_diag, events: TCP", "disappear", &mut ev_tcp.disappear);
    row("sock_diag, events: UDP", "appear", &mut ev_udp.appear);
    row("sock_diag, events: UDP", "disappear", &mut ev_udp.disappear);
    let name = format!("sock_diag, poll {} ms: TCP", poll.as_millis());
    row(&name, "appear", &mut poll_tcp.appear);
    row(&name, "disappear", &mut poll_tcp.disappear);
    row("/proc/net/tcp{,6} poll 1 s", "appear", &mut proc1.appear);
    row(
        "/proc/net/tcp{,6} poll 1 s",
        "disappear",
        &mut proc1.disappear,
    );
    row("/proc/net/tcp{,6} poll 3 s", "appear", &mut proc3.appear);
    row(
        "/proc/net/tcp{,6} poll 3 s",
        "disappear",
        &mut proc3.disappear,
    );

    // Idle CPU: the three pollers in parallel child processes (each measures itself).
    let exe = std::env::current_exe().expect("current_exe");
    let kinds = [
        ("sockdiag", "sock_diag, events".to_string()),
        (
            "sockdiag-poll",
            format!("sock_diag, poll {} ms", poll.as_millis()),
        ),
        ("proc1", "/proc/net/tcp{,6} poll 1 s".to_string()),
        ("proc3", "/proc/net/tcp{,6} poll 3 s".to_string()),
    ];
    let children: Vec<_> = kinds
        .iter()
        .map(|(k, _)| {
            Command::new(&exe)
                .args(["idle-child", k, &idle_secs.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    println!(
        "\nidle CPU with {CONNECTIONS} established connections ({idle_secs} s per poller, scaled to a minute)"
    );
    println!(
        "| {:<28} | {:>18} | {:>14} |",
        "poller", "CPU s per minute", "% of one core"
    );
    println!("|{:-<30}|{:-<20}|{:-<16}|", "", "", "");
    for ((_, name), child) in kinds.iter().zip(children) {
        let out = child.wait_with_output().expect("child");
        let secs: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("child output");
        let per_min = secs * 60.0 / idle_secs as f64;
        println!(
            "| {name:<28} | {per_min:>18.4} | {:>14.3} |",
            per_min / 60.0 * 100.0
        );
    }
    drop(conns);
}
