//! `hostnet-forwarder sandbox`: a real program in a fresh namespace, its port on the host.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use hostnet_e2e::net::{LO4, LO6, free_port, refused, sa, tcp_listeners, try_connect};
use hostnet_e2e::process::{Proc, bin};
use hostnet_e2e::{TempDir, after, privileged, wait_until};

fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = try_connect(sa(LO4, port)).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn sandbox_python_http_server_reachable_from_host() {
    if !privileged("sandbox_python_http_server_reachable_from_host") {
        return;
    }
    let dir = TempDir::new("www").unwrap();
    let marker = format!("hostnet sandbox marker {}", std::process::id());
    std::fs::write(dir.join("hello.txt"), &marker).unwrap();
    let port = free_port();
    let mut cmd = Command::new(bin("hostnet-forwarder"));
    cmd.arg("sandbox")
        .arg("--agent")
        .arg(bin("hostnet-agent"))
        .arg("--control")
        .arg(dir.join("control.sock"))
        .args([
            "--",
            "python3",
            "-m",
            "http.server",
            &port.to_string(),
            "--directory",
        ])
        .arg(dir.path());
    let mut p = Proc::spawn("hostnet-forwarder sandbox", cmd);
    let mut last = Err(String::new());
    let ok = wait_until(after(Duration::from_secs(20)), || {
        if !p.is_running() {
            return true;
        }
        last = http_get(port, "/hello.txt");
        last.as_ref().is_ok_and(|r| r.contains(" 200 "))
    });
    if !ok || !p.is_running() {
        panic!(
            "no page from python3 -m http.server {port} through the sandbox within 20 s; last: {last:?}\n{}",
            p.describe()
        );
    }
    // Python bound a wildcard inside the namespace; the host only has the forwarder's loopback
    // mirrors.
    let mut host: Vec<_> = tcp_listeners()
        .into_iter()
        .filter(|a| a.port() == port)
        .collect();
    host.sort();
    assert_eq!(
        host,
        vec![sa(LO4, port), sa(LO6, port)],
        "host listeners on {port}: python must run in the sandbox's namespace, mirrored on loopback\n{}",
        p.describe()
    );
    let page = last.unwrap();
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    assert!(page.contains(&marker), "page body: {page}");
    // Stopping the sandbox stops everything and frees the port.
    let st = p.terminate(Duration::from_secs(5));
    eprintln!("sandbox exit after SIGTERM: {st:?}");
    assert!(
        wait_until(after(Duration::from_secs(3)), || refused(sa(LO4, port))),
        "127.0.0.1:{port} still answers after the sandbox exited"
    );
}

#[test]
fn sandbox_exits_with_the_command_status() {
    if !privileged("sandbox_exits_with_the_command_status") {
        return;
    }
    let dir = TempDir::new("sandbox").unwrap();
    let mut cmd = Command::new(bin("hostnet-forwarder"));
    cmd.arg("sandbox")
        .arg("--agent")
        .arg(bin("hostnet-agent"))
        .arg("--control")
        .arg(dir.join("control.sock"))
        .args(["--", "sh", "-c", "exit 7"]);
    let mut p = Proc::spawn("hostnet-forwarder sandbox", cmd);
    let st = p.wait_exit(Duration::from_secs(15));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(7),
        "sandbox should exit with the command's status\n{}",
        p.describe()
    );
}

/// The other way round: a host server on 127.0.0.1 is reachable from the sandboxed command via
/// its own localhost; the sandbox exits with the command's status (0 once the echo came back).
#[test]
fn sandbox_command_reaches_host_server_via_localhost() {
    if !privileged("sandbox_command_reaches_host_server_via_localhost") {
        return;
    }
    let port = free_port();
    let _srv = hostnet_e2e::net::TcpServer::echo(hostnet_e2e::net::host_listener(sa(LO4, port)));
    let dir = TempDir::new("sandbox").unwrap();
    let script = format!(
        r#"
import socket, sys, time
end = time.time() + 8
while True:
    try:
        s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
        s.sendall(b"ping from the sandbox")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        sys.exit(0 if data == b"ping from the sandbox" else 3)
    except OSError as e:
        if time.time() > end:
            print("cannot reach the host server:", e, file=sys.stderr)
            sys.exit(4)
        time.sleep(0.05)
"#
    );
    let mut cmd = Command::new(bin("hostnet-forwarder"));
    cmd.arg("sandbox")
        .arg("--agent")
        .arg(bin("hostnet-agent"))
        .arg("--control")
        .arg(dir.join("control.sock"))
        .args(["--", "python3", "-c", &script]);
    let mut p = Proc::spawn("hostnet-forwarder sandbox", cmd);
    let st = p.wait_exit(Duration::from_secs(20));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(0),
        "the sandboxed command could not echo through the host server on 127.0.0.1:{port}\n{}",
        p.describe()
    );
}
