#!/usr/bin/env bash
# CI's check of the host half on the other host systems (run by .ci/run): clippy -D warnings for
# hostnet-link and hostnet-forwarder on aarch64-apple-darwin and x86_64-pc-windows-gnu, then a
# linked hostnet-forwarder for aarch64-apple-darwin and x86_64-apple-darwin (cargo zigbuild, debug
# profile), and the check that no Linux-only crate is in the macOS or Windows build. One target
# dir (target/), each target's artifacts in their own subdirectory; prints how long each step took.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/cross-setup.sh
# pip puts cargo-zigbuild in Python's scripts directory (on PATH with pyenv's shims, not always).
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
step() {
    local t0=$SECONDS
    echo "cross-check: $*" >&2
    "$@"
    echo "cross-check: $(($SECONDS - t0)) s: $*" >&2
}
pkgs=(-p hostnet-link -p hostnet-forwarder)
step cargo-zigbuild clippy "${pkgs[@]}" --all-targets --target aarch64-apple-darwin -- -D warnings
step cargo clippy "${pkgs[@]}" --all-targets --target x86_64-pc-windows-gnu -- -D warnings
for t in aarch64-apple-darwin x86_64-apple-darwin; do
    # rustc warns that xcrun is missing: zig links without an Apple SDK.
    step cargo zigbuild -p hostnet-forwarder --target "$t"
    bin="target/$t/debug/hostnet-forwarder"
    magic="$(od -An -tx1 -N4 "$bin" | tr -d ' ')"
    [[ "$magic" == cffaedfe ]] || { echo "cross-check: $bin is not a 64-bit Mach-O ($magic)" >&2; exit 1; }
    echo "cross-check: $bin: Mach-O, $(stat -c %s "$bin") bytes" >&2
done
# No Linux-only crate in the macOS or Windows build of the host half (netlink, AF_VSOCK; and
# no unix crate at all on Windows).
only_on() { # TARGET REGEX
    local found
    found="$(cargo tree -e normal -p hostnet-forwarder --target "$1" --prefix none \
        | grep -E "$2" | sort -u || true)"
    if [[ -n "$found" ]]; then
        echo "cross-check: crates of another host system in the $1 build:" >&2
        echo "$found" >&2
        exit 1
    fi
}
only_on aarch64-apple-darwin '^(netlink-|tokio-vsock|vsock )'
only_on x86_64-pc-windows-gnu '^(netlink-|tokio-vsock|vsock |nix )'
echo "cross-check: ok" >&2
