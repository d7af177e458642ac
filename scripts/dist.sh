#!/usr/bin/env bash
# Release binaries for every host system, in one folder with checksums:
#   dist/hostnet-forwarder-aarch64-apple-darwin      macOS, Apple silicon   (cargo zigbuild)
#   dist/hostnet-forwarder-x86_64-apple-darwin       macOS, Intel           (cargo zigbuild)
#   dist/hostnet-forwarder-x86_64-pc-windows-gnu.exe Windows x64            (MinGW-w64)
#   dist/hostnet-forwarder-x86_64-unknown-linux-gnu  Linux x86_64
#   dist/hostnet-agent-x86_64-unknown-linux-musl     the agent, static, x86_64 VMs
#   dist/hostnet-agent-aarch64-unknown-linux-musl    the agent, static, arm64 VMs (Apple silicon)
#   dist/hostnet-forwarder.service, dist/io.hostnet.forwarder.plist   the service files
#   dist/SHA256SUMS
# Usage: bash scripts/dist.sh [OUT_DIR]   (default dist/; installs what it needs with
# scripts/cross-setup.sh --dist). Release profile (fat LTO): about 15 minutes on 2 cores.
# The macOS binaries are not signed: on a Mac, `xattr -d com.apple.quarantine FILE` after a
# download, or sign them with `codesign -s - FILE`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)"
bash scripts/cross-setup.sh --dist
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
host="$(rustc -vV | sed -n 's/^host: //p')"

build() { # TOOL PACKAGE TARGET NAME
    local tool=$1 pkg=$2 target=$3 name=$4 ext=""
    [[ "$target" == *windows* ]] && ext=.exe
    echo "dist: $pkg for $target" >&2
    if [[ "$tool" == zig ]]; then
        cargo zigbuild --release -p "$pkg" --target "$target" >&2
    else
        cargo build --release -p "$pkg" --target "$target" >&2
    fi
    cp "target/$target/release/$pkg$ext" "$out/$name-$target$ext"
}
build zig hostnet-forwarder aarch64-apple-darwin hostnet-forwarder
build zig hostnet-forwarder x86_64-apple-darwin hostnet-forwarder
build cargo hostnet-forwarder x86_64-pc-windows-gnu hostnet-forwarder
build cargo hostnet-forwarder "$host" hostnet-forwarder
# The agent is static: musl; zig is the C compiler for ring on both architectures.
build zig hostnet-agent x86_64-unknown-linux-musl hostnet-agent
build zig hostnet-agent aarch64-unknown-linux-musl hostnet-agent
cp forwarder/service/hostnet-forwarder.service forwarder/service/io.hostnet.forwarder.plist "$out/"
(cd "$out" && rm -f SHA256SUMS && sha256sum -- * > SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
echo "dist: $out" >&2
cat "$out/SHA256SUMS"
