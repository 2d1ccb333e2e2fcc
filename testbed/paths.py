"""Where the project's build products live (all under the ignored build/ folder)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = (REPO / "build").resolve()  # real path: QEMU 10 in its chroot sees only binds of it
QEMU10_ROOT = BUILD / "qemu10-root"
BOOTGUEST_DIR = BUILD / "guests" / "bootguest"
LINUXGUEST_DIR = BUILD / "guests" / "linuxguest"
