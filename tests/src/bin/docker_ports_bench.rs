//! What users of port ranges feel: one container publishing a range of ports under a real dockerd,
//! once with docker-proxy and once with hostnet-proxy as the userland proxy, in the same run.
//!
//! `-p 127.0.0.1:F-L:8000-… -p [::1]:F-L:8000-…` starts two proxies per port (one per address
//! family, as `-p F-L:8000-…` does on 0.0.0.0 and ::, but bound to loopback only). Figures per
//! trial: time until `docker run -d` returns (dockerd starts the proxies one by one and waits for
//! each one's readiness), total RSS and PSS and the thread count of all proxy processes, and the
//! time `docker rm -f` takes (dockerd stops them one by one and waits for each). Medians of
//! `--trials`; within a trial a daemon with each proxy runs in turn, the first one alternating (same
//! data root, image and range). To show how much of those times is the proxy's own, each proxy is also run alone the
//! way dockerd runs it (readiness pipe on fd 3): exec to `0\n`, and SIGINT to exit. Needs root;
//! run it with `bench/docker.sh` (static release hostnet-proxy).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hostnet_e2e::dockerd::{self, DOCKER_PROXY, Dockerd, IMAGE, Lab};
use hostnet_e2e::net::free_port;
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, pipe2};

#[derive(Debug, Parser)]
#[command(about = "userland proxies for a published port range: docker-proxy vs hostnet-proxy")]
struct Args {
    /// The hostnet-proxy binary (bench/docker.sh passes the static release build).
    #[arg(long)]
    hostnet: PathBuf,
    /// The baseline.
    #[arg(long, default_value = DOCKER_PROXY)]
    docker_proxy: PathBuf,
    /// Trials per proxy (the median is reported).
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// First host port of the range.
    #[arg(long, default_value_t = 20000)]
    first_port: u16,
    /// Ports in the range (two proxies each).
    #[arg(long, default_value_t = 200)]
    ports: u16,
    /// Start/stop cycles of each proxy run alone.
    #[arg(long, default_value_t = 200)]
    alone: usize,
}

/// Runs `bin` for one TCP port as dockerd does (status pipe on fd 3), returns the milliseconds
/// from spawn to `0\n` and from SIGINT to its exit.
fn alone(bin: &Path) -> Result<(f64, f64)> {
    let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
    let wfd = w.as_raw_fd();
    let port = free_port().to_string();
    let mut cmd = Command::new(bin);
    cmd.args([
        "-proto",
        "tcp",
        "-host-ip",
        "127.0.0.1",
        "-host-port",
        &port,
    ])
    .args(["-container-ip", "127.0.0.1", "-container-port", "9"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) on descriptors
    // this process owns.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if wfd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(wfd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    drop(w);
    let mut status = [0u8; 2];
    let read = File::from(r).read_exact(&mut status);
    let ready = t.elapsed();
    let t = Instant::now();
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
    let exit = child.wait()?;
    let stop = t.elapsed();
    read.context("reading the status pipe")?;
    // docker-proxy installs its signal handler only after reporting ready, so a SIGINT right
    // after `0\n` kills it by the default action; dockerd does not mind either way.
    use std::os::unix::process::ExitStatusExt;
    let stopped = exit.success() || exit.signal() == Some(libc::SIGINT);
    if &status != b"0\n" || !stopped {
        bail!("{}: status {status:?}, exit {exit}", bin.display());
    }
    Ok((ready.as_secs_f64() * 1e3, stop.as_secs_f64() * 1e3))
}

#[derive(Debug, Default, Clone)]
struct Trial {
    run_s: f64,
    rss_kib: u64,
    pss_kib: u64,
    threads: u64,
    rm_s: f64,
}

/// Proportional set size of `pid`, KiB (shared pages divided among their users).
fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn trial(d: &Dockerd, args: &Args, n: usize) -> Result<Trial> {
    let last = args.first_port + args.ports - 1;
    let inner_last = 8000 + args.ports - 1;
    let v4 = format!("127.0.0.1:{}-{last}:8000-{inner_last}", args.first_port);
    let v6 = format!("[::1]:{}-{last}:8000-{inner_last}", args.first_port);
    let name = format!("range{n}");
    let want = 2 * args.ports as usize;

    let t = Instant::now();
    d.docker_ok(&[
        "run", "-d", "--name", &name, "-p", &v4, "-p", &v6, IMAGE, "sleep", "3600",
    ])?;
    let run_s = t.elapsed().as_secs_f64();
    let procs = d
        .wait_proxies(want, Duration::from_secs(30))
        .context("proxies after docker run")?;
    let mut out = Trial {
        run_s,
        ..Trial::default()
    };
    for p in &procs {
        out.rss_kib += p.rss_kib;
        out.threads += p.threads;
        out.pss_kib += pss_kib(p.pid);
    }
    let t = Instant::now();
    d.docker_ok(&["rm", "-f", &name])?;
    out.rm_s = t.elapsed().as_secs_f64();
    d.wait_proxies(0, Duration::from_secs(30))
        .context("proxies after docker rm -f")?;
    Ok(out)
}

/// A table row: its name, the figure of a trial, decimals.
type Row = (&'static str, fn(&Trial) -> f64, usize);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !dockerd::available("docker_ports_bench") {
        bail!("HOSTNET_SKIP_DOCKER=1: nothing to measure");
    }
    if args.trials == 0 || args.ports == 0 {
        bail!("--trials and --ports must be at least 1");
    }
    let kinds = [
        ("docker-proxy", args.docker_proxy.clone()),
        ("hostnet-proxy", args.hostnet.clone()),
    ];
    // The two proxies alternate, so that a change in machine load hits both alike.
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); kinds.len()];
    for _ in 0..args.alone {
        for (k, (label, path)) in kinds.iter().enumerate() {
            runs[k].push(alone(path).with_context(|| format!("{label} alone"))?);
        }
    }
    let alone_ms: Vec<(f64, f64)> = runs
        .iter()
        .map(|r| {
            (
                median(r.iter().map(|x| x.0).collect()),
                median(r.iter().map(|x| x.1).collect()),
            )
        })
        .collect();
    let lab = Lab::new("bench")?;
    let mut results: Vec<Vec<Trial>> = vec![Vec::new(); kinds.len()];
    let mut version = String::new();
    for n in 0..args.trials {
        // ABBA: which daemon goes first alternates, so that running second is no bias.
        let order = if n % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let (label, path) = &kinds[k];
            let d = lab.start(Some(path), &[], &[])?;
            version = d
                .docker_ok(&["version", "--format", "{{.Server.Version}}"])?
                .trim()
                .to_string();
            let t = trial(&d, &args, n).with_context(|| format!("{label}, trial {n}"))?;
            eprintln!(
                "{label} trial {n}: run {:.2} s, RSS {} KiB, PSS {} KiB, threads {}, rm {:.2} s",
                t.run_s, t.rss_kib, t.pss_kib, t.threads, t.rm_s
            );
            d.stop()?;
            results[k].push(t);
        }
    }
    lab.finish()?;

    let col = |i: usize, f: fn(&Trial) -> f64| median(results[i].iter().map(f).collect());
    let rows: [Row; 5] = [
        ("docker run -d returns (s)", |t| t.run_s, 2),
        (
            "total RSS of proxies (MiB)",
            |t| t.rss_kib as f64 / 1024.0,
            1,
        ),
        (
            "total PSS of proxies (MiB)",
            |t| t.pss_kib as f64 / 1024.0,
            1,
        ),
        ("threads of proxies", |t| t.threads as f64, 0),
        ("docker rm -f returns (s)", |t| t.rm_s, 2),
    ];
    println!(
        "dockerd {version}; -p 127.0.0.1:{f}-{l}:8000-{il} -p [::1]:{f}-{l}:8000-{il} ({} proxies)",
        2 * args.ports,
        f = args.first_port,
        l = args.first_port + args.ports - 1,
        il = 8000 + args.ports - 1
    );
    println!(
        "{:<28} | {:>12} | {:>13} | {:>22}",
        "figure", "docker-proxy", "hostnet-proxy", "hostnet/docker-proxy"
    );
    println!("{}", "-".repeat(84));
    for (name, f, prec) in rows {
        let (a, b) = (col(0, f), col(1, f));
        let ratio = if a > 0.0 {
            format!("{:.2}x", b / a)
        } else {
            "-".into()
        };
        println!("{name:<28} | {a:>12.prec$} | {b:>13.prec$} | {ratio:>22}");
    }
    for (name, pick) in [
        ("alone: exec to ready (ms)", 0),
        ("alone: SIGINT to exit (ms)", 1),
    ] {
        let get = |k: usize| {
            if pick == 0 {
                alone_ms[k].0
            } else {
                alone_ms[k].1
            }
        };
        let (a, b) = (get(0), get(1));
        println!(
            "{name:<28} | {a:>12.2} | {b:>13.2} | {:>22}",
            format!("{:.2}x", b / a)
        );
    }
    println!(
        "medians of {} trials per proxy (daemons alternating), {} start/stop cycles alone",
        args.trials, args.alone
    );
    Ok(())
}
