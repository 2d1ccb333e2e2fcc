#!/usr/bin/env bash
# Install everything vmsnap needs on a fresh Debian 12 (run as root): Debian packages, the Python
# venv (.venv), the QEMU 10 chroot and the two test guests. Idempotent and cached under build/,
# so a second run takes seconds. Usage: scripts/install.sh [--bench]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86 qemu-utils        # QEMU 7.2, the VMs under test
  debootstrap                       # builds the Debian 13 chroot with QEMU 10
  busybox-static cpio gcc libc6-dev binutils make kmod zstd xz-utils  # the two guests
  python3 python3-venv python3-pip  # vmsnap itself
  fio util-linux                    # disk limits, loop devices
  libvirt-daemon-system libvirt-clients  # libvirt domains (vmsnap save --domain, save images)
  libvirt-dev pkg-config            # build libvirt-python in the venv
  ceph-mon ceph-mgr ceph-osd radosgw ceph-common python3-rados python3-rbd  # rbd:/s3:// targets
)
bench=0
if [[ ${1:-} == --bench ]]; then
  bench=1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install: apt-get install ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
if ! cmp -s pyproject.toml .venv/.installed-pyproject 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,ceph]'
  cp pyproject.toml .venv/.installed-pyproject
fi
# Debian's librados/librbd bindings are built for its python3 only: expose just those two
# modules to the venv (whatever python3 made it) through a directory of links and a .pth.
bindings=.venv/lib/debian-ceph
mkdir -p "$bindings"
for mod in rados rbd; do
  so=$(ls /usr/lib/python3/dist-packages/"$mod".cpython-*.so)
  ln -sfn "$so" "$bindings/$(basename "$so")"
done
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
realpath "$bindings" >"$site/debian-ceph.pth"
.venv/bin/python -c 'import rados, rbd' || { echo "install: rados/rbd bindings unusable"; exit 1; }
if ((bench)) && ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
  .venv/bin/pip install -q -e '.[test,bench]'  # matplotlib for bench/run's chart
fi

scripts/build-qemu10-chroot.sh build/qemu10-root
# Rebuild a guest only when its sources changed since the last build.
build_guest() {
  local name=$1 out=build/guests/$1 hash
  hash=$(cat guests/"$name"/* | sha256sum | cut -d' ' -f1)
  if [[ $(cat "$out/.source-hash" 2>/dev/null) != "$hash" ]]; then
    echo "install: building $name"
    guests/"$name"/build.sh "$out" >/dev/null
    echo "$hash" >"$out/.source-hash"
  fi
}
build_guest bootguest
build_guest linuxguest
echo "install: done"
