#!/usr/bin/env bash
# Docker Desktop's host networking, shown with Docker itself on one Linux machine: a network
# namespace plays the VM and runs Debian's dockerd (hostnet-proxy as its userland proxy) with
# hostnet-agent beside it; hostnet-forwarder runs here, on the host. A `--network host` web
# server in the VM then answers `curl localhost:PORT` here, as it does on a Mac with Docker
# Desktop 4.34+.
#   bash scripts/try-desktop.sh [PORT]      # as root; PORT defaults to 8000
# Ctrl-C removes everything (containers, dockerd, the namespace, its cgroups and files) and
# checks that the host's iptables, sysctls, mounts, /run and /etc/docker are as they were.
# Needs root; installs docker.io, busybox-static and curl when missing (apt-get); builds the
# release binaries (a few minutes the first time). TRY_ONCE=1: fetch the page once and stop.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
port="${1:-8000}"

if [[ "$(id -u)" -ne 0 ]]; then
    echo "try-desktop.sh: run it as root (e.g. sudo env PATH=\"\$PATH\" bash scripts/try-desktop.sh): it makes a network namespace and starts dockerd" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "try-desktop.sh: cargo is not on root's PATH (it builds the binaries); e.g. sudo env PATH=\"\$PATH\" bash scripts/try-desktop.sh" >&2
    exit 1
fi
if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    echo "try-desktop.sh: PORT must be a number from 1 to 65535, not '$port'" >&2
    exit 2
fi

missing=()
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
need dockerd docker.io
need docker docker.io
need busybox busybox-static
need curl curl
need ip iproute2
need iptables-save iptables
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "try-desktop.sh: missing ${missing[*]} and no apt-get; install them by hand" >&2
        exit 1
    fi
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "try-desktop.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if [[ -n "$(ss -Htln "sport = :$port")" ]]; then
    echo "try-desktop.sh: port $port is taken on this host; pass another: bash scripts/try-desktop.sh 8001" >&2
    exit 1
fi

echo "== building hostnet-agent, hostnet-forwarder, hostnet-proxy (release)" >&2
cargo build --release -q -p hostnet-agent -p hostnet-forwarder -p hostnet-proxy
bin="$root/target/release"

W="$(mktemp -d /tmp/hostnet-desktop.XXXXXX)"
trap 'rm -rf "$W"' EXIT
ns="hostnet-desktop-$$"
cg="hostnet-desktop-$$"
export DOCKER_CONFIG="$W/cli" # the docker CLI's own files stay in $W too
D=(docker -H "unix://$W/docker.sock")
sysctls=(/proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/all/forwarding
    /proc/sys/net/ipv6/conf/default/forwarding /proc/sys/net/bridge/bridge-nf-call-iptables
    /proc/sys/net/bridge/bridge-nf-call-ip6tables)

# What the host looks like now, to compare with after the clean-up.
snapshot() { # DIR
    mkdir -p "$1"
    # (`grep -v` fails when nothing is left, e.g. no rules at all)
    iptables-save | { grep -v '^#' || true; } | sed 's/\[[0-9]*:[0-9]*\]//g' >"$1/iptables"
    if command -v ip6tables-save >/dev/null; then
        ip6tables-save | { grep -v '^#' || true; } | sed 's/\[[0-9]*:[0-9]*\]//g' >"$1/ip6tables"
    fi
    for f in "${sysctls[@]}"; do
        echo "$f $(cat "$f" 2>/dev/null || echo absent)"
    done >"$1/sysctls"
    # mount point and type; other namespaces than ours come and go with other programs
    awk '{ for (i = 7; $i != "-"; i++) {} print $5, $(i + 1) }' /proc/self/mountinfo |
        { grep -v '^/run/netns/' || true; } | sort >"$1/mounts"
    { ls -lA /etc/docker 2>&1 || true; } | { grep -v '^total' || true; } >"$1/etc-docker"
    ls -A /run >"$1/run"
    { ls -d /sys/fs/cgroup/"$cg" /sys/fs/cgroup/*/"$cg" 2>/dev/null || true; } >"$1/cgroups"
}
snapshot "$W/before"
netns_dir_existed=$([[ -d /run/netns ]] && echo yes || echo no)
netns_mounted=$(mountpoint -q /run/netns 2>/dev/null && echo yes || echo no)

agent_pid="" fwd_pid="" dockerd_pid=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    ((rc == 130)) && rc=0 # Ctrl-C is how this demo ends
    echo >&2
    echo "== removing the containers, dockerd, the agent, the forwarder and the namespace" >&2
    if [[ -n "$dockerd_pid" ]] && kill -0 "$dockerd_pid" 2>/dev/null; then
        ids=$("${D[@]}" ps -aq 2>/dev/null)
        [[ -n "$ids" ]] && "${D[@]}" rm -f $ids >/dev/null 2>&1
        kill -TERM "$dockerd_pid"
        for _ in $(seq 600); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$dockerd_pid" 2>/dev/null
    fi
    for p in $fwd_pid $agent_pid; do kill -TERM "$p" 2>/dev/null; done
    for p in $fwd_pid $agent_pid; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$p" 2>/dev/null
    done
    # containerd and its shims, if dockerd left any (their command lines name $W)
    for p in /proc/[0-9]*; do
        if grep -qF "$W" "$p/cmdline" 2>/dev/null; then kill -KILL "${p#/proc/}" 2>/dev/null; fi
    done
    wait 2>/dev/null
    ip netns del "$ns" 2>/dev/null
    # the containers' cgroups (dockerd's --cgroup-parent), children first
    for d in /sys/fs/cgroup/"$cg" /sys/fs/cgroup/*/"$cg"; do
        [[ -d "$d" ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    # `ip netns add` bind-mounts /run/netns on itself the first time; undo that if it was us
    if [[ "$netns_mounted" == no ]] && mountpoint -q /run/netns && [[ -z "$(ip netns list)" ]]; then
        umount /run/netns
        [[ "$netns_dir_existed" == no ]] && rmdir /run/netns 2>/dev/null
    fi
    snapshot "$W/after"
    local changed=0
    for f in iptables ip6tables sysctls mounts etc-docker run cgroups; do
        [[ -f "$W/before/$f" ]] || continue
        if ! diff -u "$W/before/$f" "$W/after/$f" >"$W/diff-$f"; then
            echo "try-desktop.sh: the host's $f differ from before:" >&2
            cat "$W/diff-$f" >&2
            changed=1
        fi
    done
    if ((changed)); then
        echo "try-desktop.sh: logs and snapshots kept in $W" >&2
        exit 1
    fi
    if ((rc)); then
        echo "try-desktop.sh: logs kept in $W (the host is as it was)" >&2
        rm -rf "$W/data" "$W/exec" "$W/rootfs" "$W/image.tar"
    else
        rm -rf "$W"
    fi
    echo "== done: iptables, ip6tables, sysctls, mounts, /run, /etc/docker and cgroups are as they were" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { # MESSAGE LOG
    echo "try-desktop.sh: $1" >&2
    [[ -n "${2:-}" ]] && tail -n 30 "$2" >&2
    exit 1
}

echo "== the VM: network namespace $ns" >&2
ip netns add "$ns"
ip -n "$ns" link set lo up

# The children get sessions of their own: Ctrl-C reaches only this script, whose clean-up stops
# them in order (setsid execs them, so $! is their pid).
setsid ip netns exec "$ns" "$bin/hostnet-agent" run --listen "unix://$W/agent.sock" \
    >"$W/agent.log" 2>&1 </dev/null &
agent_pid=$!
for _ in $(seq 200); do [[ -S "$W/agent.sock" ]] && break; sleep 0.05; done
[[ -S "$W/agent.sock" ]] || fail "hostnet-agent did not start" "$W/agent.log"
setsid "$bin/hostnet-forwarder" run --guest "unix://$W/agent.sock" --control "$W/forwarder.sock" \
    >"$W/forwarder.log" 2>&1 </dev/null &
fwd_pid=$!

# dockerd in the VM: scripts/desktop-vm-init.sh mounts the cgroups and tmpfs over /run and
# /etc/docker in the private mount namespace `ip netns exec` gives it; our config file keeps a
# host daemon.json out and the trust key in $W; --cgroup-parent keeps the containers' cgroups
# apart (removed on exit).
printf '{"deprecated-key-path": "%s/key.json"}\n' "$W" >"$W/daemon.json"
cat /proc/self/mountinfo >"$W/host.mountinfo"
echo "== dockerd in the VM, hostnet-proxy as its userland proxy" >&2
setsid ip netns exec "$ns" sh "$root/scripts/desktop-vm-init.sh" "$W/host.mountinfo" \
    dockerd --config-file "$W/daemon.json" --data-root "$W/data" --exec-root "$W/exec" \
    --pidfile "$W/dockerd.pid" -H "unix://$W/docker.sock" --storage-driver overlay2 \
    --cgroup-parent "/$cg" --userland-proxy-path "$bin/hostnet-proxy" \
    >"$W/dockerd.log" 2>&1 </dev/null &
dockerd_pid=$!
for _ in $(seq 600); do
    "${D[@]}" version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || fail "dockerd exited while starting:" "$W/dockerd.log"
    sleep 0.1
done
"${D[@]}" version >/dev/null 2>&1 || fail "dockerd did not answer within 60 s:" "$W/dockerd.log"

# No registry is needed: the image is busybox-static with a page to serve.
mkdir -p "$W/rootfs/bin" "$W/rootfs/www"
cp "$(command -v busybox)" "$W/rootfs/bin/busybox"
for a in sh httpd wget cat ls; do ln -s busybox "$W/rootfs/bin/$a"; done
echo "<h1>Hello from a --network host container in the VM</h1>" >"$W/rootfs/www/index.html"
tar -C "$W/rootfs" -cf "$W/image.tar" .
"${D[@]}" import "$W/image.tar" hostnet-demo:busybox >/dev/null

echo "== docker run -d --network host --name web hostnet-demo:busybox httpd -f -p $port -h /www" >&2
"${D[@]}" run -d --network host --name web hostnet-demo:busybox httpd -f -p "$port" -h /www >/dev/null
for _ in $(seq 200); do
    curl -fsS "http://localhost:$port/" >/dev/null 2>&1 && break
    sleep 0.05
done
curl -fsS "http://localhost:$port/" >/dev/null 2>&1 ||
    fail "localhost:$port does not answer; the forwarder's log:" "$W/forwarder.log"

if [[ "${TRY_ONCE:-}" == 1 ]]; then
    curl -fsS "http://localhost:$port/"
    exit 0
fi

cat <<EOF

The VM is network namespace $ns. In it, dockerd $("${D[@]}" version --format '{{.Server.Version}}') runs a
--network host busybox httpd on port $port, and hostnet-agent mirrors its listener to the
hostnet-forwarder on this host. Type, in another shell:

    curl localhost:$port

More to try (same shell, as root):
    D="docker -H unix://$W/docker.sock"
    \$D run -d -p 8080:80 hostnet-demo:busybox httpd -f -p 80 -h /www     # then: curl localhost:8080
    python3 -m http.server 9000 --bind 127.0.0.1 &                          # a server on this host...
    \$D run --rm --network host hostnet-demo:busybox wget -qO- http://127.0.0.1:9000/   # ...reached from a container
    $bin/hostnet-forwarder status --control $W/forwarder.sock

Ctrl-C removes everything and checks the host is as it was.
EOF
# Until Ctrl-C (or dockerd ends).
wait "$dockerd_pid" || true
echo "try-desktop.sh: dockerd exited" >&2
tail -n 20 "$W/dockerd.log" >&2
