"""Where things are inside a saved plain migration stream (for corruption tests)."""

from __future__ import annotations

from pathlib import Path

from vmsnap.stream import Pages, StreamDecoder

PAGE = 4096


def page_data_positions(stream: Path, block: str = "pc.ram") -> dict[int, int]:
    """Map block offset → file position of that page's data, for the LAST copy of each page
    of `block` in the stream (the copy a destination keeps)."""
    decoder = StreamDecoder()
    positions: dict[int, int] = {}
    with open(stream, "rb") as f:
        while chunk := f.read(8 << 20):
            decoder.feed(chunk)
            _collect(decoder.events(), block, positions)
    _collect(decoder.close(), block, positions)
    return positions


def _collect(events, block: str, positions: dict[int, int]) -> None:
    for e in events:
        if not isinstance(e, Pages) or e.block != block:
            continue
        first_header = 8 if e.continued else 8 + 1 + len(e.block.encode())
        pos = e.stream_offset + first_header
        for k, offset in enumerate(e.offsets.tolist()):
            positions[offset] = pos if k == 0 else pos + PAGE + (k - 1) * (8 + PAGE) + 8
