"""Typed events produced by :class:`~vmsnap.stream.decoder.StreamDecoder`.

All events are frozen dataclasses. ``Pages``/``ZeroPages`` hold numpy arrays and define
value equality (arrays compared element-wise, ``data`` compared as bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from ..lazy_numpy import np
from . import constants as C
from .errors import StreamError

#: Bytes-like input the codec reads (struct.unpack_from, len, slicing).
Bytes = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Header:
    version: int


@dataclass(frozen=True)
class Configuration:
    """CONFIGURATION record. ``raw`` is the whole record from the 0x07 type byte on.

    ``subsections`` maps every subsection name to its raw field bytes (after the
    version word); ``page_bits``/``uuid`` are decoded when present.
    """

    machine_type: str
    capabilities: tuple[str, ...]
    raw: bytes
    subsections: tuple[tuple[str, int, bytes], ...] = ()  # (name, version_id, field bytes)
    page_bits: int | None = None
    uuid: bytes | None = None


@dataclass(frozen=True)
class Command:
    cmd: int
    payload: bytes

    @property
    def name(self) -> str:
        from .constants import COMMAND_NAMES

        return COMMAND_NAMES.get(self.cmd, f"CMD{self.cmd}")


@dataclass(frozen=True)
class Prelude:
    """Verbatim bytes of non-RAM sections before the RAM START (8.0+ early setup)."""

    data: bytes


@dataclass(frozen=True)
class SectionStart:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class SectionPart:
    """A RAM PART section header (the section's records follow; closed by RamEos)."""

    section_id: int


@dataclass(frozen=True)
class SectionEnd:
    """The RAM END section header (records follow; closed by RamEos then RamEnd)."""

    section_id: int


def bitmap_size(npages: int) -> int:
    """Bytes of a mapped-ram file bitmap for ``npages`` pages: ceil(npages/64) 64-bit words."""
    return -(-npages // 64) * 8


@dataclass(frozen=True)
class MappedRamHeader:
    """28-byte per-block header of the mapped-ram layout (§5.2); offsets are absolute.

    The one codec of this header: :meth:`pack`, :meth:`parse` and :meth:`check` (the
    decoder's validation; raises :class:`StreamError` naming the field and its offset).
    A header with both offsets 0 describes an ignored shared block (no bitmap/pages).
    """

    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    SIZE: ClassVar[int] = C.MAPPED_RAM_HDR_SIZE
    _STRUCT: ClassVar[struct.Struct] = struct.Struct(">IQQQ")

    @staticmethod
    def bitmap_size_for(used_length: int, page_size: int) -> int:
        return bitmap_size(-(-used_length // page_size))

    @property
    def ignored(self) -> bool:
        """True for an ignored shared block (x-ignore-shared): nothing in the file."""
        return self.bitmap_offset == 0 and self.pages_offset == 0

    def pack(self) -> bytes:
        return self._STRUCT.pack(self.version, self.page_size, self.bitmap_offset,
                                 self.pages_offset)

    @classmethod
    def parse(cls, data: Bytes, offset: int = 0) -> MappedRamHeader:
        """Decode 28 big-endian bytes (``data`` may be longer; ``offset`` indexes it)."""
        if len(data) - offset < cls.SIZE:
            raise StreamError(f"mapped-ram header needs {cls.SIZE} bytes, got "
                              f"{max(len(data) - offset, 0)}", "mapped_ram", offset,
                              f"{cls.SIZE} bytes")
        return cls(*cls._STRUCT.unpack_from(data, offset))

    def check(self, used_length: int, header_offset: int, page_size: int) -> None:
        """Validate against the block's ``used_length``, the header's absolute offset and
        the stream's target ``page_size``. Raises StreamError with absolute offsets."""
        if self.version != C.MAPPED_RAM_HDR_VERSION:
            raise StreamError(f"mapped-ram header version {self.version}",
                              "mapped_ram.version", header_offset,
                              str(C.MAPPED_RAM_HDR_VERSION))
        if self.page_size != page_size:
            raise StreamError(f"mapped-ram page size {self.page_size}",
                              "mapped_ram.page_size", header_offset + 4, str(page_size))
        if self.ignored:
            return
        end_hdr = header_offset + self.SIZE
        if self.bitmap_offset < end_hdr:
            raise StreamError(f"bitmap_offset {self.bitmap_offset} inside the stream already "
                              "read", "mapped_ram.bitmap_offset", header_offset + 12,
                              f">= {end_hdr}")
        bm_end = self.bitmap_offset + self.bitmap_size_for(used_length, page_size)
        if self.pages_offset < bm_end or self.pages_offset % page_size:
            raise StreamError(f"pages_offset {self.pages_offset} overlaps the bitmap or is "
                              "unaligned", "mapped_ram.pages_offset", header_offset + 20,
                              f"page aligned and >= {bm_end}")
        if self.pages_offset + used_length >= 1 << 63:
            raise StreamError(f"pages_offset {self.pages_offset} too large",
                              "mapped_ram.pages_offset", header_offset + 20,
                              "< 2**63 - used_length")


@dataclass(frozen=True)
class RamBlock:
    """One MEM_SIZE entry. ``stream_offset``: absolute offset of its counted idstr in the
    stream (-1 if not decoded from a stream; not part of equality)."""

    name: str
    used_length: int
    page_size: int | None = None
    addr: int | None = None
    mapped_ram: MappedRamHeader | None = None
    stream_offset: int = field(default=-1, compare=False)

    @property
    def bitmap_size(self) -> int:
        ps = self.mapped_ram.page_size if self.mapped_ram else C.TARGET_PAGE_SIZE
        return MappedRamHeader.bitmap_size_for(self.used_length, ps)

    @property
    def entry_size(self) -> int:
        """Bytes of this MEM_SIZE entry: idstr, used_length, [page_size], [addr], [header]."""
        return (1 + len(self.name.encode()) + 8 + 8 * (self.page_size is not None)
                + 8 * (self.addr is not None)
                + MappedRamHeader.SIZE * (self.mapped_ram is not None))

    @property
    def header_offset(self) -> int | None:
        """Absolute offset of the MappedRamHeader (None if not mapped or not decoded)."""
        if self.mapped_ram is None or self.stream_offset < 0:
            return None
        return self.stream_offset + self.entry_size - MappedRamHeader.SIZE

    @property
    def resume_offset(self) -> int | None:
        """mapped-ram: absolute offset where the sequential stream continues after
        this block (``pages_offset + used_length``); None if not mapped or ignored."""
        m = self.mapped_ram
        if m is None or m.ignored:
            return None
        return m.pages_offset + self.used_length


@dataclass(frozen=True)
class RamBlocks:
    blocks: tuple[RamBlock, ...]


def _arr_eq(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


@dataclass(frozen=True, eq=False)
class Pages:
    """A batch of consecutive PAGE records of one block.

    ``offsets``: uint64 block offsets; ``data``: contiguous ``len(offsets)*page_size``
    bytes, a fresh copy owned by the event (the caller may keep it).
    ``continued``: the first record of the batch had the CONTINUE flag (no idstr).
    ``stream_offset``: absolute offset of the batch's first record.
    """

    block: str
    offsets: np.ndarray
    data: memoryview
    continued: bool = False
    stream_offset: int = field(default=-1, compare=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pages):
            return NotImplemented
        return (
            self.block == other.block
            and self.continued == other.continued
            and _arr_eq(self.offsets, other.offsets)
            and bytes(self.data) == bytes(other.data)
        )

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True, eq=False)
class ZeroPages:
    """A batch of consecutive ZERO records of one block with the same fill byte.

    ``fill`` != 0 is only legal in 7.2 streams: the page is filled with that byte.
    """

    block: str
    offsets: np.ndarray
    fill: int = 0
    continued: bool = False
    stream_offset: int = field(default=-1, compare=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ZeroPages):
            return NotImplemented
        return (
            self.block == other.block
            and self.fill == other.fill
            and self.continued == other.continued
            and _arr_eq(self.offsets, other.offsets)
        )

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class RamEos:
    section_kind: str  # "start" | "part" | "end"


@dataclass(frozen=True)
class MultifdFlush:
    pass


@dataclass(frozen=True)
class RamEnd:
    """RAM is over: after the RAM END section's footer or, in a background-snapshot stream
    (which has no RAM END), at the first device section after the last RAM PART."""


@dataclass(frozen=True)
class DeviceState:
    """Opaque bytes after the RAM END footer (FULL sections, EOF, vmdesc), in chunks."""

    data: bytes


@dataclass(frozen=True)
class StreamEnd:
    """End of stream. ``vmdesc``: the JSON trailer bytes (None if absent);
    ``end_offset``: absolute offset just past the last stream byte."""

    vmdesc: bytes | None = None
    end_offset: int = -1


Event = (
    Header
    | Configuration
    | Command
    | Prelude
    | SectionStart
    | SectionPart
    | SectionEnd
    | RamBlocks
    | Pages
    | ZeroPages
    | RamEos
    | MultifdFlush
    | RamEnd
    | DeviceState
    | StreamEnd
)
