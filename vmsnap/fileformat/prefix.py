"""The QEMU stream of a mapped-ram file, decoded with the stream codec and preads.

:class:`StreamScan` drives a :class:`~vmsnap.stream.StreamDecoder` over a file without
reading its page data: it reads the header region, and after every RAMBlock's
MappedRamHeader seeks over the bitmap and page area (the decoder's ``wanted_offset``) to
the next entry. It stops where the last page area ends (``tail_offset``: EOS, footer, …,
device state, EOF, vmdesc); :meth:`StreamScan.tail_problem` decodes that tail with the
same decoder. Codec errors (:class:`~vmsnap.stream.StreamError`) become one-line
:class:`SnapshotError` messages naming the problem and its offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..stream import RamBlock, RamBlocks, SectionStart, StreamDecoder, StreamError
from ..stream.constants import TARGET_PAGE_SIZE
from ..stream.sections import ends_at_eof
from .errors import SnapshotError

#: Bytes read at a time from the header region and at each block entry.
READ_CHUNK = 16 << 10


@dataclass(frozen=True)
class StreamPrefix:
    machine_type: str
    capabilities: tuple[str, ...]
    ram_section_id: int
    first_block_offset: int  # where the first block idstr is (= length of the "prefix")
    total_ram: int
    blocks: tuple[RamBlock, ...]  # decoded entries: stream_offset, header_offset, mapped_ram
    tail_offset: int  # stream continues here (EOS of the RAM START, ...)


def describe(e: StreamError) -> str:
    """One line for a codec error: what is wrong, where, and what was expected."""
    where = f" at offset {e.offset:#x}" if e.offset is not None else ""
    detail = "; ".join(x for x in (e.field, e.expected and f"expected {e.expected}") if x)
    return f"{e.message}{where}" + (f" ({detail})" if detail else "")


class StreamScan:
    """Decode the stream of a file of `size` stream bytes read with `pread(offset, n)`.

    The constructor decodes up to ``prefix.tail_offset`` (raises SnapshotError)."""

    def __init__(self, pread: Callable[[int, int], bytes], size: int,
                 page_size: int = TARGET_PAGE_SIZE) -> None:
        self._dec = dec = StreamDecoder(page_size)
        blocks: tuple[RamBlock, ...] | None = None
        sid = None
        try:
            while blocks is None:
                want = dec.wanted_offset
                if want > dec.fed_offset:  # jump over a bitmap and page area
                    if want > size:
                        b = next(reversed(dec.blocks.values()))
                        raise SnapshotError(
                            f"stream truncated: page area of RAMBlock {b.name!r} ends at "
                            f"{want:#x}, beyond end of file ({size:#x})")
                    dec.seek(want)
                if want >= size:
                    dec.close()  # raises: the stream ends inside the header region
                    raise SnapshotError(f"stream truncated at offset {size:#x}")
                try:
                    dec.feed(pread(want, min(READ_CHUNK, size - want)))
                    for e in dec.events():
                        if isinstance(e, SectionStart):
                            sid = e.section_id
                            if not dec.mapped_ram:
                                raise SnapshotError(
                                    "stream does not use the mapped-ram capability "
                                    "(a plain migration stream, not a snapshot file)")
                        elif isinstance(e, RamBlocks):
                            blocks = e.blocks
                except StreamError:
                    if blocks is None:
                        raise
                    # an error in the tail bytes read along: the decoder keeps it for
                    # tail_problem(); the block list is complete
        except StreamError as e:
            raise SnapshotError(f"QEMU stream: {describe(e)}") from None
        if not blocks:
            raise SnapshotError("stream has no RAM blocks (MEM_SIZE total 0)")
        for b in blocks:
            if b.mapped_ram is not None and b.mapped_ram.ignored:
                raise SnapshotError(
                    f"RAMBlock {b.name!r} is an ignored shared block (unsupported)")
        tail_offset = blocks[-1].resume_offset
        if tail_offset is None or sid is None:
            raise SnapshotError("stream has no RAM section with mapped-ram page areas")
        if tail_offset > size:
            raise SnapshotError(
                f"stream truncated: page area of RAMBlock {blocks[-1].name!r} ends at "
                f"{tail_offset:#x}, beyond end of file ({size:#x})")
        self.prefix = StreamPrefix(
            dec.machine_type or "", dec.capabilities, sid, blocks[0].stream_offset,
            sum(b.used_length for b in blocks), blocks, tail_offset)

    def tail_problem(self, tail: bytes) -> str | None:
        """Decode `tail` (the stream bytes from ``prefix.tail_offset`` to the end). None if
        it ends like a finished QEMU stream: EOF byte and vmdesc trailer (or, vmdesc
        suppressed, device sections each closed by its footer, then EOF: see
        vmsnap.stream.sections); else what is wrong."""
        dec, off = self._dec, self.prefix.tail_offset
        try:
            if dec.fed_offset < off:
                dec.seek(off)
            dec.feed(tail[dec.fed_offset - off:])
            list(dec.events())
            dec.close()
        except StreamError as e:
            return describe(e)
        end, dev = dec.end, dec.device_offset
        if end is None or dev is None or (
                end.vmdesc is None and not ends_at_eof(tail[dev - off:])):
            return f"stream does not end with a vmdesc trailer (offset {off + len(tail):#x})"
        return None


def parse_prefix(pread: Callable[[int, int], bytes], size: int) -> StreamPrefix:
    """The stream up to the tail of a mapped-ram file of `size` bytes (see StreamScan)."""
    return StreamScan(pread, size).prefix
