#!/usr/bin/env bash
# The real-VM figures (tests/src/bin/vm_bench.rs): boot to ready, discovery latency, and
# throughput host->guest / guest->host through hostnet against raw hybrid vsock in the same boot.
# Needs root. Prepares the VM tools first (scripts/vm-setup.sh), builds the forwarder and the
# benchmark in release mode (the guest binaries are built for musl by the harness), and runs the
# benchmark under the machine's heavy-work lock. Arguments go to vm_bench, e.g.:
#   bash bench/vm.sh --boots 3 --cycles 10 --trials 3 --mib 128
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ "$(id -u)" -ne 0 ]]; then
    echo "vm.sh: needs root (apt for the setup, QEMU's vhost-user backend)" >&2
    exit 1
fi
bash scripts/vm-setup.sh >/dev/null
# (--bin filters every selected package, so name both binaries.)
cargo build --release -p hostnet-forwarder -p hostnet-e2e --bin hostnet-forwarder --bin vm_bench
exec flock /tmp/hostnet-heavy.lock "$root/target/release/vm_bench" "$@"
