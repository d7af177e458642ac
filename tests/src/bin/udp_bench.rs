//! The UDP benchmark of the bridge: the direct path (veth into the namespace) and hostnet over
//! unix and over QUIC, side by side in one run (two namespaces, each with its own agent and
//! forwarder).
//!
//! Figures: 64 B and 1400 B datagrams delivered per second (one sender thread, as fast as it
//! can; the server counts what arrives), the round trip of a new flow's first datagram (a fresh
//! client port each time, to an echo server), and the memory of the forwarder and the agent per
//! idle flow (RSS before and after `--flows` client ports sent one datagram each). Medians of
//! `--trials`. Needs root; run it with `bench/udp.sh` (release build). All traffic stays on
//! loopback and the benchmark's own namespaces.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use hostnet_e2e::bridge::{Bridge, Transport};
use hostnet_e2e::measure::{Row, median, print_table, udp_first_rtt, udp_rate_sized};
use hostnet_e2e::net::{ANY4, LO4, free_port, sa};
use hostnet_e2e::process::rss_kib;

#[derive(Debug, Parser)]
#[command(about = "hostnet UDP benchmark: direct (veth) vs hostnet over unix and over QUIC")]
struct Args {
    /// Trials per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Seconds per throughput trial.
    #[arg(long, default_value_t = 1.0)]
    secs: f64,
    /// New flows per first-datagram latency trial.
    #[arg(long, default_value_t = 200)]
    firsts: usize,
    /// Client ports opened for the memory figure.
    #[arg(long, default_value_t = 4096)]
    flows: usize,
    /// Measure one path only (`direct`, `unix`, `quic`), e.g. to profile it.
    #[arg(long)]
    only: Option<String>,
}

/// One namespace with a counting sink and an echo server, reached through one bridge.
struct Side {
    bridge: Bridge,
    count: Arc<AtomicU64>,
    sink: u16,
    echo: u16,
}

fn side(transport: Transport, veth: bool) -> Result<Side> {
    let mut b = Bridge::builder(transport);
    if veth {
        b = b.veth();
    }
    let mut bridge = b.start();
    let (sink, echo) = (free_port(), free_port());
    let count = Arc::new(AtomicU64::new(0));
    {
        let s = bridge.ns.udp_socket(sa(ANY4, sink))?;
        socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20)?;
        let c = count.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while s.recv_from(&mut buf).is_ok() {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
        let e = bridge.ns.udp_socket(sa(ANY4, echo))?;
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = e.recv_from(&mut buf) {
                let _ = e.send_to(&buf[..n], from);
            }
        });
    }
    for p in [sink, echo] {
        if bridge.wait_udp(LO4, p, Duration::from_secs(10)).is_none() {
            bail!("UDP 127.0.0.1:{p} not mirrored\n{}", bridge.describe());
        }
    }
    Ok(Side {
        bridge,
        count,
        sink,
        echo,
    })
}

/// RSS (KiB) of the forwarder and the agent.
fn rss(b: &Bridge) -> (u64, u64) {
    let r = |p: &Option<hostnet_e2e::process::Proc>| {
        p.as_ref().and_then(|p| rss_kib(p.pid())).unwrap_or(0)
    };
    (r(&b.fwd), r(&b.agent))
}

/// Bytes per idle flow on each side: RSS growth after `n` client ports sent one datagram
/// each to the echo server (answered, so each flow is open on both sides).
fn per_flow(s: &Side, n: usize) -> Result<(f64, f64)> {
    let before = rss(&s.bridge);
    let to = sa(LO4, s.echo);
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let c = UdpSocket::bind(sa(LO4, 0))?;
        c.send_to(&(i as u64).to_be_bytes(), to)?;
        socks.push(c);
        if i % 256 == 255 {
            // Let the relays keep up (datagrams lost to a full buffer open no flow).
            thread::sleep(Duration::from_millis(20));
        }
    }
    let mut got = 0;
    let mut buf = [0u8; 16];
    for c in &socks {
        c.set_read_timeout(Some(Duration::from_millis(500)))?;
        if c.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    if got < n * 95 / 100 {
        bail!("only {got} of {n} new flows answered via {to}");
    }
    let after = rss(&s.bridge);
    let per = |a: u64, b: u64| (a.saturating_sub(b) * 1024) as f64 / n as f64;
    Ok((per(after.0, before.0), per(after.1, before.1)))
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the UDP benchmark needs root (network namespaces)");
    }
    hostnet_e2e::raise_nofile();
    let start = Instant::now();
    let unix = side(Transport::Unix, true)?;
    let quic = side(Transport::Quic, false)?;
    let ns_ip = unix.bridge.ns.ns_ip();
    let direct_sink = sa(ns_ip.into(), unix.sink);
    let direct_echo = sa(ns_ip.into(), unix.echo);

    let mut small = [vec![], vec![], vec![]];
    let mut large = [vec![], vec![], vec![]];
    let mut first50 = [vec![], vec![], vec![]];
    let mut first99 = [vec![], vec![], vec![]];
    for trial in 0..args.trials {
        let paths: [(SocketAddr, SocketAddr, &Arc<AtomicU64>); 3] = [
            (direct_sink, direct_echo, &unix.count),
            (sa(LO4, unix.sink), sa(LO4, unix.echo), &unix.count),
            (sa(LO4, quic.sink), sa(LO4, quic.echo), &quic.count),
        ];
        for (i, (sink, echo, count)) in paths.into_iter().enumerate() {
            if args
                .only
                .as_deref()
                .is_some_and(|o| o != ["direct", "unix", "quic"][i])
            {
                continue;
            }
            small[i].push(udp_rate_sized(sink, count, args.secs, 64)?.0);
            large[i].push(udp_rate_sized(sink, count, args.secs, 1400)?.0);
            let (p50, p99) = udp_first_rtt(echo, args.firsts)?;
            first50[i].push(p50);
            first99[i].push(p99);
        }
        eprintln!("trial {} done ({:?})", trial + 1, start.elapsed());
    }
    let (fu, au) = per_flow(&unix, args.flows)?;
    let (fq, aq) = per_flow(&quic, args.flows)?;
    let med = |v: &[Vec<f64>; 3]| -> [Option<f64>; 3] {
        std::array::from_fn(|i| (!v[i].is_empty()).then(|| median(v[i].clone())))
    };
    let rows = [
        Row {
            name: "UDP 64 B delivered".into(),
            unit: "pkt/s",
            values: med(&small),
        },
        Row {
            name: "UDP 1400 B delivered".into(),
            unit: "pkt/s",
            values: med(&large),
        },
        Row {
            name: "new flow, first datagram RTT p50".into(),
            unit: "µs",
            values: med(&first50),
        },
        Row {
            name: "new flow, first datagram RTT p99".into(),
            unit: "µs",
            values: med(&first99),
        },
        Row {
            name: "forwarder memory per idle flow".into(),
            unit: "B",
            values: [None, Some(fu), Some(fq)],
        },
        Row {
            name: "agent memory per idle flow".into(),
            unit: "B",
            values: [None, Some(au), Some(aq)],
        },
    ];
    println!(
        "hostnet UDP benchmark: {} trials (median), {} s per throughput trial, {} new flows per latency trial, {} flows for memory; {} CPUs; total {:.0} s",
        args.trials,
        args.secs,
        args.firsts,
        args.flows,
        thread::available_parallelism().map_or(0, |n| n.get()),
        start.elapsed().as_secs_f64()
    );
    print_table(
        ["direct", "unix", "quic"],
        &[("unix/direct", 1, 0), ("quic/direct", 2, 0)],
        &rows,
    );
    for (name, s) in [("unix", &unix), ("quic", &quic)] {
        let c = s.bridge.status_json().map(|v| v["counters"].clone());
        if let Ok(c) = c {
            println!(
                "{name}: datagrams dropped {}, sent on the stream (too large for a QUIC datagram) {}",
                c["udp_datagrams_dropped"], c["udp_sent_on_stream"]
            );
        }
    }
    Ok(())
}
