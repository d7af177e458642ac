#!/usr/bin/env bash
# Prepares the real-VM test (tests/tests/vm.rs): QEMU, busybox-static and musl-tools from apt (only the
# missing ones), the Debian cloud kernel unpacked from its .deb (never installed system-wide), and
# vhost-device-vsock from crates.io. Idempotent and quick when already done.
#
# Cache dir: ${HOSTNET_VM_CACHE:-<workspace>/target/hostnet-vm}. On success it writes
# <cache>/env (shell syntax, read by the test harness) and prints it:
#   HOSTNET_VM_KERNEL=<cache>/kernel/root/boot/vmlinuz-<KV>
#   HOSTNET_VM_MODULES=<cache>/kernel/root/lib/modules/<KV>
#   HOSTNET_VM_VHOST_DEVICE_VSOCK=<cache>/cargo-root/bin/vhost-device-vsock
#   HOSTNET_VM_QEMU=/usr/bin/qemu-system-x86_64
#   HOSTNET_VM_BUSYBOX=/bin/busybox
# Needs root for apt (skipped when everything is present).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${HOSTNET_VM_CACHE:-$root/target/hostnet-vm}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
log() { echo "vm-setup: $*" >&2; }

# 1. Debian packages.
missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 || missing+=(busybox-static)
# musl-gcc: the agent links ring (QUIC's crypto), whose C and assembly parts cc-rs builds with
# the musl compiler wrapper when the target is x86_64-unknown-linux-musl.
command -v musl-gcc >/dev/null 2>&1 || missing+=(musl-tools)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=l apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >"$cache/apt.log" 2>&1 || { cat "$cache/apt.log" >&2; exit 1; }
fi
ldd_out="$(LC_ALL=C ldd /bin/busybox 2>&1 || true)"
if ! grep -qE 'not a dynamic executable|statically linked' <<<"$ldd_out"; then
    log "/bin/busybox is not static (install busybox-static, not busybox)"
    exit 1
fi

# The Rust standard library for musl (the guest binaries are static); without it the test
# falls back to a static glibc build.
if command -v rustup >/dev/null 2>&1 \
    && ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    log "rustup target add x86_64-unknown-linux-musl"
    rustup target add x86_64-unknown-linux-musl >&2 || log "no musl target; static glibc it is"
fi

# 2. The guest kernel: the package linux-image-cloud-amd64 currently depends on, unpacked.
kdir="$cache/kernel"
if ! ls "$kdir"/root/boot/vmlinuz-* >/dev/null 2>&1; then
    pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg="$(apt-cache depends linux-image-cloud-amd64 \
            | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
    fi
    [ -n "$pkg" ] || { log "cannot resolve linux-image-cloud-amd64"; exit 1; }
    log "downloading $pkg"
    rm -rf "$kdir"
    mkdir -p "$kdir/dl"
    (cd "$kdir/dl" && apt-get download "$pkg" >&2)
    dpkg-deb -x "$kdir"/dl/"$pkg"_*.deb "$kdir/root.tmp"
    mv "$kdir/root.tmp" "$kdir/root"
    rm -rf "$kdir/dl"
fi
kernel="$(ls "$kdir"/root/boot/vmlinuz-* | head -n1)"
kv="${kernel##*/vmlinuz-}"
modules="$kdir/root/lib/modules/$kv"
[ -f "$modules/kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko" ] || {
    log "$modules lacks the vsock modules (uncompressed .ko expected)"
    exit 1
}

# 3. vhost-device-vsock (a vhost-user backend; QEMU's vhost-user-vsock-pci talks to it).
vdv="$cache/cargo-root/bin/vhost-device-vsock"
if [ ! -x "$vdv" ]; then
    log "cargo install vhost-device-vsock (about 2 minutes on 2 cores)"
    "${CARGO:-cargo}" install --locked --quiet --root "$cache/cargo-root" vhost-device-vsock >&2
fi

qemu="$(command -v qemu-system-x86_64)"
cat >"$cache/env.tmp" <<ENV
HOSTNET_VM_KERNEL=$kernel
HOSTNET_VM_MODULES=$modules
HOSTNET_VM_VHOST_DEVICE_VSOCK=$vdv
HOSTNET_VM_QEMU=$qemu
HOSTNET_VM_BUSYBOX=/bin/busybox
ENV
mv "$cache/env.tmp" "$cache/env"
cat "$cache/env"
