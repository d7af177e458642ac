#!/usr/bin/env bash
# Builds hostnet-proxy as a static binary and prints its path on stdout.
# musl when the target is installed (or can be added with rustup), else static glibc.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
musl=x86_64-unknown-linux-musl
if rustup target list --installed 2>/dev/null | grep -qx "$musl" \
    || rustup target add "$musl" >/dev/null 2>&1; then
    cargo build --release -p hostnet-proxy --target "$musl" >&2
    echo "$root/target/$musl/release/hostnet-proxy"
else
    gnu="$(rustc -vV | sed -n 's/^host: //p')"
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p hostnet-proxy --target "$gnu" >&2
    echo "$root/target/$gnu/release/hostnet-proxy"
fi
