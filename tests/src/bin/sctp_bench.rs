//! The SCTP figures: hostnet-proxy and docker-proxy side by side in the real-VM guest (this
//! machine's kernel may have no SCTP; the guest's has). Run it with `bench/sctp.sh` (root, after
//! `scripts/vm-setup.sh`).
//!
//! Boots the guest of `hostnet_e2e::vm` (1 GiB of RAM) and runs `sctp_guest bench` there
//! (`src/bin/sctp_guest.rs`): for the direct path (client to server), hostnet-proxy and Debian's
//! docker-proxy (when `/usr/sbin/docker-proxy` is installed on the host), in turn, with a fresh
//! proxy per trial:
//!
//! * messages/s and MB/s of 64 B and 16 KiB messages, client to server on one association, for
//!   `--seconds` each, counted by the server;
//! * each proxy's RSS, threads and open descriptors when idle and with `--assocs` associations
//!   held open (each checked by one round trip), and how much of the guest's memory the held
//!   associations take (`MemAvailable`, kernel included: client and server ends are the same on
//!   every path, so the difference between columns is the proxy's).
//!
//! The clients and the server set `SCTP_NODELAY`, as signalling applications do (`--nagle`: not;
//! then Linux's SCTP Nagle and delayed SACKs hold every path to ~470 messages/s here). Medians
//! of `--trials`. Client, proxy and server share the guest's one emulated CPU (TCG):
//! compare the columns, not the absolute numbers with other machines.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hostnet_e2e::vm::{self, Vm};

#[derive(Debug, Parser)]
#[command(about = "SCTP through hostnet-proxy and docker-proxy in the real-VM guest")]
struct Args {
    /// Trials per figure (a fresh proxy each).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Seconds per rate figure.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Associations held for the footprint figures.
    #[arg(long, default_value_t = 100)]
    assocs: usize,
    /// Clients and server without SCTP_NODELAY (the kernel's default, Nagle on).
    #[arg(long)]
    nagle: bool,
    /// MTU of the guest's loopback for the run (0: leave its 65,536).
    #[arg(long, default_value_t = 1500)]
    lo_mtu: u32,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tools = vm::prerequisites("sctp_bench").context("the VM prerequisites are missing")?;
    let t0 = Instant::now();
    let vm = Vm::boot_with_memory(&tools, 1024)?;
    eprintln!(
        "sctp_bench: guest up in {:.1?} ({:.1?} with the build)",
        vm.boot_time,
        t0.elapsed()
    );
    if args.lo_mtu > 0 {
        vm.run_ok(&format!("ip link set lo mtu {}", args.lo_mtu));
    }
    let mut proxies = vec!["hostnet=/bin/hostnet-proxy".to_string()];
    if Path::new(vm::DOCKER_PROXY).is_file() {
        proxies.push(format!("docker-proxy={}", vm::DOCKER_PROXY));
    } else {
        eprintln!(
            "sctp_bench: {} missing (install docker.io); hostnet-proxy alone",
            vm::DOCKER_PROXY
        );
    }
    let line = format!(
        "sctp_guest bench --seconds {} --trials {} --assocs {}{} {}",
        args.seconds,
        args.trials,
        args.assocs,
        if args.nagle { " --nagle" } else { "" },
        proxies.join(" ")
    );
    let o = vm.request(&format!("RUN {line}"), Duration::from_secs(3600))?;
    print!("{}", o.output);
    if o.code != 0 {
        bail!("`{line}` exited {} in the guest", o.code);
    }
    Ok(())
}
