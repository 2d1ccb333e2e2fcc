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
from typing import TYPE_CHECKING, Protocol

from ..errors import VmsnapError

if TYPE_CHECKING:  # the standard library only at run time: see orchestration.early
    from ..fileformat.trailer import TrailerMetadata

#: the RAM block of `-m` memory on x86 PC machines; the only one mapped
MAPPED_BLOCK = "pc.ram"
MIN_VERSION = (8, 2)
ENGINES = ("auto", "postcopy", "mmap")
_VERSION = re.compile(r"^(\d+)\.(\d+)")


class PageArea(Protocol):
    @property
    def used_length(self) -> int: ...

    @property
    def pages_offset(self) -> int: ...


class Mappable(Protocol):
    """What the engine's choice and the mapped launch command need of a snapshot: the open
    file (fileformat.reader.Snapshot), or its trailer's word before it is opened
    (orchestration.early)."""

    @property
    def path(self) -> str: ...

    @property
    def metadata(self) -> TrailerMetadata | None: ...

    def block(self, name: str) -> PageArea: ...  # KeyError if there is none


def supports_mmap(qemu_version: str | None) -> bool:
    """Whether a QEMU of `qemu_version` ("10.0.13") has memory-backend-file offset=."""
    m = _VERSION.match(qemu_version or "")
    return m is not None and (int(m.group(1)), int(m.group(2))) >= MIN_VERSION


def pick_engine(engine: str, snap: Mappable, argv: Sequence[str] | None,
                where: object | None) -> str:
    """The lazy restore engine to use (`argv`: the command vmsnap launches, None for a --qmp
    target; `where`: the remote store the snapshot is in, None for a local file). "auto" is
    postcopy everywhere: its guest makes its first pass over RAM 2-4x sooner than under
    mmap, whose every first write is a copy-on-write fault inside KVM's (README: Lazy
    restore); mmap is for many VMs sharing one file's page cache, when asked for."""
    if engine not in ENGINES:
        raise VmsnapError(f"unknown lazy engine {engine!r} (choose {', '.join(ENGINES[1:])})")
    version = snap.metadata.qemu_version if snap.metadata else None
    if engine == "mmap":
        if where is not None:
            raise VmsnapError(f"--lazy=mmap maps a local file; {where} is remote: "
                              "use --lazy=postcopy")
        if argv is None:
            raise VmsnapError("--lazy=mmap needs vmsnap to launch QEMU (no --qmp): "
                              "use --lazy=postcopy for a waiting QEMU")
        if not supports_mmap(version):
            raise VmsnapError(f"--lazy=mmap needs QEMU >= 8.2 (memory-backend-file offset=); "
                              f"this snapshot is from QEMU {version or 'unknown'}: "
                              "use --lazy=postcopy")
        check_mappable(argv, snap)
        return "mmap"
    return "postcopy"


def check_mappable(argv: Sequence[str], snap: Mappable) -> None:
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


def mapped_argv(argv: Sequence[str], snap: Mappable, fd: int) -> list[str]:
    """`argv` with `-m` memory backed by the snapshot's `pc.ram` page area (MAP_PRIVATE),
    mapped from `fd`, a descriptor on the very file vmsnap opened and checked that QEMU
    inherits: through /proc/self/fd QEMU opens that inode, whatever the path names by now.
    `argv` and `snap` passed check_mappable (pick_engine)."""
    block = snap.block(MAPPED_BLOCK)
    backend = (f"memory-backend-file,id={MAPPED_BLOCK},size={block.used_length},"
               f"mem-path=/proc/self/fd/{fd},offset={block.pages_offset},share=off")
    return [*argv, "-object", backend, "-machine", f"memory-backend={MAPPED_BLOCK}"]
