#!/usr/bin/env bash
# Make sure the kernel runs aarch64 binaries through qemu-user (binfmt_misc, fix-binary flag so
# the interpreter need not exist inside the chroot).
set -euo pipefail
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" \
        || { echo "check-arm64: cannot mount binfmt_misc at $BINFMT" >&2; exit 1; }
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi
grep -q '^enabled' "$BINFMT/qemu-aarch64" 2>/dev/null \
    || { echo "check-arm64: binfmt_misc has no enabled qemu-aarch64 entry (apt-get install qemu-user-static binfmt-support)" >&2; exit 1; }
