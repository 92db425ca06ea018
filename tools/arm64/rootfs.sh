#!/usr/bin/env bash
# Build (once) a Debian bookworm arm64 root filesystem for running the agent under qemu-user.
# Prints the root filesystem's path. Reused while it exists: delete it to rebuild.
# Needs root, debootstrap and qemu-user-static (apt-get install debootstrap qemu-user-static).
set -euo pipefail

CACHE="${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}"
ROOTFS="${ARM64_ROOTFS:-$CACHE/arm64-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=python3,python3-venv,python3-pip,ca-certificates

if [ -f "$ROOTFS/.complete" ]; then
    echo "$ROOTFS"
    exit 0
fi

fail() { echo "check-arm64: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "building the arm64 root filesystem needs root (debootstrap, chroot)"
command -v debootstrap >/dev/null || fail "debootstrap is missing: apt-get install debootstrap"
command -v qemu-aarch64-static >/dev/null || fail "qemu-aarch64-static is missing: apt-get install qemu-user-static"
"$(dirname "$0")/binfmt.sh"

mkdir -p "$CACHE"
partial="$ROOTFS.partial"
rm -rf "$partial"
echo "check-arm64: debootstrap bookworm arm64 into $partial (several minutes under emulation)" >&2
debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" bookworm "$partial" "$MIRROR" >&2
touch "$partial/.complete"
rm -rf "$ROOTFS"  # a folder left by a run that stopped before .complete
mv "$partial" "$ROOTFS"
echo "$ROOTFS"
