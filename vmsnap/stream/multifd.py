"""Multifd channel framing (reference §3.2, §3.3): parse/pack, sans-IO, validated.

``MultifdInit``: 64-byte per-channel initial packet.
``PacketHeader``: fixed-size packet header (320 + 8 * (512 KiB / page_size) bytes,
1344 for 4 KiB pages) followed on the wire by ``normal_pages * page_size`` payload bytes.
Stale fields (7.2 … 9.1: ``next_packet_size``, ``ramblock`` and unused offset slots of
empty packets) are kept verbatim but never trusted; 9.2+ SYNC packets have
``pages_alloc == 0``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from . import constants as C
from .errors import StreamError
from .events import Bytes

_INIT = struct.Struct(">II16sB7x32x")
_HDR = struct.Struct(">IIIIIIQI28s256s")
#: where the 256-byte ramblock name starts in a packet header (64)
_RAMBLOCK_AT = _HDR.size - 256


def page_count(page_size: int = C.TARGET_PAGE_SIZE) -> int:
    return C.MULTIFD_PACKET_SIZE // page_size


def header_size(page_size: int = C.TARGET_PAGE_SIZE) -> int:
    return C.MULTIFD_HDR_FIXED + 8 * page_count(page_size)


@dataclass(frozen=True)
class MultifdInit:
    uuid: bytes = bytes(16)
    id: int = 0
    magic: int = C.MULTIFD_MAGIC
    version: int = C.MULTIFD_VERSION

    SIZE = C.MULTIFD_INIT_SIZE

    @classmethod
    def parse(cls, buf: Bytes, offset: int = 0, *, channels: int | None = None) -> MultifdInit:
        if len(buf) - offset < C.MULTIFD_INIT_SIZE:
            raise StreamError(f"multifd init packet truncated ({len(buf) - offset} bytes)",
                              "multifd.init", offset, "64 bytes")
        magic, version, uuid, cid = _INIT.unpack_from(buf, offset)
        if magic != C.MULTIFD_MAGIC:
            raise StreamError(f"bad multifd magic 0x{magic:08x}", "multifd.init.magic", offset,
                              "0x11223344")
        if version != C.MULTIFD_VERSION:
            raise StreamError(f"multifd version {version}", "multifd.init.version",
                              offset + 4, "1")
        if channels is not None and cid >= channels:
            raise StreamError(f"multifd channel id {cid}", "multifd.init.id", offset + 24,
                              f"0..{channels - 1}")
        return cls(uuid, cid, magic, version)

    def pack(self) -> bytes:
        if len(self.uuid) != 16 or not 0 <= self.id <= 255:
            raise ValueError("uuid must be 16 bytes and id 0..255")
        return _INIT.pack(self.magic, self.version, self.uuid, self.id)


@dataclass(frozen=True, eq=False)
class PacketHeader:
    """A multifd packet header. ``slots``: all ``page_count`` be64 offset slots as
    uint64 (normal pages first, then zero pages; the rest are stale/garbage)."""

    flags: int = 0
    pages_alloc: int = 128
    normal_pages: int = 0
    next_packet_size: int = 0
    packet_num: int = 0
    zero_pages: int = 0
    ramblock: bytes = b""
    slots: np.ndarray = field(default_factory=lambda: np.zeros(128, np.uint64))
    reserved: bytes = bytes(28)
    magic: int = C.MULTIFD_MAGIC
    version: int = C.MULTIFD_VERSION

    @property
    def sync(self) -> bool:
        return bool(self.flags & C.MULTIFD_FLAG_SYNC)

    @property
    def block(self) -> str:
        return self.ramblock.split(b"\0", 1)[0].decode("ascii", "replace")

    @property
    def normal_offsets(self) -> np.ndarray:
        return self.slots[: self.normal_pages]

    @property
    def zero_offsets(self) -> np.ndarray:
        return self.slots[self.normal_pages : self.normal_pages + self.zero_pages]

    def payload_size(self, page_size: int = C.TARGET_PAGE_SIZE) -> int:
        return self.normal_pages * page_size

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PacketHeader):
            return NotImplemented
        if len(self.slots) != len(other.slots) or not len(self.slots):
            return False
        ps = C.MULTIFD_PACKET_SIZE // len(self.slots)
        return self.pack(ps) == other.pack(ps)

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def parse(
        cls,
        buf: Bytes,
        offset: int = 0,
        *,
        page_size: int = C.TARGET_PAGE_SIZE,
        blocks: Mapping[str, int] | None = None,
        legacy: bool = False,
    ) -> PacketHeader:
        """Parse and validate one header at ``offset`` of ``buf``.

        ``blocks``: block name → used_length, to check the block and the offsets.
        ``legacy``: a 7.2–8.2 source (no ``zero_pages`` field; the word at +32 is
        reserved and ignored)."""
        size = header_size(page_size)
        cnt = page_count(page_size)
        if len(buf) - offset < size:
            raise StreamError(f"multifd packet header truncated ({len(buf) - offset} bytes)",
                              "multifd.header", offset, f"{size} bytes")
        (magic, version, flags, alloc, normal, nps, num, zero, reserved,
         name) = _HDR.unpack_from(buf, offset)
        if magic != C.MULTIFD_MAGIC:
            raise StreamError(f"bad multifd packet magic 0x{magic:08x}", "multifd.magic",
                              offset, "0x11223344")
        if version != C.MULTIFD_VERSION:
            raise StreamError(f"multifd packet version {version}", "multifd.version",
                              offset + 4, "1")
        if flags & C.MULTIFD_FLAG_DEVICE_STATE:
            raise StreamError("multifd device-state packet (VFIO) not supported",
                              "multifd.flags", offset + 8, "RAM packets")
        if flags & C.MULTIFD_FLAG_COMPRESSION_MASK:
            raise StreamError(f"multifd compression flags 0x{flags:x} not supported",
                              "multifd.flags", offset + 8, "no compression")
        if flags & ~(C.MULTIFD_FLAG_SYNC | C.MULTIFD_FLAG_COMPRESSION_MASK
                     | C.MULTIFD_FLAG_DEVICE_STATE):
            raise StreamError(f"unknown multifd flags 0x{flags:x}", "multifd.flags",
                              offset + 8, "0 or SYNC (0x1)")
        if alloc > cnt:
            raise StreamError(f"pages_alloc {alloc}", "multifd.pages_alloc", offset + 12,
                              f"<= {cnt}")
        if normal > alloc:
            raise StreamError(f"normal_pages {normal}", "multifd.normal_pages", offset + 16,
                              f"<= pages_alloc {alloc}")
        if legacy:
            zero = 0
        elif zero > alloc - normal:
            raise StreamError(f"zero_pages {zero}", "multifd.zero_pages", offset + 32,
                              f"<= pages_alloc - normal_pages = {alloc - normal}")
        slots = np.frombuffer(buf, dtype=">u8", count=cnt, offset=offset + 320).astype(
            np.uint64)
        hdr = cls(flags, alloc, normal, nps, num, zero, bytes(name), slots,
                  bytes(reserved), magic, version)
        used = normal + zero
        if used:
            bname = name.split(b"\0", 1)[0]
            if not bname or name[255] != 0:
                raise StreamError("ramblock name not NUL terminated or empty",
                                  "multifd.ramblock", offset + _RAMBLOCK_AT, "a NUL-padded name")
            if blocks is not None:
                blk = hdr.block
                if blk not in blocks:
                    raise StreamError(f"unknown RAMBlock {blk!r}", "multifd.ramblock",
                                      offset + _RAMBLOCK_AT, "a block from the MEM_SIZE list")
                limit = blocks[blk] - page_size
                offs = slots[:used]
                bad = np.flatnonzero((offs > np.uint64(limit))
                                     | (offs & np.uint64(page_size - 1) != 0))
                if bad.size:
                    i = int(bad[0])
                    raise StreamError(f"page offset 0x{int(offs[i]):x} invalid for {blk!r}",
                                      "multifd.offset", offset + 320 + 8 * i,
                                      f"page aligned and <= 0x{limit:x}")
        return hdr

    def pack(self, page_size: int = C.TARGET_PAGE_SIZE) -> bytes:
        cnt = page_count(page_size)
        slots = np.zeros(cnt, np.uint64)
        n = min(cnt, len(self.slots))
        slots[:n] = self.slots[:n]
        name = self.ramblock
        if len(name) > 256:
            raise ValueError("ramblock name longer than 256 bytes")
        head = _HDR.pack(self.magic, self.version, self.flags, self.pages_alloc,
                         self.normal_pages, self.next_packet_size, self.packet_num,
                         self.zero_pages, self.reserved, name.ljust(256, b"\0"))
        return head + slots.astype(">u8").tobytes()

    @classmethod
    def make(cls, block: str, normal: np.ndarray, zero: np.ndarray | None = None, *,
             packet_num: int = 0, flags: int = 0, page_size: int = C.TARGET_PAGE_SIZE,
             pages_alloc: int | None = None) -> PacketHeader:
        """Build a header for ``normal`` (+ ``zero``) page offsets of ``block``."""
        cnt = page_count(page_size)
        normal = np.asarray(normal, np.uint64)
        zero = np.zeros(0, np.uint64) if zero is None else np.asarray(zero, np.uint64)
        if normal.size + zero.size > cnt:
            raise ValueError(f"at most {cnt} pages per packet")
        slots = np.zeros(cnt, np.uint64)
        slots[: normal.size] = normal
        slots[normal.size : normal.size + zero.size] = zero
        return cls(flags, cnt if pages_alloc is None else pages_alloc, int(normal.size),
                   int(normal.size) * page_size, packet_num, int(zero.size),
                   block.encode("ascii") if normal.size + zero.size else b"", slots)
