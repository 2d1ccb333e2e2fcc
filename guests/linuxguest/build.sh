#!/bin/bash
# Build the vmsnap "linuxguest": Debian kernel + busybox/memfill initramfs + a small virtio-blk disk.
#
#   guests/linuxguest/build.sh OUTDIR
#
# Produces OUTDIR/vmlinuz, OUTDIR/initramfs.cpio.gz, OUTDIR/disk.img (and OUTDIR/kernel-version).
# Idempotent; the kernel .deb is cached in OUTDIR/.work. Run as root on Debian 12.
#
# apt packages needed (installed here with apt-get if missing):
#   busybox-static gcc libc6-dev cpio gzip
# plus what every Debian has: apt, dpkg, coreutils, findutils, sed, grep (strip comes with gcc via binutils;
# `file` is used for a sanity check only if present; xz/zstd only if a future kernel compresses modules).
# The kernel comes from the apt repositories: the linux-image-<version>-amd64 package that
# linux-image-amd64 depends on, fetched with `apt-get download` (needs `apt-get update` lists).
set -euo pipefail

PACKAGES=(busybox-static gcc libc6-dev cpio gzip)
# Kernel options that must be usable for the guest; =m ones are put into the initramfs.
KCONFIG_MODULES=(VIRTIO_PCI:virtio_pci VIRTIO_BLK:virtio_blk)
DISK_MB=16

die() { echo "build.sh: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
WORK=$OUT/.work
mkdir -p "$WORK"

# --- tools ---------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get install -y --no-install-recommends "${missing[@]}" ||
        { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; }
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || BUSYBOX=/usr/bin/busybox
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' || [ ! -x /usr/bin/file ] ||
    die "$BUSYBOX is not static (install busybox-static)"

# --- kernel --------------------------------------------------------------------------------
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1; }
KPKG=$(kpkg)
if [ -z "$KPKG" ]; then
    apt-get update
    KPKG=$(kpkg)
fi
[ -n "$KPKG" ] || die "cannot resolve the package behind linux-image-amd64"
KTREE=$WORK/kernel
if [ ! -f "$KTREE/.done-$KPKG" ]; then
    rm -rf "$WORK/deb" "$KTREE"
    mkdir -p "$WORK/deb" "$KTREE"
    (cd "$WORK/deb" && apt-get -o APT::Sandbox::User=root download "$KPKG")
    deb=$(find "$WORK/deb" -maxdepth 1 -name "${KPKG}_*.deb" | head -n1)
    [ -n "$deb" ] || die "apt-get download $KPKG gave no .deb"
    dpkg-deb -x "$deb" "$KTREE"
    rm -f "$deb"
    touch "$KTREE/.done-$KPKG"
fi
KVER=${KPKG#linux-image-}
VMLINUZ=$KTREE/boot/vmlinuz-$KVER
KCONFIG=$KTREE/boot/config-$KVER
MODDIR=$KTREE/lib/modules/$KVER
if [ ! -f "$VMLINUZ" ] || [ ! -f "$KCONFIG" ]; then die "no vmlinuz/config for $KVER in $KPKG"; fi
for opt in BLK_DEV_INITRD RD_GZIP DEVTMPFS SERIAL_8250_CONSOLE; do
    grep -qx "CONFIG_$opt=y" "$KCONFIG" || die "kernel $KVER lacks CONFIG_$opt=y"
done

# --- initramfs tree ------------------------------------------------------------------------
ROOT=$WORK/root
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,etc,tmp,lib/modules}
install -m 755 "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ -e "$ROOT/bin/$applet" ] || ln -s busybox "$ROOT/bin/$applet"
done
gcc -static -O2 -Wall -o "$ROOT/bin/memfill" "$HERE/memfill.c"
strip "$ROOT/bin/memfill" 2>/dev/null || true
install -m 755 "$HERE/init" "$ROOT/init"
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$ROOT/dev/null" c 1 3 2>/dev/null || true

# Kernel modules (only for options built as =m), dependencies first.
declare -A seen=()
ORDER=()
mod_file() { # module name -> path of its .ko* (names may use - or _)
    local n=$1 alt=${1//_/-}
    find "$MODDIR/kernel" \( -name "$n.ko" -o -name "$n.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) | head -n1
}
mod_plain() { # decompress if needed, print the plain .ko content
    case "$1" in
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -dc "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
    esac
}
add_mod() {
    local name=${1//-/_} f deps d
    [ -z "${seen[$name]:-}" ] || return 0
    seen[$name]=1
    f=$(mod_file "$name")
    [ -n "$f" ] || die "module $name not found in $KPKG"
    deps=$(mod_plain "$f" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do add_mod "$d"; done
    mod_plain "$f" > "$ROOT/lib/modules/$name.ko"
    ORDER+=("$name.ko")
}
for entry in "${KCONFIG_MODULES[@]}"; do
    opt=${entry%%:*} mod=${entry#*:}
    if grep -qx "CONFIG_$opt=m" "$KCONFIG"; then
        add_mod "$mod"
    elif ! grep -qx "CONFIG_$opt=y" "$KCONFIG"; then
        die "kernel $KVER has neither CONFIG_$opt=y nor =m"
    fi
done
: > "$ROOT/etc/modules.order"
if [ ${#ORDER[@]} -gt 0 ]; then
    printf '%s\n' "${ORDER[@]}" > "$ROOT/etc/modules.order"
fi

# --- outputs -------------------------------------------------------------------------------
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9n > "$OUT/initramfs.cpio.gz.tmp"
mv -f "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
install -m 644 "$VMLINUZ" "$OUT/vmlinuz.tmp"
mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
echo "$KVER" > "$OUT/kernel-version"

# Disk: sector 0 = header the guest checks, sector 1 = boot counter the guest bumps,
# then 1 MiB of non-zero data so the device has real content; sparse up to DISK_MB.
{
    printf 'VMSNAP-LINUXDISK'
    head -c $((512 - 16)) /dev/zero
    head -c 512 /dev/zero
    yes 'vmsnap linuxguest disk data' | head -c $((1024 * 1024)) || true
} > "$OUT/disk.img.tmp"
truncate -s "${DISK_MB}M" "$OUT/disk.img.tmp"
mv -f "$OUT/disk.img.tmp" "$OUT/disk.img"

echo "linuxguest: kernel $KVER, modules: ${ORDER[*]:-(built in)}"
ls -l "$OUT/vmlinuz" "$OUT/initramfs.cpio.gz" "$OUT/disk.img"
