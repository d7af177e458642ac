#!/usr/bin/env bash
# Builds the agent, the forwarder, hostnet-proxy and the Docker Desktop benchmark in release mode
# and runs it: dockerd in a network namespace (the VM) with hostnet-proxy as its userland proxy,
# the agent beside it and the forwarder on the host; the same container servers reached from
# inside the VM (the kernel path) and from the host through the bridge, on the host network and
# through a -p port; then `docker run -d` → the port answering, in the VM and on the host. Needs
# root; installs docker.io, busybox-static and socat when missing. Arguments go to desktop_bench:
#   bash bench/desktop.sh --trials 5 --starts 20
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ "$(id -u)" -ne 0 ]]; then
    echo "desktop.sh: needs root (network namespaces, dockerd)" >&2
    exit 1
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v busybox >/dev/null || missing+=(busybox-static)
command -v socat >/dev/null || missing+=(socat)
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null; then
        echo "desktop.sh: missing ${missing[*]} and no apt-get; install them by hand" >&2
        exit 1
    fi
    echo "desktop.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# (--bin filters every selected package, so name every binary.)
cargo build --release -p hostnet-agent -p hostnet-forwarder -p hostnet-proxy -p hostnet-e2e \
    --bin hostnet-agent --bin hostnet-forwarder --bin hostnet-proxy \
    --bin desktop_bench --bin desktop_servers
exec "$root/target/release/desktop_bench" "$@"
