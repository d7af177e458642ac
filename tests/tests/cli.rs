//! Command lines as a user types them: invalid values get a clear error and a failure status,
//! never a panic; `status` without a forwarder says so.

use std::process::Command;

use hostnet_e2e::process::bin;

fn run(bin_name: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin(bin_name)).args(args).output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_clear_failure(bin_name: &str, args: &[&str], needle: &str) {
    let (code, text) = run(bin_name, args);
    assert!(
        matches!(code, Some(c) if c != 0),
        "{bin_name} {args:?} should fail, exit {code:?}: {text}"
    );
    assert!(
        !text.contains("panicked"),
        "{bin_name} {args:?} panicked: {text}"
    );
    assert!(
        text.to_lowercase().contains(&needle.to_lowercase()),
        "{bin_name} {args:?}: the error should mention {needle:?}: {text}"
    );
}

#[test]
fn invalid_values_are_clear_errors() {
    assert_clear_failure(
        "hostnet-agent",
        &["run", "--listen", "bogus://x", "--allow", "1"],
        "bogus",
    );
    assert_clear_failure(
        "hostnet-agent",
        &[
            "run",
            "--listen",
            "unix:///tmp/hne-cli-never.sock",
            "--allow",
            "80-abc",
        ],
        "80-abc",
    );
    assert_clear_failure(
        "hostnet-agent",
        &["run", "--listen", "tcp://127.0.0.1:1"],
        "token",
    );
    assert_clear_failure("hostnet-forwarder", &["run", "--guest", "nope"], "nope");
    assert_clear_failure(
        "hostnet-forwarder",
        &["run", "--guest", "tcp://127.0.0.1:1"],
        "token",
    );
    assert_clear_failure(
        "hostnet-forwarder",
        &[
            "run",
            "--guest",
            "unix:///tmp/x.sock",
            "--udp-timeout",
            "soon",
        ],
        "soon",
    );
}

#[test]
fn status_without_a_forwarder_says_so() {
    let path = "/tmp/hne-cli-no-forwarder-here.sock";
    assert_clear_failure(
        "hostnet-forwarder",
        &["status", "--control", path, "--json"],
        path,
    );
}
