#!/usr/bin/env bash
# Installs what `cargo test --workspace` needs beyond the Rust toolchain, on Debian/Ubuntu, as
# root; quick when everything is present. The README's test command runs it first.
#   network-namespace tests: iproute2; sandbox test: python3; fuzz targets (.ci/run): g++
#   dockerd tests (tests/tests/dockerd.rs): docker.io (dockerd, docker-proxy, containerd, runc,
#     iptables), busybox-static and socat (the test image), tar, nftables (puts iptables back)
#   real-VM tests (tests/tests/vm.rs): scripts/vm-setup.sh (QEMU, guest kernel, vhost-device-vsock)
#   the Windows build under Wine (tests/tests/wine.rs), and the macOS builds of .ci/run:
#     scripts/cross-setup.sh (rust targets, MinGW-w64, wine64, zig and cargo-zigbuild)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "$(id -u)" -ne 0 ]]; then
    echo "test-deps.sh: not root; installing nothing (the privileged tests will say what is missing)" >&2
    exit 0
fi

missing=()
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
need ip iproute2
need python3 python3
need c++ g++
need socat socat
need tar tar
need dockerd docker.io
need docker docker.io
need busybox busybox-static
# Debian's iptables is the nftables back end: `nft` deletes the tables dockerd created, so the
# dockerd tests leave none behind (iptables alone can only empty them).
need nft nftables
[[ -x /usr/sbin/docker-proxy ]] || missing+=(docker.io)
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "test-deps.sh: missing ${missing[*]} and no apt-get; install them by hand" >&2
        exit 1
    fi
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "test-deps.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [[ -f "$root/scripts/vm-setup.sh" ]]; then
    bash "$root/scripts/vm-setup.sh" >&2
fi

if [[ -f "$root/scripts/cross-setup.sh" ]]; then
    bash "$root/scripts/cross-setup.sh" >&2
fi
