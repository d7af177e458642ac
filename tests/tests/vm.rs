//! The real path: a QEMU guest (TCG) with virtio-vsock through vhost-device-vsock, the static
//! musl `hostnet-agent` inside on `vsock://any:5000`, `hostnet-forwarder` on the host over
//! `hybrid-vsock://`. One boot serves the whole scenario list, run in order; a failure names its
//! scenario and carries every log (console, backend, forwarder, the guest's `/tmp/*.log`).
//!
//! Prerequisites: `scripts/vm-setup.sh` (root). Without them the test fails, unless
//! `HOSTNET_SKIP_VM=1`.

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use hostnet_e2e::net::{
    LO4, LO6, TcpServer, duplex, echo_check, free_port, host_listener, sa, set_timeouts,
    tcp_listeners, udp_bound, udp_echo_check,
};
use hostnet_e2e::payload::{expect_eof, read_prng, write_prng};
use hostnet_e2e::scenario::{connect_raw, poke};
use hostnet_e2e::vm::{self, Vm};
use hostnet_e2e::{after, wait_until};

/// The guest port of the first scenario, as the issue says; another free one when the host
/// has 8000 taken (the forwarder binds the guest's port number on the host).
fn port_8000() -> u16 {
    let free = [LO4, LO6]
        .iter()
        .all(|ip| std::net::TcpListener::bind(sa(*ip, 8000)).is_ok());
    if free {
        8000
    } else {
        let p = free_port();
        eprintln!("note: host port 8000 is taken; the first scenario uses {p}");
        p
    }
}

/// Bulk request head of `vm_guest bulk`.
fn bulk_head(mode: u8, len: u64, seed: u64) -> Vec<u8> {
    let mut h = vec![mode];
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&seed.to_le_bytes());
    h
}

struct Run {
    vm: Vm,
    echo_port: u16,
    bulk_port: u16,
}

impl Run {
    /// Runs one scenario; on a panic, re-panics naming it, with all the logs.
    fn scenario(&mut self, name: &str, f: impl FnOnce(&mut Run)) {
        let t0 = Instant::now();
        eprintln!("vm scenario: {name} ...");
        match catch_unwind(AssertUnwindSafe(|| f(self))) {
            Ok(()) => eprintln!("vm scenario: {name}: ok ({:.1?})", t0.elapsed()),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("vm scenario `{name}` failed: {msg}\n{}", self.vm.describe());
            }
        }
    }

    fn expect_host_tcp(&self, port: u16) {
        for ip in [LO4, LO6] {
            if self
                .vm
                .wait_host_tcp(ip, port, true, Duration::from_secs(20))
                .is_none()
            {
                panic!(
                    "{} not mirrored on the host within 20 s; status: {:?}",
                    sa(ip, port),
                    self.vm.status()
                );
            }
        }
    }
}

#[test]
fn real_vm() {
    let Some(tools) = vm::prerequisites("real_vm") else {
        return;
    };
    let t0 = Instant::now();
    let mut vm = Vm::boot(&tools).unwrap_or_else(|e| panic!("boot: {e:#}"));
    eprintln!(
        "vm: booted in {:.1?} (initramfs and guest binaries included: {:.1?})",
        vm.boot_time,
        t0.elapsed()
    );
    let up = vm.start_forwarder();
    eprintln!("vm: forwarder connected after {up:.1?}");
    let mut run = Run {
        vm,
        echo_port: port_8000(),
        bulk_port: free_port(),
    };

    run.scenario(
        "guest 0.0.0.0 server reached on host 127.0.0.1 and [::1]",
        |r| {
            let p = r.echo_port;
            r.vm.spawn("echo", &format!("vm_guest tcp-echo 0.0.0.0:{p}"));
            r.expect_host_tcp(p);
            for (i, ip) in [LO4, LO6].into_iter().enumerate() {
                echo_check(sa(ip, p), 100 + i as u64, 256 * 1024).unwrap();
            }
        },
    );

    run.scenario(
        "discovery: started after the forwarder, then stopped",
        |r| {
            let p = free_port();
            let t = Instant::now();
            r.vm.spawn("late", &format!("vm_guest tcp-echo 0.0.0.0:{p}"));
            let spawned = t.elapsed();
            r.expect_host_tcp(p);
            eprintln!(
                "  mirrored {:.0?} after the spawn answer (spawn round trip {spawned:.0?})",
                t.elapsed() - spawned
            );
            echo_check(sa(LO4, p), 7, 4096).unwrap();
            r.vm.kill("late");
            for ip in [LO4, LO6] {
                if r.vm
                    .wait_host_tcp(ip, p, false, Duration::from_secs(20))
                    .is_none()
                {
                    panic!(
                        "{} still listening on the host 20 s after the guest server died",
                        sa(ip, p)
                    );
                }
            }
            // The port is free on the host again.
            std::net::TcpListener::bind(sa(LO4, p)).unwrap_or_else(|e| panic!("rebind {p}: {e}"));
        },
    );

    run.scenario("64 MiB both ways at once, checksummed", |r| {
        let p = r.bulk_port;
        r.vm.spawn("bulk", &format!("vm_guest bulk 0.0.0.0:{p}"));
        r.expect_host_tcp(p);
        let len = 64 << 20;
        let seed = 4242;
        let mut s = TcpStream::connect(sa(LO4, p)).unwrap();
        set_timeouts(&s, Duration::from_secs(120));
        s.write_all(&bulk_head(b'D', len, seed)).unwrap();
        let t = Instant::now();
        duplex(s, seed, seed + 1, len, "host side").unwrap();
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "  {} MiB each way in {secs:.1} s ({:.1} MB/s each way)",
            len >> 20,
            len as f64 / secs / 1e6
        );
        let want = format!("duplex seed={seed} ok");
        let ok = wait_until(after(Duration::from_secs(30)), || {
            r.vm.run("cat /tmp/bulk.log")
                .is_ok_and(|o| o.output.contains(&want))
        });
        assert!(ok, "the guest did not log `{want}`");
    });

    run.scenario(
        "half-close: the client shuts down writing, still gets the full reply",
        |r| {
            let p = r.bulk_port;
            let len = 4 << 20;
            let seed = 77;
            let s = TcpStream::connect(sa(LO4, p)).unwrap();
            set_timeouts(&s, Duration::from_secs(60));
            let mut w = s.try_clone().unwrap();
            w.write_all(&bulk_head(b'H', len, seed)).unwrap();
            write_prng(&mut w, seed, len).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
            // The guest answers only after it has seen our EOF.
            let mut rd = s;
            read_prng(&mut rd, seed + 1, len, "reply after half-close").unwrap();
            expect_eof(&mut rd, "reply after half-close").unwrap();
        },
    );

    run.scenario("a refused guest port resets the host client", |r| {
        let mut resets = 0;
        let mut refusals = 0;
        for round in 0..3 {
            let p = free_port();
            let name = format!("refuse{round}");
            r.vm.spawn(&name, &format!("vm_guest tcp-echo 127.0.0.1:{p}"));
            if r.vm.wait_host_tcp(LO4, p, true, Duration::from_secs(20)).is_none() {
                panic!("127.0.0.1:{p} not mirrored");
            }
            r.vm.kill(&name);
            match connect_raw(sa(LO4, p)) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => refusals += 1,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => resets += 1,
                Err(e) => panic!("round {round}: connect: {e}"),
                Ok(mut s) => match poke(&mut s) {
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => resets += 1,
                    other => panic!(
                        "round {round}: a mirrored port whose guest server is gone: expected a reset, got {other:?}"
                    ),
                },
            }
        }
        eprintln!("  {resets} resets, {refusals} refused connects (mirror already gone)");
    });

    run.scenario("UDP echo", |r| {
        let p = free_port();
        r.vm.spawn("udp", &format!("vm_guest udp-echo 0.0.0.0:{p}"));
        let a = sa(LO4, p);
        let ok = wait_until(after(Duration::from_secs(20)), || udp_bound().contains(&a));
        assert!(ok, "UDP {a} not mirrored on the host");
        let sock = UdpSocket::bind(sa(LO4, 0)).unwrap();
        for (i, size) in [1usize, 1400, 8000, 65_000].into_iter().enumerate() {
            let data = hostnet_e2e::payload::payload(500 + i as u64, size);
            udp_echo_check(&sock, a, &data, Duration::from_secs(20)).unwrap();
        }
    });

    run.scenario(
        "reverse: a host server reached from the guest via 127.0.0.1",
        |r| {
            let p = free_port();
            let _srv = TcpServer::echo(host_listener(sa(LO4, p)));
            let o =
                r.vm.run(&format!(
                    "vm_guest echo-client 127.0.0.1:{p} 900 1048576 30"
                ))
                .unwrap();
            assert_eq!(o.code, 0, "guest client: {}", o.output);
            eprintln!("  {}", o.output.trim());
        },
    );

    run.scenario("CONNECT to a guest port nobody listens on", |r| {
        let t = Instant::now();
        match vm::hybrid_connect(&r.vm.uds(), 5999, Duration::from_secs(10)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                eprintln!("  refused in {:.0?}: {e}", t.elapsed())
            }
            other => panic!("expected a close without reply, got {other:?}"),
        }
    });

    run.scenario("agent killed and restarted in the guest", |r| {
        let p = r.echo_port;
        r.vm.kill_agent();
        r.vm.wait_connected(false, Duration::from_secs(30));
        // Without the agent the host mirrors go, and the forwarder says why it cannot connect.
        if r.vm
            .wait_host_tcp(LO4, p, false, Duration::from_secs(20))
            .is_none()
        {
            panic!("127.0.0.1:{p} still mirrored with the agent dead");
        }
        let ok = wait_until(after(Duration::from_secs(20)), || {
            r.vm.status().is_ok_and(|v| {
                v["session"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("no listener"))
            })
        });
        assert!(
            ok,
            "the forwarder does not report the missing agent as `no listener`: {:?}",
            r.vm.status()
        );
        let t = Instant::now();
        r.vm.restart_agent();
        r.vm.wait_connected(true, Duration::from_secs(60));
        r.expect_host_tcp(p);
        eprintln!("  converged {:.1?} after the restart", t.elapsed());
        echo_check(sa(LO4, p), 31, 64 * 1024).unwrap();
        echo_check(sa(LO6, p), 32, 64 * 1024).unwrap();
    });

    run.scenario("forwarder restarted", |r| {
        let p = r.echo_port;
        let t = Instant::now();
        r.vm.start_forwarder();
        r.expect_host_tcp(p);
        eprintln!("  converged {:.1?} after the restart", t.elapsed());
        echo_check(sa(LO4, p), 41, 64 * 1024).unwrap();
        // The reverse direction came back too.
        let q = free_port();
        let _srv = TcpServer::echo(host_listener(sa(LO4, q)));
        let o =
            r.vm.run(&format!("vm_guest echo-client 127.0.0.1:{q} 901 65536 30"))
                .unwrap();
        assert_eq!(o.code, 0, "guest client after the restart: {}", o.output);
    });

    // Nothing of ours is left listening on the host once the VM is gone.
    let ports = [run.echo_port, run.bulk_port];
    drop(run);
    let gone = wait_until(after(Duration::from_secs(5)), || {
        !tcp_listeners()
            .iter()
            .any(|a: &SocketAddr| ports.contains(&a.port()))
    });
    assert!(
        gone,
        "host listeners left behind after the VM was torn down"
    );
}
