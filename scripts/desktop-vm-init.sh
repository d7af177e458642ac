#!/bin/sh
# Prepares the "VM" of the Docker Desktop demo and test for dockerd, then runs the command:
#   ip netns exec NS sh scripts/desktop-vm-init.sh HOST_MOUNTINFO dockerd ARGS...
# HOST_MOUNTINFO is a copy of the caller's /proc/self/mountinfo (the host's mounts).
#
# `ip netns exec` runs the command in a private mount namespace (a slave of the host's: nothing
# mounted here reaches the host) with a fresh /sys for the namespace, which has no cgroup
# hierarchies: dockerd 20.10 then dies with "Devices cgroup isn't mounted". This mounts the
# host's hierarchies again, as the host has them (the same hierarchies: cgroups made under them
# are visible on the host, so the caller gives dockerd a --cgroup-parent of its own and removes
# it afterwards), and puts tmpfs over /run (dockerd's and containerd's sockets, xtables.lock; a
# containerd of the host's is not seen) and /etc/docker (dockerd's files there) when it exists.
set -eu
mountinfo=$1
shift
# /run first: mount(8) keeps its own files under /run/mount, which must not land on the host.
mount -n -t tmpfs -o mode=755 tmpfs /run
# Fields: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
awk '{
    for (i = 7; $i != "-"; i++) {}
    fstype = $(i + 1); super = $(i + 3); point = $5
    if (point !~ "^/sys/fs/cgroup(/|$)") next
    n = split(super, o, ","); opts = ""
    for (j = 1; j <= n; j++) if (o[j] != "rw" && o[j] != "ro") opts = opts (opts == "" ? "" : ",") o[j]
    print fstype, point, (opts == "" ? "defaults" : opts)
}' "$mountinfo" | while read -r fstype point opts; do
    mkdir -p "$point"
    case $fstype in
        tmpfs) mount -t tmpfs -o mode=755 tmpfs "$point" ;;
        cgroup) mount -t cgroup -o "$opts" cgroup "$point" ;;
        cgroup2) mount -t cgroup2 -o "$opts" cgroup2 "$point" ;;
        *) mount -t "$fstype" -o "$opts" "$fstype" "$point" ;;
    esac
done

if [ -d /etc/docker ]; then
    mount -t tmpfs -o mode=755 tmpfs /etc/docker
fi
exec "$@"
