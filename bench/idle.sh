#!/usr/bin/env bash
# Idle wake-ups of the forwarder and the agent: starts the sandbox pair (agent in a new network
# namespace, reverse direction on), lets it settle, then counts the context switches (voluntary +
# involuntary, every thread, from /proc/PID/task/*/status) of each process over SECS seconds and
# prints them per second, per thread name too. Needs root (the sandbox's namespace).
#   bash bench/idle.sh                          # release build, 60 s
#   bash bench/idle.sh 60 /tmp/before           # binaries from another directory
#   HOSTNET_DISCOVERY=poll bash bench/idle.sh   # discovery's polling mode
# The forwarder itself runs in a private network namespace too, so that servers other programs
# start and stop on this machine do not count as activity for its reverse direction. Discovery's
# perf tracepoints are system-wide, though: each TCP listen or inet bind anywhere on the machine
# wakes an event-mode watcher (twice: its dump and the re-check), so the script also counts those
# events over the window when `perf` is installed. Measure on a quiet machine.
# A thread that ends inside the window takes its count with it; an idle pair starts none.
set -euo pipefail

secs="${1:-60}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${2:-}"
if [[ -z "$bin" ]]; then
    cd "$root"
    cargo build --release -p hostnet-agent -p hostnet-forwarder \
        --bin hostnet-agent --bin hostnet-forwarder
    bin="$root/target/release"
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "idle.sh: needs root (the sandbox's network namespace)" >&2
    exit 1
fi

log="$(mktemp)"
unshare --net -- sh -c 'ip link set lo up && exec "$0" sandbox --agent "$1" -- sleep infinity' \
    "$bin/hostnet-forwarder" "$bin/hostnet-agent" >"$log" 2>&1 &
fwd=$!
cleanup() {
    kill -INT "$fwd" 2>/dev/null || true
    wait "$fwd" 2>/dev/null || true
    rm -f "$log"
}
trap cleanup EXIT

for _ in $(seq 100); do
    grep -q "session established" "$log" && break
    sleep 0.1
done
grep -q "session established" "$log" || { cat "$log" >&2; echo "idle.sh: no session" >&2; exit 1; }
agent="$(pgrep -P "$fwd" -f hostnet-agent)"
grep -h "discovery" "$log" | sed 's/^/  log: /' || true
sleep 3 # let start-up work settle

# "TID NAME COUNT" for every thread of a process.
sample() {
    local t
    for t in /proc/"$1"/task/*; do
        awk -v tid="${t##*/}" -v name="$(cat "$t/comm" 2>/dev/null || echo '?')" \
            '/ctxt_switches/ { s += $2 } END { print tid, name, s }' "$t/status" 2>/dev/null || true
    done
}

declare -A before
for p in "$fwd" "$agent"; do before[$p]="$(sample "$p")"; done
if command -v perf >/dev/null; then
    # (perf mounts tracefs if needed; it is unmounted again below if it was not mounted before.)
    mounted=0
    [[ -d /sys/kernel/tracing/events ]] && mounted=1
    perf stat -a -x, \
        -e sock:inet_sock_set_state --filter 'protocol == 6 && (newstate == 10 || oldstate == 10)' \
        -e syscalls:sys_enter_bind --filter 'addrlen == 16 || addrlen == 28 || addrlen == 128' \
        sleep "$secs" 2>&1 | awk -F, -v secs="$secs" \
        '$1 ~ /^[0-9]+$/ { printf "machine-wide %-26s %8.2f /s\n", $3, $1 / secs }'
    [[ "$mounted" == 1 ]] || umount /sys/kernel/tracing 2>/dev/null || true
else
    sleep "$secs"
fi
for p in "$fwd" "$agent"; do
    name=forwarder
    [[ "$p" == "$agent" ]] && name=agent
    awk -v secs="$secs" -v who="$name" -v pid="$p" '
        NR == FNR { b[$1] = $3; next }
        { d = $3 - b[$1]; total += d; byname[$2] += d }
        END {
            printf "%-9s pid %-7s %8.2f wake-ups/s (%d in %d s)\n", who, pid, total / secs, total, secs
            for (n in byname) if (byname[n] > 0) printf "    %-20s %8.2f /s\n", n, byname[n] / secs
        }' <(echo "${before[$p]}") <(sample "$p")
done
