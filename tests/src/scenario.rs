//! Scenarios shared by several test files (one per transport): each sets up its own servers in
//! the bridge's namespace on fresh ports, and panics with both processes' logs on failure.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::bridge::Bridge;
use crate::net::{
    ANY4, ANY6, LO4, LO6, Outcome, TcpServer, UdpEcho, duplex, duplex_handler, echo_check,
    free_port, refused, sa, set_timeouts, try_connect, udp_echo_check,
};
use crate::payload::{Verifier, expect_eof, payload, read_prng, write_prng};
use crate::{after, wait_until};

/// Servers in the namespace on 0.0.0.0:P1, [::]:P2, 127.0.0.1:P3 and [::1]:P4; each reached
/// from the host per the address policy with a checksummed echo, over 127.0.0.1 and ::1 (P4:
/// ::1 only, and 127.0.0.1:P4 stays unmirrored).
pub fn reach_all(b: &mut Bridge) {
    let cases: [(IpAddr, &[IpAddr]); 4] = [
        (ANY4, &[LO4, LO6]),
        (ANY6, &[LO4, LO6]),
        (LO4, &[LO4, LO6]),
        (LO6, &[LO6]),
    ];
    let mut servers = Vec::new();
    for (i, (guest, hosts)) in cases.iter().enumerate() {
        let port = free_port();
        let l = b.ns.tcp_listener(sa(*guest, port)).unwrap();
        servers.push(TcpServer::echo(l));
        for h in *hosts {
            b.expect_tcp(*h, port);
            if let Err(e) = echo_check(sa(*h, port), 100 + i as u64, 256 * 1024) {
                panic!(
                    "guest {} reached via host {}: {e}\n{}",
                    sa(*guest, port),
                    sa(*h, port),
                    b.describe()
                );
            }
        }
        if *guest == LO6 {
            thread::sleep(Duration::from_millis(300));
            assert!(
                refused(sa(LO4, port)),
                "guest [::1]:{port} must be mirrored on [::1] only, but 127.0.0.1:{port} answers"
            );
        }
    }
}

/// `len` bytes each way at once through the host's `ip` to a guest server on 0.0.0.0, both
/// sides checking every byte.
pub fn duplex_through(b: &mut Bridge, ip: IpAddr, len: u64) {
    let port = free_port();
    let outcome: Outcome = Arc::default();
    let _srv = TcpServer::serve(
        b.ns.tcp_listener(sa(ANY4, port)).unwrap(),
        duplex_handler(1000, len, outcome.clone()),
    );
    b.expect_tcp(ip, port);
    let s = try_connect(sa(ip, port)).unwrap();
    set_timeouts(&s, Duration::from_secs(30));
    let t0 = Instant::now();
    let client = duplex(s, 1000, 1001, len, "host client");
    let server = if wait_until(after(Duration::from_secs(10)), || {
        !outcome.lock().unwrap().is_empty()
    }) {
        outcome.lock().unwrap()[0].clone()
    } else {
        Err("the guest server never finished".into())
    };
    eprintln!(
        "duplex {len} bytes each way via {ip}: {:?} ({:.0} MiB/s each way)",
        t0.elapsed(),
        len as f64 / (1 << 20) as f64 / t0.elapsed().as_secs_f64()
    );
    if client.is_err() || server.is_err() {
        panic!(
            "duplex transfer: client {client:?}, server {server:?}\n{}",
            b.describe()
        );
    }
}

/// Half-close both ways round: (a) the host client sends and shuts down its write side, the
/// guest server reads to EOF and only then answers; (b) the guest server sends and shuts down
/// first, the host client reads to EOF and then still sends.
pub fn half_close(b: &mut Bridge) {
    const N: u64 = 300_000;
    const M: u64 = 200_000;
    // (a)
    let pa = free_port();
    let out_a: Outcome = Arc::default();
    let oa = out_a.clone();
    let _sa = TcpServer::serve(b.ns.tcp_listener(sa(ANY4, pa)).unwrap(), move |mut s| {
        set_timeouts(&s, Duration::from_secs(10));
        let r = read_prng(&mut s, 1, N, "server reads")
            .and_then(|_| expect_eof(&mut s, "server after client's FIN"))
            .and_then(|_| write_prng(&mut s, 2, M).map_err(|e| format!("server write: {e}")));
        oa.lock().unwrap().push(r);
    });
    b.expect_tcp(LO4, pa);
    let mut c = try_connect(sa(LO4, pa)).unwrap();
    write_prng(&mut c, 1, N).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let r = read_prng(&mut c, 2, M, "client reads the answer after its FIN")
        .and_then(|_| expect_eof(&mut c, "client at the end"));
    if let Err(e) = r {
        panic!(
            "half-close (client first): {e}; server: {:?}\n{}",
            out_a.lock().unwrap(),
            b.describe()
        );
    }
    // (b)
    let pb = free_port();
    let out_b: Outcome = Arc::default();
    let ob = out_b.clone();
    let _sb = TcpServer::serve(b.ns.tcp_listener(sa(ANY4, pb)).unwrap(), move |mut s| {
        set_timeouts(&s, Duration::from_secs(10));
        let r = write_prng(&mut s, 3, M)
            .map_err(|e| format!("server write: {e}"))
            .and_then(|_| s.shutdown(Shutdown::Write).map_err(|e| e.to_string()))
            .and_then(|_| read_prng(&mut s, 4, N, "server reads after its own FIN"))
            .and_then(|_| expect_eof(&mut s, "server at the end"));
        ob.lock().unwrap().push(r);
    });
    b.expect_tcp(LO6, pb);
    let mut c = try_connect(sa(LO6, pb)).unwrap();
    let r = read_prng(&mut c, 3, M, "client reads")
        .and_then(|_| expect_eof(&mut c, "client after server's FIN"))
        .and_then(|_| write_prng(&mut c, 4, N).map_err(|e| format!("client write after EOF: {e}")))
        .and_then(|_| c.shutdown(Shutdown::Write).map_err(|e| e.to_string()));
    let done = wait_until(after(Duration::from_secs(10)), || {
        !out_b.lock().unwrap().is_empty()
    });
    let server = out_b.lock().unwrap().first().cloned();
    if r.is_err() || !done || server.as_ref().is_some_and(|s| s.is_err()) {
        panic!(
            "half-close (server first): client {r:?}, server {server:?}\n{}",
            b.describe()
        );
    }
}

/// UDP echo in the namespace on [::]:P (dual-stack); several host clients at once over
/// 127.0.0.1 and ::1, each checking that every reply is its own and comes from the address it
/// targeted.
pub fn udp_forward(b: &mut Bridge) {
    let port = free_port();
    let echo = UdpEcho::serve(b.ns.udp_socket(sa(ANY6, port)).unwrap());
    for ip in [LO4, LO6] {
        if b.wait_udp(ip, port, Duration::from_secs(5)).is_none() {
            panic!(
                "UDP {} not mirrored within 5 s\n{}",
                sa(ip, port),
                b.describe()
            );
        }
    }
    let errors = udp_clients(|ip| UdpSocket::bind(sa(ip, 0)), port, 8);
    if !errors.is_empty() {
        panic!("UDP forward: {errors:?}\n{}", b.describe());
    }
    // The guest socket closes: the host sockets go too.
    drop(echo);
    for ip in [LO4, LO6] {
        let a = sa(ip, port);
        if !wait_until(after(Duration::from_secs(2)), || {
            !crate::net::udp_bound().contains(&a)
        }) {
            panic!(
                "host UDP {a} still bound 2 s after the guest closed its socket\n{}",
                b.describe()
            );
        }
    }
}

/// `n` clients (alternating 127.0.0.1 and ::1) made by `mk`, each sending 20 tagged datagrams to
/// `port` concurrently; returns the errors.
pub fn udp_clients(
    mk: impl Fn(IpAddr) -> std::io::Result<UdpSocket>,
    port: u16,
    n: usize,
) -> Vec<String> {
    let socks: Vec<(SocketAddr, UdpSocket)> = (0..n)
        .map(|i| {
            let ip = if i % 2 == 0 { LO4 } else { LO6 };
            (sa(ip, port), mk(ip).unwrap())
        })
        .collect();
    let errors = Arc::new(Mutex::new(Vec::new()));
    thread::scope(|s| {
        for (i, (to, sock)) in socks.iter().enumerate() {
            let errors = errors.clone();
            s.spawn(move || {
                for j in 0..20 {
                    let msg = format!("client {i} datagram {j} {}", "x".repeat(i * 37 + j));
                    if let Err(e) =
                        udp_echo_check(sock, *to, msg.as_bytes(), Duration::from_secs(5))
                    {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("client {i} -> {to}: {e}"));
                        return;
                    }
                }
            });
        }
    });
    let e = errors.lock().unwrap().clone();
    #[allow(clippy::let_and_return)] // the guard must drop before `errors`
    e
}

/// A guest server that reads 5 bytes and resets: the host client must see a reset (not EOF).
pub fn reset_from_guest(b: &mut Bridge) {
    let port = free_port();
    let _srv = TcpServer::serve(b.ns.tcp_listener(sa(ANY4, port)).unwrap(), |mut s| {
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf);
        crate::net::set_linger_zero(&s);
    });
    b.expect_tcp(LO4, port);
    let mut c = try_connect(sa(LO4, port)).unwrap();
    set_timeouts(&c, Duration::from_secs(5));
    let outcome = match c.write_all(b"hello") {
        Err(e) => Err(e),
        Ok(()) => crate::net::read_to_end_or_err(&mut c),
    };
    match outcome {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "guest server reset its connection; the host client should see ECONNRESET, got {other:?}\n{}",
            b.describe()
        ),
    }
}

/// Opens a connection and returns it, or the error, with SO_LINGER untouched.
pub fn connect_raw(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    set_timeouts(&s, Duration::from_secs(5));
    Ok(s)
}

/// Writes one byte and reads to the end: what a client sees on a dead path (a write error is
/// returned as is: it may be the pending reset).
pub fn poke(s: &mut TcpStream) -> std::io::Result<usize> {
    s.write_all(b"?")?;
    crate::net::read_to_end_or_err(s)
}

/// A host client that resets its connection (SO_LINGER 0): the guest server must see a reset,
/// not a clean EOF.
pub fn reset_from_host(b: &mut Bridge) {
    let port = free_port();
    let seen: Arc<Mutex<Option<std::io::Result<usize>>>> = Arc::default();
    let s2 = seen.clone();
    let _srv = TcpServer::serve(b.ns.tcp_listener(sa(ANY4, port)).unwrap(), move |mut s| {
        set_timeouts(&s, Duration::from_secs(5));
        let mut buf = [0u8; 5];
        let r = s
            .read_exact(&mut buf)
            .and_then(|_| crate::net::read_to_end_or_err(&mut s));
        *s2.lock().unwrap() = Some(r);
    });
    b.expect_tcp(LO4, port);
    let mut c = try_connect(sa(LO4, port)).unwrap();
    c.write_all(b"hello").unwrap();
    thread::sleep(Duration::from_millis(100));
    crate::net::set_linger_zero(&c);
    drop(c);
    let done = wait_until(after(Duration::from_secs(5)), || {
        seen.lock().unwrap().is_some()
    });
    let r = seen.lock().unwrap().take();
    match r {
        Some(Err(e)) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "host client reset its connection; the guest server should see ECONNRESET, got {other:?} (finished: {done})\n{}",
            b.describe()
        ),
    }
}

/// UDP datagrams of edge sizes (empty, 1 byte, 1472, 9000, 60000) echoed through the bridge.
pub fn udp_sizes(b: &mut Bridge) {
    let port = free_port();
    let _echo = UdpEcho::serve(b.ns.udp_socket(sa(ANY4, port)).unwrap());
    if b.wait_udp(LO4, port, Duration::from_secs(5)).is_none() {
        panic!("UDP 127.0.0.1:{port} not mirrored\n{}", b.describe());
    }
    let c = UdpSocket::bind(sa(LO4, 0)).unwrap();
    socket2::SockRef::from(&c)
        .set_recv_buffer_size(1 << 20)
        .unwrap();
    // A first datagram sets the flow up.
    udp_echo_check(&c, sa(LO4, port), b"warm-up", Duration::from_secs(5)).unwrap();
    let mut errors = Vec::new();
    for len in [1usize, 1472, 9000, 60_000, 0] {
        let data = payload(len as u64, len);
        if let Err(e) = udp_echo_check(&c, sa(LO4, port), &data, Duration::from_secs(3)) {
            errors.push(format!("{len}-byte datagram: {e}"));
        }
    }
    if !errors.is_empty() {
        panic!("UDP sizes: {errors:?}\n{}", b.describe());
    }
}

/// `n` connections open at once, half over 127.0.0.1 and half over ::1: every one sends a
/// checksummed 2000 bytes, then every one reads its echo, then every one half-closes and expects
/// EOF.
pub fn concurrent(b: &mut Bridge, n: usize) {
    crate::raise_nofile();
    let port = free_port();
    let _srv = TcpServer::echo(b.ns.tcp_listener(sa(ANY4, port)).unwrap());
    b.expect_tcp(LO4, port);
    const LEN: usize = 2000;
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let ip = if i % 2 == 0 { LO4 } else { LO6 };
        match try_connect(sa(ip, port)) {
            Ok(s) => conns.push(s),
            Err(e) => panic!("connection {i} of {n}: {e}\n{}", b.describe()),
        }
    }
    // All open at once: every one sends, then every one reads its echo back.
    for (i, s) in conns.iter_mut().enumerate() {
        if let Err(e) = s.write_all(&payload(i as u64, LEN)) {
            panic!("connection {i}: write: {e}\n{}", b.describe());
        }
    }
    let mut failures = Vec::new();
    for (i, s) in conns.iter_mut().enumerate() {
        let mut v = Verifier::new(i as u64, format!("connection {i}"));
        let mut buf = [0u8; LEN];
        let mut got = 0;
        while got < LEN {
            match s.read(&mut buf[..LEN - got]) {
                Ok(0) => {
                    failures.push(format!("connection {i}: EOF after {got} bytes"));
                    break;
                }
                Ok(n) => {
                    if let Err(e) = v.check(&buf[..n]) {
                        failures.push(e);
                        break;
                    }
                    got += n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    failures.push(format!("connection {i}: read after {got} bytes: {e}"));
                    break;
                }
            }
        }
    }
    for (i, s) in conns.iter_mut().enumerate() {
        if let Err(e) = s
            .shutdown(Shutdown::Write)
            .map_err(|e| e.to_string())
            .and_then(|_| expect_eof(s, &format!("connection {i}")))
        {
            failures.push(e);
        }
    }
    eprintln!("{n} concurrent echo connections: {:?}", t0.elapsed());
    if !failures.is_empty() {
        panic!(
            "{} of {n} connections failed, first: {:?}\n{}",
            failures.len(),
            &failures[..failures.len().min(5)],
            b.describe()
        );
    }
}
