#!/usr/bin/env bash
# The SCTP figures (tests/src/bin/sctp_bench.rs): messages/s and MB/s of 64 B and 16 KiB messages,
# and idle / 100-association footprints, direct, through hostnet-proxy and through Debian's
# docker-proxy, side by side in the real-VM guest (whose kernel has SCTP). Needs root. Prepares
# the VM tools first (scripts/vm-setup.sh), builds the benchmark in release mode (the guest
# binaries are built for musl by the harness), and runs it under the machine's heavy-work lock.
# Arguments go to sctp_bench, e.g.:
#   bash bench/sctp.sh --trials 5 --seconds 2 --assocs 100
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ "$(id -u)" -ne 0 ]]; then
    echo "sctp.sh: needs root (apt for the setup, QEMU's vhost-user backend)" >&2
    exit 1
fi
bash scripts/vm-setup.sh >/dev/null
cargo build --release -p hostnet-e2e --bin sctp_bench
exec flock /tmp/hostnet-heavy.lock "$root/target/release/sctp_bench" "$@"
