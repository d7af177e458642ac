#!/usr/bin/env bash
# Installs what building the forwarder for macOS and Windows needs, on a Debian machine with
# rustup: the Rust standard libraries of the targets (rustup), zig and cargo-zigbuild (PyPI:
# ziglang, cargo-zigbuild; they link Mach-O binaries without an Apple SDK), MinGW-w64 (Debian:
# gcc-mingw-w64-x86-64, the Windows C compiler and linker) and Wine (Debian: wine64, which runs
# the Windows build in tests/tests/wine.rs). Quick when everything is there. apt needs root; without
# it the missing packages are named and the script fails.
set -euo pipefail
log() { echo "cross-setup: $*" >&2; }

targets=(aarch64-apple-darwin x86_64-apple-darwin x86_64-pc-windows-gnu)
[[ "${1:-}" == --dist ]] && targets+=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
installed="$(rustup target list --installed)"
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$installed" || { log "rustup target add $t"; rustup target add "$t" >&2; }
done

if ! command -v cargo-zigbuild >/dev/null 2>&1 || ! python3 -c 'import ziglang' 2>/dev/null; then
    log "pip install ziglang cargo-zigbuild"
    python3 -m pip install --quiet --disable-pip-version-check ziglang cargo-zigbuild >&2
    hash -r
fi

missing=()
command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 || missing+=(gcc-mingw-w64-x86-64)
{ command -v wine64 >/dev/null 2>&1 || [[ -x /usr/lib/wine/wine64 ]]; } || missing+=(wine64)
if ((${#missing[@]})); then
    if [[ "$(id -u)" -ne 0 ]]; then
        log "missing ${missing[*]} (apt-get install them as root)"
        exit 1
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
