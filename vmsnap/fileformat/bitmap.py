"""QEMU mapped-ram bitmaps: little-endian 64-bit words, bit i = page i.

In memory a bitmap is kept as a numpy bool array (one byte per page); these helpers convert
to/from the file representation and turn set bits into runs for coalesced I/O.
"""

from __future__ import annotations

from ..lazy_numpy import np
from ..stream.events import bitmap_size


def pack_bitmap(present: np.ndarray) -> bytes:
    """bool[npages] → file bytes (LE u64 words, padded with zero bits)."""
    npages = len(present)
    packed = np.packbits(np.asarray(present, dtype=bool), bitorder="little")
    out = np.zeros(bitmap_size(npages), dtype=np.uint8)
    out[: len(packed)] = packed
    return out.tobytes()


def unpack_bitmap(data: bytes, npages: int) -> np.ndarray:
    """File bytes → bool[npages] (bits past npages are ignored, as QEMU does)."""
    need = bitmap_size(npages)
    if len(data) < need:
        raise ValueError(f"bitmap needs {need} bytes, got {len(data)}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=need), bitorder="little")
    return bits[:npages].view(bool)  # no copy: 1 byte per page is the only cost








def count_set(data: bytes, npages: int) -> int:
    """How many of the first `npages` bits of a bitmap are set: what unpack_bitmap's sum is,
    without unpacking (2 MiB pages: ~0.3 ms, against ~2 ms)."""
    need = bitmap_size(npages)
    if len(data) < need:
        raise ValueError(f"bitmap needs {need} bytes, got {len(data)}")
    whole, rest = divmod(npages, 8)
    count = int.from_bytes(memoryview(data)[:whole], "little").bit_count()
    if rest:
        count += (data[whole] & ((1 << rest) - 1)).bit_count()
    return count


def runs(present: np.ndarray, max_pages: int | None = None) -> np.ndarray:
    """Runs of set bits as an int64 array of shape (n, 2): (first_page, count).

    With `max_pages`, longer runs are split so no run exceeds it.
    """
    p = np.asarray(present, dtype=bool).view(np.int8)
    edges = np.diff(np.concatenate(([0], p, [0])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    counts = ends - starts
    if max_pages is not None and len(counts) and counts.max() > max_pages:
        pieces = -(-counts // max_pages)
        rep_starts = np.repeat(starts, pieces)
        idx = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        first = rep_starts + idx * max_pages
        cnt = np.minimum(np.repeat(ends, pieces) - first, max_pages)
        return np.stack([first, cnt], axis=1).astype(np.int64)
    return np.stack([starts, counts], axis=1).astype(np.int64)


def contiguous_runs(pages: np.ndarray) -> np.ndarray:
    """Split a sequence of page numbers (in the given order) into runs where each next page
    is the previous + 1. Returns (n, 2) int64: (index of first element, length)."""
    pages = np.asarray(pages, dtype=np.int64)
    if len(pages) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return np.stack([starts, ends - starts], axis=1).astype(np.int64)
