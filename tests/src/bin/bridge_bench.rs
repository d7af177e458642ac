//! The bridge benchmark: one namespace, three paths to the same servers inside it, side by side
//! in one run.
//!
//! * direct  — host client → the namespace's veth address (the kernel path, the physical limit);
//! * hostnet — host client → forwarder on 127.0.0.1:P → link (`--transport`: a unix socket by
//!   default, or tcp / QUIC over the veth pair) → agent → 127.0.0.1:P inside;
//! * socat   — host client → `socat TCP-LISTEN` on 127.0.0.1:Q → unix socket →
//!   `socat UNIX-LISTEN` inside → TCP 127.0.0.1:P.
//!
//! Figures: TCP bulk (1 and 4 streams), 64-byte request/response latency, connection rate
//! (connect, 1 byte each way, close), UDP 64-byte packets/s delivered (direct and hostnet),
//! discovery latency (bind inside → connectable on the host, and close → refused). Each figure is
//! the median of `--trials` trials, the paths interleaved within a trial. Needs root; run it with
//! `bench/bridge.sh` (release build). All traffic stays on loopback and the benchmark's own
//! namespace.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hostnet_e2e::TempDir;
use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::measure::{
    Row, bulk, conn_rate, cpu_secs, echo_nodelay, median, pct, print_table, rr, sink_handler,
    udp_rate, wait_until_fast,
};
use hostnet_e2e::net::{ANY4, LO4, TcpServer, free_port, refused, sa};
use hostnet_e2e::netns::Netns;
use hostnet_e2e::socat::{self, SocatChain};

#[derive(Debug, Parser)]
#[command(about = "hostnet bridge benchmark: direct (veth) vs hostnet vs socat")]
struct Args {
    /// The link between forwarder and agent: unix, tcp or quic (tcp and quic over the veth).
    #[arg(long, default_value = "unix", value_parser = parse_transport)]
    transport: Transport,
    /// Worker threads of the forwarder's and the agent's runtimes (`HOSTNET_THREADS`; default:
    /// theirs).
    #[arg(long)]
    threads: Option<usize>,
    /// Trials per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Seconds per bulk / UDP trial.
    #[arg(long, default_value_t = 1.0)]
    secs: f64,
    /// Round trips per latency trial.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Connections per connection-rate trial.
    #[arg(long, default_value_t = 300)]
    conns: usize,
    /// Bind/close cycles for discovery latency.
    #[arg(long, default_value_t = 50)]
    cycles: usize,
    /// Skip the socat chain.
    #[arg(long)]
    no_socat: bool,
    /// Measure only these figures (comma-separated: bulk, rr, conn, udp, discovery); all by
    /// default. For profiling one figure.
    #[arg(long, value_delimiter = ',', value_parser = ["bulk", "rr", "conn", "udp", "discovery"])]
    only: Vec<String>,
}

impl Args {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == figure)
    }
}

fn parse_transport(s: &str) -> Result<Transport, String> {
    match s {
        "unix" => Ok(Transport::Unix),
        "tcp" => Ok(Transport::Tcp),
        "quic" => Ok(Transport::Quic),
        other => Err(format!("unknown transport {other:?} (unix, tcp or quic)")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Hostnet,
    Socat,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Hostnet => "hostnet",
            Path::Socat => "socat",
        }
    }
}

/// Where each path reaches a given guest service.
#[derive(Debug, Clone, Copy)]
struct Targets {
    direct: SocketAddr,
    hostnet: SocketAddr,
    socat: Option<SocketAddr>,
}

impl Targets {
    fn get(&self, p: Path) -> Option<SocketAddr> {
        match p {
            Path::Direct => Some(self.direct),
            Path::Hostnet => Some(self.hostnet),
            Path::Socat => self.socat,
        }
    }
}

/// Discovery: bind inside → connectable on the host; close → refused on the host. Milliseconds.
fn discovery(ns: &Netns, cycles: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut up = Vec::new();
    let mut down = Vec::new();
    // A random pause before each bind and close, so that they do not stay in phase with the
    // agent's polling (each cycle otherwise starts right after a poll and measures its worst case).
    let mut jitter = hostnet_e2e::payload::Prng::new(u64::from(std::process::id()));
    let mut pause = || thread::sleep(Duration::from_micros(jitter.next_u64() % 60_000));
    for _ in 0..cycles {
        let port = free_port();
        let host = sa(LO4, port);
        pause();
        let l = ns.tcp_listener(sa(LO4, port))?;
        let t0 = Instant::now();
        if !wait_until_fast(t0 + Duration::from_secs(3), || {
            TcpStream::connect_timeout(&host, Duration::from_millis(200)).is_ok()
        }) {
            bail!("{host} not connectable 3 s after binding it in the namespace");
        }
        up.push(t0.elapsed().as_secs_f64() * 1e3);
        pause();
        drop(l);
        let t1 = Instant::now();
        if !wait_until_fast(t1 + Duration::from_secs(3), || refused(host)) {
            bail!("{host} still connectable 3 s after closing it in the namespace");
        }
        down.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    Ok((up, down))
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bridge benchmark needs root (network namespaces)");
    }
    let use_socat = !args.no_socat && socat::available();
    if !args.no_socat && !use_socat {
        bail!("socat is not installed (bench/bridge.sh installs it; or pass --no-socat)");
    }
    let bench_start = Instant::now();
    hostnet_e2e::raise_nofile();

    let mut builder = Bridge::builder(args.transport).veth();
    if let Some(n) = args.threads {
        builder = builder
            .fwd_env("HOSTNET_THREADS", n.to_string())
            .agent_env("HOSTNET_THREADS", n.to_string());
    }
    let mut bridge = builder.start();
    let ns_ip = bridge.ns.ns_ip();
    let (ps, pe, pu) = (free_port(), free_port(), free_port());
    let _sink = TcpServer::serve(bridge.ns.tcp_listener(sa(ANY4, ps))?, sink_handler);
    let _echo = TcpServer::serve(bridge.ns.tcp_listener(sa(ANY4, pe))?, echo_nodelay);
    let udp_count = Arc::new(AtomicU64::new(0));
    {
        let sock = bridge.ns.udp_socket(sa(ANY4, pu))?;
        socket2::SockRef::from(&sock).set_recv_buffer_size(4 << 20)?;
        let c = udp_count.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while sock.recv_from(&mut buf).is_ok() {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    for p in [ps, pe] {
        if bridge.wait_tcp(LO4, p, Duration::from_secs(10)).is_none() {
            bail!(
                "hostnet did not mirror 127.0.0.1:{p} within 10 s\n{}",
                bridge.describe()
            );
        }
    }
    if bridge.wait_udp(LO4, pu, Duration::from_secs(10)).is_none() {
        bail!(
            "hostnet did not mirror UDP 127.0.0.1:{pu}\n{}",
            bridge.describe()
        );
    }
    let dir = TempDir::new("bench")?;
    let (qs, qe) = (free_port(), free_port());
    let chains = use_socat.then(|| {
        (
            SocatChain::start(&bridge.ns, &dir.join("sink.sock"), qs, ps),
            SocatChain::start(&bridge.ns, &dir.join("echo.sock"), qe, pe),
        )
    });
    let sink = Targets {
        direct: sa(ns_ip.into(), ps),
        hostnet: sa(LO4, ps),
        socat: chains.as_ref().map(|_| sa(LO4, qs)),
    };
    let echo = Targets {
        direct: sa(ns_ip.into(), pe),
        hostnet: sa(LO4, pe),
        socat: chains.as_ref().map(|_| sa(LO4, qe)),
    };
    let udp = Targets {
        direct: sa(ns_ip.into(), pu),
        hostnet: sa(LO4, pu),
        socat: None,
    };
    let paths: Vec<Path> = [Path::Direct, Path::Hostnet, Path::Socat]
        .into_iter()
        .filter(|p| *p != Path::Socat || use_socat)
        .collect();

    // Samples per figure and path.
    let mut bulk1 = [vec![], vec![], vec![]];
    let mut bulk4 = [vec![], vec![], vec![]];
    let mut rr50 = [vec![], vec![], vec![]];
    let mut rr99 = [vec![], vec![], vec![]];
    let mut cps = [vec![], vec![], vec![]];
    let mut pps = [vec![], vec![], vec![]];
    let mut sent_pps = [vec![], vec![], vec![]];
    // Relay CPU (ms) per GB moved in the 1-stream bulk trials: forwarder + agent, socat x2.
    let mut cpu_gb = [vec![], vec![], vec![]];
    let relay_pids: [Vec<i32>; 3] = [
        vec![],
        [bridge.agent.as_ref(), bridge.fwd.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| p.pid().as_raw())
            .collect(),
        chains
            .as_ref()
            .map(|(a, _)| vec![a.host.pid().as_raw(), a.guest.pid().as_raw()])
            .unwrap_or_default(),
    ];
    for trial in 0..args.trials {
        for (i, p) in [Path::Direct, Path::Hostnet, Path::Socat]
            .iter()
            .enumerate()
        {
            if !paths.contains(p) {
                continue;
            }
            let what = |m: &str| format!("{m} via {} (trial {trial})", p.name());
            let s = sink.get(*p).unwrap();
            let e = echo.get(*p).unwrap();
            if args.wants("bulk") {
                let c0 = cpu_secs(&relay_pids[i]);
                let t0 = Instant::now();
                let g = bulk(s, 1, args.secs).with_context(|| what("bulk 1"))?;
                let gb = g * t0.elapsed().as_secs_f64() / 8.0;
                if !relay_pids[i].is_empty() {
                    // socat copies in a child per connection, counted in the parent (cutime)
                    // only once reaped: give the children time to exit and be reaped.
                    thread::sleep(Duration::from_millis(300));
                    cpu_gb[i].push((cpu_secs(&relay_pids[i]) - c0) * 1e3 / gb);
                }
                bulk1[i].push(g);
                bulk4[i].push(bulk(s, 4, args.secs).with_context(|| what("bulk 4"))?);
            }
            if args.wants("rr") {
                let (a, b) = rr(e, args.round_trips).with_context(|| what("rr"))?;
                rr50[i].push(a);
                rr99[i].push(b);
            }
            if args.wants("conn") {
                cps[i].push(conn_rate(e, args.conns).with_context(|| what("connection rate"))?);
            }
            if let Some(u) = udp.get(*p).filter(|_| args.wants("udp")) {
                let (got, sent) =
                    udp_rate(u, &udp_count, args.secs).with_context(|| what("udp"))?;
                pps[i].push(got);
                sent_pps[i].push(sent);
            }
        }
        eprintln!("trial {} done ({:?})", trial + 1, bench_start.elapsed());
    }
    let (mut up, mut down) = if args.wants("discovery") {
        discovery(&bridge.ns, args.cycles)?
    } else {
        (vec![], vec![])
    };

    let med = |v: &[Vec<f64>; 3]| -> [Option<f64>; 3] {
        std::array::from_fn(|i| (!v[i].is_empty()).then(|| median(v[i].clone())))
    };
    let only_hostnet = |x: f64| [None, Some(x), None];
    let mut rows = vec![
        Row {
            name: "TCP bulk, 1 stream".into(),
            unit: "Gbit/s",
            values: med(&bulk1),
        },
        Row {
            name: "relay CPU per GB, bulk 1 stream".into(),
            unit: "ms",
            values: med(&cpu_gb),
        },
        Row {
            name: "TCP bulk, 4 streams".into(),
            unit: "Gbit/s",
            values: med(&bulk4),
        },
        Row {
            name: "RR 64 B p50".into(),
            unit: "µs",
            values: med(&rr50),
        },
        Row {
            name: "RR 64 B p99".into(),
            unit: "µs",
            values: med(&rr99),
        },
        Row {
            name: "connections (1 B each way)".into(),
            unit: "conn/s",
            values: med(&cps),
        },
        Row {
            name: "UDP 64 B delivered".into(),
            unit: "pkt/s",
            values: med(&pps),
        },
        Row {
            name: "UDP 64 B offered".into(),
            unit: "pkt/s",
            values: med(&sent_pps),
        },
        Row {
            name: format!("discovery appear p50 ({} cycles)", up.len()),
            unit: "ms",
            values: only_hostnet(pct(&mut up, 50.0)),
        },
        Row {
            name: "discovery appear p99".into(),
            unit: "ms",
            values: only_hostnet(pct(&mut up, 99.0)),
        },
        Row {
            name: "discovery gone p50".into(),
            unit: "ms",
            values: only_hostnet(pct(&mut down, 50.0)),
        },
        Row {
            name: "discovery gone p99".into(),
            unit: "ms",
            values: only_hostnet(pct(&mut down, 99.0)),
        },
    ];

    // Figures not measured (`--only`) are left out.
    rows.retain(|r| r.values.iter().any(|v| v.is_some_and(|x| !x.is_nan())));
    println!(
        "hostnet bridge benchmark: {:?} transport, {} runtime threads; {} trials (median), {} s per bulk/UDP trial, {} round trips, {} connections, {} discovery cycles; {} CPUs; total {:.0} s",
        args.transport,
        args.threads
            .map_or("default".to_string(), |n| n.to_string()),
        args.trials,
        args.secs,
        args.round_trips,
        args.conns,
        args.cycles,
        thread::available_parallelism().map_or(0, |n| n.get()),
        bench_start.elapsed().as_secs_f64()
    );
    print_table(
        ["direct", "hostnet", "socat"],
        &[("hostnet/direct", 1, 0), ("hostnet/socat", 1, 2)],
        &rows,
    );
    if let [Some(d), Some(h), _] = med(&rr50) {
        println!("latency overhead hostnet - direct, p50: {:.1} µs", h - d);
    }
    drop(chains);
    Ok(())
}
