#!/usr/bin/env bash
# Port ranges under a real dockerd: docker-proxy vs hostnet-proxy (static release build) as the
# userland proxy, in the same run. Needs root, dockerd (docker.io), the docker CLI, busybox and
# socat (`bash scripts/test-deps.sh` installs them). The host's iptables and forwarding sysctls
# are put back afterwards. Arguments go to docker_ports_bench, e.g.:
#   bash bench/docker.sh --trials 3 --ports 200
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ "$(id -u)" -ne 0 ]]; then
    echo "docker.sh: needs root (dockerd)" >&2
    exit 1
fi

proxy="$(bash scripts/build-static-proxy.sh)"
cargo build --release -p hostnet-e2e --bin docker_ports_bench
exec "$root/target/release/docker_ports_bench" --hostnet "$proxy" "$@"
