//! `sctp_guest`: the SCTP side of the real-VM test, run inside the guest (static musl), whose
//! kernel has the `sctp` module (the host's may not). It starts a userland proxy the way dockerd
//! does — the status pipe on fd 3, with `-use-listen-fd` a listening SCTP socket on fd 4 — in
//! front of an SCTP server of its own, drives clients through it, and prints what it saw as one
//! JSON object: the host test (`tests/tests/vm.rs`) holds the expectations, for hostnet-proxy
//! and for docker-proxy, so the two are compared on the same observations.
//!
//! ```text
//! sctp_guest check PROXY SCENARIO    one scenario (below) through the proxy binary PROXY
//! sctp_guest bench [--seconds S] [--trials N] [--assocs N] [--nagle] NAME=PROXY...
//!                                    messages/s and MB/s (64 B and 16 KiB messages, client to
//!                                    server) direct and through each proxy, and each proxy's
//!                                    RSS, threads and descriptors with N associations held
//!                                    (and the guest memory they take);
//!                                    --nagle: clients and server without SCTP_NODELAY
//! ```
//!
//! Scenarios: `messages` (1 B to 300 KB: echo, server-checked sink, client-checked source;
//! how many messages each one arrived as), `streams` (stream ids and PPIDs per message, the
//! unordered flag), `concurrent` (100 associations open at once), `listen-fd` (fd 4), `ipv6`
//! (an IPv6 front to an IPv4 server), `port-in-use`, `sigterm` (with associations open),
//! `refused` (nothing listens on the container port), `close` (graceful ends and ABORTs each
//! way), `over-limit` (`HOSTNET_PROXY_SCTP_MAX_MESSAGE`), `emfile` (RLIMIT_NOFILE 32).
//!
//! **The server**: one thread per association. A message whose PPID is [`CTL`] is a command
//! (ASCII): `CLOSE` (close the association gracefully), `ABORT` (abort it), `SINK n size seed`
//! (read `n * size` bytes of the PRNG stream of `seed`, check them, answer `OK msgs=M bytes=B`
//! or `BAD ...`), `SOURCE n size seed` (send `n` messages of `size` bytes of that stream on
//! stream 1, PPIDs 1000 + i), `COUNT` (count messages until `END`, answer `OK msgs=M bytes=B`).
//! Any other message is echoed back as it came: same bytes, stream id, PPID and ordering.
//! How each association ended (`eof`, `reset`, or the error) is recorded for the scenarios.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hostnet_e2e::payload::{Prng, Verifier, payload};
use serde_json::{Value, json};

/// The PPID of the server's commands ("HNCT").
const CTL: u32 = 0x484e_4354;
/// Socket timeouts of the clients and the server: nothing waits longer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// Streams each way of the clients and the server, but for `streams`: what SCTP applications
/// typically ask for. (The kernel preallocates 44 bytes per stream and direction: associations
/// of 65,535 streams cost ~2.9 MiB each, and 100 of them through a proxy (four ends each) do
/// not fit the guest's 256 MiB.)
const STREAMS: u16 = 16;

/// `SCTP_NODELAY` on the clients' and the server's sockets (what signalling applications set;
/// `bench --nagle` turns it off). With Linux's SCTP Nagle on, a one-way stream of small messages
/// waits for delayed SACKs: about 470 messages/s in the guest whatever the path.
static NODELAY: AtomicBool = AtomicBool::new(true);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("check") => match &args[1..] {
            [bin, scenario] => check(bin, scenario).map(|v| println!("{v}")),
            _ => Err("usage: sctp_guest check PROXY SCENARIO".into()),
        },
        Some("bench") => bench(&args[1..]),
        _ => Err("usage: sctp_guest check PROXY SCENARIO | bench ...".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sctp_guest: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// SCTP sockets (blocking, one-to-one), straight on libc
// ---------------------------------------------------------------------------

/// The metadata of one message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Info {
    sid: u16,
    ppid: u32,
    unordered: bool,
}

/// One whole message as received (up to `MSG_EOR`): its length and metadata (of its first
/// piece).
#[derive(Debug, Clone, Copy)]
struct Msg {
    len: usize,
    info: Info,
}

#[derive(Debug)]
struct Sctp(OwnedFd);

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut ss).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut ss).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read(std::ptr::from_ref(ss).cast()) };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read(std::ptr::from_ref(ss).cast()) };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

impl Sctp {
    fn new(v6: bool, streams: u16) -> io::Result<Sctp> {
        let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket(2).
        let fd = cvt(unsafe {
            libc::socket(
                domain,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                libc::IPPROTO_SCTP,
            )
        })?;
        // SAFETY: socket(2) just returned this descriptor; nothing else owns it.
        let s = Sctp(unsafe { OwnedFd::from_raw_fd(fd) });
        if v6 {
            s.setsockopt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &1 as &libc::c_int)?;
        }
        let init = libc::sctp_initmsg {
            sinit_num_ostreams: streams,
            sinit_max_instreams: streams,
            sinit_max_attempts: 0,
            sinit_max_init_timeo: 0,
        };
        s.setsockopt(libc::IPPROTO_SCTP, libc::SCTP_INITMSG, &init)?;
        s.setsockopt(
            libc::IPPROTO_SCTP,
            libc::SCTP_RECVRCVINFO,
            &1 as &libc::c_int,
        )?;
        if NODELAY.load(Ordering::Relaxed) {
            s.setsockopt(libc::IPPROTO_SCTP, libc::SCTP_NODELAY, &1 as &libc::c_int)?;
        }
        if BIG_SNDBUF.load(Ordering::Relaxed) {
            // Linux sends no message larger than the send buffer (212,992 B by default): 300 KB
            // messages need more (accepted sockets inherit it from the listener).
            s.setsockopt(
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                &(2 << 20) as &libc::c_int,
            )?;
        }
        Ok(s)
    }

    fn setsockopt<T>(&self, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
        // SAFETY: `v` is a live T of the length given; the kernel only reads it.
        cvt(unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                level,
                name,
                std::ptr::from_ref(v).cast(),
                size_of::<T>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    fn timeouts(&self, t: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        self.setsockopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        self.setsockopt(libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)
    }

    /// A listening socket as dockerd makes it (V6ONLY, 65,535 streams, bound, `listen(-1)`).
    fn listen(addr: SocketAddr) -> io::Result<Sctp> {
        Sctp::listen_streams(addr, u16::MAX)
    }

    fn listen_streams(addr: SocketAddr, streams: u16) -> io::Result<Sctp> {
        let s = Sctp::new(addr.is_ipv6(), streams)?;
        let (ss, len) = sockaddr(addr);
        // SAFETY: `ss` holds a sockaddr of `len` bytes.
        cvt(unsafe { libc::bind(s.0.as_raw_fd(), std::ptr::from_ref(&ss).cast(), len) })?;
        // SAFETY: plain listen(2).
        cvt(unsafe { libc::listen(s.0.as_raw_fd(), -1) })?;
        Ok(s)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        // SAFETY: sockaddr_storage is plain data for which all-zero is valid.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `ss`.
        cvt(unsafe {
            libc::getsockname(
                self.0.as_raw_fd(),
                std::ptr::from_mut(&mut ss).cast(),
                &mut len,
            )
        })?;
        from_sockaddr(&ss).ok_or_else(|| io::Error::other("not an IP socket"))
    }

    fn accept(&self) -> io::Result<Sctp> {
        // SAFETY: accept4 with no address wanted; the descriptor is new and ours.
        let fd = cvt(unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        let s = Sctp(unsafe { OwnedFd::from_raw_fd(fd) });
        s.setsockopt(
            libc::IPPROTO_SCTP,
            libc::SCTP_RECVRCVINFO,
            &1 as &libc::c_int,
        )?;
        s.timeouts(IO_TIMEOUT)?;
        Ok(s)
    }

    /// Connects with [`STREAMS`] streams each way (bounded by the send timeout).
    fn connect(addr: SocketAddr) -> io::Result<Sctp> {
        Sctp::connect_streams(addr, STREAMS)
    }

    fn connect_streams(addr: SocketAddr, streams: u16) -> io::Result<Sctp> {
        let s = Sctp::new(addr.is_ipv6(), streams)?;
        s.timeouts(IO_TIMEOUT)?;
        let (ss, len) = sockaddr(addr);
        // SAFETY: `ss` holds a sockaddr of `len` bytes.
        cvt(unsafe { libc::connect(s.0.as_raw_fd(), std::ptr::from_ref(&ss).cast(), len) })?;
        Ok(s)
    }

    /// Sends one whole message.
    fn send(&self, data: &[u8], info: Info) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        };
        let snd = libc::sctp_sndinfo {
            snd_sid: info.sid,
            snd_flags: if info.unordered {
                libc::SCTP_UNORDERED as u16
            } else {
                0
            },
            snd_ppid: info.ppid,
            snd_context: 0,
            snd_assoc_id: 0,
        };
        let mut cbuf = CmsgBuf([0; 64]);
        // SAFETY: msghdr is plain data for which all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a length.
        msg.msg_controllen =
            unsafe { libc::CMSG_SPACE(size_of::<libc::sctp_sndinfo>() as u32) } as _;
        // SAFETY: the control buffer holds one header and an sctp_sndinfo (<= 64 bytes).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::IPPROTO_SCTP;
            (*c).cmsg_type = libc::SCTP_SNDINFO;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::sctp_sndinfo>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::sctp_sndinfo>(), snd);
        }
        // SAFETY: `msg` points at live buffers; the kernel reads them.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != data.len() {
            return Err(io::Error::other(format!(
                "sendmsg took {n} of {} bytes",
                data.len()
            )));
        }
        Ok(())
    }

    /// One recvmsg into `out`: (bytes, end of message, metadata).
    fn recv_piece(&self, out: &mut [u8]) -> io::Result<(usize, bool, bool, Option<Info>)> {
        let mut iov = libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: out.len(),
        };
        let mut cbuf = CmsgBuf([0; 64]);
        // SAFETY: msghdr is plain data for which all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.0.len() as _;
        // SAFETY: `msg` points at live, writable buffers of the lengths given.
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut info = None;
        // SAFETY: walking the control messages recvmsg wrote, within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::IPPROTO_SCTP && (*c).cmsg_type == libc::SCTP_RCVINFO {
                    let ri: libc::sctp_rcvinfo =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    info = Some(Info {
                        sid: ri.rcv_sid,
                        ppid: ri.rcv_ppid,
                        unordered: libc::c_int::from(ri.rcv_flags) & libc::SCTP_UNORDERED != 0,
                    });
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((
            n as usize,
            msg.msg_flags & libc::MSG_EOR != 0,
            msg.msg_flags & libc::MSG_NOTIFICATION != 0,
            info,
        ))
    }

    /// Receives one whole message into `buf` (reassembling partial deliveries); `None` at end of
    /// stream.
    fn recv(&self, buf: &mut Vec<u8>) -> io::Result<Option<Msg>> {
        buf.clear();
        let mut info = None;
        let mut skipping = false;
        loop {
            let len = buf.len();
            if buf.capacity() - len < 64 * 1024 {
                buf.reserve(64 * 1024);
            }
            buf.resize(buf.capacity(), 0);
            let r = self.recv_piece(&mut buf[len..]);
            let (n, eor, notification, i) = match r {
                Ok(x) => x,
                Err(e) => {
                    buf.truncate(len);
                    return Err(e);
                }
            };
            if notification || skipping {
                buf.truncate(len);
                skipping = !eor;
                continue;
            }
            buf.truncate(len + n);
            if n == 0 {
                if len == 0 {
                    return Ok(None);
                }
                return Err(io::Error::other("end of stream inside a message"));
            }
            if info.is_none() {
                info = i;
            }
            if eor {
                return Ok(Some(Msg {
                    len: buf.len(),
                    info: info.unwrap_or_default(),
                }));
            }
        }
    }

    /// SO_LINGER on with a zero timeout: closing then sends an ABORT.
    fn linger_zero(&self) {
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = self.setsockopt(libc::SOL_SOCKET, libc::SO_LINGER, &l);
    }

    /// Closes with an ABORT.
    fn abort(self) {
        self.linger_zero();
    }
}

/// How an association looked from one end when it stopped: `eof` (graceful SHUTDOWN),
/// `reset` (an ABORT: ECONNRESET), `timeout`, or another error.
fn end_kind(r: &io::Result<Option<Msg>>) -> String {
    match r {
        Ok(None) => "eof".into(),
        Ok(Some(m)) => format!("message of {} bytes", m.len),
        Err(e) => error_kind(e),
    }
}

fn error_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EAGAIN) => "timeout".into(),
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::EPIPE) => "epipe".into(),
        _ => format!("error: {e}"),
    }
}

/// A free SCTP port on `ip` (bound, then released).
fn free_port(ip: IpAddr) -> io::Result<u16> {
    Ok(Sctp::listen(SocketAddr::new(ip, 0))?.local_addr()?.port())
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Ends {
    list: Mutex<VecDeque<String>>,
    cond: Condvar,
}

impl Ends {
    fn push(&self, e: String) {
        self.list.lock().unwrap().push_back(e);
        self.cond.notify_all();
    }

    /// The next association end recorded, waiting at most `t`.
    fn next(&self, t: Duration) -> Option<String> {
        let deadline = Instant::now() + t;
        let mut l = self.list.lock().unwrap();
        loop {
            if let Some(e) = l.pop_front() {
                return Some(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            l = self.cond.wait_timeout(l, deadline - now).unwrap().0;
        }
    }
}

#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    ends: Arc<Ends>,
}

impl Server {
    fn start(ip: IpAddr) -> io::Result<Server> {
        Server::start_streams(ip, STREAMS)
    }

    fn start_streams(ip: IpAddr, streams: u16) -> io::Result<Server> {
        let l = Sctp::listen_streams(SocketAddr::new(ip, 0), streams)?;
        let addr = l.local_addr()?;
        let ends = Arc::new(Ends::default());
        let e2 = ends.clone();
        thread::spawn(move || {
            loop {
                match l.accept() {
                    Ok(s) => {
                        let ends = e2.clone();
                        thread::spawn(move || {
                            let end = serve(&s);
                            ends.push(end);
                        });
                    }
                    Err(e) => {
                        eprintln!("server accept: {e}");
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        });
        Ok(Server { addr, ends })
    }
}

/// Serves one association; how it ended.
fn serve(s: &Sctp) -> String {
    let mut buf = Vec::new();
    loop {
        let r = s.recv(&mut buf);
        let m = match r {
            Ok(Some(m)) => m,
            other => return end_kind(&other),
        };
        if m.info.ppid != CTL {
            if let Err(e) = s.send(&buf, m.info) {
                return format!("echo failed: {}", error_kind(&e));
            }
            continue;
        }
        let cmd = String::from_utf8_lossy(&buf).into_owned();
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let num = |i: usize| {
            words
                .get(i)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let reply = |text: String| {
            s.send(
                text.as_bytes(),
                Info {
                    sid: 0,
                    ppid: CTL,
                    unordered: false,
                },
            )
        };
        match words.first().copied() {
            Some("CLOSE") => return "closed by the server".into(),
            Some("ABORT") => {
                // SO_LINGER 0: the caller's close of `s` aborts the association.
                s.linger_zero();
                return "aborted by the server".into();
            }
            Some("SINK") => {
                let (n, size, seed) = (num(1), num(2), num(3));
                let total = n * size;
                let mut v = Verifier::new(seed, "sink");
                let mut msgs = 0u64;
                let mut bad = None;
                while v.offset() < total {
                    match s.recv(&mut buf) {
                        Ok(Some(m)) => {
                            msgs += 1;
                            if m.info.sid != 1 {
                                bad.get_or_insert(format!(
                                    "message {msgs} on stream {}",
                                    m.info.sid
                                ));
                            }
                            if let Err(e) = v.check(&buf) {
                                bad.get_or_insert(e);
                            }
                        }
                        other => return end_kind(&other),
                    }
                }
                let text = match bad {
                    None => format!("OK msgs={msgs} bytes={}", v.offset()),
                    Some(b) => format!("BAD msgs={msgs} {b}"),
                };
                if reply(text).is_err() {
                    return "reply failed".into();
                }
            }
            Some("SOURCE") => {
                let (n, size, seed) = (num(1), num(2), num(3));
                let mut p = Prng::new(seed);
                let mut data = vec![0; size as usize];
                for i in 0..n {
                    p.fill(&mut data);
                    let info = Info {
                        sid: 1,
                        ppid: 1000 + i as u32,
                        unordered: false,
                    };
                    if let Err(e) = s.send(&data, info) {
                        return format!("source failed: {}", error_kind(&e));
                    }
                }
            }
            Some("COUNT") => {
                let (mut msgs, mut bytes) = (0u64, 0u64);
                loop {
                    match s.recv(&mut buf) {
                        Ok(Some(m)) if m.info.ppid == CTL => break,
                        Ok(Some(m)) => {
                            msgs += 1;
                            bytes += m.len as u64;
                        }
                        other => return end_kind(&other),
                    }
                }
                if reply(format!("OK msgs={msgs} bytes={bytes}")).is_err() {
                    return "reply failed".into();
                }
            }
            _ => {
                let _ = reply(format!("BAD command {cmd:?}"));
            }
        }
    }
}

/// Sends a command to the server.
fn command(s: &Sctp, text: &str, sid: u16) -> io::Result<()> {
    s.send(
        text.as_bytes(),
        Info {
            sid,
            ppid: CTL,
            unordered: false,
        },
    )
}

/// Waits for the server's `OK ...` / `BAD ...` answer.
fn answer(s: &Sctp, buf: &mut Vec<u8>) -> Result<String, String> {
    match s.recv(buf) {
        Ok(Some(m)) if m.info.ppid == CTL => Ok(String::from_utf8_lossy(buf).into_owned()),
        Ok(Some(m)) => Err(format!(
            "expected the server's answer, got a message of {} bytes",
            m.len
        )),
        other => Err(format!("no answer from the server: {}", end_kind(&other))),
    }
}

/// `key=value` out of an answer.
fn field(text: &str, key: &str) -> Option<u64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------
// The proxy under test, started as dockerd starts it
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Proxy {
    child: Child,
    status: Vec<u8>,
    front: SocketAddr,
}

/// What to give the proxy besides its argv.
#[derive(Debug, Default)]
struct Launch {
    fd4: Option<Sctp>,
    nofile: Option<u64>,
    env: Vec<(&'static str, &'static str)>,
}

/// 4 MiB send buffers on the clients' and the server's sockets (the checks; not the benchmark).
static BIG_SNDBUF: AtomicBool = AtomicBool::new(false);

/// Proxies log at debug level (the checks; not the benchmark).
static DEBUG_LOG: AtomicBool = AtomicBool::new(false);

/// The proxy's stderr: appended to `/tmp/sctp-<binary name>.log` (the test shows the guest's
/// `/tmp/*.log` when it fails).
fn log_file(bin: &str) -> Option<File> {
    let name = Path::new(bin)
        .file_name()
        .map_or_else(|| "proxy".into(), |n| n.to_string_lossy().into_owned());
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("/tmp/sctp-{name}.log"))
        .ok()
}

/// `dup` to a number above 10, so that the moves to 3 and 4 cannot overwrite each other.
fn dup_high(fd: RawFd) -> RawFd {
    // SAFETY: fcntl(F_DUPFD) on an open descriptor, async-signal-safe.
    unsafe { libc::fcntl(fd, libc::F_DUPFD, 10) }
}

impl Proxy {
    /// Starts `bin` in front of `back` on `front`, and reads its status pipe (fd 3) until it
    /// closes or 5 s pass.
    fn start(bin: &str, front: SocketAddr, back: SocketAddr, launch: Launch) -> io::Result<Proxy> {
        let mut args = vec![
            "-proto".to_string(),
            "sctp".into(),
            "-host-ip".into(),
            front.ip().to_string(),
            "-host-port".into(),
            front.port().to_string(),
            "-container-ip".into(),
            back.ip().to_string(),
            "-container-port".into(),
            back.port().to_string(),
        ];
        if launch.fd4.is_some() {
            args.push("-use-listen-fd".into());
        }
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let w_raw = w.as_raw_fd();
        let fd4_raw = launch.fd4.as_ref().map(|s| s.0.as_raw_fd());
        let nofile = launch.nofile;
        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(bin).map_or_else(Stdio::null, Stdio::from));
        if DEBUG_LOG.load(Ordering::Relaxed) {
            cmd.env("HOSTNET_PROXY_LOG", "debug");
        }
        cmd.envs(launch.env.iter().copied());
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (fcntl, dup2, close, setrlimit).
        unsafe {
            cmd.pre_exec(move || {
                let w = dup_high(w_raw);
                let s = fd4_raw.map(dup_high);
                if libc::dup2(w, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(w);
                if let Some(s) = s {
                    if libc::dup2(s, 4) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(s);
                }
                if let Some(n) = nofile {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(w);
        drop(launch.fd4);
        let status = read_status(r, Duration::from_secs(5));
        Ok(Proxy {
            child,
            status,
            front,
        })
    }

    fn ready(&self) -> bool {
        self.status == b"0\n"
    }

    fn status_text(&self) -> String {
        String::from_utf8_lossy(&self.status).into_owned()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits at most `t` for the exit.
    fn wait_exit(&mut self, t: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + t;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the status pipe until EOF (the proxy closes fd 3 once it has reported) or `t`.
fn read_status(r: OwnedFd, t: Duration) -> Vec<u8> {
    let deadline = Instant::now() + t;
    let mut f = File::from(r);
    let mut out = Vec::new();
    let mut b = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        let mut fds = [nix::poll::PollFd::new(
            f.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(0) => return out,
            Ok(_) => match f.read(&mut b) {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&b[..n]),
            },
            Err(_) => {}
        }
    }
}

fn exit_json(st: Option<ExitStatus>) -> Value {
    use std::os::unix::process::ExitStatusExt;
    match st {
        None => json!("running"),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => json!(c),
            (None, Some(sig)) => json!(format!("signal {sig}")),
            _ => json!("?"),
        },
    }
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// A server on 127.0.0.1 and the proxy in front of it on 127.0.0.1 (bound by the proxy).
fn setup(bin: &str) -> Result<(Server, Proxy), String> {
    setup_streams(bin, STREAMS)
}

fn setup_streams(bin: &str, streams: u16) -> Result<(Server, Proxy), String> {
    let srv = Server::start_streams(LO4, streams).map_err(|e| format!("server: {e}"))?;
    let front = SocketAddr::new(LO4, free_port(LO4).map_err(|e| e.to_string())?);
    let p = Proxy::start(bin, front, srv.addr, Launch::default()).map_err(|e| e.to_string())?;
    if !p.ready() {
        return Err(format!(
            "the proxy did not start: status {:?}",
            p.status_text()
        ));
    }
    Ok((srv, p))
}

fn check(bin: &str, scenario: &str) -> Result<Value, String> {
    DEBUG_LOG.store(true, Ordering::Relaxed);
    BIG_SNDBUF.store(true, Ordering::Relaxed);
    if let Some(mut f) = log_file(bin) {
        let _ = writeln!(f, "== scenario {scenario}");
    }
    let t0 = Instant::now();
    let mut v = match scenario {
        "messages" => messages(bin)?,
        "streams" => streams(bin)?,
        "concurrent" => concurrent(bin)?,
        "listen-fd" => listen_fd(bin)?,
        "ipv6" => ipv6(bin)?,
        "port-in-use" => port_in_use(bin)?,
        "sigterm" => sigterm(bin)?,
        "refused" => refused(bin)?,
        "close" => close(bin)?,
        "emfile" => emfile(bin)?,
        "over-limit" => over_limit(bin)?,
        _ => return Err(format!("unknown scenario {scenario:?}")),
    };
    v["scenario"] = json!(scenario);
    v["ms"] = json!(t0.elapsed().as_millis() as u64);
    Ok(v)
}

/// Sends `data` as one message and reads back `data.len()` bytes: how many messages they came
/// as, whether every one kept `info`, and whether the bytes are intact.
fn round_trip(c: &Sctp, data: &[u8], info: Info, buf: &mut Vec<u8>) -> Value {
    let t = Instant::now();
    if let Err(e) = c.send(data, info) {
        return json!({"size": data.len(), "error": format!("send: {e}")});
    }
    let mut got = Vec::with_capacity(data.len());
    let mut pieces = 0;
    let mut info_kept = true;
    while got.len() < data.len() {
        match c.recv(buf) {
            Ok(Some(m)) => {
                pieces += 1;
                info_kept &= m.info == info;
                got.extend_from_slice(buf);
            }
            other => {
                return json!({"size": data.len(), "error": format!("receive: {}", end_kind(&other))});
            }
        }
    }
    json!({
        "size": data.len(),
        "messages": pieces,
        "info_kept": info_kept,
        "intact": got == data,
        "ms": t.elapsed().as_secs_f64() * 1e3,
    })
}

/// Message sizes echoed by `messages`: around docker-proxy's 32,736-byte cut, around the 64 KiB
/// receive buffer of hostnet-proxy (larger ones come in pieces, reassembled), and 300 KB (more
/// than the receive window of a default socket: the kernel hands it over in pieces, partial
/// delivery).
const SIZES: &[usize] = &[
    1, 2, 7, 8, 100, 1000, 1452, 1500, 4096, 9000, 16_384, 32_736, 32_737, 32_768, 50_000, 65_535,
    65_536, 65_537, 100_000, 300_000,
];

fn messages(bin: &str) -> Result<Value, String> {
    let (_srv, p) = setup(bin)?;
    let c = Sctp::connect(p.front).map_err(|e| format!("connect: {e}"))?;
    let mut buf = Vec::new();
    let echo: Vec<Value> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let info = Info {
                sid: (i % 10) as u16,
                ppid: 0x100 + i as u32,
                unordered: false,
            };
            round_trip(&c, &payload(size as u64, size), info, &mut buf)
        })
        .collect();
    // Client to server, checked by the server; then server to client, checked here.
    let mut sink = Vec::new();
    let mut source = Vec::new();
    for (n, size, seed) in [(200u64, 100u64, 11u64), (8, 16_384, 12), (8, 65_536, 13)] {
        sink.push(sink_check(&c, n, size, seed, &mut buf));
        source.push(source_check(&c, n, size, seed + 100, &mut buf));
    }
    Ok(json!({"echo": echo, "sink": sink, "source": source}))
}

fn sink_check(c: &Sctp, n: u64, size: u64, seed: u64, buf: &mut Vec<u8>) -> Value {
    let r = (|| -> Result<String, String> {
        command(c, &format!("SINK {n} {size} {seed}"), 1).map_err(|e| e.to_string())?;
        let mut p = Prng::new(seed);
        let mut data = vec![0; size as usize];
        for i in 0..n {
            p.fill(&mut data);
            let info = Info {
                sid: 1,
                ppid: 1000 + i as u32,
                unordered: false,
            };
            c.send(&data, info).map_err(|e| format!("send: {e}"))?;
        }
        answer(c, buf)
    })();
    match r {
        Ok(text) => json!({
            "size": size, "sent": n, "answer": text,
            "ok": text.starts_with("OK"), "server_messages": field(&text, "msgs"),
        }),
        Err(e) => json!({"size": size, "sent": n, "error": e, "ok": false}),
    }
}

fn source_check(c: &Sctp, n: u64, size: u64, seed: u64, buf: &mut Vec<u8>) -> Value {
    if let Err(e) = command(c, &format!("SOURCE {n} {size} {seed}"), 1) {
        return json!({"size": size, "error": e.to_string(), "ok": false});
    }
    let total = n * size;
    let mut v = Verifier::new(seed, "source");
    let mut msgs = 0u64;
    let mut ppids_ok = true;
    let mut bad = None;
    while v.offset() < total {
        match c.recv(buf) {
            Ok(Some(m)) => {
                msgs += 1;
                // Message i carries PPID 1000 + i on stream 1 (pieces of a cut one repeat it).
                let i = v.offset() / size;
                ppids_ok &= m.info.sid == 1 && u64::from(m.info.ppid) == 1000 + i;
                if let Err(e) = v.check(buf) {
                    bad.get_or_insert(e);
                }
            }
            other => {
                return json!({"size": size, "error": end_kind(&other), "ok": false});
            }
        }
    }
    json!({
        "size": size, "sent": n, "client_messages": msgs, "ppids_ok": ppids_ok,
        "ok": bad.is_none(), "error": bad,
    })
}

fn streams(bin: &str) -> Result<Value, String> {
    // Every stream id there is, each way.
    let (_srv, p) = setup_streams(bin, u16::MAX)?;
    let c = Sctp::connect_streams(p.front, u16::MAX).map_err(|e| format!("connect: {e}"))?;
    let mut buf = Vec::new();
    let sids: [u16; 10] = [0, 1, 2, 9, 10, 11, 100, 1000, 4095, 65_534];
    let ppids: [u32; 6] = [0, 1, 3, 46, 0x1234_5678, u32::MAX];
    let mut results = Vec::new();
    let mut kept = 0;
    let mut total = 0;
    for (i, &sid) in sids.iter().enumerate() {
        for (j, &ppid) in ppids.iter().enumerate() {
            let info = Info {
                sid,
                ppid,
                unordered: false,
            };
            let r = round_trip(
                &c,
                &payload((i * 10 + j) as u64, 64 + i * 7 + j),
                info,
                &mut buf,
            );
            total += 1;
            if r["info_kept"] == json!(true)
                && r["intact"] == json!(true)
                && r["messages"] == json!(1)
            {
                kept += 1;
            } else {
                results.push(json!({"sid": sid, "ppid": ppid, "result": r}));
            }
        }
    }
    let unordered = round_trip(
        &c,
        &payload(99, 500),
        Info {
            sid: 3,
            ppid: 7,
            unordered: true,
        },
        &mut buf,
    );
    Ok(json!({
        "pairs": total, "kept": kept, "failures": results,
        "unordered_kept": unordered["info_kept"], "unordered": unordered,
    }))
}

fn concurrent(bin: &str) -> Result<Value, String> {
    let (_srv, p) = setup(bin)?;
    const N: usize = 100;
    let t = Instant::now();
    let mut clients = Vec::new();
    for i in 0..N {
        clients.push(Sctp::connect(p.front).map_err(|e| format!("connect {i}: {e}"))?);
    }
    let connected_ms = t.elapsed().as_millis() as u64;
    // Every association sends before any reads: all 100 are open and busy at once.
    let sizes = [10usize, 1000, 20_000];
    for (i, c) in clients.iter().enumerate() {
        for (k, &size) in sizes.iter().enumerate() {
            let info = Info {
                sid: (i % usize::from(STREAMS)) as u16,
                ppid: (i * 10 + k) as u32,
                unordered: false,
            };
            c.send(&payload((i * 10 + k) as u64, size), info)
                .map_err(|e| format!("send on association {i}: {e}"))?;
        }
    }
    let mut ok = 0;
    let mut failures = Vec::new();
    let mut buf = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let mut good = true;
        for (k, &size) in sizes.iter().enumerate() {
            let want = Info {
                sid: (i % usize::from(STREAMS)) as u16,
                ppid: (i * 10 + k) as u32,
                unordered: false,
            };
            match c.recv(&mut buf) {
                Ok(Some(m)) if m.info == want && buf == payload((i * 10 + k) as u64, size) => {}
                other => {
                    good = false;
                    failures.push(format!("association {i} message {k}: {}", end_kind(&other)));
                    break;
                }
            }
        }
        ok += usize::from(good);
    }
    Ok(json!({
        "associations": N, "ok": ok, "failures": failures,
        "connect_ms": connected_ms, "total_ms": t.elapsed().as_millis() as u64,
    }))
}

fn echo_once(front: SocketAddr) -> Value {
    let r = (|| -> Result<Value, String> {
        let c = Sctp::connect(front).map_err(|e| format!("connect: {}", error_kind(&e)))?;
        let mut buf = Vec::new();
        Ok(round_trip(
            &c,
            &payload(5, 3000),
            Info {
                sid: 4,
                ppid: 46,
                unordered: false,
            },
            &mut buf,
        ))
    })();
    match r {
        Ok(v) => {
            let ok = v["intact"] == json!(true) && v["info_kept"] == json!(true);
            json!({"ok": ok, "detail": v})
        }
        Err(e) => json!({"ok": false, "error": e}),
    }
}

fn listen_fd(bin: &str) -> Result<Value, String> {
    let srv = Server::start(LO4).map_err(|e| format!("server: {e}"))?;
    let sock = Sctp::listen(SocketAddr::new(LO4, 0)).map_err(|e| e.to_string())?;
    let front = sock.local_addr().map_err(|e| e.to_string())?;
    let mut p = Proxy::start(
        bin,
        front,
        srv.addr,
        Launch {
            fd4: Some(sock),
            ..Launch::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let echo = if p.ready() {
        echo_once(front)
    } else {
        json!(null)
    };
    let exit = exit_json(p.wait_exit(Duration::from_millis(if p.ready() { 0 } else { 2000 })));
    Ok(json!({"status": p.status_text(), "exit": exit, "echo": echo}))
}

fn ipv6(bin: &str) -> Result<Value, String> {
    let srv = Server::start(LO4).map_err(|e| format!("server: {e}"))?;
    let front = SocketAddr::new(LO6, free_port(LO6).map_err(|e| e.to_string())?);
    let p = Proxy::start(bin, front, srv.addr, Launch::default()).map_err(|e| e.to_string())?;
    let echo = if p.ready() {
        echo_once(front)
    } else {
        json!(null)
    };
    Ok(json!({"status": p.status_text(), "echo": echo}))
}

fn port_in_use(bin: &str) -> Result<Value, String> {
    let srv = Server::start(LO4).map_err(|e| format!("server: {e}"))?;
    let taken = Sctp::listen(SocketAddr::new(LO4, 0)).map_err(|e| e.to_string())?;
    let front = taken.local_addr().map_err(|e| e.to_string())?;
    let mut p = Proxy::start(bin, front, srv.addr, Launch::default()).map_err(|e| e.to_string())?;
    let exit = exit_json(p.wait_exit(Duration::from_secs(5)));
    Ok(json!({"status": p.status_text(), "exit": exit}))
}

fn sigterm(bin: &str) -> Result<Value, String> {
    let (_srv, mut p) = setup(bin)?;
    let mut clients = Vec::new();
    let mut buf = Vec::new();
    for i in 0..10 {
        let c = Sctp::connect(p.front).map_err(|e| format!("connect: {e}"))?;
        let r = round_trip(&c, &payload(i, 100), Info::default(), &mut buf);
        if r["intact"] != json!(true) {
            return Err(format!("echo before the signal failed: {r}"));
        }
        clients.push(c);
    }
    let t = Instant::now();
    p.signal(libc::SIGTERM);
    let st = p.wait_exit(Duration::from_secs(5));
    let exit_ms = t.elapsed().as_secs_f64() * 1e3;
    // What the clients saw of the proxy's exit.
    let seen = clients
        .first()
        .map(|c| end_kind(&c.recv(&mut buf)))
        .unwrap_or_default();
    Ok(
        json!({"exit": exit_json(st), "exit_ms": exit_ms, "associations": clients.len(), "client_saw": seen}),
    )
}

fn refused(bin: &str) -> Result<Value, String> {
    // A port where nothing listens (a listener bound and closed).
    let dead = SocketAddr::new(LO4, free_port(LO4).map_err(|e| e.to_string())?);
    let front = SocketAddr::new(LO4, free_port(LO4).map_err(|e| e.to_string())?);
    let p = Proxy::start(bin, front, dead, Launch::default()).map_err(|e| e.to_string())?;
    if !p.ready() {
        return Err(format!("the proxy did not start: {:?}", p.status_text()));
    }
    let t = Instant::now();
    let c = match Sctp::connect(front) {
        Ok(c) => c,
        Err(e) => {
            return Ok(json!({"connect": error_kind(&e), "ms": t.elapsed().as_millis() as u64}));
        }
    };
    let mut buf = Vec::new();
    // A message the container can never get, then wait for the association's end. If the end
    // came first, the send says which: an ABORT makes it fail with ECONNRESET, a SHUTDOWN with
    // EPIPE or ESHUTDOWN.
    let (sent, end) = match c.send(b"hello?", Info::default()) {
        Ok(()) => ("ok".to_string(), end_kind(&c.recv(&mut buf))),
        Err(e) => {
            let end = match e.raw_os_error() {
                Some(libc::EPIPE | libc::ESHUTDOWN) => "eof".to_string(),
                _ => error_kind(&e),
            };
            (error_kind(&e), end)
        }
    };
    Ok(json!({
        "connect": "ok", "send": sent,
        "client_saw": end, "end_ms": t.elapsed().as_secs_f64() * 1e3,
    }))
}

fn close(bin: &str) -> Result<Value, String> {
    let (srv, p) = setup(bin)?;
    let mut buf = Vec::new();
    let mut out = serde_json::Map::new();
    let open = |buf: &mut Vec<u8>| -> Result<Sctp, String> {
        let c = Sctp::connect(p.front).map_err(|e| format!("connect: {e}"))?;
        let r = round_trip(&c, &payload(1, 200), Info::default(), buf);
        if r["intact"] != json!(true) {
            return Err(format!("echo failed: {r}"));
        }
        Ok(c)
    };
    // The client ends: what does the server see?
    let c = open(&mut buf)?;
    drop(c);
    out.insert(
        "client_close_server_saw".into(),
        json!(srv.ends.next(IO_TIMEOUT + Duration::from_secs(2))),
    );
    let c = open(&mut buf)?;
    c.abort();
    out.insert(
        "client_abort_server_saw".into(),
        json!(srv.ends.next(IO_TIMEOUT + Duration::from_secs(2))),
    );
    // The server ends: what does the client see?
    for (what, key) in [
        ("CLOSE", "server_close_client_saw"),
        ("ABORT", "server_abort_client_saw"),
    ] {
        let c = open(&mut buf)?;
        let t = Instant::now();
        command(&c, what, 0).map_err(|e| e.to_string())?;
        let seen = end_kind(&c.recv(&mut buf));
        out.insert(key.into(), json!(seen));
        out.insert(format!("{key}_ms"), json!(t.elapsed().as_secs_f64() * 1e3));
        let _ = srv.ends.next(Duration::from_secs(2));
    }
    Ok(Value::Object(out))
}

/// A message over `HOSTNET_PROXY_SCTP_MAX_MESSAGE` (64 KiB here), and a message under it after.
fn over_limit(bin: &str) -> Result<Value, String> {
    let srv = Server::start(LO4).map_err(|e| format!("server: {e}"))?;
    let front = SocketAddr::new(LO4, free_port(LO4).map_err(|e| e.to_string())?);
    let launch = Launch {
        env: vec![("HOSTNET_PROXY_SCTP_MAX_MESSAGE", "65536")],
        ..Launch::default()
    };
    let p = Proxy::start(bin, front, srv.addr, launch).map_err(|e| e.to_string())?;
    if !p.ready() {
        return Err(format!("the proxy did not start: {:?}", p.status_text()));
    }
    let mut buf = Vec::new();
    let c = Sctp::connect(front).map_err(|e| format!("connect: {e}"))?;
    let small = round_trip(&c, &payload(1, 65_536), Info::default(), &mut buf);
    let big = round_trip(&c, &payload(2, 100_000), Info::default(), &mut buf);
    // Only when the message did not come back: how the association ended, each side.
    let (after, server) = if big.get("error").is_some() {
        (
            json!(end_kind(&c.recv(&mut buf))),
            json!(srv.ends.next(Duration::from_secs(5))),
        )
    } else {
        (json!("open"), json!("open"))
    };
    Ok(json!({
        "limit": 65_536, "at_limit": small, "over_limit": big,
        "client_then_saw": after, "server_saw": server,
    }))
}

fn emfile(bin: &str) -> Result<Value, String> {
    let srv = Server::start(LO4).map_err(|e| format!("server: {e}"))?;
    let front = SocketAddr::new(LO4, free_port(LO4).map_err(|e| e.to_string())?);
    let mut p = Proxy::start(
        bin,
        front,
        srv.addr,
        Launch {
            nofile: Some(32),
            ..Launch::default()
        },
    )
    .map_err(|e| e.to_string())?;
    if !p.ready() {
        return Err(format!("the proxy did not start: {:?}", p.status_text()));
    }
    // More associations than the descriptors allow, all held open.
    let mut held = Vec::new();
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    let mut buf = Vec::new();
    for i in 0..30 {
        let kind = match Sctp::connect(front) {
            Ok(c) => {
                c.timeouts(Duration::from_secs(3))
                    .map_err(|e| e.to_string())?;
                let r = round_trip(&c, &payload(i, 100), Info::default(), &mut buf);
                held.push(c);
                if r["intact"] == json!(true) {
                    "echoed".to_string()
                } else {
                    r["error"].as_str().unwrap_or("?").to_string()
                }
            }
            Err(e) => format!("connect: {}", error_kind(&e)),
        };
        *outcomes.entry(kind).or_default() += 1;
    }
    let alive_while_exhausted = p.wait_exit(Duration::ZERO).is_none();
    drop(held);
    // Descriptors free again: is the port served? (The accept back-off is at most 1 s.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let recovered = loop {
        let r = echo_once(front);
        let exited = p.wait_exit(Duration::ZERO).is_some();
        if r["ok"] == json!(true) || exited || Instant::now() >= deadline {
            break r;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let exit = exit_json(p.wait_exit(Duration::ZERO));
    Ok(json!({
        "nofile": 32, "attempts": 30, "outcomes": outcomes,
        "alive_while_exhausted": alive_while_exhausted,
        "recovered": recovered["ok"], "recovered_detail": recovered, "exit": exit,
    }))
}

// ---------------------------------------------------------------------------
// Benchmark
// ---------------------------------------------------------------------------

/// Messages of `size` bytes sent for `secs` on one association to a counting server: messages/s
/// and MB/s (every byte arrived, counted by the server), and how many more messages the server
/// counted than were sent (messages cut in pieces on the way).
fn rate(front: SocketAddr, size: usize, secs: f64) -> Result<(f64, f64, u64), String> {
    let c = Sctp::connect(front).map_err(|e| format!("connect: {e}"))?;
    c.timeouts(Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    command(&c, "COUNT", 0).map_err(|e| e.to_string())?;
    let data = vec![0x5a; size];
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        for _ in 0..16 {
            c.send(&data, Info::default())
                .map_err(|e| format!("send: {e}"))?;
            sent += 1;
        }
    }
    command(&c, "END", 0).map_err(|e| e.to_string())?;
    let text = answer(&c, &mut buf)?;
    let elapsed = t.elapsed().as_secs_f64();
    let msgs = field(&text, "msgs").ok_or_else(|| format!("bad answer {text:?}"))?;
    let bytes = field(&text, "bytes").unwrap_or(0);
    if bytes != sent * size as u64 || msgs < sent {
        return Err(format!(
            "sent {sent} messages of {size} B, the server counted {msgs} messages, {bytes} B"
        ));
    }
    Ok((
        sent as f64 / elapsed,
        bytes as f64 / elapsed / 1e6,
        msgs - sent,
    ))
}

/// The guest's `MemAvailable` (KiB).
fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (RSS KiB, threads, open descriptors) of `pid`.
fn footprint(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (get("VmRSS:"), get("Threads:"), fds)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut secs = 2.0;
    let mut trials = 3;
    let mut assocs = 100;
    let mut proxies = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => secs = val()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--trials" => trials = val()?.parse().map_err(|e| format!("--trials: {e}"))?,
            "--assocs" => assocs = val()?.parse().map_err(|e| format!("--assocs: {e}"))?,
            "--nagle" => NODELAY.store(false, Ordering::Relaxed),
            p => {
                let (name, bin) = p
                    .split_once('=')
                    .ok_or(format!("expected NAME=PROXY, got {p:?}"))?;
                proxies.push((name.to_string(), bin.to_string()));
            }
        }
    }
    let srv = Server::start(LO4).map_err(|e| format!("server: {e}"))?;
    let mut paths: Vec<(String, Option<String>)> = vec![("direct".into(), None)];
    paths.extend(proxies.iter().map(|(n, b)| (n.clone(), Some(b.clone()))));
    let mut results = serde_json::Map::new();
    for (name, bin) in &paths {
        let mut r: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for _ in 0..trials {
            // A fresh proxy per trial.
            let proxy = match bin {
                Some(b) => {
                    let front = SocketAddr::new(LO4, free_port(LO4).map_err(|e| e.to_string())?);
                    let p = Proxy::start(b, front, srv.addr, Launch::default())
                        .map_err(|e| e.to_string())?;
                    if !p.ready() {
                        return Err(format!("{name} did not start: {:?}", p.status_text()));
                    }
                    Some(p)
                }
                None => None,
            };
            let front = proxy.as_ref().map_or(srv.addr, |p| p.front);
            let (rss0, thr0, fd0) = proxy.as_ref().map_or((0, 0, 0), |p| footprint(p.pid()));
            let avail0 = mem_available_kib();
            let mut held = Vec::new();
            let mut buf = Vec::new();
            for i in 0..assocs {
                let c = Sctp::connect(front).map_err(|e| format!("connect: {e}"))?;
                let rt = round_trip(&c, &payload(i, 64), Info::default(), &mut buf);
                if rt["intact"] != json!(true) {
                    return Err(format!("{name}: held association {i}: {rt}"));
                }
                held.push(c);
            }
            // Let everything settle (idle threads parked, buffers given back).
            thread::sleep(Duration::from_millis(500));
            let used = avail0.saturating_sub(mem_available_kib());
            r.entry("held_guest_kib".into())
                .or_default()
                .push(used as f64);
            if let Some(p) = &proxy {
                let (rss, thr, fds) = footprint(p.pid());
                r.entry("idle_rss_kib".into())
                    .or_default()
                    .push(rss0 as f64);
                r.entry("idle_threads".into())
                    .or_default()
                    .push(thr0 as f64);
                r.entry("idle_fds".into()).or_default().push(fd0 as f64);
                r.entry("held_rss_kib".into()).or_default().push(rss as f64);
                r.entry("held_threads".into()).or_default().push(thr as f64);
                r.entry("held_fds".into()).or_default().push(fds as f64);
            }
            drop(held);
            thread::sleep(Duration::from_millis(200));
            for (key, size) in [("64B", 64usize), ("16KiB", 16_384)] {
                let (m, b, cut) =
                    rate(front, size, secs).map_err(|e| format!("{name} {size} B: {e}"))?;
                r.entry(format!("{key}_msgs_per_s")).or_default().push(m);
                r.entry(format!("{key}_MB_per_s")).or_default().push(b);
                r.entry(format!("{key}_cut")).or_default().push(cut as f64);
            }
        }
        let med: serde_json::Map<String, Value> =
            r.into_iter().map(|(k, v)| (k, json!(median(v)))).collect();
        results.insert(name.clone(), Value::Object(med));
    }
    // A table, then the JSON.
    let keys = [
        ("64B_msgs_per_s", "64 B messages/s".to_string(), 0),
        ("64B_MB_per_s", "64 B MB/s".into(), 2),
        ("16KiB_msgs_per_s", "16 KiB messages/s".into(), 0),
        ("16KiB_MB_per_s", "16 KiB MB/s".into(), 1),
        ("64B_cut", "64 B: messages cut".into(), 0),
        ("16KiB_cut", "16 KiB: messages cut".into(), 0),
        ("idle_rss_kib", "idle RSS (KiB)".into(), 0),
        ("idle_threads", "idle threads".into(), 0),
        ("idle_fds", "idle open fds".into(), 0),
        (
            "held_rss_kib",
            format!("RSS, {assocs} assocs held (KiB)"),
            0,
        ),
        ("held_threads", format!("threads, {assocs} assocs held"), 0),
        ("held_fds", format!("open fds, {assocs} assocs held"), 0),
        (
            "held_guest_kib",
            format!("guest memory, {assocs} assocs (KiB)"),
            0,
        ),
    ];
    print!("{:<32}", "figure");
    for (n, _) in &paths {
        print!(" | {n:>14}");
    }
    println!();
    for (key, label, prec) in keys {
        print!("{label:<32}");
        for (n, _) in &paths {
            match results[n].get(key).and_then(Value::as_f64) {
                Some(x) => print!(" | {x:>14.prec$}"),
                None => print!(" | {:>14}", "-"),
            }
        }
        println!();
    }
    println!(
        "medians of {trials} trials, {secs} s per rate figure, client to server on one association \
         (endpoints {}); client, proxy and server share the guest's one CPU",
        if NODELAY.load(Ordering::Relaxed) {
            "with SCTP_NODELAY"
        } else {
            "with Nagle (no SCTP_NODELAY)"
        }
    );
    println!("JSON {}", Value::Object(results));
    Ok(())
}
