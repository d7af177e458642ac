//! hostnet-proxy under a real dockerd (`--userland-proxy-path`): published TCP and UDP ports over
//! IPv4 and IPv6 loopback, proxies that exit with their container, a daemon restarted under live
//! containers, and a taken host port reported in Docker's own error. Needs root, dockerd, the
//! docker CLI, busybox and socat (`scripts/test-deps.sh`); `HOSTNET_SKIP_DOCKER=1` skips.
//!
//! The daemons change the host's iptables and forwarding sysctls; [`Lab`] puts them back, and each
//! test asserts that it did. One daemon at a time: the tests hold [`SERIAL`].

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use hostnet_e2e::desktop::http_get;
use hostnet_e2e::dockerd::{self, Dockerd, IMAGE, INDEX_HTML, Lab};
use hostnet_e2e::net::{LO4, LO6, echo_check, free_port, refused, sa, udp_echo_check};
use hostnet_e2e::payload::payload;
use hostnet_e2e::process::bin;
use hostnet_e2e::{after, wait_until};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn proxy() -> PathBuf {
    bin("hostnet-proxy")
}

/// The container's servers: socat TCP echo on 7 and UDP echo on 9, busybox httpd on 80.
const SERVERS: &str = "socat TCP-LISTEN:7,fork,reuseaddr PIPE & \
                       socat UDP-LISTEN:9,fork,reuseaddr PIPE & \
                       exec httpd -f -p 80 -h /www";

/// `-p` arguments publishing `container` (e.g. `80`, `9/udp`) on `host_port` of 127.0.0.1 and
/// [::1]: dockerd starts one proxy per address.
fn publish(host_port: u16, container: &str) -> [String; 4] {
    [
        "-p".into(),
        format!("127.0.0.1:{host_port}:{container}"),
        "-p".into(),
        format!("[::1]:{host_port}:{container}"),
    ]
}

/// GET / over HTTP/1.0; the body when the status is 200.
/// Polls until `check` succeeds (the container's servers start after `docker run` returns), at
/// most 30 s; the last error otherwise.
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let mut last = String::new();
    let ok = wait_until(after(Duration::from_secs(30)), || match check() {
        Ok(()) => true,
        Err(e) => {
            last = e;
            std::thread::sleep(Duration::from_millis(50));
            false
        }
    });
    assert!(ok, "{what}: {last}");
}

fn check_http(port: u16) {
    for ip in [LO4, LO6] {
        eventually(&format!("HTTP via {ip}"), || {
            let body = http_get(sa(ip, port))?;
            if body == INDEX_HTML {
                Ok(())
            } else {
                Err(format!("body {body:?}"))
            }
        });
    }
}

fn server_version(d: &Dockerd) -> String {
    d.docker_ok(&["version", "--format", "{{.Server.Version}}"])
        .unwrap()
        .trim()
        .to_string()
}

fn run(d: &Dockerd, name: &str, ports: &[&[String]], cmd: &[&str]) -> std::process::Output {
    let mut args: Vec<&str> = vec!["run", "-d", "--name", name];
    for p in ports {
        args.extend(p.iter().map(String::as_str));
    }
    args.push(IMAGE);
    args.extend(cmd);
    d.docker(&args).unwrap()
}

fn run_ok(d: &Dockerd, name: &str, ports: &[&[String]], cmd: &[&str]) {
    let out = run(d, name, ports, cmd);
    assert!(
        out.status.success(),
        "docker run {name}: {}\n--- dockerd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_tail()
    );
}

/// `docker run` publishing one `-p` spec that must fail: Docker's message (stderr).
fn run_fails(d: &Dockerd, spec: &str, cmd: &[&str]) -> String {
    let out = run(d, "must-fail", &[&["-p".into(), spec.to_string()]], cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "docker run -p {spec} succeeded: {err}"
    );
    // The failed container stays created; the next attempt reuses its name.
    let _ = d.docker(&["rm", "-f", "must-fail"]);
    err
}

#[test]
fn published_ports_are_served_by_hostnet_proxy_and_go_with_their_container() {
    if !dockerd::available("dockerd") {
        return;
    }
    let _g = serial();
    let lab = Lab::new("ports").unwrap();
    let log = lab.path().join("proxy.log");
    let log_s = log.display().to_string();
    let d = lab
        .start(
            Some(&proxy()),
            &[],
            &[
                ("HOSTNET_PROXY_LOG", "debug"),
                ("HOSTNET_PROXY_LOG_FILE", &log_s),
            ],
        )
        .unwrap();
    eprintln!("dockerd {}", server_version(&d));
    let (http, echo, udp) = (free_port(), free_port(), free_port());
    run_ok(
        &d,
        "svc",
        &[
            &publish(http, "80"),
            &publish(echo, "7"),
            &publish(udp, "9/udp"),
        ],
        &["sh", "-c", SERVERS],
    );

    // Six proxies (three ports, two addresses), each ours, single-threaded, with docker-proxy's
    // argv.
    let procs = d.wait_proxies(6, Duration::from_secs(10)).unwrap();
    for p in &procs {
        assert_eq!(p.threads, 1, "{p:?}");
        let host_ip = p.flag("-host-ip").unwrap();
        assert!(host_ip == "127.0.0.1" || host_ip == "::1", "{p:?}");
        let container_ip: std::net::Ipv4Addr = p.flag("-container-ip").unwrap().parse().unwrap();
        assert_eq!(container_ip.octets()[..3], [198, 19, 253], "{p:?}");
    }
    let udp_procs = procs
        .iter()
        .filter(|p| p.flag("-proto") == Some("udp"))
        .count();
    assert_eq!(udp_procs, 2);

    check_http(http);
    for (i, ip) in [LO4, LO6].into_iter().enumerate() {
        eventually(&format!("TCP echo via {ip}"), || {
            echo_check(sa(ip, echo), 40 + i as u64, 4 << 20)
        });
        let sock = UdpSocket::bind(sa(ip, 0)).unwrap();
        for (j, len) in [1usize, 512, 1400, 8000].into_iter().enumerate() {
            let data = payload(50 + j as u64, len);
            udp_echo_check(&sock, sa(ip, udp), &data, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("UDP echo via {ip}, {len} B: {e}"));
        }
    }
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !logged.is_empty(),
        "HOSTNET_PROXY_LOG_FILE from dockerd's environment was not used"
    );

    // dockerd stops the proxies (SIGINT, then waits with no timeout) before `docker stop`
    // returns.
    d.docker_ok(&["stop", "-t", "1", "svc"]).unwrap();
    d.wait_proxies(0, Duration::from_secs(5)).unwrap();
    for p in &procs {
        assert!(
            !std::path::Path::new(&format!("/proc/{}", p.pid)).exists(),
            "proxy {} outlived its container",
            p.pid
        );
    }
    assert!(refused(sa(LO4, http)) && refused(sa(LO6, http)));

    d.docker_ok(&["start", "svc"]).unwrap();
    let again = d.wait_proxies(6, Duration::from_secs(10)).unwrap();
    assert!(again.iter().all(|p| procs.iter().all(|o| o.pid != p.pid)));
    check_http(http);

    d.docker_ok(&["rm", "-f", "svc"]).unwrap();
    d.wait_proxies(0, Duration::from_secs(5)).unwrap();
    assert!(refused(sa(LO4, http)) && refused(sa(LO6, http)));

    d.stop().unwrap();
    lab.finish().unwrap();
}

#[test]
fn a_taken_host_port_fails_docker_run_with_hostnet_proxys_error() {
    if !dockerd::available("dockerd") {
        return;
    }
    let _g = serial();
    let lab = Lab::new("taken").unwrap();
    let d = lab.start(Some(&proxy()), &[], &[]).unwrap();

    let taken = TcpListener::bind(sa(LO4, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = run_fails(
        &d,
        &format!("127.0.0.1:{port}:80"),
        &["httpd", "-f", "-p", "80", "-h", "/www"],
    );
    assert!(
        err.contains(&format!("failed to listen on tcp/127.0.0.1:{port}"))
            && err.contains("in use"),
        "Docker's message lacks hostnet-proxy's error: {err}"
    );
    eprintln!("docker run on a taken TCP port: {}", err.trim());

    let taken6 = UdpSocket::bind(sa(LO6, 0)).unwrap();
    let port6 = taken6.local_addr().unwrap().port();
    let err = run_fails(&d, &format!("[::1]:{port6}:9/udp"), &["sleep", "600"]);
    assert!(
        err.contains(&format!("failed to listen on udp/[::1]:{port6}")),
        "Docker's message lacks hostnet-proxy's error: {err}"
    );
    // Nothing left behind, and the port's owner keeps it.
    d.wait_proxies(0, Duration::from_secs(5)).unwrap();
    assert_eq!(taken.local_addr().unwrap().port(), port);
    d.stop().unwrap();

    // The proxies take their settings from dockerd's environment; a bad one is reported the same
    // way.
    let d = lab
        .start(
            Some(&proxy()),
            &[],
            &[("HOSTNET_PROXY_UDP_TIMEOUT", "soon")],
        )
        .unwrap();
    let err = run_fails(
        &d,
        &format!("127.0.0.1:{}:9/udp", free_port()),
        &["sleep", "600"],
    );
    assert!(
        err.contains("invalid HOSTNET_PROXY_UDP_TIMEOUT"),
        "expected the invalid setting in Docker's message: {err}"
    );
    d.wait_proxies(0, Duration::from_secs(5)).unwrap();
    d.stop().unwrap();
    lab.finish().unwrap();
}

#[test]
fn a_restarted_dockerd_recreates_the_proxies_of_live_containers() {
    if !dockerd::available("dockerd") {
        return;
    }
    let _g = serial();
    let lab = Lab::new("restart").unwrap();
    let live = ["--live-restore"];
    let d = lab.start(Some(&proxy()), &live, &[]).unwrap();
    let http = free_port();
    run_ok(
        &d,
        "web",
        &[&publish(http, "80")],
        &["httpd", "-f", "-p", "80", "-h", "/www"],
    );
    let before = d.wait_proxies(2, Duration::from_secs(10)).unwrap();
    check_http(http);

    // dockerd gone: its proxies get SIGTERM (PR_SET_PDEATHSIG) and exit; the container lives on.
    d.shutdown_live().unwrap();
    for p in &before {
        let path = format!("/proc/{}", p.pid);
        assert!(
            wait_until(after(Duration::from_secs(5)), || !std::path::Path::new(
                &path
            )
            .exists()),
            "proxy {} outlived dockerd",
            p.pid
        );
    }
    assert!(refused(sa(LO4, http)));

    let d = lab.start(Some(&proxy()), &live, &[]).unwrap();
    let state = d
        .docker_ok(&["inspect", "-f", "{{.State.Running}}", "web"])
        .unwrap();
    assert_eq!(state.trim(), "true", "the container did not stay up");
    let after_restart = d.wait_proxies(2, Duration::from_secs(20)).unwrap();
    assert!(
        after_restart
            .iter()
            .all(|p| before.iter().all(|o| o.pid != p.pid))
    );
    check_http(http);
    d.stop().unwrap();
    lab.finish().unwrap();
}
