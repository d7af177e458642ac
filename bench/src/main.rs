//! `hostnet-bench`: a side-by-side benchmark of `hostnet-proxy` and Docker's
//! `docker-proxy`, with the direct kernel path (no proxy) as the baseline.
//!
//! # What it measures
//!
//! Everything runs on loopback (127.0.0.1) in one run. For each path —
//! `direct`, `hostnet-proxy`, `docker-proxy` — the same in-process backend
//! servers are used (see [`servers`]): a TCP sink, a TCP echo server and a UDP
//! sink. Each proxy is started exactly as dockerd starts docker-proxy
//! (`-proto … -host-ip 127.0.0.1 -host-port N -container-ip 127.0.0.1
//! -container-port M`, with a pipe on fd 3 that carries `0\n` once the proxy
//! is ready; see [`spawn`]). The figures (see [`scenarios`]):
//!
//! * `bulk1`, `bulk4`: TCP throughput with 1 and 4 connections, each writing
//!   256 KiB buffers as fast as possible for D seconds; Gbit/s counted by
//!   the sink.
//! * `rr`: request/response latency on one TCP_NODELAY connection, 64 bytes
//!   out and 64 back, for D seconds or 20,000 round trips; p50 and p99 over
//!   all samples, and their overhead over the direct path.
//! * `connrate`: two client threads doing connect, 1-byte echo, close, for D
//!   seconds or at most 20,000 connections; connections per second.
//! * `udp64`, `udp1400`: one socket sends datagrams (trial id + sequence
//!   number) as fast as it can for D seconds; the sink counts those of the
//!   current trial. Delivered datagrams per second and loss.
//! * `idle` (proxies only): RSS, threads and open descriptors of a proxy
//!   right after it reports ready (from /proc/PID).
//! * `conns` (proxies only): C idle connections (default 5,000) opened
//!   through a fresh proxy, each checked by a 1-byte round trip; how many
//!   were held, and the proxy's RSS, threads and descriptors while holding
//!   them. A proxy that dies on the way is reported as "died at N".
//!
//! Every scenario is repeated R times (default 5), alternating the paths
//! within each repetition, and the table shows the median. Proxies for the
//! throughput scenarios live for the whole run; `idle` and `conns` start a
//! fresh proxy per trial.
//!
//! # Running
//!
//! `bash bench/run.sh` builds the proxy and this tool in release mode and runs
//! it with the defaults (about 3 minutes on 2 cores). See `--help` for the
//! options, e.g. `--only rr,udp64 --repeats 3 --json out.json`.

mod report;
mod scenarios;
mod servers;
mod spawn;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use report::{COLUMNS, DIRECT, DOCKER, HOSTNET, Results, json_num, json_str};
use servers::Backends;
use spawn::{Proto, Proxy};

/// Side-by-side loopback benchmark: direct vs hostnet-proxy vs docker-proxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// hostnet-proxy binary [default: <workspace>/target/release/hostnet-proxy]
    #[arg(long, value_name = "PATH")]
    hostnet: Option<PathBuf>,
    /// docker-proxy binary
    #[arg(long, value_name = "PATH", default_value = "/usr/sbin/docker-proxy")]
    docker_proxy: PathBuf,
    /// Repetitions of every scenario; the median is reported
    #[arg(long, short = 'r', default_value_t = 5, value_name = "R")]
    repeats: usize,
    /// Seconds per bulk, rr, connrate and udp trial
    #[arg(long, short = 'd', default_value_t = 2.0, value_name = "SECS")]
    duration: f64,
    /// Connections held through each proxy in the `conns` scenario
    #[arg(long, default_value_t = 5000, value_name = "C")]
    idle_conns: usize,
    /// Scenarios to run (comma separated) [default: all]
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    only: Vec<Scenario>,
    /// Maximum round trips per rr trial
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    rr_max: usize,
    /// Maximum connections per connrate trial (bounds TIME_WAIT build-up)
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    connrate_max: u64,
    /// Maximum datagrams sent per udp trial
    #[arg(long, default_value_t = 5_000_000, value_name = "N")]
    udp_max: u64,
    /// Also write the medians (and all trial values) as JSON to FILE
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Let the proxies write to our stderr
    #[arg(long, short = 'v')]
    verbose: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    #[value(name = "bulk1")]
    Bulk1,
    #[value(name = "bulk4")]
    Bulk4,
    #[value(name = "rr")]
    Rr,
    #[value(name = "connrate")]
    Connrate,
    #[value(name = "udp64")]
    Udp64,
    #[value(name = "udp1400")]
    Udp1400,
    #[value(name = "idle")]
    Idle,
    #[value(name = "conns")]
    Conns,
}

impl Scenario {
    const ALL: [Scenario; 8] = [
        Scenario::Bulk1,
        Scenario::Bulk4,
        Scenario::Rr,
        Scenario::Connrate,
        Scenario::Udp64,
        Scenario::Udp1400,
        Scenario::Idle,
        Scenario::Conns,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Bulk1 => "bulk1",
            Scenario::Bulk4 => "bulk4",
            Scenario::Rr => "rr",
            Scenario::Connrate => "connrate",
            Scenario::Udp64 => "udp64",
            Scenario::Udp1400 => "udp1400",
            Scenario::Idle => "idle",
            Scenario::Conns => "conns",
        }
    }

    /// Scenarios that use the long-lived proxies (and run on the direct path).
    fn is_traffic(self) -> bool {
        !matches!(self, Scenario::Idle | Scenario::Conns)
    }
}

/// The long-lived proxies of one proxy column, one per backend.
#[derive(Debug)]
struct Proxies {
    sink: Proxy,
    echo: Proxy,
    udp: Proxy,
}

impl Proxies {
    fn spawn(bin: &Path, b: &Backends, verbose: bool) -> Result<Proxies> {
        Ok(Proxies {
            sink: Proxy::spawn(bin, Proto::Tcp, b.sink.addr, verbose)?,
            echo: Proxy::spawn(bin, Proto::Tcp, b.echo.addr, verbose)?,
            udp: Proxy::spawn(bin, Proto::Udp, b.udp.addr, verbose)?,
        })
    }

    /// Restarts any proxy that has exited (a crash must not void the rest of the run).
    fn respawn_dead(&mut self, bin: &Path, b: &Backends, verbose: bool) -> Result<()> {
        for (p, proto, backend, what) in [
            (&mut self.sink, Proto::Tcp, b.sink.addr, "tcp sink"),
            (&mut self.echo, Proto::Tcp, b.echo.addr, "tcp echo"),
            (&mut self.udp, Proto::Udp, b.udp.addr, "udp sink"),
        ] {
            if let Some(st) = p.exit_status() {
                eprintln!("    warning: {what} proxy exited ({st}); restarting it");
                *p = Proxy::spawn(bin, proto, backend, verbose)?;
            }
        }
        Ok(())
    }
}

/// One result column: the direct path or a proxy binary.
#[derive(Debug)]
struct Column {
    index: usize,
    /// None for the direct path.
    bin: Option<PathBuf>,
    backends: Backends,
    proxies: Option<Proxies>,
}

impl Column {
    fn name(&self) -> &'static str {
        COLUMNS[self.index]
    }

    /// (sink, echo, udp) addresses clients use on this path.
    fn addrs(&self) -> (SocketAddr, SocketAddr, SocketAddr) {
        match &self.proxies {
            Some(p) => (p.sink.addr, p.echo.addr, p.udp.addr),
            None => (
                self.backends.sink.addr,
                self.backends.echo.addr,
                self.backends.udp.addr,
            ),
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration must be a positive number of seconds");
    }
    let dur = Duration::from_secs_f64(args.duration);
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| args.only.is_empty() || args.only.contains(s))
        .collect();
    let nofile = raise_nofile_limit()?;

    let hostnet = args
        .hostnet
        .clone()
        .unwrap_or_else(spawn::default_hostnet_path);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_string());
    println!(
        "hostnet-bench: nproc={nproc} kernel={kernel} repeats={} duration={}s idle-conns={} nofile={nofile}",
        args.repeats, args.duration, args.idle_conns
    );
    println!("  hostnet-proxy: {}", hostnet.display());
    println!("  docker-proxy:  {}", args.docker_proxy.display());
    println!(
        "  scenarios: {}",
        scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(",")
    );

    let need_traffic = scenarios.iter().any(|s| s.is_traffic());
    let mut columns = vec![Column {
        index: DIRECT,
        bin: None,
        backends: Backends::start()?,
        proxies: None,
    }];
    for (index, bin) in [(HOSTNET, &hostnet), (DOCKER, &args.docker_proxy)] {
        let name = COLUMNS[index];
        if !spawn::exists(bin) {
            println!("  skipping {name}: {} not found", bin.display());
            continue;
        }
        let backends = Backends::start()?;
        // Start the long-lived proxies, or at least check that one starts.
        let started = if need_traffic {
            Proxies::spawn(bin, &backends, args.verbose).map(Some)
        } else {
            Proxy::spawn(bin, Proto::Tcp, backends.echo.addr, args.verbose).map(|_| None)
        };
        match started {
            Ok(proxies) => columns.push(Column {
                index,
                bin: Some(bin.clone()),
                backends,
                proxies,
            }),
            Err(e) => println!("  skipping {name}: it does not start: {e:#}"),
        }
    }

    let started = Instant::now();
    let mut results = Results::default();
    let mut udp_trial: u32 = 0;
    for &sc in &scenarios {
        for rep in 1..=args.repeats {
            for col in columns.iter_mut() {
                if !sc.is_traffic() && col.bin.is_none() {
                    continue;
                }
                let what = format!("{} {rep}/{} {}", sc.name(), args.repeats, col.name());
                let outcome = trial(args, sc, col, dur, &mut udp_trial, &mut results);
                match outcome {
                    Ok(summary) => eprintln!("  {what}: {summary}"),
                    Err(e) => eprintln!("  {what}: error: {e:#}"),
                }
            }
        }
    }
    eprintln!("  (trials took {:.0?})", started.elapsed());
    // Stop the long-lived proxies before printing.
    drop(columns);

    results.derive_overheads();
    results.derive_notes();
    println!();
    print!("{}", results.table());
    println!(
        "medians of {} trials; ratios are hostnet-proxy's median over the other column's",
        args.repeats
    );
    if scenarios.contains(&Scenario::Conns) {
        println!(
            "idle conns: {} opened through a fresh proxy per trial, each checked by a 1-byte round trip",
            args.idle_conns
        );
    }

    if let Some(path) = &args.json {
        let meta = vec![
            ("nproc", nproc.to_string()),
            ("kernel", json_str(&kernel)),
            ("hostnet_proxy", json_str(&hostnet.display().to_string())),
            (
                "docker_proxy",
                json_str(&args.docker_proxy.display().to_string()),
            ),
            ("repeats", args.repeats.to_string()),
            ("duration_s", json_num(args.duration)),
            ("idle_conns", args.idle_conns.to_string()),
        ];
        std::fs::write(path, results.json(&meta))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("JSON written to {}", path.display());
    }
    Ok(())
}

/// Runs one trial of `sc` on `col`, records its figures, returns a summary line.
fn trial(
    args: &Args,
    sc: Scenario,
    col: &mut Column,
    dur: Duration,
    udp_trial: &mut u32,
    results: &mut Results,
) -> Result<String> {
    let c = col.index;
    if let (Some(bin), Some(p)) = (&col.bin, &mut col.proxies) {
        p.respawn_dead(bin, &col.backends, args.verbose)?;
    }
    let (sink, echo, udp) = col.addrs();
    let b = &col.backends;
    Ok(match sc {
        Scenario::Bulk1 | Scenario::Bulk4 => {
            let (streams, key) = if sc == Scenario::Bulk1 {
                (1, "bulk1_gbps")
            } else {
                (4, "bulk4_gbps")
            };
            let gbps = scenarios::bulk(sink, &b.sink, streams, dur)?;
            results.add(key, c, gbps);
            format!("{gbps:.2} Gbit/s")
        }
        Scenario::Rr => {
            let (p50, p99) = scenarios::rr(echo, dur, args.rr_max)?;
            results.add("rr_p50_us", c, p50);
            results.add("rr_p99_us", c, p99);
            format!("p50 {p50:.1} us, p99 {p99:.1} us")
        }
        Scenario::Connrate => {
            let cps = scenarios::connrate(echo, dur, args.connrate_max)?;
            results.add("connrate_cps", c, cps);
            format!("{cps:.0} conn/s")
        }
        Scenario::Udp64 | Scenario::Udp1400 => {
            let (size, pps_key, loss_key) = if sc == Scenario::Udp64 {
                (64, "udp64_pps", "udp64_loss_pct")
            } else {
                (1400, "udp1400_pps", "udp1400_loss_pct")
            };
            *udp_trial += 1;
            let (pps, loss) = scenarios::udp(udp, &b.udp, *udp_trial, size, dur, args.udp_max)?;
            results.add(pps_key, c, pps);
            results.add(loss_key, c, loss);
            format!("{pps:.0} pkt/s delivered, {loss:.2}% lost")
        }
        Scenario::Idle => {
            let bin = col.bin.as_deref().context("idle needs a proxy")?;
            let st = scenarios::idle(bin, b.echo.addr, args.verbose)?;
            results.add("idle_rss_kib", c, st.rss_kib as f64);
            results.add("idle_threads", c, st.threads as f64);
            results.add("idle_fds", c, st.fds as f64);
            format!(
                "RSS {} KiB, {} threads, {} fds",
                st.rss_kib, st.threads, st.fds
            )
        }
        Scenario::Conns => {
            let bin = col.bin.as_deref().context("conns needs a proxy")?;
            let r = scenarios::conns(bin, b.echo.addr, args.idle_conns, args.verbose)?;
            results.add("conns_held", c, r.held as f64);
            let mut summary = if r.died {
                results.mark_died("conns_held", c);
                format!("proxy died after {} connections", r.held)
            } else {
                format!("held {}/{}", r.held, args.idle_conns)
            };
            if let Some(why) = &r.stopped {
                summary.push_str(&format!(" (stopped: {why})"));
            }
            if let Some(st) = r.stats {
                results.add("conns_rss_kib", c, st.rss_kib as f64);
                results.add("conns_threads", c, st.threads as f64);
                results.add("conns_fds", c, st.fds as f64);
                if r.held > 0 {
                    let per = (st.rss_kib as f64 - r.idle.rss_kib as f64) / r.held as f64;
                    results.add("conns_kib_per_conn", c, per);
                }
                summary.push_str(&format!(
                    ", RSS {} KiB, {} threads, {} fds",
                    st.rss_kib, st.threads, st.fds
                ));
            }
            summary
        }
    })
}

/// Raises our RLIMIT_NOFILE soft limit to the hard limit (the `conns`
/// scenario holds about two descriptors per connection); returns the new limit.
fn raise_nofile_limit() -> Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    Ok(hard)
}
