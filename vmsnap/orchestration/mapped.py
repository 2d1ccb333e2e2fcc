"""The mmap engine's launch command: guest RAM mapped privately from the snapshot file.

`memory-backend-file` with `offset=` (QEMU >= 8.2) maps the page area of `pc.ram` straight
from the file with `share=off` (MAP_PRIVATE): the kernel reads a page on first touch, file
holes read as zero, a guest write makes a private copy (the file never changes), and VMs
restored from one file share its page cache. The backend's id is `pc.ram`, so the RAM block
keeps its name and the stream that follows (device state and small blocks only) loads.
A save replaces a file by rename, so a VM mapping the old inode keeps its memory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import VmsnapError
from ..fileformat.reader import Snapshot

#: the RAM block of `-m` memory on x86 PC machines; the only one mapped
MAPPED_BLOCK = "pc.ram"
MIN_VERSION = (8, 2)
_VERSION = re.compile(r"^(\d+)\.(\d+)")


def supports_mmap(qemu_version: str | None) -> bool:
    """Whether a QEMU of `qemu_version` ("10.0.13") has memory-backend-file offset=."""
    m = _VERSION.match(qemu_version or "")
    return m is not None and (int(m.group(1)), int(m.group(2))) >= MIN_VERSION


def check_mappable(argv: Sequence[str], snap: Snapshot) -> None:
    """Refuse command lines that already choose a memory backend or NUMA layout, and
    snapshots without the block to map."""
    for i, a in enumerate(argv):
        if a in ("-numa", "-mem-path", "-mem-prealloc") or (
                a in ("-machine", "-M") and i + 1 < len(argv)
                and "memory-backend" in argv[i + 1]) or (
                a == "-object" and i + 1 < len(argv) and argv[i + 1].startswith("memory-backend")):
            raise VmsnapError("--lazy=mmap maps plain -m memory only; this command line sets "
                              f"its own memory backend ({a}): use --lazy=postcopy")
    try:
        snap.block(MAPPED_BLOCK)
    except KeyError:
        raise VmsnapError(f"{snap.path} has no {MAPPED_BLOCK} block to map: "
                          "use --lazy=postcopy") from None


def mapped_argv(argv: Sequence[str], snap: Snapshot, fd: int) -> list[str]:
    """`argv` with `-m` memory backed by the snapshot's `pc.ram` page area (MAP_PRIVATE),
    mapped from `fd`, a descriptor on the very file vmsnap opened and checked that QEMU
    inherits: through /proc/self/fd QEMU opens that inode, whatever the path names by now.
    `argv` and `snap` passed check_mappable (pick_engine)."""
    block = snap.block(MAPPED_BLOCK)
    backend = (f"memory-backend-file,id={MAPPED_BLOCK},size={block.used_length},"
               f"mem-path=/proc/self/fd/{fd},offset={block.pages_offset},share=off")
    return [*argv, "-object", backend, "-machine", f"memory-backend={MAPPED_BLOCK}"]
