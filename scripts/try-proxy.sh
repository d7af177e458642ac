#!/usr/bin/env bash
# The main job until the host-networking bridge lands: hostnet-proxy in front of a local server,
# exactly as dockerd would run it for `-p 127.0.0.1:8080:8000`.
#   bash scripts/try-proxy.sh            # then, in another shell: curl http://127.0.0.1:8080/
# Ctrl-C stops both. HOSTNET_PROXY_LOG=debug shows every connection.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
front="${FRONT_PORT:-8080}"
back="${BACKEND_PORT:-8000}"
cargo build --release -p hostnet-proxy
python3 -m http.server "$back" --bind 127.0.0.1 --directory "$root" >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
# Wait for the server (bounded), so the first curl through the proxy is not refused.
for _ in $(seq 100); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $back), 0.1)" 2>/dev/null; then break; fi
    sleep 0.05
done
echo "hostnet-proxy: 127.0.0.1:$front -> 127.0.0.1:$back (python3 -m http.server); try: curl http://127.0.0.1:$front/" >&2
"$root/target/release/hostnet-proxy" -proto tcp -host-ip 127.0.0.1 -host-port "$front" \
    -container-ip 127.0.0.1 -container-port "$back" &
proxy=$!
trap 'kill "$proxy" "$server" 2>/dev/null || true' EXIT
if [[ "${TRY_ONCE:-}" == 1 ]]; then
    # Non-interactive check: fetch one page through the proxy and stop.
    for _ in $(seq 100); do
        if curl -fsS "http://127.0.0.1:$front/README.md" -o /dev/null 2>/dev/null; then break; fi
        sleep 0.05
    done
    curl -fsS "http://127.0.0.1:$front/README.md" | head -3
    exit 0
fi
wait "$proxy"
