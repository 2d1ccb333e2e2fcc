"""QEMU mapped-ram file layout (reference §5.2), computed exactly as QEMU does.

The 28-byte header itself (pack/parse/validation) is the stream codec's
:class:`~vmsnap.stream.events.MappedRamHeader`; this module owns the placement policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..stream import encoder
from ..stream.constants import (
    MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    MAPPED_RAM_HDR_VERSION,
    TARGET_PAGE_SIZE,
)
from ..stream.events import MappedRamHeader, RamBlock, bitmap_size


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


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

    @property
    def ram_block(self) -> RamBlock:
        """The block as the stream codec sees it (equal to the decoder's RamBlock)."""
        return RamBlock(self.name, self.used_length, mapped_ram=self.header,
                        stream_offset=self.idstr_offset)

    def record(self) -> bytes:
        """Stream bytes at idstr_offset: counted idstr, be64 used_length, MappedRamHeader."""
        return encoder.ramblock_entry(self.ram_block, mapped_ram=True)


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
                 page_size: int = TARGET_PAGE_SIZE) -> BlockLayout:
    raw = name.encode()
    if not 0 < len(raw) <= 255:
        raise ValueError(f"RAMBlock name length must be 1..255 bytes: {name!r}")
    if used_length < 0 or used_length % page_size:
        raise ValueError(f"used_length of {name!r} must be a page multiple: {used_length}")
    header_offset = idstr_offset + 1 + len(raw) + 8
    bitmap_offset = header_offset + MappedRamHeader.SIZE
    bsize = bitmap_size(used_length // page_size)
    pages_offset = align_up(bitmap_offset + bsize, MAPPED_RAM_FILE_OFFSET_ALIGNMENT)
    return BlockLayout(name, used_length, page_size, idstr_offset, header_offset,
                       bitmap_offset, bsize, pages_offset)


def compute_layout(
    blocks: Sequence[tuple[str, int]], start: int, page_size: int = TARGET_PAGE_SIZE
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
