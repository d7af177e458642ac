//! In-process backend servers, all on 127.0.0.1:
//!
//! * [`TcpSink`]: accepts connections and reads and discards everything,
//!   counting bytes (bulk throughput). Thread per connection.
//! * [`EchoServer`]: echoes whatever it reads (request/response, connection
//!   rate, idle connections). One thread with epoll, so it can hold thousands
//!   of connections cheaply.
//! * [`UdpSink`]: counts datagrams that carry the current trial id.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{setsockopt, sockopt};

/// Read buffer of the TCP sink.
const SINK_BUF: usize = 256 * 1024;

/// The three backends one path (direct or a proxy) is measured against.
#[derive(Debug)]
pub struct Backends {
    pub sink: TcpSink,
    pub echo: EchoServer,
    pub udp: UdpSink,
}

impl Backends {
    pub fn start() -> Result<Backends> {
        Ok(Backends {
            sink: TcpSink::start()?,
            echo: EchoServer::start()?,
            udp: UdpSink::start()?,
        })
    }
}

#[derive(Debug, Default)]
struct SinkConns {
    accepted: u64,
    active: u64,
}

/// TCP server that discards everything and counts the bytes.
#[derive(Debug)]
pub struct TcpSink {
    pub addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    conns: Arc<(Mutex<SinkConns>, Condvar)>,
}

impl TcpSink {
    pub fn start() -> Result<TcpSink> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding TCP sink")?;
        let addr = listener.local_addr()?;
        let bytes = Arc::new(AtomicU64::new(0));
        let conns = Arc::new((Mutex::new(SinkConns::default()), Condvar::new()));
        let (b, c) = (bytes.clone(), conns.clone());
        std::thread::Builder::new()
            .name("tcp-sink".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    {
                        let mut g = c.0.lock().unwrap_or_else(|e| e.into_inner());
                        g.accepted += 1;
                        g.active += 1;
                    }
                    let (b2, c2) = (b.clone(), c.clone());
                    let spawned = std::thread::Builder::new()
                        .name("tcp-sink-conn".into())
                        .spawn(move || {
                            sink_conn(stream, &b2);
                            let mut g = c2.0.lock().unwrap_or_else(|e| e.into_inner());
                            g.active -= 1;
                            c2.1.notify_all();
                        });
                    if spawned.is_err() {
                        let mut g = c.0.lock().unwrap_or_else(|e| e.into_inner());
                        g.active -= 1;
                        c.1.notify_all();
                    }
                }
            })
            .context("spawning TCP sink thread")?;
        Ok(TcpSink { addr, bytes, conns })
    }

    /// Total bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Number of connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.conns
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .accepted
    }

    /// Waits until at least `accepted` connections were accepted in total and
    /// all of them are closed, so a trial's tail does not leak into the next.
    pub fn wait_quiet(&self, accepted: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.conns;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        while g.accepted < accepted || g.active > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "TCP sink not quiet after {timeout:?}: accepted {}/{accepted}, {} still open",
                    g.accepted,
                    g.active
                );
            }
            g = cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

fn sink_conn(mut stream: TcpStream, bytes: &AtomicU64) {
    let mut buf = vec![0u8; SINK_BUF];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// TCP echo server on one epoll thread.
#[derive(Debug)]
pub struct EchoServer {
    pub addr: SocketAddr,
}

impl EchoServer {
    pub fn start() -> Result<EchoServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding TCP echo")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
        std::thread::Builder::new()
            .name("tcp-echo".into())
            .spawn(move || {
                if let Err(e) = echo_loop(&listener, &epoll) {
                    eprintln!("error: echo server stopped: {e:#}");
                }
            })
            .context("spawning echo thread")?;
        Ok(EchoServer { addr })
    }
}

/// Epoll token of the listening socket; connections get 1, 2, ...
const LISTENER: u64 = 0;

fn echo_loop(listener: &TcpListener, epoll: &Epoll) -> Result<()> {
    let mut conns: HashMap<u64, TcpStream> = HashMap::new();
    let mut next_token = LISTENER + 1;
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 64 * 1024];
    // When accept fails for lack of descriptors, the listener is taken out of
    // epoll (it would stay readable and spin) until a connection closes.
    let mut listener_paused = false;
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("epoll_wait"),
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((s, _)) => {
                            if s.set_nonblocking(true).is_err() {
                                continue;
                            }
                            let _ = s.set_nodelay(true);
                            let token = next_token;
                            next_token += 1;
                            if epoll
                                .add(&s, EpollEvent::new(EpollFlags::EPOLLIN, token))
                                .is_ok()
                            {
                                conns.insert(token, s);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                            eprintln!(
                                "warning: echo server out of descriptors with {} connections",
                                conns.len()
                            );
                            epoll.delete(listener)?;
                            listener_paused = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            } else if let Some(s) = conns.get_mut(&token) {
                if echo_once(s, &mut buf) {
                    // Dropping the stream closes it and removes it from epoll.
                    conns.remove(&token);
                    if listener_paused {
                        epoll.add(listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
                        listener_paused = false;
                    }
                }
            }
        }
    }
}

/// Echoes what is readable now; returns true when the connection should close.
fn echo_once(s: &mut TcpStream, buf: &mut [u8]) -> bool {
    loop {
        match s.read(buf) {
            Ok(0) => return true,
            Ok(n) => {
                if write_all_spin(s, &buf[..n]).is_err() {
                    return true;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// Writes all of `data` to a non-blocking socket. The echo traffic is a few
/// bytes at a time, so the send buffer is never full in practice; if it is,
/// retry (bounded) rather than buffer.
fn write_all_spin(s: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    let mut spins = 0u32;
    while !data.is_empty() {
        match s.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock && spins < 100_000 => {
                spins += 1;
                std::thread::yield_now();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// UDP server that counts datagrams of the current trial.
///
/// Each datagram starts with a little-endian u32 trial id, then a u64
/// sequence number. The state packs the current trial id (high 32 bits) and
/// the count of its datagrams received (low 32 bits), so starting a trial and
/// counting are each one atomic operation and stragglers of an earlier trial
/// are never counted.
#[derive(Debug)]
pub struct UdpSink {
    pub addr: SocketAddr,
    state: Arc<AtomicU64>,
}

impl UdpSink {
    pub fn start() -> Result<UdpSink> {
        let sock = UdpSocket::bind("127.0.0.1:0").context("binding UDP sink")?;
        // Same (large) receive buffer for every path; capped by net.core.rmem_max.
        let _ = setsockopt(&sock, sockopt::RcvBuf, &(4 << 20));
        let addr = sock.local_addr()?;
        let state = Arc::new(AtomicU64::new(0));
        let st = state.clone();
        std::thread::Builder::new()
            .name("udp-sink".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match sock.recv(&mut buf) {
                        Ok(n) => n,
                        Err(_) => continue,
                    };
                    if n < 4 {
                        continue;
                    }
                    let trial = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    let mut cur = st.load(Ordering::Relaxed);
                    while cur >> 32 == u64::from(trial) {
                        match st.compare_exchange_weak(
                            cur,
                            cur + 1,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        ) {
                            Ok(_) => break,
                            Err(now) => cur = now,
                        }
                    }
                }
            })
            .context("spawning UDP sink thread")?;
        Ok(UdpSink { addr, state })
    }

    /// Starts counting datagrams of trial `id` from zero.
    pub fn begin_trial(&self, id: u32) {
        self.state.store(u64::from(id) << 32, Ordering::SeqCst);
    }

    /// Datagrams of the current trial received so far.
    pub fn received(&self) -> u64 {
        self.state.load(Ordering::SeqCst) & 0xffff_ffff
    }
}
