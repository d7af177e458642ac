#!/usr/bin/env bash
# Builds hostnet-agent, hostnet-forwarder and the bridge benchmark in release mode and runs it:
# direct (veth into the namespace) vs hostnet (forwarder -> unix socket -> agent in the namespace)
# vs a socat chain doing the same job. Needs root (network namespaces). Arguments are passed to
# bridge_bench, e.g.:
#   bash bench/bridge.sh --trials 5 --secs 2
#   bash bench/bridge.sh --no-socat
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ "$(id -u)" -ne 0 ]]; then
    echo "bridge.sh: needs root (network namespaces, veth pairs)" >&2
    exit 1
fi

# The socat chain is the comparison point: install socat when it is missing.
if ! command -v socat >/dev/null; then
    if command -v apt-get >/dev/null; then
        echo "bridge.sh: socat missing; installing it" >&2
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y socat
    else
        echo "bridge.sh: socat missing and no apt-get; pass --no-socat to run without it" >&2
    fi
fi

# (--bin filters every selected package, so name all three binaries.)
cargo build --release -p hostnet-agent -p hostnet-forwarder -p hostnet-e2e \
    --bin hostnet-agent --bin hostnet-forwarder --bin bridge_bench
exec "$root/target/release/bridge_bench" "$@"
