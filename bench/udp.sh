#!/usr/bin/env bash
# Builds hostnet-agent, hostnet-forwarder and the UDP benchmark in release mode and runs it:
# direct (veth into the namespace) vs hostnet over unix vs hostnet over QUIC, side by side.
# Needs root (network namespaces). Arguments are passed to udp_bench, e.g.:
#   bash bench/udp.sh --trials 5 --secs 1 --flows 4096
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ "$(id -u)" -ne 0 ]]; then
    echo "udp.sh: needs root (network namespaces, veth pairs)" >&2
    exit 1
fi

# (--bin filters every selected package, so name all three binaries.)
cargo build --release -p hostnet-agent -p hostnet-forwarder -p hostnet-e2e \
    --bin hostnet-agent --bin hostnet-forwarder --bin udp_bench
exec "$root/target/release/udp_bench" "$@"
