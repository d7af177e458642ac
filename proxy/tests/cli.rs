//! Black-box tests of the hostnet-proxy command line, status pipe (fd 3),
//! listen fd (fd 4), environment tunables, startup errors and signals.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::*;

/// `-proto tcp -host-ip 127.0.0.1 -host-port P -container-ip .. -container-port ..`
/// for a free P and an echo backend.
fn base_args(be: &TcpServer) -> (Vec<String>, SocketAddr) {
    let front = SocketAddr::new(LO4, free_tcp_port(LO4));
    let args = vec![
        "-proto".to_string(),
        "tcp".into(),
        "-host-ip".into(),
        front.ip().to_string(),
        "-host-port".into(),
        front.port().to_string(),
        "-container-ip".into(),
        be.addr.ip().to_string(),
        "-container-port".into(),
        be.addr.port().to_string(),
    ];
    (args, front)
}

fn assert_echo(p: &mut Proxy, addr: SocketAddr, seed: u64) {
    if let Err(e) = echo_check(addr, seed, 32 * 1024) {
        panic!("round trip via {addr} failed: {e}; {}", p.describe());
    }
}

/// A bad command line: message on stderr, exit 2, nothing at all on fd 3.
fn assert_usage_error(args: Vec<String>) {
    let mut p = Proxy::with_args(args).spawn();
    let code = p.exit_code(Duration::from_secs(5));
    assert!(
        p.wait_status_eof(Duration::from_secs(2)),
        "fd 3 not closed: {}",
        p.describe()
    );
    let desc = p.describe();
    assert_eq!(code, 2, "exit status: {desc}");
    assert!(
        p.status_bytes().is_empty(),
        "nothing may be written on fd 3: {desc}"
    );
    assert!(
        !p.stderr().trim().is_empty(),
        "no message on stderr: {desc}"
    );
}

#[test]
fn unknown_flag_exits_2() {
    let be = TcpServer::echo(any_port(LO4));
    let (mut args, _) = base_args(&be);
    args.insert(0, "-bogus".into());
    assert_usage_error(args);
}

#[test]
fn bad_port_exits_2() {
    let be = TcpServer::echo(any_port(LO4));
    let (mut args, _) = base_args(&be);
    args[5] = "notanumber".into();
    assert_usage_error(args);
}

#[test]
fn bad_container_port_exits_2() {
    let be = TcpServer::echo(any_port(LO4));
    let (mut args, _) = base_args(&be);
    args[9] = "12x".into();
    assert_usage_error(args);
}

#[test]
fn bad_host_ip_exits_2() {
    let be = TcpServer::echo(any_port(LO4));
    let (mut args, _) = base_args(&be);
    args[3] = "999.1.1.1".into();
    assert_usage_error(args);
}

#[test]
fn flag_missing_value_exits_2() {
    let be = TcpServer::echo(any_port(LO4));
    let (mut args, _) = base_args(&be);
    args.truncate(9); // "-container-port" without its value
    assert_usage_error(args);
}

#[test]
fn version_flag() {
    for flag in ["-v", "-version", "--version"] {
        let mut p = Proxy::with_args([flag]).spawn();
        let code = p.exit_code(Duration::from_secs(5));
        let desc = p.describe();
        assert_eq!(code, 0, "{flag}: {desc}");
        assert!(
            p.stdout().to_lowercase().contains("version"),
            "{flag}: stdout should have a line with \"version\": {desc}"
        );
    }
}

#[test]
fn help_flag() {
    for flag in ["-h", "-help", "--help"] {
        let mut p = Proxy::with_args([flag]).spawn();
        let code = p.exit_code(Duration::from_secs(5));
        let desc = p.describe();
        assert_eq!(code, 0, "{flag}: {desc}");
        let out = format!("{}{}", p.stdout(), p.stderr());
        assert!(
            out.contains("host-port"),
            "{flag}: usage should list the flags: {desc}"
        );
        assert!(p.status_bytes().is_empty(), "{flag}: {desc}");
    }
}

/// `--name value`, `-name=value` and `--name=value` all work.
#[test]
fn flag_forms() {
    let be = TcpServer::echo(any_port(LO4));
    let port = free_tcp_port(LO4);
    let front = SocketAddr::new(LO4, port);
    let args = vec![
        "--proto".to_string(),
        "tcp".into(),
        "-host-ip=127.0.0.1".into(),
        format!("--host-port={port}"),
        format!("--container-ip={}", be.addr.ip()),
        "-container-port".into(),
        be.addr.port().to_string(),
    ];
    let mut p = Proxy::with_args(args).start();
    assert_echo(&mut p, front, 1);

    let port = free_tcp_port(LO4);
    let args = vec![
        "-proto=tcp".to_string(),
        "--host-ip".into(),
        "127.0.0.1".into(),
        format!("-host-port={port}"),
        "-container-ip".into(),
        be.addr.ip().to_string(),
        format!("--container-port={}", be.addr.port()),
    ];
    let mut p = Proxy::with_args(args).start();
    assert_echo(&mut p, SocketAddr::new(LO4, port), 2);
}

/// `-proto` defaults to tcp.
#[test]
fn proto_defaults_to_tcp() {
    let be = TcpServer::echo(any_port(LO4));
    let (args, front) = base_args(&be);
    let mut p = Proxy::with_args(args[2..].to_vec()).start();
    assert_echo(&mut p, front, 3);
}

/// Parsing stops at `--` and at the first non-flag argument.
#[test]
fn parsing_stops_at_non_flag() {
    let be = TcpServer::echo(any_port(LO4));
    let (mut args, front) = base_args(&be);
    args.extend(["--".to_string(), "-bogus".into()]);
    let mut p = Proxy::with_args(args).start();
    assert_echo(&mut p, front, 4);

    let (mut args, front) = base_args(&be);
    args.extend(["extra".to_string(), "-bogus".into()]);
    let mut p = Proxy::with_args(args).start();
    assert_echo(&mut p, front, 5);
}

#[test]
fn use_listen_fd_forms() {
    let be = TcpServer::echo(any_port(LO4));
    for form in [
        "-use-listen-fd",
        "-use-listen-fd=true",
        "--use-listen-fd=true",
    ] {
        let sock = tcp_listen_socket(any_port(LO4));
        let front = sock.local_addr().unwrap().as_socket().unwrap();
        let args = vec![
            "-proto".to_string(),
            "tcp".into(),
            "-host-ip".into(),
            "127.0.0.1".into(),
            "-host-port".into(),
            front.port().to_string(),
            "-container-ip".into(),
            be.addr.ip().to_string(),
            "-container-port".into(),
            be.addr.port().to_string(),
            form.into(),
        ];
        let mut p = Proxy::with_args(args).fd4(sock).start();
        assert_echo(&mut p, front, 6);
    }
}

/// The host port is taken by another listening socket.
#[test]
fn tcp_port_in_use() {
    let taken = TcpListener::bind(any_port(LO4)).unwrap();
    let be = TcpServer::echo(any_port(LO4));
    let mut p = Proxy::tcp()
        .host(taken.local_addr().unwrap())
        .container(be.addr)
        .spawn();
    assert_startup_error(&mut p, "address already in use");
}

#[test]
fn udp_port_in_use() {
    let taken = UdpSocket::bind(any_port(LO4)).unwrap();
    let be = UdpServer::echo(any_port(LO4));
    let mut p = Proxy::udp()
        .host(taken.local_addr().unwrap())
        .container(be.addr)
        .spawn();
    assert_startup_error(&mut p, "address already in use");
}

/// Whether this kernel can make SCTP sockets (the machine this project is developed on cannot:
/// no `sctp` module). The SCTP data path is tested in the real-VM test's guest, whose kernel has
/// the module (`tests/tests/vm.rs`).
fn kernel_has_sctp() -> bool {
    socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::from(libc::IPPROTO_SCTP)),
    )
    .is_ok()
}

/// `-proto sctp`: without SCTP in the kernel, a clear startup error naming the cause; with it,
/// the proxy starts and listens.
#[test]
fn sctp_startup() {
    let mut p = Proxy::proto("sctp")
        .host(SocketAddr::new(LO4, free_tcp_port(LO4)))
        .container(dead_tcp_addr(LO4))
        .spawn();
    if kernel_has_sctp() {
        let st = p.status_bytes();
        assert_eq!(st, b"0\n", "{}", p.describe());
    } else {
        assert_startup_error(&mut p, "SCTP is not available in this kernel: ");
        let st = String::from_utf8_lossy(&p.status_bytes()).into_owned();
        assert!(
            st.starts_with("1\nSCTP is not available in this kernel: ")
                && st.contains("Protocol not supported"),
            "the reason should come first and carry the OS error: {st:?}"
        );
    }
}

/// `-proto sctp -use-listen-fd` with a TCP socket on fd 4: refused, and on a kernel without SCTP
/// the reason is that, not the socket type.
#[test]
fn sctp_listen_fd_is_checked() {
    let mut p = Proxy::proto("sctp")
        .listen_strict(tcp_listen_socket(any_port(LO4)))
        .container(dead_tcp_addr(LO4))
        .spawn();
    if kernel_has_sctp() {
        assert_startup_error(&mut p, "fd 4 is an unexpected socket type for -proto sctp");
    } else {
        assert_startup_error(&mut p, "SCTP is not available in this kernel");
    }
}

#[test]
fn unknown_protocol_is_reported() {
    let mut p = Proxy::proto("foo")
        .host(SocketAddr::new(LO4, free_tcp_port(LO4)))
        .container(dead_tcp_addr(LO4))
        .spawn();
    assert_startup_error(&mut p, "unsupported protocol");
}

/// fd 4 holds a UDP socket but `-proto tcp`.
#[test]
fn listen_fd_udp_socket_for_tcp() {
    let mut p = Proxy::tcp()
        .listen_strict(udp_listen_socket(any_port(LO4)))
        .container(dead_tcp_addr(LO4))
        .spawn();
    assert_startup_error(&mut p, "fd 4");
}

/// fd 4 holds a bound TCP socket that is not listening.
#[test]
fn listen_fd_tcp_not_listening() {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&socket2::SockAddr::from(any_port(LO4))).unwrap();
    let mut p = Proxy::tcp()
        .listen_strict(s)
        .container(dead_tcp_addr(LO4))
        .spawn();
    assert_startup_error(&mut p, "fd 4");
}

/// fd 4 holds a listening TCP socket but `-proto udp`.
#[test]
fn listen_fd_tcp_socket_for_udp() {
    let mut p = Proxy::udp()
        .listen_strict(tcp_listen_socket(any_port(LO4)))
        .container(dead_tcp_addr(LO4))
        .spawn();
    assert_startup_error(&mut p, "fd 4");
}

/// `-use-listen-fd` while fd 4 is not open.
#[test]
fn listen_fd_missing() {
    let be = TcpServer::echo(any_port(LO4));
    let (mut args, _) = base_args(&be);
    args.push("-use-listen-fd".into());
    let mut p = Proxy::with_args(args).spawn();
    assert_startup_error(&mut p, "fd 4");
}

fn env_rejected(var: &str, value: &str) {
    let be = TcpServer::echo(any_port(LO4));
    let mut p = Proxy::tcp()
        .host_free(LO4)
        .container(be.addr)
        .env(var, value)
        .spawn();
    let st = p.status_bytes();
    let code = p.wait_exit(Duration::from_secs(5)).and_then(|s| s.code());
    let desc = p.describe();
    assert!(
        st.starts_with(b"1\n") && st.len() > 2,
        "{var}={value:?} should be refused with `1\\n<reason>`: {desc}"
    );
    assert_eq!(code, Some(1), "{var}={value:?}: {desc}");
}

#[test]
fn invalid_env_values_are_refused() {
    for (var, value) in [
        ("HOSTNET_PROXY_UDP_TIMEOUT", "soon"),
        ("HOSTNET_PROXY_UDP_TIMEOUT", "-5s"),
        ("HOSTNET_PROXY_UDP_MAX_FLOWS", "many"),
        ("HOSTNET_PROXY_UDP_MAX_FLOWS", "-1"),
        ("HOSTNET_PROXY_UDP_MAX_DATAGRAM", "big"),
        ("HOSTNET_PROXY_CONNECT_TIMEOUT", "later"),
        ("HOSTNET_PROXY_PROXY_PROTOCOL", "v9"),
    ] {
        env_rejected(var, value);
    }
}

#[test]
fn valid_env_values_are_accepted() {
    let be = TcpServer::echo(any_port(LO4));
    for (var, value) in [
        ("HOSTNET_PROXY_UDP_TIMEOUT", "90"),
        ("HOSTNET_PROXY_UDP_TIMEOUT", "90s"),
        ("HOSTNET_PROXY_UDP_TIMEOUT", "1500ms"),
        ("HOSTNET_PROXY_UDP_MAX_FLOWS", "10"),
        ("HOSTNET_PROXY_UDP_MAX_DATAGRAM", "1500"),
        ("HOSTNET_PROXY_CONNECT_TIMEOUT", "5s"),
    ] {
        let mut p = Proxy::tcp()
            .host_free(LO4)
            .container(be.addr)
            .env(var, value)
            .spawn();
        if p.status_bytes() != b"0\n" {
            panic!("{var}={value} refused: {}", p.describe());
        }
        let addr = p.addr();
        assert_echo(&mut p, addr, 8);
    }
}

/// HOSTNET_PROXY_LOG_FILE: logs are appended (existing content kept) and the
/// file holds text lines.
#[test]
fn log_file_is_appended() {
    let path = std::env::temp_dir().join(format!("hnp-log-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, "existing line\n").unwrap();
    {
        let be = TcpServer::echo(any_port(LO4));
        let mut p = Proxy::tcp()
            .host_free(LO4)
            .container(be.addr)
            .env("HOSTNET_PROXY_LOG_FILE", &path)
            .start();
        let addr = p.addr();
        assert_echo(&mut p, addr, 9);
        p.signal(Signal::SIGTERM);
        p.exit_code(Duration::from_secs(2));
    }
    let text = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8(text).expect("log file is not UTF-8 text");
    assert!(
        text.starts_with("existing line\n"),
        "log file was truncated, not appended: {text:?}"
    );
    assert!(
        text.ends_with('\n'),
        "log file does not end with a complete line: {text:?}"
    );
}

fn signal_with_open_connections(sig: Signal) {
    let be = TcpServer::echo(any_port(LO4));
    let mut p = Proxy::tcp().host_free(LO4).container(be.addr).start();
    let addr = p.addr();
    let conns: Vec<TcpStream> = (0..10)
        .map(|i| {
            let mut c = connect(addr);
            c.write_all(&payload(i, 100)).unwrap();
            read_prng(&mut c, i, 100, "echo before signal").unwrap();
            c
        })
        .collect();
    let t0 = Instant::now();
    p.signal(sig);
    let st = p.wait_exit(Duration::from_millis(500));
    let took = t0.elapsed();
    let desc = p.describe();
    let st = st.unwrap_or_else(|| panic!("still running {took:?} after {sig}: {desc}"));
    assert_eq!(st.code(), Some(0), "exit after {sig}: {desc}");
    drop(conns);
}

#[test]
fn sigterm_exits_0_promptly() {
    signal_with_open_connections(Signal::SIGTERM);
}

#[test]
fn sigint_exits_0_promptly() {
    signal_with_open_connections(Signal::SIGINT);
}

#[test]
fn udp_sigterm_exits_0_promptly() {
    let be = UdpServer::echo(any_port(LO4));
    let mut p = Proxy::udp().host_free(LO4).container(be.addr).start();
    let c = udp_client(LO4);
    udp_echo_check(&c, p.addr(), b"before signal", Duration::from_secs(5)).unwrap();
    let t0 = Instant::now();
    p.signal(Signal::SIGTERM);
    let st = p.wait_exit(Duration::from_millis(500));
    let desc = p.describe();
    let st = st.unwrap_or_else(|| panic!("still running {:?} after SIGTERM: {desc}", t0.elapsed()));
    assert_eq!(st.code(), Some(0), "{desc}");
}

/// HOSTNET_PROXY_LOG=debug reaches debug lines (a closed connection is logged at debug).
#[test]
fn debug_level_is_logged() {
    let path = std::env::temp_dir().join(format!("hnp-debug-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let be = TcpServer::echo(any_port(LO4));
    let mut p = Proxy::tcp()
        .host_free(LO4)
        .container(be.addr)
        .env("HOSTNET_PROXY_LOG_FILE", &path)
        .env("HOSTNET_PROXY_LOG", "debug")
        .start();
    let addr = p.addr();
    assert_echo(&mut p, addr, 11);
    let logged = wait_until(Instant::now() + Duration::from_secs(5), || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains("connection closed"))
    });
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    p.signal(Signal::SIGTERM);
    p.exit_code(Duration::from_secs(2));
    let _ = std::fs::remove_file(&path);
    assert!(
        logged,
        "no debug line with HOSTNET_PROXY_LOG=debug: {text:?}"
    );
    assert!(text.contains("DEBUG"), "{text:?}");
}
