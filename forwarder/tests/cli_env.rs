//! Boolean settings from the environment read as people write them: `HOSTNET_NO_REVERSE=`
//! (empty), `0`, `false`, `no`, `off` leave the reverse direction on; `1`, `true`, `yes` turn it
//! off. Told apart by what the forwarder does next with a reverse rules file that does not
//! exist: with the reverse direction on it fails to read it; off, it refuses the combination.

use std::process::Command;

fn run_with(no_reverse: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hostnet-forwarder"))
        .args([
            "run",
            "--guest",
            "unix:///nonexistent/hostnet-test/agent.sock",
            "--reverse-rules",
            "/nonexistent/hostnet-test/rules",
        ])
        .env("HOSTNET_NO_REVERSE", no_reverse)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn hostnet_no_reverse_reads_falsy_and_truthy_values() {
    for v in ["", "0", "false", "no", "off"] {
        let err = run_with(v);
        assert!(
            err.contains("reverse rules file") && !err.contains("turns the reverse direction off"),
            "HOSTNET_NO_REVERSE={v:?}: {err}"
        );
    }
    for v in ["1", "true", "yes"] {
        let err = run_with(v);
        assert!(
            err.contains("turns the reverse direction off"),
            "HOSTNET_NO_REVERSE={v:?}: {err}"
        );
    }
}
