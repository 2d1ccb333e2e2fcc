#!/usr/bin/env bash
# Install everything (scripts/install.sh), then run the main job on a real VM: boot the Linux
# guest, save it with vmsnap, restore it (QEMU relaunched from the file), check every page,
# and print timings next to QEMU's own exec:cat. Extra arguments go to testbed/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m testbed.demo "$@"
