//! The Docker Desktop benchmark: dockerd inside the "VM" (a namespace, see
//! [`hostnet_e2e::desktop`]), the same container servers reached four ways, side by side in one
//! run:
//!
//! * VM, host net  — a client inside the VM → 127.0.0.1:P of a `--network host` container (the
//!   kernel path, what a process in the VM gets);
//! * bridge        — a host client → 127.0.0.1:P on the host: forwarder → unix socket → agent →
//!   the same container (what `curl localhost:P` on the Mac gets);
//! * VM, -p        — a client inside the VM → 127.0.0.1:HP published with `-p HP:PORT`:
//!   hostnet-proxy → the container over docker0;
//! * bridge + -p   — a host client → 127.0.0.1:HP on the host: forwarder → agent → hostnet-proxy
//!   → the container.
//!
//! Figures: TCP bulk (1 and 4 streams), 64-byte round trips (p50, p99), connections/s (connect, 1
//! byte each way, close), each the median of `--trials` trials with the paths interleaved; and
//! the time from `docker run -d` returning to the port answering (HTTP 200 from busybox httpd),
//! in the VM and on the host, polled every millisecond from both at once, p50/p99 over `--starts`
//! runs, for `--network host` and for `-p`. Needs root, dockerd, busybox and socat; run it with
//! `bench/desktop.sh` (release build). The host is checked unchanged at the end.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hostnet_e2e::desktop::{DesktopVm, http_get, run_d};
use hostnet_e2e::dockerd::{Dockerd, IMAGE, INDEX_HTML};
use hostnet_e2e::measure::{
    Row, bulk, conn_rate, fmt, median, pct, print_table, rr, wait_until_fast,
};
use hostnet_e2e::net::{LO4, free_port, sa, tcp_listeners};
use hostnet_e2e::netns::Netns;

#[derive(Debug, Parser)]
#[command(
    about = "Docker Desktop benchmark: dockerd in a namespace (the VM); a container reached from the VM and from the host, host network and -p"
)]
struct Args {
    /// Trials per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Seconds per bulk trial.
    #[arg(long, default_value_t = 1.0)]
    secs: f64,
    /// Round trips per latency trial.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Connections per connection-rate trial.
    #[arg(long, default_value_t = 300)]
    conns: usize,
    /// `docker run -d` → answering: runs per kind (host network, -p).
    #[arg(long, default_value_t = 20)]
    starts: usize,
}

/// The four ways to the container's servers.
const PATHS: [&str; 4] = ["VM, host net", "bridge", "VM, -p", "bridge + -p"];

/// Where a path reaches the sink and the echo, and whether its client runs inside the VM.
#[derive(Debug, Clone, Copy)]
struct Target {
    sink: SocketAddr,
    echo: SocketAddr,
    in_vm: bool,
}

/// Runs `f` on a thread inside the VM's namespace (threads it spawns stay there), or here.
fn client<T: Send>(ns: &Netns, in_vm: bool, f: impl FnOnce() -> T + Send) -> T {
    if in_vm { ns.run(f) } else { f() }
}

/// Waits until the host has a TCP listener on 127.0.0.1:`port` (mirrored by the forwarder).
fn wait_mirrored(port: u16, timeout: Duration) -> Result<()> {
    let a = sa(LO4, port);
    if !wait_until_fast(Instant::now() + timeout, || tcp_listeners().contains(&a)) {
        bail!("127.0.0.1:{port} not mirrored onto the host within {timeout:?}");
    }
    Ok(())
}

/// Milliseconds from `t0` until `GET /` on 127.0.0.1:`port` (inside the VM or on the host)
/// returns the image's page, polled every millisecond, at most 30 s.
fn answered_after(ns: &Netns, in_vm: bool, port: u16, t0: Instant) -> Result<f64> {
    let addr = sa(LO4, port);
    client(ns, in_vm, || {
        let mut last = String::new();
        if wait_until_fast(t0 + Duration::from_secs(30), || match http_get(addr) {
            Ok(body) if body == INDEX_HTML => true,
            Ok(body) => {
                last = format!("body {body:?}");
                false
            }
            Err(e) => {
                last = e;
                false
            }
        }) {
            Ok(t0.elapsed().as_secs_f64() * 1e3)
        } else {
            bail!(
                "{addr} ({}) did not answer within 30 s: {last}",
                if in_vm { "in the VM" } else { "on the host" }
            )
        }
    })
}

/// Start-up samples (ms) of one kind of container.
#[derive(Debug, Default)]
struct Starts {
    run: Vec<f64>,
    vm: Vec<f64>,
    host: Vec<f64>,
}

/// `n` times: `docker run -d` an httpd (`--network host` on a fresh port P, or `-p HP:80`), time
/// the command, then the time from its return to the page answering in the VM and on the host,
/// then `docker rm -f` and wait for the host port to go.
fn starts(d: &Dockerd, ns: &Netns, n: usize, published: bool) -> Result<Starts> {
    let mut s = Starts::default();
    for i in 0..n {
        let port = free_port();
        let ps = port.to_string();
        let name = format!("start-{}-{i}", if published { "p" } else { "host" });
        let publish = format!("{port}:80");
        let mut args = vec!["--name", &name];
        if published {
            args.extend([
                "-p", &publish, IMAGE, "httpd", "-f", "-p", "80", "-h", "/www",
            ]);
        } else {
            args.extend([
                "--network",
                "host",
                IMAGE,
                "httpd",
                "-f",
                "-p",
                &ps,
                "-h",
                "/www",
            ]);
        }
        let t = Instant::now();
        run_d(d, &args)?;
        let t0 = Instant::now();
        s.run.push((t0 - t).as_secs_f64() * 1e3);
        let (vm, host) = thread::scope(|sc| {
            let vm = sc.spawn(|| answered_after(ns, true, port, t0));
            let host = sc.spawn(|| answered_after(ns, false, port, t0));
            (vm.join(), host.join())
        });
        s.vm.push(vm.map_err(|_| anyhow::anyhow!("poller panicked"))??);
        s.host
            .push(host.map_err(|_| anyhow::anyhow!("poller panicked"))??);
        d.docker_ok(&["rm", "-f", &name])?;
        let a = sa(LO4, port);
        if !wait_until_fast(Instant::now() + Duration::from_secs(5), || {
            !tcp_listeners().contains(&a)
        }) {
            bail!("{a} still listening on the host 5 s after docker rm -f");
        }
    }
    Ok(s)
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the Desktop benchmark needs root (network namespaces, dockerd)");
    }
    let bench_start = Instant::now();
    hostnet_e2e::raise_nofile();
    // Panics with what is missing (dockerd, busybox, socat, a docker0 of another daemon).
    if !hostnet_e2e::dockerd::available("desktop_bench") {
        bail!("HOSTNET_SKIP_DOCKER=1: nothing to measure");
    }
    let vm = DesktopVm::new("bench")?;
    let d = vm.docker.start(&[])?;
    let version = d.docker_ok(&["version", "--format", "{{.Server.Version}}"])?;
    let result = measure(&args, &vm.bridge.ns, &d);
    d.stop().context("stopping dockerd")?;
    vm.finish()?;
    let (rows, start_rows) = result?;

    println!(
        "hostnet Docker Desktop benchmark: dockerd {} in a namespace (the VM), hostnet-proxy as its userland proxy, agent beside it, forwarder on the host (unix transport); {} trials (median), {} s per bulk trial, {} round trips, {} connections, {} starts per kind; {} CPUs; total {:.0} s; host unchanged afterwards",
        version.trim(),
        args.trials,
        args.secs,
        args.round_trips,
        args.conns,
        args.starts,
        thread::available_parallelism().map_or(0, |n| n.get()),
        bench_start.elapsed().as_secs_f64()
    );
    print_table(
        PATHS,
        &[("bridge/VM host", 1, 0), ("bridge + -p/VM, -p", 3, 2)],
        &rows,
    );
    println!();
    println!(
        "| {:<44} | {:>14} | {:>14} |",
        "docker run -d → answering (ms)", "--network host", "-p HP:80"
    );
    println!("|{:-<46}|{:-<16}|{:-<16}|", "", "", "");
    for (name, h, p) in &start_rows {
        println!("| {:<44} | {:>14} | {:>14} |", name, fmt(*h), fmt(*p));
    }
    Ok(())
}

type StartRow = (String, Option<f64>, Option<f64>);

/// Starts the servers, measures, and removes the containers.
fn measure(args: &Args, ns: &Netns, d: &Dockerd) -> Result<(Vec<Row<4>>, Vec<StartRow>)> {
    let t0 = Instant::now();
    // The same servers twice: on the VM's network, and in bridge mode published with -p.
    let (ps, pe, hs, he) = (free_port(), free_port(), free_port(), free_port());
    let (pss, pes) = (ps.to_string(), pe.to_string());
    run_d(
        d,
        &[
            "--network",
            "host",
            "--name",
            "servers-host",
            IMAGE,
            "desktop_servers",
            "--sink",
            &pss,
            "--echo",
            &pes,
        ],
    )?;
    let (hss, hes) = (format!("{hs}:5001"), format!("{he}:5002"));
    run_d(
        d,
        &[
            "-p",
            &hss,
            "-p",
            &hes,
            "--name",
            "servers-pub",
            IMAGE,
            "desktop_servers",
            "--sink",
            "5001",
            "--echo",
            "5002",
        ],
    )?;
    for p in [ps, pe, hs, he] {
        wait_mirrored(p, Duration::from_secs(30))?;
    }
    let targets = [
        Target {
            sink: sa(LO4, ps),
            echo: sa(LO4, pe),
            in_vm: true,
        },
        Target {
            sink: sa(LO4, ps),
            echo: sa(LO4, pe),
            in_vm: false,
        },
        Target {
            sink: sa(LO4, hs),
            echo: sa(LO4, he),
            in_vm: true,
        },
        Target {
            sink: sa(LO4, hs),
            echo: sa(LO4, he),
            in_vm: false,
        },
    ];
    // The container's servers may start a moment after the mirror: wait for an echo on each path.
    for t in &targets {
        let ok = client(ns, t.in_vm, || {
            wait_until_fast(Instant::now() + Duration::from_secs(30), || {
                conn_rate(t.echo, 1).is_ok()
            })
        });
        if !ok {
            bail!("no echo via {} within 30 s", t.echo);
        }
    }

    let mut bulk1: [Vec<f64>; 4] = Default::default();
    let mut bulk4: [Vec<f64>; 4] = Default::default();
    let mut rr50: [Vec<f64>; 4] = Default::default();
    let mut rr99: [Vec<f64>; 4] = Default::default();
    let mut cps: [Vec<f64>; 4] = Default::default();
    for trial in 0..args.trials {
        for (i, t) in targets.iter().enumerate() {
            let what = |m: &str| format!("{m} via {} (trial {trial})", PATHS[i]);
            let (s, e) = (t.sink, t.echo);
            client(ns, t.in_vm, || -> Result<()> {
                bulk1[i].push(bulk(s, 1, args.secs).with_context(|| what("bulk 1"))?);
                bulk4[i].push(bulk(s, 4, args.secs).with_context(|| what("bulk 4"))?);
                let (a, b) = rr(e, args.round_trips).with_context(|| what("rr"))?;
                rr50[i].push(a);
                rr99[i].push(b);
                cps[i].push(conn_rate(e, args.conns).with_context(|| what("connection rate"))?);
                Ok(())
            })?;
        }
        eprintln!("trial {} done ({:?})", trial + 1, t0.elapsed());
    }
    d.docker_ok(&["rm", "-f", "servers-host", "servers-pub"])?;

    let host = starts(d, ns, args.starts, false)?;
    let publ = starts(d, ns, args.starts, true)?;

    let med = |v: &[Vec<f64>; 4]| -> [Option<f64>; 4] {
        std::array::from_fn(|i| (!v[i].is_empty()).then(|| median(v[i].clone())))
    };
    let rows = vec![
        Row {
            name: "TCP bulk, 1 stream".into(),
            unit: "Gbit/s",
            values: med(&bulk1),
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
    ];
    let p = |v: &[f64], q: f64| Some(pct(&mut v.to_vec(), q));
    let n = args.starts;
    let start_rows = vec![
        (
            format!("`docker run -d` itself, p50 ({n} runs)"),
            p(&host.run, 50.0),
            p(&publ.run, 50.0),
        ),
        (
            "→ answering in the VM, p50".into(),
            p(&host.vm, 50.0),
            p(&publ.vm, 50.0),
        ),
        (
            "→ answering in the VM, p99".into(),
            p(&host.vm, 99.0),
            p(&publ.vm, 99.0),
        ),
        (
            "→ answering on the host (bridge), p50".into(),
            p(&host.host, 50.0),
            p(&publ.host, 50.0),
        ),
        (
            "→ answering on the host (bridge), p99".into(),
            p(&host.host, 99.0),
            p(&publ.host, 99.0),
        ),
    ];
    Ok((rows, start_rows))
}
