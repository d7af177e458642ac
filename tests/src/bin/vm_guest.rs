//! `vm_guest`: the test helper that runs inside the real-VM test's guest (static, musl), giving it
//! what busybox lacks or does too slowly under TCG. Started by the guest's `/init`; see
//! `hostnet_e2e::vm` for the host side.
//!
//! ```text
//! vm_guest cmd PORT                  command server on vsock port PORT (below)
//! vm_guest tcp-echo [--vsock PORT]... ADDR...
//!                                    TCP echo (echoes until EOF, then half-closes), on TCP
//!                                    addresses and/or vsock ports (the same handler: read,
//!                                    write back, a thread per connection)
//! vm_guest udp-echo ADDR...          UDP echo
//! vm_guest bulk [--vsock PORT]... [ADDR]...
//!                                    bulk server on TCP addresses and/or vsock ports (below)
//! vm_guest relay VSOCK_PORT ADDR    the minimal relay (benchmark baseline): each vsock
//!                                    connection to a TCP connection to ADDR, one thread and a
//!                                    256 KiB buffer per direction (TCP_NODELAY on its TCP
//!                                    side, like the agent)
//! vm_guest udp-sink ADDR VSOCK_PORT UDP sink (benchmark): counts the datagrams arriving on ADDR;
//!                                    a vsock connection sending `C` gets the count
//!                                    (`u64 LE`); one sending `D` then `len: u16 BE ‖ len bytes`
//!                                    frames has each frame counted like a datagram (the raw
//!                                    vsock path of the same payload); one sending `U` then
//!                                    frames has each sent as a UDP datagram to ADDR (the
//!                                    minimal relay in the guest)
//! vm_guest echo-client ADDR SEED LEN WAIT_SECS
//!                                    connect (retrying refusals for WAIT_SECS), send LEN PRNG
//!                                    bytes of SEED, half-close, check the echo and the EOF
//! ```
//!
//! Servers print `READY` on stdout once every socket is bound, and log one line per connection
//! on stderr.
//!
//! **Command server**: one request line per connection, answered with `EXIT <code> <len>\n`
//! and `len` bytes of output, then closed:
//! * `RUN <shell line>`: `sh -c LINE` (stdin null), stdout and stderr together;
//! * `SPAWN <name> <shell line>`: starts `sh -c 'exec LINE'` in the background with its output
//!   appended to `/tmp/<name>.log`, waits (at most 30 s) until the output has a line `READY` or
//!   the child exits; answers `0` and the pid, or `1` and the log;
//! * `SPAWNBG <name> <shell line>`: the same without waiting for `READY`;
//! * `KILL <name>`: SIGKILL the spawned child and reap it (`0` and its status).
//!
//! **Bulk protocol**: the client sends `mode: u8 ‖ len: u64 LE ‖ seed: u64 LE`; seed 0 means
//! zeros, unchecked (for throughput), otherwise the PRNG stream of `hostnet_e2e::payload`.
//! * `S` (sink): the server reads `len` bytes (checking them) and answers `count: u64 LE ‖ ok: u8`.
//!   No half-close is needed, so it works over raw hybrid vsock too.
//! * `R` (source): the server writes `len` bytes and closes.
//! * `H` (half-close, TCP only): the server reads `len` bytes of `seed` and then EOF, and only
//!   then writes `len` bytes of `seed + 1` and closes.
//! * `D` (duplex, TCP only): the server writes `len` bytes of `seed + 1` then half-closes, while
//!   it reads and checks `len` bytes of `seed` and then EOF; it logs `duplex seed=S ok` or
//!   `duplex seed=S FAIL: ...` on stderr (the test reads the log).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hostnet_e2e::payload::{Prng, Verifier, expect_eof, read_prng, write_prng};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept, bind, listen, socket,
};

const VMADDR_CID_ANY: u32 = u32::MAX;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("cmd") => args
            .get(1)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| "usage: vm_guest cmd PORT".to_string())
            .and_then(cmd_server),
        Some("tcp-echo") => tcp_echo(&args[1..]),
        Some("udp-echo") => udp_echo(&args[1..]),
        Some("bulk") => bulk(&args[1..]),
        Some("echo-client") => echo_client(&args[1..]),
        Some("relay") => relay(&args[1..]),
        Some("udp-sink") => udp_sink(&args[1..]),
        _ => Err("usage: vm_guest cmd|tcp-echo|udp-echo|bulk|relay|echo-client ...".to_string()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vm_guest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ready() {
    println!("READY");
    let _ = io::stdout().flush();
}

fn parse_addrs(args: &[String]) -> Result<Vec<SocketAddr>, String> {
    args.iter()
        .map(|a| a.parse().map_err(|e| format!("bad address {a:?}: {e}")))
        .collect()
}

/// A vsock stream listener on `port` (any CID), as a std `TcpListener`-like fd: accept(2) and
/// read/write(2) work the same on AF_VSOCK, so the accepted fds are wrapped as `TcpStream`s
/// (only `read`, `write`, `shutdown` and close are used on them).
fn vsock_listen(port: u32) -> Result<OwnedFd, String> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("vsock socket: {e}"))?;
    bind(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))
        .map_err(|e| format!("vsock bind port {port}: {e}"))?;
    listen(&fd, Backlog::new(128).expect("backlog"))
        .map_err(|e| format!("vsock listen port {port}: {e}"))?;
    Ok(fd)
}

fn vsock_accept(l: &OwnedFd) -> io::Result<TcpStream> {
    let fd = accept(l.as_raw_fd()).map_err(io::Error::from)?;
    // SAFETY: accept(2) returned a fresh descriptor that nothing else owns; the TcpStream takes
    // ownership and closes it on drop. read/write/shutdown behave alike on AF_VSOCK streams.
    Ok(unsafe { TcpStream::from_raw_fd(fd) })
}

/// Splits `--vsock PORT` options from the other arguments: (vsock listeners, the rest).
fn vsock_args(args: &[String]) -> Result<(Vec<OwnedFd>, Vec<String>), String> {
    let mut ports = Vec::new();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--vsock" {
            let p = it
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .ok_or("--vsock needs a port")?;
            ports.push(p);
        } else {
            rest.push(a.clone());
        }
    }
    let listeners = ports
        .iter()
        .map(|p| vsock_listen(*p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((listeners, rest))
}

/// Accepts on each vsock listener in a thread of its own, `handler` in a thread per connection.
fn serve_vsock(listeners: Vec<OwnedFd>, handler: impl Fn(TcpStream) + Send + Copy + 'static) {
    for l in listeners {
        thread::spawn(move || {
            loop {
                match vsock_accept(&l) {
                    Ok(s) => {
                        thread::spawn(move || handler(s));
                    }
                    Err(e) => {
                        eprintln!("vsock accept: {e}");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------
// Command server
// ---------------------------------------------------------------------------

type Children = Arc<Mutex<HashMap<String, Child>>>;

fn cmd_server(port: u32) -> Result<(), String> {
    let l = vsock_listen(port)?;
    let children: Children = Arc::default();
    ready();
    loop {
        match vsock_accept(&l) {
            Ok(s) => {
                let children = children.clone();
                thread::spawn(move || {
                    if let Err(e) = serve_cmd(s, &children) {
                        eprintln!("vm_guest cmd: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("vm_guest cmd: accept: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_cmd(s: TcpStream, children: &Children) -> io::Result<()> {
    let mut line = String::new();
    BufReader::new(s.try_clone()?)
        .take(64 * 1024)
        .read_line(&mut line)?;
    let line = line.trim_end_matches(['\n', '\r']);
    let (code, out) = match line.split_once(' ') {
        Some(("RUN", cmd)) => run(cmd),
        Some(("SPAWN", rest)) => spawn(rest, true, children),
        Some(("SPAWNBG", rest)) => spawn(rest, false, children),
        Some(("KILL", name)) => kill(name, children),
        _ => (2, format!("bad request {line:?}").into_bytes()),
    };
    let mut s = s;
    s.write_all(format!("EXIT {code} {}\n", out.len()).as_bytes())?;
    s.write_all(&out)?;
    s.flush()
}

fn run(cmd: &str) -> (i32, Vec<u8>) {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec 2>&1; {cmd}"))
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => (o.status.code().unwrap_or(128), o.stdout),
        Err(e) => (127, format!("cannot run sh: {e}").into_bytes()),
    }
}

fn spawn(rest: &str, wait_ready: bool, children: &Children) -> (i32, Vec<u8>) {
    let Some((name, cmd)) = rest.split_once(' ') else {
        return (2, b"usage: SPAWN NAME COMMAND".to_vec());
    };
    let log_path = format!("/tmp/{name}.log");
    let mut child = match Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec 2>&1; exec {cmd}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (127, format!("cannot spawn: {e}").into_bytes()),
    };
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");
    let seen_ready = Arc::new(Mutex::new(false));
    let seen = seen_ready.clone();
    let log_path2 = log_path.clone();
    thread::spawn(move || {
        let mut log = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path2)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("vm_guest cmd: open {log_path2}: {e}");
                return;
            }
        };
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = log.write_all(&line);
                    if line.trim_ascii() == b"READY" {
                        *seen.lock().unwrap() = true;
                    }
                }
            }
        }
    });
    if wait_ready {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if *seen_ready.lock().unwrap() {
                break;
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read(&log_path).unwrap_or_default();
                let mut out = format!("{name} not ready (exit: {exited:?}); log:\n").into_bytes();
                out.extend(log);
                return (1, out);
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
    if let Some(mut old) = children.lock().unwrap().insert(name.to_string(), child) {
        let _ = old.kill();
        let _ = old.wait();
    }
    (0, pid.to_string().into_bytes())
}

fn kill(name: &str, children: &Children) -> (i32, Vec<u8>) {
    let Some(mut child) = children.lock().unwrap().remove(name) else {
        return (1, format!("no child named {name}").into_bytes());
    };
    let _ = child.kill();
    match child.wait() {
        Ok(st) => (0, format!("{st}").into_bytes()),
        Err(e) => (1, format!("wait: {e}").into_bytes()),
    }
}

// ---------------------------------------------------------------------------
// Echo servers
// ---------------------------------------------------------------------------

fn tcp_echo(args: &[String]) -> Result<(), String> {
    let (vsock_listeners, addrs) = vsock_args(args)?;
    let addrs = parse_addrs(&addrs)?;
    let listeners = addrs
        .iter()
        .map(|a| TcpListener::bind(a).map_err(|e| format!("bind {a}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    ready();
    serve_vsock(vsock_listeners, echo);
    serve_tcp(listeners, echo)?;
    // Only vsock listeners: park forever.
    loop {
        thread::park();
    }
}

/// Echoes until EOF, then half-closes.
fn echo(mut s: TcpStream) {
    let mut buf = vec![0; 64 * 1024];
    let mut n_total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
                n_total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("echo: read after {n_total} bytes: {e}");
                return;
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    eprintln!("echo: {n_total} bytes");
}

fn serve_tcp(
    listeners: Vec<TcpListener>,
    handler: impl Fn(TcpStream) + Send + Sync + Copy + 'static,
) -> Result<(), String> {
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            thread::spawn(move || {
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            thread::spawn(move || handler(s));
                        }
                        Err(e) => {
                            eprintln!("accept: {e}");
                            thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn udp_echo(args: &[String]) -> Result<(), String> {
    let addrs = parse_addrs(args)?;
    let socks = addrs
        .iter()
        .map(|a| UdpSocket::bind(a).map_err(|e| format!("bind udp {a}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    ready();
    let threads: Vec<_> = socks
        .into_iter()
        .map(|s| {
            thread::spawn(move || {
                let mut buf = vec![0; 65_536];
                loop {
                    match s.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            let _ = s.send_to(&buf[..n], from);
                        }
                        Err(e) => eprintln!("udp recv: {e}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Bulk server
// ---------------------------------------------------------------------------

fn bulk(args: &[String]) -> Result<(), String> {
    let (vsock_listeners, tcp) = vsock_args(args)?;
    let tcp_listeners = parse_addrs(&tcp)?
        .iter()
        .map(|a| TcpListener::bind(a).map_err(|e| format!("bind {a}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    ready();
    serve_vsock(vsock_listeners, serve_bulk);
    serve_tcp(tcp_listeners, serve_bulk)?;
    // Only vsock listeners: park forever.
    loop {
        thread::park();
    }
}

fn serve_bulk(mut s: TcpStream) {
    let mut head = [0u8; 17];
    if let Err(e) = s.read_exact(&mut head) {
        eprintln!("bulk: request: {e}");
        return;
    }
    let mode = head[0];
    let len = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
    let seed = u64::from_le_bytes(head[9..17].try_into().expect("8 bytes"));
    let t0 = Instant::now();
    match mode {
        b'S' => {
            let (count, ok) = sink(&mut s, len, seed);
            let mut reply = count.to_le_bytes().to_vec();
            reply.push(u8::from(ok));
            let _ = s.write_all(&reply);
            eprintln!("sink: {count}/{len} bytes ok={ok} in {:?}", t0.elapsed());
        }
        b'R' => {
            let r = if seed == 0 {
                write_zeros(&mut s, len)
            } else {
                write_prng(&mut s, seed, len)
            };
            eprintln!("source: {len} bytes: {r:?} in {:?}", t0.elapsed());
        }
        b'H' => {
            // Half-close: everything until the client's EOF, then the reply.
            let (count, ok) = sink(&mut s, len, seed);
            let eof = ok && expect_eof(&mut s, "half-close").is_ok();
            if eof {
                let r = write_prng(&mut s, seed + 1, len);
                eprintln!("half-close: {count} bytes then EOF; replied: {r:?}");
            } else {
                eprintln!("half-close: {count}/{len} bytes ok={ok} eof={eof}; no reply");
            }
        }
        b'D' => {
            let r = duplex(s, seed, len);
            match r {
                Ok(()) => eprintln!("duplex seed={seed} ok"),
                Err(e) => eprintln!("duplex seed={seed} FAIL: {e}"),
            }
        }
        m => eprintln!("bulk: unknown mode {m:#04x}"),
    }
}

fn sink(s: &mut TcpStream, len: u64, seed: u64) -> (u64, bool) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut v = (seed != 0).then(|| Verifier::new(seed, "sink"));
    let mut count = 0u64;
    let mut ok = true;
    while count < len {
        let want = (len - count).min(buf.len() as u64) as usize;
        match s.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(Err(e)) = v.as_mut().map(|v| v.check(&buf[..n])) {
                    if ok {
                        eprintln!("{e}");
                    }
                    ok = false;
                }
                count += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("sink: read after {count}: {e}");
                break;
            }
        }
    }
    (count, ok && count == len)
}

fn write_zeros(w: &mut impl Write, len: u64) -> io::Result<()> {
    let buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn duplex(s: TcpStream, seed: u64, len: u64) -> Result<(), String> {
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = thread::spawn(move || -> Result<(), String> {
        write_prng(&mut w, seed + 1, len).map_err(|e| format!("write: {e}"))?;
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))
    });
    let mut r = s;
    let res = read_prng(&mut r, seed, len, "duplex").and_then(|_| expect_eof(&mut r, "duplex"));
    let wres = writer
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()));
    res.and(wres)
}

// ---------------------------------------------------------------------------
// Client (the reverse direction: guest -> host service)
// ---------------------------------------------------------------------------

fn echo_client(args: &[String]) -> Result<(), String> {
    let [addr, seed, len, wait] = args else {
        return Err("usage: vm_guest echo-client ADDR SEED LEN WAIT_SECS".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let seed: u64 = seed.parse().map_err(|e| format!("seed: {e}"))?;
    let len: usize = len.parse().map_err(|e| format!("len: {e}"))?;
    let wait: u64 = wait.parse().map_err(|e| format!("wait: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(wait);
    let t0 = Instant::now();
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
    };
    let connected = t0.elapsed();
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = thread::spawn(move || -> Result<(), String> {
        let mut p = Prng::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            p.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
            left -= n;
        }
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))
    });
    let res = read_prng(&mut s, seed, len as u64, "echo").and_then(|_| expect_eof(&mut s, "echo"));
    let wres = writer
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()));
    res.and(wres)?;
    println!(
        "ok: {len} bytes echoed by {addr} (connected after {connected:?}, total {:?})",
        t0.elapsed()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Minimal relay (the benchmark's baseline for the guest's extra hop)
// ---------------------------------------------------------------------------

fn relay(args: &[String]) -> Result<(), String> {
    let [port, addr] = args else {
        return Err("usage: vm_guest relay VSOCK_PORT ADDR".into());
    };
    let port: u32 = port.parse().map_err(|e| format!("port: {e}"))?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let l = vsock_listen(port)?;
    ready();
    loop {
        let v = match vsock_accept(&l) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("relay: accept: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        thread::spawn(move || {
            let t = match TcpStream::connect(addr) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("relay: connect {addr}: {e}");
                    return;
                }
            };
            let _ = t.set_nodelay(true);
            let (Ok(v2), Ok(t2)) = (v.try_clone(), t.try_clone()) else {
                return;
            };
            let up = thread::spawn(move || copy_then_shutdown(v2, t2));
            copy_then_shutdown(t, v);
            let _ = up.join();
        });
    }
}

fn copy_then_shutdown(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

// ---------------------------------------------------------------------------
// UDP sink
// ---------------------------------------------------------------------------

fn udp_sink(args: &[String]) -> Result<(), String> {
    let [addr, port] = args else {
        return Err("usage: vm_guest udp-sink ADDR VSOCK_PORT".into());
    };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?;
    let port: u32 = port
        .parse()
        .map_err(|e| format!("bad vsock port {port:?}: {e}"))?;
    let sock = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
    let to = SocketAddr::new(
        std::net::Ipv4Addr::LOCALHOST.into(),
        sock.local_addr().map_err(|e| e.to_string())?.port(),
    );
    let listener = vsock_listen(port)?;
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let count = count.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while sock.recv_from(&mut buf).is_ok() {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    ready();
    loop {
        let Ok(mut c) = vsock_accept(&listener) else {
            continue;
        };
        let count = count.clone();
        thread::spawn(move || {
            let mut mode = [0u8; 1];
            if c.read_exact(&mut mode).is_err() {
                return;
            }
            match mode[0] {
                b'C' => {
                    let n = count.load(std::sync::atomic::Ordering::Relaxed);
                    let _ = c.write_all(&n.to_le_bytes());
                }
                mode @ (b'D' | b'U') => {
                    let out = UdpSocket::bind("127.0.0.1:0").ok();
                    let mut r = BufReader::with_capacity(256 * 1024, c);
                    let mut len = [0u8; 2];
                    let mut buf = vec![0u8; 65_536];
                    while r.read_exact(&mut len).is_ok() {
                        let n = usize::from(u16::from_be_bytes(len));
                        if r.read_exact(&mut buf[..n]).is_err() {
                            break;
                        }
                        match (mode, &out) {
                            (b'U', Some(out)) => {
                                let _ = out.send_to(&buf[..n], to);
                            }
                            _ => {
                                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                }
                m => eprintln!("udp-sink: unknown mode {m}"),
            }
        });
    }
}
