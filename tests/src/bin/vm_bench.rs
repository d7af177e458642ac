//! The real-VM figures: a QEMU guest (TCG) with the musl agent inside, the forwarder on the host
//! over hybrid vsock (see `hostnet_e2e::vm`). Run it with `bench/vm.sh` (root, after
//! `scripts/vm-setup.sh`).
//!
//! * boot to ready: QEMU started → the guest's command server answers through the hybrid
//!   socket (the agent is started by the same `/init` line before it), then forwarder started →
//!   its session with the agent is up; each the median of `--boots` boots;
//! * discovery: a guest server has bound and said so (the command server's answer) → its port
//!   is listening on the host's 127.0.0.1; and killed → the host port is gone (median of
//!   `--cycles`);
//! * throughput host→guest and guest→host, `--mib` MiB per trial (zeros, unchecked, so that
//!   the guest's CPU goes to moving bytes), through hostnet (host TCP → forwarder → hybrid vsock
//!   → agent → guest TCP) and raw (host → hybrid vsock `CONNECT` → the same guest server on a
//!   vsock port), interleaved in one boot; the median of `--trials`. A third path, "relay",
//!   puts the guest's extra hop on the raw path with the least code that can do it (`vm_guest
//!   relay`: vsock → guest TCP, a thread and a 256 KiB buffer per direction): under TCG the
//!   guest's CPU is the bottleneck, so the hop itself (vsock read, loopback TCP write and read)
//!   costs most of what hostnet loses against raw; hostnet against relay is the agent's own
//!   overhead;
//! * request/response latency, "RR 64 B" p50 and p99 (µs): one connection, 64 bytes written
//!   and the 64 echoed bytes read back, `--round-trips` times after 50 warm-up round trips (the
//!   percentiles of one trial's round trips, then the median of `--trials` trials), and the
//!   connection rate, "connections/s (1 B each way)": connect, write 1 byte, read it back,
//!   close, `--conns` times after 5 warm-up connections; both on the bulk figure's three paths,
//!   interleaved in the same boot, to one guest echo server (`vm_guest tcp-echo`, a thread per
//!   connection, read then write back): hostnet (host 127.0.0.1 → forwarder → hybrid vsock →
//!   agent → guest TCP), raw (host → hybrid vsock `CONNECT`, one per connection, → the same
//!   echo on a vsock port) and relay (raw hybrid vsock → `vm_guest relay` → guest TCP). Printed
//!   as a second table, a column per path, with the ratios hostnet/raw and hostnet/relay;
//! * idle wake-ups: context switches of every thread of the guest's agent and the host's
//!   forwarder over `--idle-secs` with nothing happening, per second;
//! * UDP 64 B and 1400 B datagrams delivered per second to a counting sink in the guest, for
//!   `--udp-secs`: through hostnet (host UDP → forwarder → the datagram channel over hybrid
//!   vsock → agent → guest UDP; lossy like UDP), raw (the same payloads as `len ‖ bytes`
//!   frames on one hybrid vsock stream, counted by the sink process directly: no UDP hop, flow
//!   controlled, lossless) and raw + a minimal relay in the guest (those frames sent on as UDP
//!   datagrams, one `send` each, to the sink: the hop every design has); the median of
//!   `--trials`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hostnet_e2e::measure::{Row, conn_rate_with, print_table, rr_on};
use hostnet_e2e::net::{LO4, free_port, sa, tcp_listeners};
use hostnet_e2e::vm::{self, Vm, median};

/// The raw vsock port of the guest's bulk server.
const RAW_PORT: u32 = 6000;
/// The vsock port of the minimal relay (`vm_guest relay`) to the bulk server's TCP port.
const RELAY_PORT: u32 = 6001;
/// The vsock port of the UDP sink's count and raw frames (`vm_guest udp-sink`).
const UDP_PORT: u32 = 6002;
/// The vsock port of the guest's echo server (`vm_guest tcp-echo --vsock`).
const ECHO_PORT: u32 = 6003;
/// The vsock port of the minimal relay to the echo server's TCP port.
const RELAY_ECHO_PORT: u32 = 6004;
/// Round trips before the measured ones (RR), connections before the measured ones.
const RR_WARMUP: usize = 50;
const CONN_WARMUP: usize = 5;
/// The bound of every connect, read and write of the RR and connection figures.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(about = "hostnet real-VM benchmark: boot, discovery, hostnet vs raw hybrid vsock")]
struct Args {
    /// Boots for the boot-to-ready figure (the last one serves the other figures).
    #[arg(long, default_value_t = 3)]
    boots: usize,
    /// Bind/kill cycles for the discovery figure.
    #[arg(long, default_value_t = 10)]
    cycles: usize,
    /// Trials per throughput figure.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// MiB per throughput trial.
    #[arg(long, default_value_t = 128)]
    mib: u64,
    /// Seconds per UDP trial.
    #[arg(long, default_value_t = 2.0)]
    udp_secs: f64,
    /// Seconds of the idle wake-up count.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Measured 64-byte round trips per RR trial (after 50 warm-up ones).
    #[arg(long, default_value_t = 1000)]
    round_trips: usize,
    /// Measured connections per connection-rate trial (after 5 warm-up ones).
    #[arg(long, default_value_t = 200)]
    conns: usize,
}

/// A stream whose reads and writes give up after [`IO_TIMEOUT`].
trait Bounded: Read + Write + Sized {
    fn bounded(self) -> Result<Self>;
}

impl Bounded for TcpStream {
    fn bounded(self) -> Result<Self> {
        self.set_nodelay(true)?;
        self.set_read_timeout(Some(IO_TIMEOUT))?;
        self.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(self)
    }
}

impl Bounded for UnixStream {
    fn bounded(self) -> Result<Self> {
        self.set_read_timeout(Some(IO_TIMEOUT))?;
        self.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(self)
    }
}

/// Starts the guest server `name` (`line`) and waits until hostnet mirrors its `port` on the
/// host's 127.0.0.1.
fn spawn_mirrored(vm: &Vm, name: &str, line: &str, port: u16) -> Result<()> {
    vm.spawn(name, line);
    if vm
        .wait_host_tcp(LO4, port, true, Duration::from_secs(20))
        .is_none()
    {
        bail!("{name} port {port} not mirrored");
    }
    Ok(())
}

/// Sums the context switches of every thread in a `/proc/PID/task/*/status` dump.
fn ctxt_sum(status: &str) -> u64 {
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// The guest agent's context switches so far (every thread).
fn guest_agent_ctxt(vm: &Vm) -> Result<u64> {
    let o = vm.run("cat /proc/$(pidof hostnet-agent)/task/*/status")?;
    if o.code != 0 {
        bail!("reading the guest agent's status: {}", o.output);
    }
    Ok(ctxt_sum(&o.output))
}

/// The host forwarder's context switches so far (every thread).
fn forwarder_ctxt(vm: &Vm) -> Result<u64> {
    let pid = vm.fwd.as_ref().context("no forwarder")?.pid();
    let mut sum = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(t?.path().join("status")).unwrap_or_default();
        sum += ctxt_sum(&status);
    }
    Ok(sum)
}

/// The UDP sink's count so far.
fn sink_count(uds: &std::path::Path) -> Result<u64> {
    let mut s = vm::hybrid_connect(uds, UDP_PORT, Duration::from_secs(10))?;
    s.write_all(b"C")?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    Ok(u64::from_le_bytes(n))
}

/// Waits until the sink's count stops growing (100 ms without change); the count.
fn settled(uds: &std::path::Path) -> Result<u64> {
    let mut last = sink_count(uds)?;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = sink_count(uds)?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
}

/// Datagrams of `size` sent through hostnet to the sink for `secs`, as fast as one sender can;
/// delivered per second.
fn udp_hostnet(uds: &std::path::Path, to: SocketAddr, size: usize, secs: f64) -> Result<f64> {
    let s = std::net::UdpSocket::bind(sa(LO4, 0))?;
    let msg = vec![7u8; size];
    let before = settled(uds)?;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..32 {
            let _ = s.send_to(&msg, to);
        }
    }
    let el = t0.elapsed().as_secs_f64();
    Ok((settled(uds)? - before) as f64 / el)
}

/// The same payloads as frames on one raw hybrid vsock stream (flow controlled, lossless);
/// frames counted per second, until the last is counted.
/// `relay`: the guest sends each frame on as a UDP datagram (lossy), else counts it.
fn udp_raw(uds: &std::path::Path, size: usize, secs: f64, relay: bool) -> Result<f64> {
    let before = settled(uds)?;
    let mut s = vm::hybrid_connect(uds, UDP_PORT, Duration::from_secs(10))?;
    s.write_all(if relay { b"U" } else { b"D" })?;
    let mut frame = (size as u16).to_be_bytes().to_vec();
    frame.resize(2 + size, 7);
    let batch = frame.repeat(32);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        s.write_all(&batch)?;
        sent += 32;
    }
    drop(s);
    if relay {
        // Lossy: what arrived once the relay has drained, per second of sending.
        let el = t0.elapsed().as_secs_f64();
        return Ok((settled(uds)? - before) as f64 / el);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink_count(uds)? - before < sent {
        if Instant::now() > deadline {
            bail!(
                "the sink counted {} of {sent} raw frames",
                sink_count(uds)? - before
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(sent as f64 / t0.elapsed().as_secs_f64())
}

fn head(mode: u8, len: u64) -> Vec<u8> {
    let mut h = vec![mode];
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    h
}

/// Sends `len` zero bytes to a sink; seconds from the first byte to the sink's count.
fn push(mut s: impl Read + Write, len: u64) -> Result<f64> {
    s.write_all(&head(b'S', len))?;
    let buf = vec![0u8; 256 * 1024];
    let t0 = Instant::now();
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    let mut reply = [0u8; 9];
    s.read_exact(&mut reply).context("sink reply")?;
    let secs = t0.elapsed().as_secs_f64();
    let count = u64::from_le_bytes(reply[..8].try_into().expect("8 bytes"));
    if count != len || reply[8] != 1 {
        bail!("sink counted {count} of {len} bytes (ok={})", reply[8]);
    }
    Ok(secs)
}

/// Reads `len` bytes from a source; seconds from the request to the last byte.
fn pull(mut s: impl Read + Write, len: u64) -> Result<f64> {
    let t0 = Instant::now();
    s.write_all(&head(b'R', len))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < len {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("source ended after {got} of {len} bytes");
        }
        got += n as u64;
    }
    Ok(t0.elapsed().as_secs_f64())
}

fn mbs(len: u64, secs: f64) -> f64 {
    len as f64 / secs / 1e6
}

fn main() -> Result<()> {
    let args = Args::parse();
    let Some(tools) = vm::prerequisites("vm_bench") else {
        return Ok(());
    };
    vm::cached_initramfs(&tools)?;

    // Boot to ready.
    let mut boots = Vec::new();
    let mut sessions = Vec::new();
    let mut vm = None;
    for i in 0..args.boots.max(1) {
        drop(vm.take());
        let mut v = Vm::boot(&tools)?;
        let up = v.start_forwarder();
        eprintln!(
            "boot {i}: command server after {:.2?}, forwarder session after {up:.2?}",
            v.boot_time
        );
        boots.push(v.boot_time.as_secs_f64());
        sessions.push(up.as_secs_f64());
        vm = Some(v);
    }
    let vm = vm.expect("booted");

    // Discovery.
    let mut add = Vec::new();
    let mut remove = Vec::new();
    let mut rtt = Vec::new();
    for i in 0..args.cycles {
        let p = free_port();
        let a: SocketAddr = sa(LO4, p);
        let t0 = Instant::now();
        vm.spawn("disc", &format!("vm_guest tcp-echo 0.0.0.0:{p}"));
        let t1 = Instant::now();
        rtt.push((t1 - t0).as_secs_f64() * 1e3);
        let Some(d) = vm.wait_host_tcp(LO4, p, true, Duration::from_secs(20)) else {
            bail!("cycle {i}: {a} not mirrored within 20 s");
        };
        add.push(d.as_secs_f64() * 1e3);
        let t2 = Instant::now();
        vm.kill("disc");
        let Some(_) = vm.wait_host_tcp(LO4, p, false, Duration::from_secs(20)) else {
            bail!("cycle {i}: {a} still mirrored 20 s after the kill");
        };
        remove.push(t2.elapsed().as_secs_f64() * 1e3);
        debug_assert!(!tcp_listeners().contains(&a));
    }

    // Idle wake-ups (nothing mirrored changes, no traffic; the guest's command server answers
    // the two reads, which the agent does not see).
    std::thread::sleep(Duration::from_secs(3));
    let (g0, f0) = (guest_agent_ctxt(&vm)?, forwarder_ctxt(&vm)?);
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let (g1, f1) = (guest_agent_ctxt(&vm)?, forwarder_ctxt(&vm)?);
    let per_s = |a: u64, b: u64| (b - a) as f64 / args.idle_secs as f64;
    let (idle_agent, idle_fwd) = (per_s(g0, g1), per_s(f0, f1));
    eprintln!("idle: guest agent {idle_agent:.2} wake-ups/s, forwarder {idle_fwd:.2} wake-ups/s");

    // Throughput.
    let p = free_port();
    spawn_mirrored(
        &vm,
        "bulk",
        &format!("vm_guest bulk 0.0.0.0:{p} --vsock {RAW_PORT}"),
        p,
    )?;
    vm.spawn(
        "relay",
        &format!("vm_guest relay {RELAY_PORT} 127.0.0.1:{p}"),
    );
    let len = args.mib << 20;
    let hostnet = || -> Result<TcpStream> {
        let s = TcpStream::connect(sa(LO4, p))?;
        s.set_nodelay(true)?;
        Ok(s)
    };
    let raw = || vm::hybrid_connect(&vm.uds(), RAW_PORT, Duration::from_secs(10));
    let relay = || vm::hybrid_connect(&vm.uds(), RELAY_PORT, Duration::from_secs(10));
    let (mut h2g_hn, mut h2g_raw, mut h2g_rl) = (Vec::new(), Vec::new(), Vec::new());
    let (mut g2h_hn, mut g2h_raw, mut g2h_rl) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..args.trials {
        h2g_raw.push(mbs(len, push(raw()?, len).context("raw push")?));
        h2g_rl.push(mbs(len, push(relay()?, len).context("relay push")?));
        h2g_hn.push(mbs(len, push(hostnet()?, len).context("hostnet push")?));
        g2h_raw.push(mbs(len, pull(raw()?, len).context("raw pull")?));
        g2h_rl.push(mbs(len, pull(relay()?, len).context("relay pull")?));
        g2h_hn.push(mbs(len, pull(hostnet()?, len).context("hostnet pull")?));
        eprintln!(
            "trial {t}: host->guest raw {:.1} relay {:.1} hostnet {:.1}; guest->host raw {:.1} relay {:.1} hostnet {:.1} MB/s",
            h2g_raw[t], h2g_rl[t], h2g_hn[t], g2h_raw[t], g2h_rl[t], g2h_hn[t]
        );
    }

    // Request/response latency and connection rate, to one echo server (TCP for hostnet and
    // the relay, vsock for raw).
    let pe = free_port();
    spawn_mirrored(
        &vm,
        "echo",
        &format!("vm_guest tcp-echo 0.0.0.0:{pe} --vsock {ECHO_PORT}"),
        pe,
    )?;
    vm.spawn(
        "relay-echo",
        &format!("vm_guest relay {RELAY_ECHO_PORT} 127.0.0.1:{pe}"),
    );
    let uds = vm.uds();
    let echo_hn = || TcpStream::connect_timeout(&sa(LO4, pe), IO_TIMEOUT)?.bounded();
    let echo_raw = || vm::hybrid_connect(&uds, ECHO_PORT, IO_TIMEOUT)?.bounded();
    let echo_rl = || vm::hybrid_connect(&uds, RELAY_ECHO_PORT, IO_TIMEOUT)?.bounded();
    // [raw, relay, hostnet] per figure.
    let mut rr50: [Vec<f64>; 3] = Default::default();
    let mut rr99: [Vec<f64>; 3] = Default::default();
    let mut cps: [Vec<f64>; 3] = Default::default();
    let n = args.round_trips.max(1);
    let rr_start = Instant::now();
    for t in 0..args.trials {
        let trips = [
            rr_on(echo_raw()?, RR_WARMUP, n).context("raw RR")?,
            rr_on(echo_rl()?, RR_WARMUP, n).context("relay RR")?,
            rr_on(echo_hn()?, RR_WARMUP, n).context("hostnet RR")?,
        ];
        let rates = [
            conn_rate_with(echo_raw, CONN_WARMUP, args.conns).context("raw connections")?,
            conn_rate_with(echo_rl, CONN_WARMUP, args.conns).context("relay connections")?,
            conn_rate_with(echo_hn, CONN_WARMUP, args.conns).context("hostnet connections")?,
        ];
        for i in 0..3 {
            rr50[i].push(trips[i].0);
            rr99[i].push(trips[i].1);
            cps[i].push(rates[i]);
        }
        eprintln!(
            "trial {t}: RR 64 B p50/p99 raw {:.0}/{:.0} relay {:.0}/{:.0} hostnet {:.0}/{:.0} µs; connections raw {:.1} relay {:.1} hostnet {:.1} per s",
            trips[0].0,
            trips[0].1,
            trips[1].0,
            trips[1].1,
            trips[2].0,
            trips[2].1,
            rates[0],
            rates[1],
            rates[2]
        );
    }
    eprintln!("RR and connections: {:.1?}", rr_start.elapsed());
    let med3 = |v: &mut [Vec<f64>; 3]| -> [Option<f64>; 3] {
        std::array::from_fn(|i| (!v[i].is_empty()).then(|| median(&mut v[i])))
    };
    let rr_rows = [
        Row {
            name: "RR 64 B p50".into(),
            unit: "µs",
            values: med3(&mut rr50),
        },
        Row {
            name: "RR 64 B p99".into(),
            unit: "µs",
            values: med3(&mut rr99),
        },
        Row {
            name: "connections/s (1 B each way)".into(),
            unit: "conn/s",
            values: med3(&mut cps),
        },
    ];

    // UDP.
    let pu = free_port();
    vm.spawn(
        "udpsink",
        &format!("vm_guest udp-sink 0.0.0.0:{pu} {UDP_PORT}"),
    );
    let ua = sa(LO4, pu);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hostnet_e2e::net::udp_bound().contains(&ua) {
        if Instant::now() > deadline {
            bail!("UDP {ua} not mirrored");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut udp_rows = Vec::new();
    for size in [64usize, 1400] {
        let (mut hn, mut rw, mut rl) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..args.trials {
            rw.push(udp_raw(&vm.uds(), size, args.udp_secs, false).context("raw UDP frames")?);
            rl.push(udp_raw(&vm.uds(), size, args.udp_secs, true).context("UDP relay")?);
            hn.push(udp_hostnet(&vm.uds(), ua, size, args.udp_secs).context("hostnet UDP")?);
            eprintln!(
                "trial {t}: UDP {size} B raw {:.0} relay {:.0} hostnet {:.0} datagrams/s",
                rw[t], rl[t], hn[t]
            );
        }
        udp_rows.push((size, median(&mut rw), median(&mut rl), median(&mut hn)));
    }

    let (h2g_r, h2g_l, h2g_h) = (
        median(&mut h2g_raw),
        median(&mut h2g_rl),
        median(&mut h2g_hn),
    );
    let (g2h_r, g2h_l, g2h_h) = (
        median(&mut g2h_raw),
        median(&mut g2h_rl),
        median(&mut g2h_hn),
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| boot to ready: QEMU start → guest command server answers (median of {}) | {:.2} s |",
        boots.len(),
        median(&mut boots)
    );
    println!(
        "| forwarder start → session with the agent up (median of {}) | {:.0} ms |",
        sessions.len(),
        median(&mut sessions) * 1e3
    );
    println!(
        "| discovery: guest server bound → host 127.0.0.1 listening (median / max of {}) | {:.0} / {:.0} ms |",
        add.len(),
        median(&mut add),
        add.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "| removal: guest server killed → host port gone (median / max of {}) | {:.0} / {:.0} ms |",
        remove.len(),
        median(&mut remove),
        remove.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "| idle wake-ups over {} s: agent in the guest / forwarder on the host | {idle_agent:.2} / {idle_fwd:.2} per s |",
        args.idle_secs
    );
    println!(
        "| (command round trip, spawn → READY answer) | {:.0} ms |",
        median(&mut rtt)
    );
    println!(
        "| host→guest, {} MiB, raw hybrid vsock | {h2g_r:.1} MB/s |",
        args.mib
    );
    println!(
        "| host→guest, {} MiB, raw + minimal relay in the guest | {h2g_l:.1} MB/s ({:.0} % of raw) |",
        args.mib,
        h2g_l / h2g_r * 100.0
    );
    println!(
        "| host→guest, {} MiB, hostnet | {h2g_h:.1} MB/s ({:.0} % of raw, {:.0} % of relay) |",
        args.mib,
        h2g_h / h2g_r * 100.0,
        h2g_h / h2g_l * 100.0
    );
    println!(
        "| guest→host, {} MiB, raw hybrid vsock | {g2h_r:.1} MB/s |",
        args.mib
    );
    println!(
        "| guest→host, {} MiB, raw + minimal relay in the guest | {g2h_l:.1} MB/s ({:.0} % of raw) |",
        args.mib,
        g2h_l / g2h_r * 100.0
    );
    println!(
        "| guest→host, {} MiB, hostnet | {g2h_h:.1} MB/s ({:.0} % of raw, {:.0} % of relay) |",
        args.mib,
        g2h_h / g2h_r * 100.0,
        g2h_h / g2h_l * 100.0
    );
    for (size, raw, rl, hn) in udp_rows {
        println!(
            "| host→guest UDP {size} B, {} s: raw hybrid vsock frames / raw + minimal relay / hostnet, delivered | {raw:.0} / {rl:.0} / {hn:.0} per s (hostnet {:.1} % of raw, {:.0} % of relay) |",
            args.udp_secs,
            hn / raw * 100.0,
            hn / rl * 100.0
        );
    }
    println!();
    println!(
        "Request/response and connection rate ({} round trips after {RR_WARMUP} warm-up ones, {} connections after {CONN_WARMUP}; median of {} trials):",
        n, args.conns, args.trials
    );
    println!();
    print_table(
        [
            "raw hybrid vsock",
            "raw + minimal relay in the guest",
            "hostnet",
        ],
        &[("hostnet / raw", 2, 0), ("hostnet / relay", 2, 1)],
        &rr_rows,
    );
    Ok(())
}
