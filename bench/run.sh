#!/usr/bin/env bash
# Builds hostnet-proxy and hostnet-bench in release mode and runs the
# side-by-side benchmark (direct vs hostnet-proxy vs docker-proxy).
# Arguments are passed to hostnet-bench, e.g.:
#   bash bench/run.sh --repeats 3 --only rr,udp64 --json /tmp/bench.json
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# docker-proxy comes with Debian's docker.io package. Install it only when it
# is missing and we are root; dockerd is never started.
if [[ ! -x /usr/sbin/docker-proxy ]]; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "run.sh: /usr/sbin/docker-proxy missing; installing docker.io" >&2
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io
    else
        echo "run.sh: /usr/sbin/docker-proxy missing and cannot install it (not root); its column will be skipped" >&2
    fi
fi

# The proxy is measured as it ships: a static binary (musl when the target can be had, as
# docker-proxy is a static Go binary), so the figures do not count shared glibc pages.
proxy="$("$root/scripts/build-static-proxy.sh")"
cargo build --release -p hostnet-bench
exec "$root/target/release/hostnet-bench" --hostnet "$proxy" "$@"
