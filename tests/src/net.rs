//! TCP and UDP servers and clients for the scenarios. Servers take a socket bound wherever the
//! test wants (host, or inside a namespace via [`crate::netns::Netns::tcp_listener`]) and serve it
//! from threads of the test process.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::SockRef;

use crate::payload::{Verifier, expect_eof, payload};
use crate::{after, wait_until};

/// Default read/write timeout of client sockets: a hang shows up as a timeout error.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
pub const ANY4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
pub const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// A port free for TCP and UDP on the host's 127.0.0.1 and ::1 right now, from a range below the
/// ephemeral one (so that client sockets do not take it), distinct within this process and spread
/// by pid across processes.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 600) as u16 * 20;
    for _ in 0..12_000 {
        let off = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base - 20_000 + off) % 12_000;
        // A bound, non-listening TCP socket: a listening probe would be visible (briefly) to
        // every reverse-mode forwarder of a parallel test. With SO_REUSEADDR, like every TCP
        // listener of the tests and the forwarder: a process forked by a parallel test holds a
        // copy of the probe until its exec, and a probe without it would make their bind fail.
        let free = [LO4, LO6].iter().all(|ip| {
            let tcp = socket2::Socket::new(
                socket2::Domain::for_address(sa(*ip, port)),
                socket2::Type::STREAM,
                None,
            )
            .and_then(|s| s.set_reuse_address(true).map(|()| s))
            .and_then(|s| s.bind(&sa(*ip, port).into()));
            tcp.is_ok() && UdpSocket::bind(sa(*ip, port)).is_ok()
        });
        if free {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

pub fn set_timeouts(s: &TcpStream, t: Duration) {
    let _ = s.set_read_timeout(Some(t));
    let _ = s.set_write_timeout(Some(t));
}

/// Connects with a timeout and sets [`IO_TIMEOUT`].
pub fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    set_timeouts(&s, IO_TIMEOUT);
    Ok(s)
}

/// True once a TCP connect to `addr` succeeds (the connection is closed at once).
pub fn connectable(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// True when a TCP connect to `addr` is refused (nobody listens).
pub fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

/// Sets SO_LINGER {on, 0}: closing the socket then sends a RST.
pub fn set_linger_zero(s: &TcpStream) {
    SockRef::from(s).set_linger(Some(Duration::ZERO)).unwrap();
}

/// True for the error kinds a socket timeout shows up as.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Sends `len` PRNG bytes to an echo server in chunks, checks every echoed byte, then half-closes
/// and expects a clean EOF.
pub fn echo_on(s: &mut TcpStream, seed: u64, len: usize) -> Result<(), String> {
    let data = payload(seed, len);
    let mut v = Verifier::new(seed, format!("echo seed {seed}"));
    let mut buf = vec![0; 16 * 1024];
    for chunk in data.chunks(16 * 1024) {
        s.write_all(chunk)
            .map_err(|e| format!("write after {} bytes: {e}", v.offset()))?;
        let mut got = 0;
        while got < chunk.len() {
            match s.read(&mut buf[..chunk.len() - got]) {
                Ok(0) => return Err(format!("EOF after {} echoed bytes", v.offset())),
                Ok(n) => {
                    v.check(&buf[..n])?;
                    got += n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read after {} echoed bytes: {e}", v.offset())),
            }
        }
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    expect_eof(s, "after echo")
}

/// Like [`echo_on`] but leaves the connection open (no half-close).
pub fn echo_on_open(s: &mut TcpStream, seed: u64, len: usize) -> Result<(), String> {
    let data = payload(seed, len);
    s.write_all(&data).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0; len];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != data {
        return Err("echo differs".into());
    }
    Ok(())
}

/// Connects to `addr` and does [`echo_on`].
pub fn echo_check(addr: SocketAddr, seed: u64, len: usize) -> Result<(), String> {
    let mut s = try_connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
    echo_on(&mut s, seed, len).map_err(|e| format!("{addr}: {e}"))
}

/// Reads until EOF or error; `Ok(bytes)` on EOF.
pub fn read_to_end_or_err(r: &mut impl Read) -> io::Result<usize> {
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------
// TCP servers
// ---------------------------------------------------------------------------

/// A TCP server: one thread per accepted connection running `handler`. Stops accepting (and
/// closes the listener) on drop or [`TcpServer::close`].
#[derive(Debug)]
pub struct TcpServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TcpServer {
    pub fn serve(
        listener: TcpListener,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        listener.set_nonblocking(true).unwrap();
        let thread = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(20u16));
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let h = handler.clone();
                            thread::spawn(move || h(s));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn echo(listener: TcpListener) -> Self {
        Self::serve(listener, echo_handler)
    }

    /// Closes the listening socket now (connections already accepted carry on).
    pub fn close(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// Echoes everything; on EOF half-closes its side.
pub fn echo_handler(mut s: TcpStream) {
    set_timeouts(&s, Duration::from_secs(30));
    let mut buf = vec![0; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Writes `tag` and closes: tells a client which server answered.
pub fn tag_handler(tag: &'static str) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |mut s: TcpStream| {
        let _ = s.write_all(tag.as_bytes());
        let _ = s.shutdown(Shutdown::Write);
        let _ = read_to_end_or_err(&mut s);
    }
}

/// Connects to `addr` and returns what the server wrote before EOF.
pub fn read_tag(addr: SocketAddr) -> Result<String, String> {
    let mut s = try_connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = s.shutdown(Shutdown::Write);
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    Ok(out)
}

/// The outcome of one side of a duplex transfer.
pub type Outcome = Arc<Mutex<Vec<Result<(), String>>>>;

/// Both ways at once: a writer thread sends `len` bytes of `send_seed` then half-closes, while
/// this thread reads and checks `len` bytes of `recv_seed` and then EOF.
pub fn duplex(
    s: TcpStream,
    send_seed: u64,
    recv_seed: u64,
    len: u64,
    what: &str,
) -> Result<(), String> {
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = thread::spawn(move || -> Result<(), String> {
        crate::payload::write_prng(&mut w, send_seed, len).map_err(|e| format!("write: {e}"))?;
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))
    });
    let mut r = s;
    let res = crate::payload::read_prng(&mut r, recv_seed, len, what)
        .and_then(|_| expect_eof(&mut r, what));
    let wres = writer
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()))
        .map_err(|e| format!("{what}: {e}"));
    res.and(wres)
}

/// A server handler doing [`duplex`] (sends `seed+1`, expects `seed`) and recording the outcome.
pub fn duplex_handler(
    seed: u64,
    len: u64,
    outcome: Outcome,
) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |s: TcpStream| {
        set_timeouts(&s, Duration::from_secs(30));
        let r = duplex(s, seed + 1, seed, len, "server side");
        outcome.lock().unwrap().push(r);
    }
}

// ---------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------

/// A UDP server that echoes every datagram to its source and counts them.
#[derive(Debug)]
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub count: Arc<AtomicUsize>,
    pub sources: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl UdpEcho {
    pub fn serve(sock: UdpSocket) -> Self {
        let addr = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let sources = Arc::new(Mutex::new(Vec::new()));
        {
            let (stop, count, sources) = (stop.clone(), count.clone(), sources.clone());
            thread::spawn(move || {
                let mut buf = vec![0; 70 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, src)) = sock.recv_from(&mut buf) {
                        count.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut s = sources.lock().unwrap();
                            if !s.contains(&src) {
                                s.push(src);
                            }
                        }
                        let _ = sock.send_to(&buf[..n], src);
                    }
                }
            });
        }
        Self {
            addr,
            count,
            sources,
            stop,
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends `data` to `to` (again every 100 ms, for a path still being set up) until the same bytes
/// come back from `to`, at most `timeout`. Datagrams from elsewhere or with other contents are
/// errors (a reply delivered to the wrong client).
pub fn udp_echo_check(
    sock: &UdpSocket,
    to: SocketAddr,
    data: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let end = after(timeout);
    let mut buf = vec![0; 70 * 1024];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    loop {
        if Instant::now() >= end {
            return Err(format!("no echo from {to} within {timeout:?}"));
        }
        sock.send_to(data, to)
            .map_err(|e| format!("send_to {to}: {e}"))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if from != to {
                    return Err(format!("reply came from {from}, expected {to}"));
                }
                if &buf[..n] != data {
                    return Err(format!(
                        "reply differs ({n} bytes): {:?}, sent {:?}",
                        String::from_utf8_lossy(&buf[..n]),
                        String::from_utf8_lossy(data)
                    ));
                }
                // Drain the echoes of retries.
                sock.set_read_timeout(Some(Duration::from_millis(30)))
                    .unwrap();
                while let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if from != to || &buf[..n] != data {
                        return Err(format!(
                            "stray datagram from {from}: {:?}",
                            String::from_utf8_lossy(&buf[..n])
                        ));
                    }
                }
                return Ok(());
            }
            Err(e) if is_timeout(&e) => {}
            // ICMP port unreachable from a path not yet up: retry.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(format!("recv_from: {e}")),
        }
    }
}

/// Waits until `cond` holds, at most `timeout`; the elapsed time on success.
pub fn time_until(timeout: Duration, cond: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    wait_until(t0 + timeout, cond).then(|| t0.elapsed())
}

// ---------------------------------------------------------------------------
// What the kernel says is bound
// ---------------------------------------------------------------------------

fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Local addresses and socket inodes of the sockets in `/proc/thread-self/net/{proto}{,6}` (the
/// calling thread's namespace) whose state is `state` (TCP listen: `0A`; UDP unconnected: `07`).
fn proc_sockets(proto: &str, state: &str) -> Vec<(SocketAddr, u64)> {
    let mut out = Vec::new();
    for f in [proto.to_string(), format!("{proto}6")] {
        let text =
            std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).unwrap_or_default();
        for l in text.lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == state {
                if let (Some(a), Ok(ino)) = (parse_proc_addr(cols[1]), cols[9].parse()) {
                    out.push((a, ino));
                }
            }
        }
    }
    out
}

/// TCP listening addresses in the calling thread's namespace.
pub fn tcp_listeners() -> Vec<SocketAddr> {
    proc_sockets("tcp", "0A")
        .into_iter()
        .map(|(a, _)| a)
        .collect()
}

/// The TCP listeners on `port` in the calling thread's namespace other than the socket `ours`
/// (a [`socket_inode`]): a test's own listener is still listed after the test closed it while a
/// process forked by a parallel test holds a copy of it (until its exec), and is not a mirror.
pub fn tcp_listeners_except(port: u16, ours: u64) -> Vec<SocketAddr> {
    proc_sockets("tcp", "0A")
        .into_iter()
        .filter(|&(a, ino)| a.port() == port && ino != ours)
        .map(|(a, _)| a)
        .collect()
}

/// The inode of a socket, as `/proc/net/tcp` shows it.
pub fn socket_inode(fd: impl AsFd) -> u64 {
    nix::sys::stat::fstat(fd).expect("fstat").st_ino
}

/// Bound, unconnected UDP addresses in the calling thread's namespace.
pub fn udp_bound() -> Vec<SocketAddr> {
    proc_sockets("udp", "07")
        .into_iter()
        .map(|(a, _)| a)
        .collect()
}

/// `ss` lines (with owning processes) for every socket on `port` in the calling thread's
/// namespace: for failure messages.
pub fn who_has(port: u16) -> String {
    std::process::Command::new("ss")
        .args(["-Htanup"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(&format!(":{port} ")))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|e| format!("ss: {e}"))
}

/// A TCP listener like std's `TcpListener::bind` (SO_REUSEADDR), with a backlog of 1024 instead
/// of std's 128: a test server meeting a burst of hundreds of relayed connections then queues
/// them instead of dropping handshakes into SYN-ACK retransmits (a second each).
pub fn listen_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Binds on the host, retrying `EADDRINUSE` for up to 2 s: a process forked by a parallel test
/// holds a copy of every descriptor until its exec closes them, so a probe or a server just
/// closed by this test can keep its port taken for a moment (seen under load). Panics with
/// who holds the port when it stays taken.
fn bind_on_host<T>(addr: SocketAddr, bind: impl Fn(SocketAddr) -> io::Result<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match bind(addr) {
            Ok(s) => return s,
            Err(e) if e.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!(
                "bind {addr} on the host: {e}; sockets on that port:\n{}",
                who_has(addr.port())
            ),
        }
    }
}

/// Binds a TCP listener on the host (see [`bind_on_host`]).
pub fn host_listener(addr: SocketAddr) -> TcpListener {
    bind_on_host(addr, listen_tcp)
}

/// Binds a UDP socket on the host (see [`bind_on_host`]).
pub fn host_udp(addr: SocketAddr) -> UdpSocket {
    bind_on_host(addr, UdpSocket::bind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(tcp_listeners().contains(&l.local_addr().unwrap()));
        let u = UdpSocket::bind("[::1]:0").unwrap();
        assert!(udp_bound().contains(&u.local_addr().unwrap()));
    }
}
