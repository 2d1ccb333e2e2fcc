"""Minimal parser of the known mapped-ram stream prefix.

Parses: file header, CONFIGURATION (with the capabilities subsection), optional COMMAND
records, the RAM START section header, MEM_SIZE and per block idstr / used_length /
[addr] / MappedRamHeader, jumping over each block's page area. Anything else before the
RAM START (e.g. early-setup FULL sections) is refused. Designed to be swapped for the
`vmsnap.stream` decoder later: it returns plain values (`StreamPrefix`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import SnapshotError
from .layout import MAPPED_RAM_HEADER_SIZE, MappedRamHeader

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_EOS = 0x10


@dataclass(frozen=True)
class PrefixBlock:
    name: str
    used_length: int
    idstr_offset: int
    header_offset: int
    header: MappedRamHeader

    @property
    def end(self) -> int:
        return self.header.pages_offset + self.used_length


@dataclass(frozen=True)
class StreamPrefix:
    machine_type: str
    capabilities: tuple[str, ...]
    ram_section_id: int
    first_block_offset: int  # where the first block idstr is (= length of the "prefix")
    total_ram: int
    blocks: tuple[PrefixBlock, ...]
    tail_offset: int  # stream continues here (EOS of the RAM START, ...)


class _Cursor:
    def __init__(self, pread: Callable[[int, int], bytes], size: int) -> None:
        self.pread, self.size, self.pos = pread, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise SnapshotError(f"stream truncated reading {what} at offset {self.pos:#x}")
        data = self.pread(self.pos, n)
        if len(data) != n:
            raise SnapshotError(f"short read of {what} at offset {self.pos:#x}")
        self.pos += n
        return data

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be16(self, what: str) -> int:
        return struct.unpack(">H", self.take(2, what))[0]

    def be32(self, what: str) -> int:
        return struct.unpack(">I", self.take(4, what))[0]

    def be64(self, what: str) -> int:
        return struct.unpack(">Q", self.take(8, what))[0]

    def counted(self, what: str) -> str:
        n = self.u8(what)
        raw = self.take(n, what)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise SnapshotError(f"{what} at offset {self.pos - n:#x} is not UTF-8") from None


def parse_prefix(pread: Callable[[int, int], bytes], size: int) -> StreamPrefix:
    """Parse a mapped-ram stream from offset 0 of a file of `size` bytes."""
    c = _Cursor(pread, size)
    if c.be32("file magic") != QEMU_VM_FILE_MAGIC:
        raise SnapshotError("not a QEMU migration stream (bad magic)")
    v = c.be32("file version")
    if v != QEMU_VM_FILE_VERSION:
        raise SnapshotError(f"unsupported QEMU stream version {v}")
    if c.u8("configuration marker") != 0x07:
        raise SnapshotError("stream has no CONFIGURATION record (offset 0x8)")
    n = c.be32("machine type length")
    if n > 256:
        raise SnapshotError(f"machine type length {n} implausible")
    try:
        machine = c.take(n, "machine type").decode()
    except UnicodeDecodeError:
        raise SnapshotError("machine type is not UTF-8") from None
    caps: list[str] = []
    while True:
        mark = c.pos
        t = c.u8("record type")
        if t != 0x05:
            c.pos = mark
            break
        sub = c.counted("subsection name")
        c.be32("subsection version")
        if sub == "configuration/capabilities":
            count = c.be32("capability count")
            if count > 64:
                raise SnapshotError(f"capability count {count} implausible")
            caps += [c.counted("capability") for _ in range(count)]
        elif sub == "configuration/target-page-bits":
            c.be32("target page bits")
        elif sub == "configuration/uuid":
            c.take(16, "uuid")
        else:
            raise SnapshotError(f"unknown configuration subsection {sub!r}")
    if "mapped-ram" not in caps:
        raise SnapshotError("stream does not use the mapped-ram capability")
    while True:
        t = c.u8("record type")
        if t == 0x08:  # COMMAND
            c.be16("command")
            c.take(c.be16("command length"), "command payload")
            continue
        if t == 0x01:
            break
        raise SnapshotError(f"unexpected record type {t:#x} before RAM START at {c.pos - 1:#x}")
    sid = c.be32("section id")
    idstr = c.counted("section idstr")
    if idstr != "ram":
        raise SnapshotError(f"first section is {idstr!r}, expected 'ram'")
    c.be32("instance id")
    ver = c.be32("ram version")
    if ver != 4:
        raise SnapshotError(f"ram section version {ver}, expected 4")
    a = c.be64("MEM_SIZE")
    if a & 0xFFF != RAM_SAVE_FLAG_MEM_SIZE:
        raise SnapshotError(f"expected MEM_SIZE record, flags {a & 0xFFF:#x}")
    total = a & ~0xFFF
    ignore_shared = "x-ignore-shared" in caps
    first = c.pos
    blocks: list[PrefixBlock] = []
    remaining = total
    names: set[str] = set()
    while remaining > 0:
        idoff = c.pos
        name = c.counted("RAMBlock idstr")
        length = c.be64(f"used_length of {name!r}")
        if length > remaining:
            raise SnapshotError(f"RAMBlock {name!r} length exceeds MEM_SIZE total")
        if name in names:
            raise SnapshotError(f"duplicate RAMBlock {name!r}")
        names.add(name)
        if ignore_shared:
            c.be64("block addr")
        hoff = c.pos
        hdr = MappedRamHeader.parse(c.take(MAPPED_RAM_HEADER_SIZE, "MappedRamHeader"),
                                    header_offset=hoff, used_length=length, file_size=size)
        if hdr.bitmap_offset == 0 and hdr.pages_offset == 0:  # ignored shared block
            raise SnapshotError(f"RAMBlock {name!r} is an ignored shared block (unsupported)")
        b = PrefixBlock(name, length, idoff, hoff, hdr)
        if blocks and hdr.bitmap_offset < blocks[-1].end:
            raise SnapshotError(f"RAMBlock {name!r} overlaps the previous block")
        blocks.append(b)
        remaining -= length
        c.pos = b.end
    if remaining != 0:  # pragma: no cover - guarded above
        raise SnapshotError("MEM_SIZE total does not match block lengths")
    return StreamPrefix(machine, tuple(caps), sid, first, total, tuple(blocks), c.pos)


def stream_looks_complete(tail: bytes) -> bool:
    """True if the stream tail ends like a finished QEMU stream: EOF byte followed by the
    vmdesc trailer (0x06 + be32 L + L bytes of JSON), or (vmdesc suppressed) an EOF byte
    right after a section footer. Used only to tell QEMU-native from interrupted files."""
    if len(tail) < 8 or struct.unpack(">Q", tail[:8])[0] != RAM_SAVE_FLAG_EOS:
        return False
    # search for 0x00 0x06 be32 L  with L == bytes remaining
    idx = tail.rfind(b"\x00\x06")
    tries = 0
    while idx >= 0 and tries < 4096:
        tries += 1
        if idx + 6 <= len(tail):
            (L,) = struct.unpack(">I", tail[idx + 2:idx + 6])
            if idx + 6 + L == len(tail):
                js = tail[idx + 6:]
                return js[:1] == b"{" and js.rstrip()[-1:] == b"}"
        idx = tail.rfind(b"\x00\x06", 0, idx)
    return len(tail) >= 6 and tail[-6] == 0x7E and tail[-1] == 0x00
