//! Black-box TCP tests of the hostnet-proxy binary: data path, half-close,
//! resets, bulk transfer, many connections, fd exhaustion, PROXY protocol.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Proxy with a listening socket handed over on fd 4.
fn proxy_fd(front: SocketAddr, backend: SocketAddr) -> Proxy {
    Proxy::tcp()
        .listen(tcp_listen_socket(front))
        .container(backend)
        .start()
}

fn round_trips(addr: SocketAddr, seed: u64) {
    for (i, len) in [1, 1000, 256 * KIB].into_iter().enumerate() {
        echo_check(addr, seed + i as u64, len)
            .unwrap_or_else(|e| panic!("echo of {len} bytes via {addr}: {e}"));
    }
}

#[test]
fn v4_listen_fd_round_trip() {
    let be = TcpServer::echo(any_port(LO4));
    let p = proxy_fd(any_port(LO4), be.addr);
    round_trips(p.addr(), 100);
}

#[test]
fn v4_self_bind_round_trip() {
    let be = TcpServer::echo(any_port(LO4));
    let p = Proxy::tcp().host_free(LO4).container(be.addr).start();
    round_trips(p.addr(), 200);
}

#[test]
fn v6_listen_fd_round_trip() {
    let be = TcpServer::echo(any_port(LO6));
    let p = proxy_fd(any_port(LO6), be.addr);
    round_trips(p.addr(), 300);
}

#[test]
fn v6_self_bind_round_trip() {
    let be = TcpServer::echo(any_port(LO6));
    let p = Proxy::tcp().host_free(LO6).container(be.addr).start();
    round_trips(p.addr(), 350);
}

#[test]
fn v6_front_to_v4_backend() {
    let be = TcpServer::echo(any_port(LO4));
    let p = proxy_fd(any_port(LO6), be.addr);
    round_trips(p.addr(), 400);
}

#[test]
fn v4_front_to_v6_backend() {
    let be = TcpServer::echo(any_port(LO6));
    let p = proxy_fd(any_port(LO4), be.addr);
    round_trips(p.addr(), 500);
}

#[test]
fn dual_stack_listen_fd() {
    let be = TcpServer::echo(any_port(LO6));
    let p = Proxy::tcp()
        .listen(tcp_listen_socket_opts(any_port(ANY6), true))
        .container(be.addr)
        .start();
    let port = p.addr().port();
    round_trips(SocketAddr::new(LO4, port), 600);
    round_trips(SocketAddr::new(LO6, port), 610);
}

/// Backend reads to EOF, then sends everything back and closes; the client
/// half-closes and must still get the full echo, then EOF.
#[test]
fn half_close_client_first() {
    const LEN: usize = MIB;
    let be = TcpServer::bind(any_port(LO4), |mut s: TcpStream| {
        set_timeouts(&s, IO_TIMEOUT);
        let mut all = Vec::new();
        if s.read_to_end(&mut all).is_err() {
            return;
        }
        let _ = s.write_all(&all);
        let _ = s.shutdown(Shutdown::Write);
    });
    let p = proxy_fd(any_port(LO4), be.addr);
    let mut c = connect(p.addr());
    write_prng(&mut c, 7, LEN as u64).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    read_prng(&mut c, 7, LEN as u64, "echo after half-close").unwrap();
    expect_eof(&mut c, "after echo").unwrap();
}

/// Backend sends its payload and half-closes first while the client keeps
/// sending (before and after it saw the backend's EOF); everything arrives
/// both ways.
#[test]
fn half_close_backend_first() {
    const DOWN: u64 = 256 * KIB as u64;
    const UP1: u64 = 64 * KIB as u64;
    const UP2: u64 = 512 * KIB as u64;
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let tx = std::sync::Mutex::new(tx);
    let be = TcpServer::bind(any_port(LO4), move |mut s: TcpStream| {
        set_timeouts(&s, IO_TIMEOUT);
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            write_prng(&mut w, 11, DOWN)?;
            w.shutdown(Shutdown::Write)
        });
        let mut r = read_prng(&mut s, 12, UP1 + UP2, "backend reading client");
        if r.is_ok() {
            r = expect_eof(&mut s, "backend: client EOF");
        }
        if let Err(e) = writer.join().unwrap() {
            r = Err(format!("backend write: {e}"));
        }
        tx.lock().unwrap().send(r).unwrap();
    });
    let p = proxy_fd(any_port(LO4), be.addr);
    let mut c = connect(p.addr());
    let mut payload = Prng::new(12);
    let mut first = vec![0; UP1 as usize];
    payload.fill(&mut first);
    c.write_all(&first).unwrap();
    read_prng(&mut c, 11, DOWN, "client reading backend").unwrap();
    expect_eof(&mut c, "client: backend EOF").unwrap();
    // The backend->client direction is closed; client->backend must still work.
    let mut rest = vec![0; UP2 as usize];
    payload.fill(&mut rest);
    c.write_all(&rest)
        .expect("client write after backend half-close");
    c.shutdown(Shutdown::Write).unwrap();
    rx.recv_timeout(IO_TIMEOUT)
        .expect("backend did not report")
        .unwrap();
}

/// 64 MiB each way at the same time, every byte checked.
#[test]
fn bulk_64mib_both_ways() {
    const LEN: u64 = 64 * MIB as u64;
    let timeout = Duration::from_secs(60);
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let tx = std::sync::Mutex::new(tx);
    let be = TcpServer::bind(any_port(LO4), move |mut s: TcpStream| {
        set_timeouts(&s, Duration::from_secs(60));
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            write_prng(&mut w, 21, LEN)?;
            w.shutdown(Shutdown::Write)
        });
        let mut r = read_prng(&mut s, 22, LEN, "backend reading 64 MiB");
        if r.is_ok() {
            r = expect_eof(&mut s, "backend: client EOF");
        }
        if let Err(e) = writer.join().unwrap() {
            r = r.and(Err(format!("backend write: {e}")));
        }
        tx.lock().unwrap().send(r).unwrap();
    });
    let p = proxy_fd(any_port(LO4), be.addr);
    let mut c = connect(p.addr());
    set_timeouts(&c, timeout);
    let mut w = c.try_clone().unwrap();
    let writer = thread::spawn(move || {
        write_prng(&mut w, 22, LEN)?;
        w.shutdown(Shutdown::Write)
    });
    read_prng(&mut c, 21, LEN, "client reading 64 MiB").unwrap();
    expect_eof(&mut c, "client: backend EOF").unwrap();
    writer.join().unwrap().expect("client write");
    rx.recv_timeout(timeout)
        .expect("backend did not report")
        .unwrap();
}

/// 300 connections open at once, each a 32 KiB echo round trip.
#[test]
fn concurrent_300_connections() {
    const N: usize = 300;
    let be = TcpServer::echo(any_port(LO4));
    let p = proxy_fd(any_port(LO4), be.addr);
    let addr = p.addr();
    let barrier = Arc::new(Barrier::new(N));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let c = try_connect(addr, Duration::from_secs(10));
                // Everyone holds an open connection before anyone sends.
                barrier.wait();
                let mut c = c.map_err(|e| format!("conn {i}: connect: {e}"))?;
                set_timeouts(&c, Duration::from_secs(30));
                echo_on(&mut c, 10_000 + i as u64, 32 * KIB).map_err(|e| format!("conn {i}: {e}"))
            })
        })
        .collect();
    let errors: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap().err())
        .collect();
    assert!(
        errors.is_empty(),
        "{} of {N} connections failed, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        be.accepted.load(std::sync::atomic::Ordering::SeqCst) >= N,
        "backend saw fewer than {N} connections"
    );
}

/// Reads until EOF/error; returns the error kind, or None for a clean EOF.
fn end_of_stream(s: &mut TcpStream) -> Option<ErrorKind> {
    match read_until_end(s) {
        Ok(_) => None,
        Err(e) => Some(e.kind()),
    }
}

/// Nothing listens on the container port: the proxy accepts the client and
/// then resets it (a refused backend must not look like a clean close).
#[test]
fn refused_backend_resets_client() {
    let p = proxy_fd(any_port(LO4), dead_tcp_addr(LO4));
    let end = match connect_or_reset(p.addr()) {
        Some(mut c) => {
            set_timeouts(&c, Duration::from_secs(5));
            end_of_stream(&mut c)
        }
        None => Some(ErrorKind::ConnectionReset),
    };
    assert_eq!(
        end,
        Some(ErrorKind::ConnectionReset),
        "client should see a reset when the backend refuses (None = clean EOF)"
    );
}

/// Backend aborts (SO_LINGER 0) after reading a little: the client must see
/// a reset.
#[test]
fn backend_reset_propagates_to_client() {
    let be = TcpServer::bind(any_port(LO4), |mut s: TcpStream| {
        set_timeouts(&s, IO_TIMEOUT);
        let mut b = [0u8; 5];
        if s.read_exact(&mut b).is_ok() {
            set_linger_zero(&s);
        }
        drop(s);
    });
    let p = proxy_fd(any_port(LO4), be.addr);
    let mut c = connect(p.addr());
    set_timeouts(&c, Duration::from_secs(5));
    c.write_all(b"hello").unwrap();
    assert_eq!(
        end_of_stream(&mut c),
        Some(ErrorKind::ConnectionReset),
        "client should see the backend's reset (None = clean EOF)"
    );
}

/// Client aborts (SO_LINGER 0): the backend must see a reset.
#[test]
fn client_reset_propagates_to_backend() {
    let (got_tx, got_rx) = mpsc::channel::<()>();
    let (end_tx, end_rx) = mpsc::channel::<Option<ErrorKind>>();
    let got_tx = std::sync::Mutex::new(got_tx);
    let end_tx = std::sync::Mutex::new(end_tx);
    let be = TcpServer::bind(any_port(LO4), move |mut s: TcpStream| {
        set_timeouts(&s, Duration::from_secs(5));
        let mut b = [0u8; 5];
        if s.read_exact(&mut b).is_err() {
            return;
        }
        got_tx.lock().unwrap().send(()).unwrap();
        let end = end_of_stream(&mut s);
        end_tx.lock().unwrap().send(end).unwrap();
    });
    let p = proxy_fd(any_port(LO4), be.addr);
    let mut c = connect(p.addr());
    c.write_all(b"hello").unwrap();
    got_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("backend never got the client's bytes");
    set_linger_zero(&c);
    drop(c);
    let end = end_rx
        .recv_timeout(Duration::from_secs(8))
        .expect("backend did not report");
    assert_eq!(
        end,
        Some(ErrorKind::ConnectionReset),
        "backend should see the client's reset (None = clean EOF)"
    );
}

/// A backend whose SYNs are dropped (listen backlog 0, accept queue full,
/// nobody accepts): with HOSTNET_PROXY_CONNECT_TIMEOUT=1s the client's
/// connection must be ended after about a second, not after 30 s.
#[test]
fn connect_timeout_env() {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&socket2::SockAddr::from(any_port(LO4))).unwrap();
    l.listen(0).unwrap();
    let black_hole = l.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue.
    let fillers: Vec<_> = (0..2)
        .filter_map(|_| TcpStream::connect_timeout(&black_hole, Duration::from_millis(300)).ok())
        .collect();
    let probe = TcpStream::connect_timeout(&black_hole, Duration::from_millis(500));
    assert!(
        probe.is_err(),
        "test setup: cannot make a backend whose connect hangs (accept queue not full)"
    );

    let p = Proxy::tcp()
        .listen(tcp_listen_socket(any_port(LO4)))
        .container(black_hole)
        .env("HOSTNET_PROXY_CONNECT_TIMEOUT", "1s")
        .start();
    let mut c = connect(p.addr());
    set_timeouts(&c, Duration::from_secs(8));
    let t0 = Instant::now();
    let end = read_until_end(&mut c);
    let took = t0.elapsed();
    if let Err(e) = &end {
        assert!(
            !is_timeout(e),
            "client connection still open after {took:?} although the backend connect timeout is 1s"
        );
    }
    assert!(
        took < Duration::from_secs(4),
        "client connection ended only after {took:?} (connect timeout 1s)"
    );
    assert!(
        took >= Duration::from_millis(700),
        "client connection ended after {took:?}, before the 1s connect timeout: {end:?}"
    );
    drop(fillers);
}

/// Reads a PROXY protocol v2 header; returns (source, destination).
fn read_proxy_v2(s: &mut TcpStream) -> Result<(SocketAddr, SocketAddr), String> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h)
        .map_err(|e| format!("reading header: {e}"))?;
    if &h[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
        return Err(format!("bad signature {:?}", &h[..12]));
    }
    if h[12] != 0x21 {
        return Err(format!(
            "version/command byte {:#04x}, expected 0x21",
            h[12]
        ));
    }
    let len = u16::from_be_bytes([h[14], h[15]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(|e| format!("reading {len}-byte address block: {e}"))?;
    match h[13] {
        0x11 => {
            if len < 12 {
                return Err(format!("TCP/IPv4 block of {len} bytes"));
            }
            let ip = |o: usize| IpAddr::from([body[o], body[o + 1], body[o + 2], body[o + 3]]);
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Ok((
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            ))
        }
        0x21 => {
            if len < 36 {
                return Err(format!("TCP/IPv6 block of {len} bytes"));
            }
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                IpAddr::from(a)
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Ok((
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            ))
        }
        f => Err(format!("family/transport byte {f:#04x}")),
    }
}

fn proxy_protocol_v2(ip: IpAddr) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let be = TcpServer::bind(any_port(ip), move |mut s: TcpStream| {
        set_timeouts(&s, IO_TIMEOUT);
        let r = read_proxy_v2(&mut s);
        let ok = r.is_ok();
        tx.lock().unwrap().send(r).unwrap();
        if ok {
            echo_handler(s);
        }
    });
    let p = Proxy::tcp()
        .listen(tcp_listen_socket(any_port(ip)))
        .container(be.addr)
        .env("HOSTNET_PROXY_PROXY_PROTOCOL", "v2")
        .start();
    let mut c = connect(p.addr());
    let client = c.local_addr().unwrap();
    c.write_all(b"x").unwrap();
    let (src, dst) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("backend got no connection")
        .unwrap();
    assert_eq!(src, client, "PROXY header source must be the client");
    assert_eq!(
        dst,
        p.addr(),
        "PROXY header destination must be the proxy address"
    );
    // The client's first byte comes right after the header.
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
    echo_on(&mut c, 77, 100 * KIB).unwrap();
}

#[test]
fn proxy_protocol_v2_ipv4() {
    proxy_protocol_v2(LO4);
}

#[test]
fn proxy_protocol_v2_ipv6() {
    proxy_protocol_v2(LO6);
}

/// Without the env var no header is sent: the backend's first bytes are the
/// client's.
#[test]
fn no_proxy_protocol_by_default() {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let be = TcpServer::bind(any_port(LO4), move |mut s: TcpStream| {
        set_timeouts(&s, IO_TIMEOUT);
        let mut b = [0u8; 4];
        let r = s.read_exact(&mut b).map(|_| b);
        tx.lock()
            .unwrap()
            .send(r.map_err(|e| e.to_string()))
            .unwrap();
    });
    let p = proxy_fd(any_port(LO4), be.addr);
    let mut c = connect(p.addr());
    c.write_all(b"abcd").unwrap();
    let got = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(&got, b"abcd");
}

/// RLIMIT_NOFILE 64 and a burst of 150 connections: the proxy must survive
/// running out of descriptors and serve again once they are closed.
#[test]
fn survives_fd_exhaustion() {
    let be = TcpServer::echo(any_port(LO4));
    let mut p = Proxy::tcp()
        .listen(tcp_listen_socket(any_port(LO4)))
        .container(be.addr)
        .nofile(64)
        .start();
    let addr = p.addr();
    let conns: Vec<_> = (0..150)
        .map(|_| {
            thread::spawn(move || {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
                set_timeouts(&s, Duration::from_millis(500));
                let _ = (&s).write_all(b"ping");
                Some(s)
            })
        })
        .collect();
    let conns: Vec<_> = conns.into_iter().map(|h| h.join().unwrap()).collect();
    let opened = conns.iter().flatten().count();
    eprintln!("{opened} of 150 connections were established");
    drop(conns);
    assert!(
        p.is_running(),
        "proxy died during the burst ({opened} connected): {}",
        p.describe()
    );

    let end = after(Duration::from_secs(8));
    let mut last = String::new();
    let mut attempt = 0u64;
    let ok = wait_until(end, || {
        attempt += 1;
        match try_connect(addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                set_timeouts(&s, Duration::from_secs(1));
                match echo_on(&mut s, 5000 + attempt, 8 * KIB) {
                    Ok(()) => true,
                    Err(e) => {
                        last = e;
                        false
                    }
                }
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    assert!(
        ok,
        "no echo round trip after the burst ({opened} of 150 had connected); last error: {last}; {}",
        p.describe()
    );
    assert!(p.is_running(), "proxy exited: {}", p.describe());
}

/// The proxy works when fd 3 is not open at all.
#[test]
fn works_without_status_fd() {
    let be = TcpServer::echo(any_port(LO4));
    let mut p = Proxy::tcp()
        .host_free(LO4)
        .container(be.addr)
        .without_status_fd()
        .spawn();
    let addr = p.addr();
    let mut last = String::new();
    let ok = wait_until(after(Duration::from_secs(5)), || {
        match echo_check(addr, 31, 64 * KIB) {
            Ok(()) => true,
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert!(ok, "no round trip without fd 3: {last}; {}", p.describe());
    assert!(p.is_running(), "{}", p.describe());
}

/// Several connections in sequence reuse one proxy (no one-shot accept).
#[test]
fn sequential_connections() {
    let be = TcpServer::echo(any_port(LO4));
    let p = proxy_fd(any_port(LO4), be.addr);
    for i in 0..50 {
        echo_check(p.addr(), 900 + i, 4 * KIB).unwrap_or_else(|e| panic!("conn {i}: {e}"));
    }
}

/// `-host-ip 0.0.0.0`: reachable on every local address.
#[test]
fn wildcard_self_bind() {
    let be = TcpServer::echo(any_port(LO4));
    let p = Proxy::tcp().host_free(ANY4).container(be.addr).start();
    let port = p.addr().port();
    for (i, last) in [1u8, 2, 3].into_iter().enumerate() {
        let to = SocketAddr::new(IpAddr::from([127, 0, 0, last]), port);
        echo_check(to, 700 + i as u64, 64 * KIB).unwrap_or_else(|e| panic!("via {to}: {e}"));
    }
}

/// The backend does not read: the proxy must push back on the client (its
/// writes block) instead of buffering without bound, and once the backend
/// reads, every byte arrives in order.
#[test]
fn backpressure_without_loss() {
    const CAP: u64 = 128 * MIB as u64;
    const LIMIT: u64 = 64 * MIB as u64;
    let (go_tx, go_rx) = mpsc::channel::<u64>();
    let (res_tx, res_rx) = mpsc::channel::<Result<(), String>>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let res_tx = std::sync::Mutex::new(res_tx);
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // Small receive buffer, inherited by the accepted socket.
    l.set_recv_buffer_size(64 * KIB).unwrap();
    l.bind(&socket2::SockAddr::from(any_port(LO4))).unwrap();
    l.listen(16).unwrap();
    let be = TcpServer::serve(l.into(), move |mut s: TcpStream| {
        set_timeouts(&s, IO_TIMEOUT);
        let total = match go_rx.lock().unwrap().recv_timeout(Duration::from_secs(30)) {
            Ok(t) => t,
            Err(_) => return,
        };
        let mut r = read_prng(&mut s, 41, total, "backend after backpressure");
        if r.is_ok() {
            r = expect_eof(&mut s, "backend: client EOF");
        }
        res_tx.lock().unwrap().send(r).unwrap();
    });
    let p = proxy_fd(any_port(LO4), be.addr);
    let mut c = connect(p.addr());
    socket2::SockRef::from(&c)
        .set_send_buffer_size(64 * KIB)
        .unwrap();
    c.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut prng = Prng::new(41);
    let mut chunk = vec![0u8; 64 * KIB];
    let mut pos = chunk.len();
    let mut written = 0u64;
    loop {
        if pos == chunk.len() {
            if written >= CAP {
                break;
            }
            prng.fill(&mut chunk);
            pos = 0;
        }
        match c.write(&chunk[pos..]) {
            Ok(n) => {
                pos += n;
                written += n as u64;
            }
            Err(e) if is_timeout(&e) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("client write after {written} bytes: {e}"),
        }
    }
    assert!(
        written < LIMIT,
        "the proxy accepted {written} bytes for a backend that reads nothing: no backpressure"
    );
    eprintln!("client could write {written} bytes before blocking");
    go_tx.send(written).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    res_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("backend did not report")
        .unwrap();
}

/// Connections that end normally, by reset, or because the backend refused
/// leave no descriptors behind in the proxy. The workload runs twice: the
/// first round warms up any bounded caches (Go's docker-proxy keeps a pool of
/// splice pipes, for instance), the second must not add descriptors.
#[test]
fn no_fd_leak() {
    let be = TcpServer::echo(any_port(LO4));
    let mut p = proxy_fd(any_port(LO4), be.addr);
    let mut dead = proxy_fd(any_port(LO4), dead_tcp_addr(LO4));
    let (pid, dead_pid) = (p.pid(), dead.pid());
    let start = (fd_count(pid), fd_count(dead_pid));
    let workload = |round: u64| {
        for i in 0..40 {
            echo_check(p.addr(), 800 + 100 * round + i, 2 * KIB).unwrap();
        }
        for _ in 0..20 {
            let mut c = connect(p.addr());
            c.write_all(b"abc").unwrap();
            let mut b = [0u8; 3];
            c.read_exact(&mut b).unwrap();
            set_linger_zero(&c);
        }
        for _ in 0..20 {
            if let Some(mut c) = connect_or_reset(dead.addr()) {
                let _ = read_until_end(&mut c);
            }
        }
    };
    workload(0);
    wait_until(after(Duration::from_secs(2)), || {
        (fd_count(pid), fd_count(dead_pid)) <= start
    });
    let base = (fd_count(pid), fd_count(dead_pid));
    workload(1);
    let ok = wait_until(after(Duration::from_secs(3)), || {
        fd_count(pid) <= base.0 && fd_count(dead_pid) <= base.1
    });
    assert!(
        ok,
        "descriptors leaked: {} open (before: {}, after a first round: {}); \
         refused-backend proxy: {} open (before: {}, after a first round: {}); {}",
        fd_count(pid),
        start.0,
        base.0,
        fd_count(dead_pid),
        start.1,
        base.1,
        p.describe()
    );
    assert!(p.is_running() && dead.is_running());
}
