//! Shared helpers for the black-box tests of the `hostnet-proxy` binary.
//!
//! Environment variables understood by the suite:
//! - `HOSTNET_PROXY_BIN=/path`: test another binary (e.g. `/usr/sbin/docker-proxy`)
//!   instead of the one Cargo built.
//! - `HOSTNET_TEST_NO_LISTEN_FD=1`: never hand a socket over on fd 4; a test that
//!   would instead closes its socket and lets the proxy bind the same address
//!   itself. Only useful to run the data-path tests against docker-proxy < 28,
//!   which has no `-use-listen-fd`.
//! - `HOSTNET_SKIP_PRIVILEGED=1`: the network-namespace tests return early
//!   instead of failing when they cannot run.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{setsockopt, sockopt};
use nix::unistd::{Pid, pipe2};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};

/// Default read/write timeout of every socket the tests create.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy gets to report its status on fd 3.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

pub const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
pub const ANY4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
pub const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// `ip:0`.
pub fn any_port(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 0)
}

/// The binary under test.
pub fn proxy_bin() -> PathBuf {
    match std::env::var_os("HOSTNET_PROXY_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_hostnet-proxy")),
    }
}

fn no_listen_fd() -> bool {
    std::env::var("HOSTNET_TEST_NO_LISTEN_FD").is_ok_and(|v| v == "1")
}

/// Polls `cond` every few milliseconds until it holds (true) or `deadline`
/// passes (false).
pub fn wait_until(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// `Instant::now() + d`.
pub fn after(d: Duration) -> Instant {
    Instant::now() + d
}

// ---------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------

// The checksummed payload stream is shared with the end-to-end tests. (Each test binary uses a
// subset, as with `dead_code` above.)
#[allow(unused_imports)]
pub use hostnet_e2e::payload::{Prng, Verifier, expect_eof, payload, read_prng, write_prng};

/// Reads until something other than data happens (EOF, error, timeout) and
/// returns that: `Ok(total bytes read)` for EOF.
pub fn read_until_end(r: &mut impl Read) -> io::Result<usize> {
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

/// True for the error kinds a socket read timeout shows up as.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

// ---------------------------------------------------------------------------
// TCP helpers
// ---------------------------------------------------------------------------

pub fn set_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).unwrap();
    s.set_write_timeout(Some(t)).unwrap();
}

/// Connects with a timeout and sets [`IO_TIMEOUT`] on the stream.
pub fn try_connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    set_timeouts(&s, IO_TIMEOUT);
    Ok(s)
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr} failed: {e}"))
}

/// Connects to a proxy that may reset the connection right away: on
/// loopback the reset can arrive before `connect` returns, which then fails
/// with ConnectionReset (the handshake did complete: a refused handshake is
/// ConnectionRefused). Returns None in that case.
pub fn connect_or_reset(addr: SocketAddr) -> Option<TcpStream> {
    match try_connect(addr, Duration::from_secs(5)) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
        Err(e) => panic!("connect to {addr} failed: {e}"),
    }
}

#[allow(unused_imports)]
pub use hostnet_e2e::net::echo_on;

/// Connects to `addr` and does [`echo_on`].
pub fn echo_check(addr: SocketAddr, seed: u64, len: usize) -> Result<(), String> {
    let mut s =
        try_connect(addr, Duration::from_secs(5)).map_err(|e| format!("connect to {addr}: {e}"))?;
    echo_on(&mut s, seed, len)
}

/// A free TCP port on `ip` (bound then released).
pub fn free_tcp_port(ip: IpAddr) -> u16 {
    TcpListener::bind(any_port(ip))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free UDP port on `ip` (bound then released).
pub fn free_udp_port(ip: IpAddr) -> u16 {
    UdpSocket::bind(any_port(ip))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An address where nothing listens (TCP).
pub fn dead_tcp_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, free_tcp_port(ip))
}

fn domain_of(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// A TCP socket as dockerd hands it over on fd 4: SO_REUSEADDR, bound,
/// listening; IPv6 sockets are V6ONLY unless `dual_stack`.
pub fn tcp_listen_socket_opts(addr: SocketAddr, dual_stack: bool) -> Socket {
    let s = Socket::new(domain_of(&addr), Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(!dual_stack).unwrap();
    }
    s.bind(&SockAddr::from(addr)).unwrap();
    s.listen(1024).unwrap();
    s
}

pub fn tcp_listen_socket(addr: SocketAddr) -> Socket {
    tcp_listen_socket_opts(addr, false)
}

/// A UDP socket as dockerd hands it over on fd 4: bound, with IP_PKTINFO (v4)
/// or IPV6_RECVPKTINFO (v6) set; IPv6 sockets are V6ONLY unless `dual_stack`.
pub fn udp_listen_socket_opts(addr: SocketAddr, dual_stack: bool) -> Socket {
    let s = Socket::new(domain_of(&addr), Type::DGRAM, None).unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(!dual_stack).unwrap();
        setsockopt(&s, sockopt::Ipv6RecvPacketInfo, &true).unwrap();
    } else {
        setsockopt(&s, sockopt::Ipv4PacketInfo, &true).unwrap();
    }
    s.bind(&SockAddr::from(addr)).unwrap();
    s
}

pub fn udp_listen_socket(addr: SocketAddr) -> Socket {
    udp_listen_socket_opts(addr, false)
}

/// Sets SO_LINGER {on, 0}: closing the socket then sends a RST.
pub fn set_linger_zero(s: &TcpStream) {
    SockRef::from(s).set_linger(Some(Duration::ZERO)).unwrap();
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A TCP server: one thread per connection running `handler`.
#[derive(Debug)]
pub struct TcpServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TcpServer {
    pub fn bind(addr: SocketAddr, handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Self {
        Self::serve(TcpListener::bind(addr).unwrap(), handler)
    }

    pub fn echo(addr: SocketAddr) -> Self {
        Self::bind(addr, echo_handler)
    }

    pub fn serve(
        listener: TcpListener,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        listener.set_nonblocking(true).unwrap();
        {
            let stop = stop.clone();
            let accepted = accepted.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(50u16));
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
            });
        }
        Self {
            addr,
            accepted,
            stop,
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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

/// One datagram as a [`UdpServer`] saw it.
pub type Datagram = (SocketAddr, Vec<u8>);

/// A UDP server that records every datagram (source, bytes) and, if asked,
/// echoes it back to its source.
#[derive(Debug)]
pub struct UdpServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Datagram>>>,
    stop: Arc<AtomicBool>,
}

impl UdpServer {
    pub fn echo(addr: SocketAddr) -> Self {
        Self::serve(UdpSocket::bind(addr).unwrap(), true)
    }

    /// Records, never replies.
    pub fn sink(addr: SocketAddr) -> Self {
        Self::serve(UdpSocket::bind(addr).unwrap(), false)
    }

    pub fn serve(sock: UdpSocket, echo: bool) -> Self {
        let addr = sock.local_addr().unwrap();
        big_buffers(&sock);
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let stop = stop.clone();
            let log = log.clone();
            thread::spawn(move || {
                let mut buf = vec![0; 70 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    // Errors are read timeouts (to check `stop`) or ICMP
                    // errors from earlier replies: keep serving.
                    if let Ok((n, src)) = sock.recv_from(&mut buf) {
                        log.lock().unwrap().push((src, buf[..n].to_vec()));
                        if echo {
                            let _ = sock.send_to(&buf[..n], src);
                        }
                    }
                }
            });
        }
        Self { addr, log, stop }
    }

    pub fn received(&self) -> Vec<Datagram> {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until at least `n` datagrams arrived.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        wait_until(after(timeout), || self.count() >= n)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// 4 MiB socket buffers so that 64 KiB datagrams are never dropped for lack
/// of room.
pub fn big_buffers(sock: &impl AsFd) {
    let r = SockRef::from(sock);
    r.set_recv_buffer_size(4 << 20).unwrap();
    r.set_send_buffer_size(4 << 20).unwrap();
}

/// A UDP client socket on `bind` with big buffers and [`IO_TIMEOUT`].
pub fn udp_client(bind: IpAddr) -> UdpSocket {
    let s = UdpSocket::bind(any_port(bind)).unwrap();
    big_buffers(&s);
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Sends `data` to `to` and expects the same bytes back from `to` within `timeout`.
pub fn udp_echo_check(
    sock: &UdpSocket,
    to: SocketAddr,
    data: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    sock.send_to(data, to)
        .map_err(|e| format!("send_to {to}: {e}"))?;
    let mut buf = vec![0; 70 * 1024];
    let end = after(timeout);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no echo from {to} within {timeout:?}"));
        }
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if from != to {
                    return Err(format!("reply came from {from}, expected {to}"));
                }
                if &buf[..n] != data {
                    return Err(format!(
                        "echo differs: got {n} bytes, sent {} bytes",
                        data.len()
                    ));
                }
                return Ok(());
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(format!("recv_from: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------

/// True when privileged tests must be skipped (`HOSTNET_SKIP_PRIVILEGED=1`).
pub fn skip_privileged(test: &str) -> bool {
    if std::env::var("HOSTNET_SKIP_PRIVILEGED").is_ok_and(|v| v == "1") {
        eprintln!("note: {test} skipped: HOSTNET_SKIP_PRIVILEGED=1");
        return true;
    }
    false
}

// ---------------------------------------------------------------------------
// Output collection
// ---------------------------------------------------------------------------

/// Drains a pipe in a thread.
#[derive(Debug, Clone)]
pub struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
}

impl Collector {
    pub fn spawn(mut r: impl Read + Send + 'static) -> Self {
        let c = Self {
            buf: Arc::default(),
            done: Arc::default(),
        };
        let c2 = c.clone();
        thread::spawn(move || {
            let mut b = [0u8; 4096];
            loop {
                match r.read(&mut b) {
                    Ok(0) => break,
                    Ok(n) => c2.buf.lock().unwrap().extend_from_slice(&b[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            c2.done.store(true, Ordering::SeqCst);
        });
        c
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// True once the writer side is closed (EOF).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    pub fn wait_done(&self, timeout: Duration) -> bool {
        wait_until(after(timeout), || self.is_done())
    }
}

// ---------------------------------------------------------------------------
// The proxy process
// ---------------------------------------------------------------------------

/// Builder for a proxy process. See [`Proxy::tcp`] and [`Proxy::udp`].
#[derive(Debug)]
pub struct ProxyBuilder {
    proto: String,
    host: Option<SocketAddr>,
    container: Option<SocketAddr>,
    listen_fd: Option<Socket>,
    envs: Vec<(OsString, OsString)>,
    nofile: Option<u64>,
    status_fd: bool,
    args: Option<Vec<String>>,
    extra_args: Vec<String>,
    wait_status: bool,
    strict_fd: bool,
}

impl ProxyBuilder {
    /// `-host-ip`/`-host-port`: the proxy binds this address itself.
    pub fn host(mut self, addr: SocketAddr) -> Self {
        self.host = Some(addr);
        self
    }

    /// Picks a free port on `ip` for the proxy to bind itself.
    pub fn host_free(self, ip: IpAddr) -> Self {
        let port = if self.proto == "udp" {
            free_udp_port(ip)
        } else {
            free_tcp_port(ip)
        };
        self.host(SocketAddr::new(ip, port))
    }

    /// Hands `sock` over on fd 4 with `-use-listen-fd`; `-host-ip`/`-host-port`
    /// are its local address.
    pub fn listen(mut self, sock: Socket) -> Self {
        self.host = Some(sock.local_addr().unwrap().as_socket().unwrap());
        self.listen_fd = Some(sock);
        self
    }

    /// Like [`Self::listen`], but never replaced by a self-bound address
    /// (`HOSTNET_TEST_NO_LISTEN_FD` is ignored): for tests of fd 4 itself.
    pub fn listen_strict(mut self, sock: Socket) -> Self {
        self.strict_fd = true;
        self.listen(sock)
    }

    /// Puts `sock` on fd 4 without adding any flag (with [`Self::args`]).
    pub fn fd4(mut self, sock: Socket) -> Self {
        self.listen_fd = Some(sock);
        self
    }

    /// `-container-ip`/`-container-port`.
    pub fn container(mut self, addr: SocketAddr) -> Self {
        self.container = Some(addr);
        self
    }

    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// RLIMIT_NOFILE soft = hard = `n` in the child.
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Leaves fd 3 closed in the child.
    pub fn without_status_fd(mut self) -> Self {
        self.status_fd = false;
        self
    }

    /// Replaces the whole generated command line.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Appended to the generated command line.
    pub fn extra_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.extra_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// The command line that [`Self::spawn`] would use.
    pub fn command_line(&self) -> Vec<String> {
        if let Some(a) = &self.args {
            return a.clone();
        }
        let mut a = vec!["-proto".to_string(), self.proto.clone()];
        if let Some(h) = self.host {
            a.extend([
                "-host-ip".into(),
                h.ip().to_string(),
                "-host-port".into(),
                h.port().to_string(),
            ]);
        }
        if let Some(c) = self.container {
            a.extend([
                "-container-ip".into(),
                c.ip().to_string(),
                "-container-port".into(),
                c.port().to_string(),
            ]);
        }
        if self.listen_fd.is_some() {
            a.push("-use-listen-fd".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }

    /// Starts the proxy and reads its status from fd 3: until `0\n`, EOF or
    /// [`STATUS_TIMEOUT`].
    pub fn spawn(mut self) -> Proxy {
        if self.args.is_none() && !self.strict_fd && self.listen_fd.is_some() && no_listen_fd() {
            // docker-proxy < 28: let it bind the same address itself.
            self.listen_fd = None;
        }
        let argv = self.command_line();
        let mut cmd = Command::new(proxy_bin());
        cmd.args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }

        let (status_r, status_w) = if self.status_fd {
            let (r, w) = pipe2(OFlag::O_CLOEXEC).unwrap();
            (Some(r), Some(high_fd(w)))
        } else {
            (None, None)
        };
        let listen = self.listen_fd.take().map(|s| high_fd(OwnedFd::from(s)));
        let status_raw: RawFd = status_w.as_ref().map_or(-1, |f| f.as_raw_fd());
        let listen_raw: RawFd = listen.as_ref().map_or(-1, |f| f.as_raw_fd());
        let nofile = self.nofile;
        let child_setup = move || -> io::Result<()> {
            place_fd(status_raw, 3)?;
            place_fd(listen_raw, 4)?;
            // Like dockerd, hand over nothing else (the test harness may hold
            // inheritable descriptors, e.g. a jobserver pipe).
            // SAFETY: close_range on numbers >= 5 only, which the child
            // owns and never uses; failure (old kernel) is harmless.
            unsafe { libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32) };
            if let Some(n) = nofile {
                setrlimit(Resource::RLIMIT_NOFILE, n, n).map_err(io::Error::from)?;
            }
            Ok(())
        };
        // SAFETY: `child_setup` runs between fork and exec; it only calls
        // dup2, close, close_range and setrlimit (async-signal-safe) on integers captured
        // by value, and does not allocate or take locks.
        unsafe {
            cmd.pre_exec(child_setup);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", proxy_bin().display()));
        drop(status_w);
        drop(listen);

        let stdout = Collector::spawn(child.stdout.take().unwrap());
        let stderr = Collector::spawn(child.stderr.take().unwrap());
        let status = status_r.map(|r| Collector::spawn(std::fs::File::from(r)));
        if let Some(st) = &status {
            if self.wait_status {
                wait_until(after(STATUS_TIMEOUT), || {
                    let b = st.bytes();
                    st.is_done() || b.starts_with(b"0\n") || (b.len() >= 2 && b[0] != b'1')
                });
                if st.bytes().starts_with(b"1") {
                    // The reason may come in several writes: read up to EOF.
                    st.wait_done(Duration::from_secs(2));
                }
            }
        }
        Proxy {
            child,
            argv,
            host: self.host,
            status,
            stdout,
            stderr,
            exit: None,
        }
    }

    /// [`Self::spawn`] and require the `0\n` status.
    pub fn start(self) -> Proxy {
        let mut p = self.spawn();
        p.assert_ready();
        p
    }
}

/// Moves `fd` to a descriptor number >= 10 (close-on-exec), so that placing
/// descriptors on 3 and 4 in the child can never clobber one another.
fn high_fd(fd: OwnedFd) -> OwnedFd {
    let n = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(10)).unwrap();
    // SAFETY: `n` is a new descriptor that F_DUPFD_CLOEXEC just returned and
    // nothing else owns.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) }
}

/// In the child: dup2 `src` onto `dst` (which clears close-on-exec), or close
/// `dst` when there is no `src`.
fn place_fd(src: RawFd, dst: RawFd) -> io::Result<()> {
    if src < 0 {
        // SAFETY: closing a descriptor number; the child owns its table and
        // nothing in it refers to `dst` (an error for a closed fd is fine).
        unsafe { libc::close(dst) };
        return Ok(());
    }
    // SAFETY: dup2 on two plain descriptor numbers; `src` is open (>= 10,
    // different from `dst`).
    if unsafe { libc::dup2(src, dst) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A running proxy; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proxy {
    pub child: Child,
    pub argv: Vec<String>,
    /// `-host-ip`/`-host-port` (for a wildcard IP, connect to a concrete one).
    pub host: Option<SocketAddr>,
    status: Option<Collector>,
    stdout: Collector,
    stderr: Collector,
    exit: Option<ExitStatus>,
}

impl Proxy {
    pub fn tcp() -> ProxyBuilder {
        Self::proto("tcp")
    }

    pub fn udp() -> ProxyBuilder {
        Self::proto("udp")
    }

    pub fn proto(p: &str) -> ProxyBuilder {
        ProxyBuilder {
            proto: p.to_string(),
            host: None,
            container: None,
            listen_fd: None,
            envs: Vec::new(),
            nofile: None,
            status_fd: true,
            args: None,
            extra_args: Vec::new(),
            wait_status: true,
            strict_fd: false,
        }
    }

    /// A proxy with exactly these arguments.
    pub fn with_args<S: Into<String>>(args: impl IntoIterator<Item = S>) -> ProxyBuilder {
        Self::tcp().args(args)
    }

    /// The address to send to (host address; wildcards mapped to loopback).
    pub fn addr(&self) -> SocketAddr {
        let h = self.host.expect("proxy has no host address");
        match h.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(LO4, h.port()),
            IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(LO6, h.port()),
            _ => h,
        }
    }

    /// What the proxy wrote on fd 3 so far (raw bytes).
    pub fn status_bytes(&self) -> Vec<u8> {
        self.status
            .as_ref()
            .map(Collector::bytes)
            .unwrap_or_default()
    }

    pub fn status(&self) -> String {
        String::from_utf8_lossy(&self.status_bytes()).into_owned()
    }

    /// True once fd 3 reads EOF.
    pub fn status_eof(&self) -> bool {
        self.status.as_ref().is_some_and(Collector::is_done)
    }

    /// Waits until fd 3 reads EOF (true), at most `timeout`.
    pub fn wait_status_eof(&self, timeout: Duration) -> bool {
        self.status.as_ref().is_none_or(|c| c.wait_done(timeout))
    }

    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Everything useful for a failure message.
    pub fn describe(&mut self) -> String {
        let exit = self.try_exit();
        format!(
            "binary {} argv {:?}: status on fd 3 {:?} (EOF: {}), exit {:?}, stdout {:?}, stderr {:?}",
            proxy_bin().display(),
            self.argv,
            self.status(),
            self.status_eof(),
            exit,
            self.stdout(),
            self.stderr()
        )
    }

    /// Panics unless the status is exactly `0\n`.
    pub fn assert_ready(&mut self) {
        if self.status_bytes() != b"0\n" {
            // Give a failing proxy a moment to exit so that its exit status
            // and stderr make it into the message.
            self.wait_exit(Duration::from_millis(500));
            panic!("proxy not ready: {}", self.describe());
        }
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().unwrap();
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = after(timeout);
        loop {
            if let Some(s) = self.try_exit() {
                // Let the drain threads see EOF.
                self.stdout.wait_done(Duration::from_secs(1));
                self.stderr.wait_done(Duration::from_secs(1));
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Exit code, panicking when the process is still running after `timeout`
    /// or died from a signal.
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        match self.wait_exit(timeout) {
            Some(s) => s.code().unwrap_or_else(|| {
                panic!(
                    "proxy killed by signal {:?}: {}",
                    s.signal(),
                    self.describe()
                )
            }),
            None => panic!("proxy still running after {timeout:?}: {}", self.describe()),
        }
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts the proxy failed at startup the docker-proxy way: `1\n<reason>`
/// on fd 3 with `needle` in the reason, then exit status 1.
pub fn assert_startup_error(p: &mut Proxy, needle: &str) {
    let st = p.status_bytes();
    let code = p.wait_exit(Duration::from_secs(5)).and_then(|s| s.code());
    let desc = p.describe();
    assert!(
        st.starts_with(b"1\n"),
        "expected `1\\n<reason>` on fd 3: {desc}"
    );
    let reason = String::from_utf8_lossy(&st[2..]).to_lowercase();
    assert!(
        reason.contains(&needle.to_lowercase()),
        "reason should mention {needle:?}: {desc}"
    );
    assert_eq!(code, Some(1), "exit status should be 1: {desc}");
}

/// Number of open descriptors of process `pid` (from /proc).
pub fn fd_count(pid: Pid) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
