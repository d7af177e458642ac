//! The forwarder with the real `hostnet-agent` (if built: `target/debug/hostnet-agent`), through
//! `hostnet-forwarder sandbox`: a Python server in a new network namespace, reached from the
//! host's loopback. Skipped with a note when the agent binary, python3 or namespaces are
//! missing (the e2e suite in `tests/` covers the pair in depth).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SERVER: &str = r#"
import socket, sys
p = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", p))
s.listen(8)
while True:
    c, _ = s.accept()
    first = c.recv(1)
    if first in (b"", b"?"):
        if first:
            c.sendall(b"?")
        c.close()
        continue
    data = [first]
    while True:
        d = c.recv(65536)
        if not d:
            break
        data.append(d)
    c.sendall(b"".join(data))
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    c.close()
    break
sys.exit(7)
"#;

fn agent_binary() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug").join("hostnet-agent");
    p.is_file().then_some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_with_the_real_agent_mirrors_a_python_server_and_exits_with_its_status() {
    let Some(agent) = agent_binary() else {
        eprintln!("NOTE: skipped: target/debug/hostnet-agent is not built");
        return;
    };
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("NOTE: skipped: python3 is not available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl.sock");
    let p = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hostnet-forwarder"))
        .arg("sandbox")
        .arg("--agent")
        .arg(&agent)
        .arg("--control")
        .arg(&ctl)
        .arg("--no-reverse")
        .args(["--", "python3", "-c", SERVER, &p.to_string()])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let v4: SocketAddr = ([127, 0, 0, 1], p).into();
    let v6: SocketAddr = SocketAddr::new("::1".parse().unwrap(), p);
    let start = std::time::Instant::now();
    loop {
        if echoes(v4).await && echoes(v6).await {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .await
                .unwrap();
            if err.contains("namespace") {
                eprintln!("NOTE: skipped: no network namespace here: {err}");
                return;
            }
            panic!("sandbox exited early ({st}): {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the server never appeared on the host"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = hostnet_forwarder::status::query(&ctl).await.unwrap();
    let row = r
        .ports
        .iter()
        .find(|r| r.port == p)
        .expect("a row for the port");
    assert_eq!(row.state, "active");
    assert_eq!(row.guest, vec![format!("0.0.0.0:{p}")]);
    // 1 MiB there and back with a half-close in the middle, checksummed.
    let data = payload(1 << 20, 9);
    let s = TcpStream::connect(v4).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    drop(writer.await.unwrap());
    assert_eq!(checksum(&got), checksum(&data));
    let st = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the sandbox exits when the command does")
        .unwrap();
    assert_eq!(st.code(), Some(7), "the command's exit status");
    assert!(bindable(v4) && bindable(v6), "host listeners closed");
    assert!(!ctl.exists(), "control socket removed");
}
