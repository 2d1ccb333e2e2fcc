"""QEMU mapped-ram file layout (reference §5.2), computed exactly as QEMU does."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import SnapshotError

MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HEADER_SIZE = 28
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 1 << 20
_HDR = struct.Struct(">IQQQ")
assert _HDR.size == MAPPED_RAM_HEADER_SIZE


def bitmap_size(npages: int) -> int:
    """Bytes of a QEMU file bitmap: ceil(pages/64) 64-bit words."""
    return -(-npages // 64) * 8


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


@dataclass(frozen=True)
class MappedRamHeader:
    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    def pack(self) -> bytes:
        return _HDR.pack(self.version, self.page_size, self.bitmap_offset, self.pages_offset)

    @classmethod
    def parse(
        cls,
        data: bytes,
        *,
        header_offset: int | None = None,
        used_length: int | None = None,
        file_size: int | None = None,
    ) -> MappedRamHeader:
        """Decode 28 big-endian bytes; with the optional context, validate the offsets."""
        if len(data) != MAPPED_RAM_HEADER_SIZE:
            raise SnapshotError(f"MappedRamHeader: need 28 bytes, got {len(data)}")
        hdr = cls(*_HDR.unpack(data))
        hdr.validate(header_offset=header_offset, used_length=used_length, file_size=file_size)
        return hdr

    def validate(
        self,
        *,
        header_offset: int | None = None,
        used_length: int | None = None,
        file_size: int | None = None,
    ) -> None:
        where = f" (header at {header_offset:#x})" if header_offset is not None else ""
        if self.version != MAPPED_RAM_HDR_VERSION:
            raise SnapshotError(f"MappedRamHeader: unsupported version {self.version}{where}")
        ps = self.page_size
        if ps < 512 or ps > (1 << 30) or ps & (ps - 1):
            raise SnapshotError(f"MappedRamHeader: bad page_size {ps}{where}")
        if self.pages_offset % ps:
            raise SnapshotError(
                f"MappedRamHeader: pages_offset {self.pages_offset:#x} not page aligned{where}"
            )
        if header_offset is not None and self.bitmap_offset < header_offset + 28:
            raise SnapshotError(
                f"MappedRamHeader: bitmap_offset {self.bitmap_offset:#x} before header end{where}"
            )
        if used_length is not None:
            if used_length % ps:
                raise SnapshotError(
                    f"MappedRamHeader: used_length {used_length:#x} not a page multiple{where}"
                )
            bm_end = self.bitmap_offset + bitmap_size(used_length // ps)
            if bm_end > self.pages_offset:
                raise SnapshotError(
                    f"MappedRamHeader: bitmap {self.bitmap_offset:#x}..{bm_end:#x} overlaps "
                    f"pages at {self.pages_offset:#x}{where}"
                )
            if file_size is not None and self.pages_offset + used_length > file_size:
                raise SnapshotError(
                    f"MappedRamHeader: pages {self.pages_offset:#x}+{used_length:#x} beyond end "
                    f"of file ({file_size:#x}){where}"
                )
        if file_size is not None and self.bitmap_offset > file_size:
            raise SnapshotError(f"MappedRamHeader: bitmap_offset beyond end of file{where}")


@dataclass(frozen=True)
class BlockLayout:
    """Where one RAMBlock's setup record and data live (absolute file offsets)."""

    name: str
    used_length: int
    page_size: int
    idstr_offset: int  # counted idstr (u8 len + name)
    header_offset: int  # 28-byte MappedRamHeader (after idstr and be64 used_length)
    bitmap_offset: int
    bitmap_size: int
    pages_offset: int

    @property
    def npages(self) -> int:
        return self.used_length // self.page_size

    @property
    def end(self) -> int:
        """Where the sequential stream resumes after this block."""
        return self.pages_offset + self.used_length

    @property
    def header(self) -> MappedRamHeader:
        return MappedRamHeader(
            MAPPED_RAM_HDR_VERSION, self.page_size, self.bitmap_offset, self.pages_offset
        )

    def record(self) -> bytes:
        """Stream bytes at idstr_offset: counted idstr, be64 used_length, MappedRamHeader."""
        name = self.name.encode()
        return bytes([len(name)]) + name + struct.pack(">Q", self.used_length) + \
            self.header.pack()

    def page_file_offset(self, offset: int) -> int:
        return self.pages_offset + offset


@dataclass(frozen=True)
class FileLayout:
    start: int  # position of the first block's idstr
    blocks: tuple[BlockLayout, ...]

    @property
    def tail_offset(self) -> int:
        """Where the stream continues after the last block (EOS, footer, ...)."""
        return self.blocks[-1].end if self.blocks else self.start

    def block(self, name: str) -> BlockLayout:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)


def block_layout(name: str, used_length: int, idstr_offset: int,
                 page_size: int = 4096) -> BlockLayout:
    raw = name.encode()
    if not 0 < len(raw) <= 255:
        raise ValueError(f"RAMBlock name length must be 1..255 bytes: {name!r}")
    if used_length < 0 or used_length % page_size:
        raise ValueError(f"used_length of {name!r} must be a page multiple: {used_length}")
    header_offset = idstr_offset + 1 + len(raw) + 8
    bitmap_offset = header_offset + MAPPED_RAM_HEADER_SIZE
    bsize = bitmap_size(used_length // page_size)
    pages_offset = align_up(bitmap_offset + bsize, MAPPED_RAM_FILE_OFFSET_ALIGNMENT)
    return BlockLayout(name, used_length, page_size, idstr_offset, header_offset,
                       bitmap_offset, bsize, pages_offset)


def compute_layout(
    blocks: Sequence[tuple[str, int]], start: int, page_size: int = 4096
) -> FileLayout:
    """Lay out `blocks` [(name, used_length)] whose first idstr is written at `start`
    (mapped_ram_setup_ramblock: bitmap right after the header, pages rounded up to 1 MiB,
    stream resumes at pages_offset + used_length)."""
    out = []
    pos = start
    for name, length in blocks:
        b = block_layout(name, length, pos, page_size)
        out.append(b)
        pos = b.end
    return FileLayout(start, tuple(out))
