//! The servers the Docker Desktop test and benchmark run inside containers (copied into the test
//! image with its libraries, see [`hostnet_e2e::desktop`]): a TCP echo (no delay, half-close
//! passed on), a byte-counting TCP sink, and a UDP echo that answers every client from one socket
//! (busybox has no UDP server, and `socat UDP-LISTEN,fork` serves one peer per child). Each binds
//! `[::]` (both families) or, where the container has no IPv6, `0.0.0.0`. Exits at once on
//! SIGTERM and SIGINT, also as a container's PID 1 (which ignores signals it has no handler for).
//!
//! `desktop_servers --echo 7 --sink 9 --udp-echo 53`

use std::io;
use std::net::{SocketAddr, UdpSocket};

use anyhow::{Context, Result};
use clap::Parser;
use hostnet_e2e::measure::{echo_nodelay, sink_handler};
use hostnet_e2e::net::{ANY4, ANY6, TcpServer, UdpEcho, listen_tcp, sa};

#[derive(Debug, Parser)]
#[command(about = "TCP echo, TCP sink and UDP echo servers for the containers of the Desktop test")]
struct Args {
    /// TCP echo on this port (repeatable).
    #[arg(long)]
    echo: Vec<u16>,
    /// TCP sink on this port: reads to EOF, then answers the byte count (8 bytes, LE).
    #[arg(long)]
    sink: Vec<u16>,
    /// UDP echo on this port (repeatable).
    #[arg(long)]
    udp_echo: Vec<u16>,
}

extern "C" fn exit_now(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe and has no preconditions.
    unsafe { libc::_exit(0) }
}

/// Binds `[::]:port`, or `0.0.0.0:port` when the container has no IPv6.
fn bind_any<T>(port: u16, bind: impl Fn(SocketAddr) -> io::Result<T>) -> Result<T> {
    bind(sa(ANY6, port))
        .or_else(|_| bind(sa(ANY4, port)))
        .with_context(|| format!("cannot bind port {port}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only calls _exit, which is async-signal-safe.
        unsafe { libc::signal(sig, exit_now as *const () as libc::sighandler_t) };
    }
    let mut tcp: Vec<TcpServer> = Vec::new();
    for &p in &args.echo {
        tcp.push(TcpServer::serve(bind_any(p, listen_tcp)?, echo_nodelay));
    }
    for &p in &args.sink {
        tcp.push(TcpServer::serve(bind_any(p, listen_tcp)?, sink_handler));
    }
    let udp: Vec<UdpEcho> = args
        .udp_echo
        .iter()
        .map(|&p| bind_any(p, UdpSocket::bind).map(UdpEcho::serve))
        .collect::<Result<_>>()?;
    eprintln!(
        "desktop_servers: echo {:?}, sink {:?}, udp echo {:?}",
        args.echo, args.sink, args.udp_echo
    );
    // The servers run on their own threads while these live.
    let _servers = (tcp, udp);
    loop {
        std::thread::park();
    }
}
