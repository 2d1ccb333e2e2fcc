"""seal: give a QEMU-native mapped-ram file vmsnap's trailer (metadata, per-page xxh3,
stream-range checksums, commit record), so every vmsnap restore checks its pages.

QEMU >= 9 writes its own mapped-ram file (`migrate file:` with mapped-ram, multifd,
direct-io) faster than any stream receiver can; the pages' checksums then come from a
read-back: parallel O_DIRECT reads of every present page, hashed in the buffers they were
read into. The trailer is appended after QEMU's stream, which stays byte for byte as QEMU
wrote it, so QEMU can still load the file natively.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import VmsnapError
from ..fileformat.reader import Snapshot, open_snapshot
from ..fileformat.trailer import (
    BlockChecksums,
    RangeChecksum,
    TrailerMetadata,
    encode_trailer,
    page_checksums,
    xxh3,
)
from ..io.aligned import AlignedBuffer
from ..stream.events import bitmap_size
from .shared_ram import CHUNK, default_workers


def stream_ranges(snap: Snapshot) -> list[RangeChecksum]:
    """Checksums of every non-page byte range of the stream, as SnapshotWriter records
    them: start (or the previous page area's end) up to each block's bitmap end, and the
    tail."""
    out = []
    start = 0
    for b in snap.blocks:
        end = b.bitmap_offset + bitmap_size(b.npages)
        out.append(RangeChecksum(start, end - start, xxh3(snap.read_meta(start, end - start))))
        start = b.pages_offset + b.used_length
    out.append(RangeChecksum(snap.tail_offset, len(snap.tail), xxh3(snap.tail)))
    return out


def page_tables(snap: Snapshot, workers: int | None = None,
                progress: Callable[[int], None] | None = None) -> list[BlockChecksums]:
    """xxh3 of every present page, read back with parallel O_DIRECT reads."""
    tables = {b.name: np.zeros(b.present_count, dtype=np.uint64) for b in snap.blocks}
    jobs = []
    for b in snap.blocks:
        index = np.concatenate(([0], np.cumsum(b.present)))
        jobs += [(b, int(first), int(count), int(index[first]))
                 for first, count in snap.present_runs(b, CHUNK // b.page_size)]
    local = threading.local()
    buffers: list[AlignedBuffer] = []
    lock = threading.Lock()

    def work(job) -> None:
        b, first, count, index = job
        if not hasattr(local, "buf"):
            local.buf = AlignedBuffer(CHUNK)
            with lock:
                buffers.append(local.buf)
        data = snap.read_pages(b, first, count, into=local.buf)
        tables[b.name][index:index + count] = page_checksums(data, b.page_size)
        if progress:
            with lock:
                progress(count * b.page_size)

    try:
        with ThreadPoolExecutor(workers or default_workers(),
                                thread_name_prefix="vmsnap-seal") as ex:
            for fut in [ex.submit(work, job) for job in jobs]:
                fut.result()
    finally:
        for buf in buffers:
            buf.close()
    return [BlockChecksums(b.name, tables[b.name]) for b in snap.blocks]


def seal(path: str, metadata: TrailerMetadata, key: bytes | None = None, *,
         direct: bool = True, progress: Callable[[int], None] | None = None) -> int:
    """Append vmsnap's trailer to the QEMU-native file at `path` and fsync it. Returns the
    number of pages checksummed. Refuses a file that already has a trailer."""
    with open_snapshot(path, direct=direct) as snap:
        if not snap.native:
            raise VmsnapError(f"{path} is already sealed (it has a vmsnap trailer)")
        if metadata.machine_type is None:
            metadata.machine_type = snap.machine_type
        checks = page_tables(snap, progress=progress)
        ranges = stream_ranges(snap)
        stream_end = snap.stream_end
    offset, trailer = encode_trailer(stream_end, metadata, checks, ranges, key)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, trailer, offset)
        os.ftruncate(fd, offset + len(trailer))
        os.fsync(fd)
    finally:
        os.close(fd)
    return sum(c.pages for c in checks)
