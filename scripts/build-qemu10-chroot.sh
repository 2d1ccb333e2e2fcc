#!/usr/bin/env bash
# Build (once) a Debian 13 "trixie" chroot holding QEMU 10.x, the QEMU with mapped-ram, multifd
# zero pages and direct-io. The testbed runs it with chroot(2) inside a private mount namespace.
# Usage: scripts/build-qemu10-chroot.sh DIR
set -euo pipefail
root=${1:?usage: $0 DIR}
if [[ -x $root/usr/bin/qemu-system-x86_64 ]]; then
  exit 0
fi
# Use the mirror this machine's apt is already configured with.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [[ -z $mirror ]]; then
  mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[[ -n $mirror ]] || { echo "build-qemu10-chroot: no Debian mirror found in apt sources" >&2; exit 1; }
tmp=$root.tmp
rm -rf "$tmp"
mkdir -p "$(dirname "$root")"
echo "build-qemu10-chroot: debootstrap trixie into $root"
debootstrap --variant=minbase --include=qemu-system-x86,qemu-utils trixie "$tmp" "$mirror" >"$tmp.log" 2>&1 \
  || { tail -20 "$tmp.log" >&2; exit 1; }
rm -f "$tmp.log"
mv "$tmp" "$root"
