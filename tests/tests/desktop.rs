//! Docker Desktop's host networking, with Docker itself: Debian's dockerd runs inside the "VM" (a
//! network namespace) with hostnet-proxy as its userland proxy and hostnet-agent beside it;
//! hostnet-forwarder runs on the host (see [`hostnet_e2e::desktop`]). One daemon serves every
//! scenario, in order:
//!
//! 1. `--network host` httpd → the host's 127.0.0.1 and [::1] answer; `docker stop` → the host
//!    port is gone within 1 s;
//! 2. `-p HP:80`, `-p 127.0.0.1:HP2:80` and `-p HU:53/udp` in bridge mode, served in the VM by
//!    hostnet-proxy, reached on the host's loopback (HTTP, UDP echo);
//! 3. a `--network host` UDP echo answering 8 host clients at once;
//! 4. the reverse direction: servers on the host's 127.0.0.1 and [::1] reached from
//!    `docker run --rm --network host ... wget`;
//! 5. 16 MiB each way at once, checksummed, through a `--network host` echo (127.0.0.1 and ::1);
//! 6. `--restart always` containers (host network and `-p`) across a dockerd restart in the VM:
//!    their host ports go and come back.
//!
//! Then the host is checked unchanged (iptables, sysctls, mounts, /run, /etc/docker, cgroups, the
//! namespace). Needs root, dockerd, busybox and socat (`scripts/test-deps.sh`);
//! `HOSTNET_SKIP_DOCKER=1` or `HOSTNET_SKIP_PRIVILEGED=1` skip it when they are missing.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use hostnet_e2e::bridge::Bridge;
use hostnet_e2e::desktop::{DesktopVm, VmDocker, http_get, http_handler, run_d};
use hostnet_e2e::dockerd::{self, Dockerd, IMAGE, INDEX_HTML};
use hostnet_e2e::net::{
    LO4, LO6, TcpServer, duplex, free_port, host_listener, host_udp, refused, sa, tcp_listeners,
    time_until, try_connect, udp_bound, udp_echo_check,
};
use hostnet_e2e::payload::payload;
use hostnet_e2e::scenario::udp_clients;
use hostnet_e2e::{after, privileged, wait_until};

/// How long a container's server may take to answer on the host after `docker run` returns.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `check` until it succeeds, at most [`ANSWER_TIMEOUT`]; panics with the last error and
/// both bridge processes' logs otherwise.
fn eventually(b: &mut Bridge, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let mut last = String::new();
    let ok = wait_until(after(ANSWER_TIMEOUT), || match check() {
        Ok(()) => true,
        Err(e) => {
            last = e;
            false
        }
    });
    if !ok {
        panic!("{what}: {last}\n{}", b.describe());
    }
}

/// The container's httpd answers on the host at `addr` with the image's page.
fn check_http(b: &mut Bridge, addr: SocketAddr) {
    eventually(b, &format!("HTTP via {addr}"), || {
        let body = http_get(addr)?;
        if body == INDEX_HTML {
            Ok(())
        } else {
            Err(format!("body {body:?}"))
        }
    });
}

/// How many sockets process `pid` holds.
fn socket_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// True when the host has a TCP listener on `ip:port`.
fn host_listens(ip: IpAddr, port: u16) -> bool {
    tcp_listeners().contains(&sa(ip, port))
}

#[test]
fn docker_desktop_host_networking_with_dockerd_in_the_vm() {
    if !dockerd::available("desktop") || !privileged("desktop") {
        return;
    }
    let t0 = Instant::now();
    let mut vm = DesktopVm::new("test").unwrap();
    let d = vm.docker.start(&[]).unwrap();
    eprintln!(
        "dockerd {} up in the VM after {:?}",
        d.docker_ok(&["version", "--format", "{{.Server.Version}}"])
            .unwrap()
            .trim(),
        t0.elapsed()
    );

    host_network_httpd(&mut vm.bridge, &d);
    published_ports(&mut vm.bridge, &d);
    host_network_udp(&mut vm.bridge, &d);
    reverse(&mut vm.bridge, &d);
    bulk_both_ways(&mut vm.bridge, &d);
    let d = restart_always(&mut vm.bridge, &vm.docker, d);

    d.stop().unwrap();
    vm.finish().unwrap();
    eprintln!("desktop: all scenarios in {:?}", t0.elapsed());
}

/// 1. `--network host` httpd: host 127.0.0.1:P and [::1]:P answer; after `docker stop` the host
///    port is gone within 1 s.
fn host_network_httpd(b: &mut Bridge, d: &Dockerd) {
    let p = free_port();
    let ps = p.to_string();
    run_d(
        d,
        &[
            "--network",
            "host",
            "--name",
            "web-host",
            IMAGE,
            "httpd",
            "-f",
            "-p",
            &ps,
            "-h",
            "/www",
        ],
    )
    .unwrap();
    let t = Instant::now();
    check_http(b, sa(LO4, p));
    eprintln!(
        "1. --network host httpd answers on 127.0.0.1:{p} {:?} after docker run returned",
        t.elapsed()
    );
    check_http(b, sa(LO6, p));

    // busybox httpd as PID 1 ignores SIGTERM: -t 1 (SIGKILL after 1 s).
    d.docker_ok(&["stop", "-t", "1", "web-host"]).unwrap();
    let gone = time_until(Duration::from_secs(1), || {
        !host_listens(LO4, p) && !host_listens(LO6, p)
    });
    match gone {
        Some(t) => eprintln!("1. host port {p} gone {t:?} after docker stop returned"),
        None => panic!(
            "host port {p} still listening 1 s after docker stop\n{}",
            b.describe()
        ),
    }
    assert!(refused(sa(LO4, p)) && refused(sa(LO6, p)));
    d.docker_ok(&["rm", "web-host"]).unwrap();
}

/// 2. Bridge mode in the VM: `-p HP:80`, `-p 127.0.0.1:HP2:80`, `-p HU:53/udp`, each served in
///    the VM by a hostnet-proxy, reached on the host's loopback.
fn published_ports(b: &mut Bridge, d: &Dockerd) {
    let (hp, hp2, hu) = (free_port(), free_port(), free_port());
    run_d(
        d,
        &[
            "--name",
            "web-pub",
            "-p",
            &format!("{hp}:80"),
            "-p",
            &format!("127.0.0.1:{hp2}:80"),
            "-p",
            &format!("{hu}:53/udp"),
            IMAGE,
            "sh",
            "-c",
            "desktop_servers --udp-echo 53 & exec httpd -f -p 80 -h /www",
        ],
    )
    .unwrap();
    // dockerd 20.10 publishes HP and HU on 0.0.0.0 and ::, HP2 on 127.0.0.1: five proxies, all
    // hostnet-proxy (the daemon's children running that binary), one thread each.
    let procs = d.wait_proxies(5, Duration::from_secs(10)).unwrap();
    for p in &procs {
        assert_eq!(p.threads, 1, "{p:?}");
        let port: u16 = p.flag("-host-port").unwrap().parse().unwrap();
        assert!([hp, hp2, hu].contains(&port), "{p:?}");
    }
    for addr in [sa(LO4, hp), sa(LO6, hp), sa(LO4, hp2), sa(LO6, hp2)] {
        check_http(b, addr);
    }
    eprintln!("2. -p {hp}:80 and -p 127.0.0.1:{hp2}:80 answer on the host's 127.0.0.1 and [::1]");
    for ip in [LO4, LO6] {
        let sock = host_udp(sa(ip, 0));
        for (j, len) in [1usize, 512, 1400, 8000].into_iter().enumerate() {
            let data = payload(60 + j as u64, len);
            if let Err(e) = udp_echo_check(&sock, sa(ip, hu), &data, ANSWER_TIMEOUT) {
                panic!(
                    "UDP echo via {}, {len} B: {e}\n{}",
                    sa(ip, hu),
                    b.describe()
                );
            }
        }
    }
    eprintln!("2. -p {hu}:53/udp echoes on the host's 127.0.0.1 and [::1]");
    // A connection held open through the host's 127.0.0.1:HP is one of HP's hostnet-proxy
    // processes' (two more sockets: the client, from the agent, and the container).
    let hp_proxies: Vec<i32> = procs
        .iter()
        .filter(|p| {
            p.flag("-proto") == Some("tcp") && p.flag("-host-port") == Some(&hp.to_string())
        })
        .map(|p| p.pid)
        .collect();
    let sockets = || {
        hp_proxies
            .iter()
            .map(|&pid| socket_count(pid))
            .sum::<usize>()
    };
    let idle = sockets();
    let mut held = try_connect(sa(LO4, hp)).unwrap();
    held.write_all(b"GET / HTTP/1.0\r\n").unwrap();
    if time_until(Duration::from_secs(5), || sockets() == idle + 2).is_none() {
        panic!(
            "a connection via the host's 127.0.0.1:{hp} is not relayed by hostnet-proxy {hp_proxies:?} ({} sockets, {idle} idle)\n{}",
            sockets(),
            b.describe()
        );
    }
    held.write_all(b"\r\n").unwrap();
    let mut resp = String::new();
    held.read_to_string(&mut resp).unwrap();
    assert!(resp.ends_with(INDEX_HTML), "{resp:?}");

    d.docker_ok(&["rm", "-f", "web-pub"]).unwrap();
    d.wait_proxies(0, Duration::from_secs(5)).unwrap();
    for (ip, p) in [(LO4, hp), (LO6, hp), (LO4, hp2)] {
        assert!(
            time_until(Duration::from_secs(2), || !host_listens(ip, p)).is_some(),
            "host {} still listening 2 s after docker rm -f",
            sa(ip, p)
        );
    }
}

/// 3. A `--network host` UDP echo answers 8 host clients at once (127.0.0.1 and ::1 alternating),
///    each reply to its own client.
fn host_network_udp(b: &mut Bridge, d: &Dockerd) {
    let pu = free_port();
    run_d(
        d,
        &[
            "--network",
            "host",
            "--name",
            "udp-host",
            IMAGE,
            "desktop_servers",
            "--udp-echo",
            &pu.to_string(),
        ],
    )
    .unwrap();
    for ip in [LO4, LO6] {
        if time_until(ANSWER_TIMEOUT, || udp_bound().contains(&sa(ip, pu))).is_none() {
            panic!("UDP {} not mirrored\n{}", sa(ip, pu), b.describe());
        }
    }
    let errors = udp_clients(|ip| Ok(host_udp(sa(ip, 0))), pu, 8);
    if !errors.is_empty() {
        panic!("UDP clients: {errors:?}\n{}", b.describe());
    }
    eprintln!("3. --network host UDP echo on {pu}: 8 host clients x 20 datagrams answered");
    d.docker_ok(&["rm", "-f", "udp-host"]).unwrap();
    for ip in [LO4, LO6] {
        let a = sa(ip, pu);
        assert!(
            time_until(Duration::from_secs(2), || !udp_bound().contains(&a)).is_some(),
            "host UDP {a} still bound 2 s after docker rm -f"
        );
    }
}

const REVERSE4: &str = "hello from the host's 127.0.0.1\n";
const REVERSE6: &str = "hello from the host's [::1]\n";

/// 4. Servers on the host's 127.0.0.1 and [::1] reached from a `--network host` container at its
///    own localhost.
fn reverse(b: &mut Bridge, d: &Dockerd) {
    let (rp, rp6) = (free_port(), free_port());
    let _s4 = TcpServer::serve(host_listener(sa(LO4, rp)), http_handler(REVERSE4));
    let _s6 = TcpServer::serve(host_listener(sa(LO6, rp6)), http_handler(REVERSE6));
    for p in [rp, rp6] {
        if !wait_until(after(Duration::from_secs(10)), || b.ns.has_socket(false, p)) {
            panic!(
                "host port {p} not mirrored into the VM within 10 s\n{}",
                b.describe()
            );
        }
    }
    for (url, body) in [
        (format!("http://127.0.0.1:{rp}/"), REVERSE4),
        (format!("http://[::1]:{rp6}/"), REVERSE6),
    ] {
        let args = [
            "run",
            "--rm",
            "--network",
            "host",
            IMAGE,
            "wget",
            "-qO-",
            &url,
        ];
        eventually(b, &format!("wget {url} in a container"), || {
            let out = d.docker(&args).map_err(|e| format!("{e:#}"))?;
            let got = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && got == body {
                Ok(())
            } else {
                Err(format!(
                    "{}: stdout {got:?}, stderr {:?}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        });
        eprintln!("4. docker run --rm --network host {IMAGE} wget -qO- {url}: {body:?}");
    }
}

/// 5. 16 MiB each way at once through a `--network host` echo, every byte checked, over the
///    host's 127.0.0.1 and ::1.
fn bulk_both_ways(b: &mut Bridge, d: &Dockerd) {
    const LEN: u64 = 16 << 20;
    let pe = free_port();
    run_d(
        d,
        &[
            "--network",
            "host",
            "--name",
            "echo-host",
            IMAGE,
            "desktop_servers",
            "--echo",
            &pe.to_string(),
        ],
    )
    .unwrap();
    for (i, ip) in [LO4, LO6].into_iter().enumerate() {
        let addr = sa(ip, pe);
        eventually(b, &format!("connect {addr}"), || {
            if host_listens(ip, pe) {
                Ok(())
            } else {
                Err("not mirrored yet".into())
            }
        });
        let t = Instant::now();
        let s = try_connect(addr).unwrap();
        let seed = 700 + i as u64;
        if let Err(e) = duplex(s, seed, seed, LEN, &format!("16 MiB echo via {addr}")) {
            panic!("{e}\n{}", b.describe());
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "5. 16 MiB each way via {addr}: {:.0} ms ({:.0} MiB/s each way)",
            secs * 1e3,
            16.0 / secs
        );
    }
    d.docker_ok(&["rm", "-f", "echo-host"]).unwrap();
}

/// 6. `--restart always` containers, one on the host network and one published with `-p`,
///    survive a dockerd restart in the VM: their host ports go with the daemon and come back.
fn restart_always<'a>(b: &mut Bridge, docker: &'a VmDocker, d: Dockerd<'a>) -> Dockerd<'a> {
    let (ph, hr) = (free_port(), free_port());
    let phs = ph.to_string();
    let always = ["--restart", "always", "--stop-timeout", "1"];
    let mut host_args = always.to_vec();
    host_args.extend([
        "--network",
        "host",
        "--name",
        "always-host",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        &phs,
        "-h",
        "/www",
    ]);
    run_d(&d, &host_args).unwrap();
    let publish = format!("{hr}:80");
    let mut pub_args = always.to_vec();
    pub_args.extend([
        "-p",
        &publish,
        "--name",
        "always-pub",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    run_d(&d, &pub_args).unwrap();
    let ports = [ph, hr];
    for p in ports {
        check_http(b, sa(LO4, p));
    }
    let proxies = d.wait_proxies(2, Duration::from_secs(10)).unwrap();
    let started = |d: &Dockerd| {
        d.docker_ok(&[
            "inspect",
            "-f",
            "{{.State.Running}} {{.State.StartedAt}}",
            "always-host",
            "always-pub",
        ])
        .unwrap()
    };
    let before = started(&d);

    // Without --live-restore, dockerd stops its containers when it stops (SIGTERM, then SIGKILL
    // after the stop timeout); its proxies die with it.
    let t = Instant::now();
    d.shutdown_live().unwrap();
    eprintln!("6. dockerd stopped in {:?}", t.elapsed());
    for p in ports {
        for ip in [LO4, LO6] {
            if time_until(Duration::from_secs(5), || !host_listens(ip, p)).is_none() {
                panic!(
                    "host {} still listening 5 s after dockerd stopped\n{}",
                    sa(ip, p),
                    b.describe()
                );
            }
        }
    }
    for p in &proxies {
        assert!(
            !Path::new(&format!("/proc/{}", p.pid)).exists(),
            "proxy {} outlived dockerd",
            p.pid
        );
    }

    let t = Instant::now();
    let d = docker.start(&[]).unwrap();
    for p in ports {
        check_http(b, sa(LO4, p));
        check_http(b, sa(LO6, p));
    }
    eprintln!(
        "6. dockerd restarted: both --restart always containers answer on the host again {:?} after the daemon was started",
        t.elapsed()
    );
    let after_restart = started(&d);
    assert!(
        after_restart.lines().all(|l| l.starts_with("true ")),
        "not running again: {after_restart}"
    );
    assert_ne!(before, after_restart, "the containers were not restarted");
    let again = d.wait_proxies(2, Duration::from_secs(10)).unwrap();
    assert!(again.iter().all(|p| proxies.iter().all(|o| o.pid != p.pid)));
    d
}
