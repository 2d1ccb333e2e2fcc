"""seal: give a QEMU-native mapped-ram file vmsnap's trailer (metadata, per-page xxh3,
stream-range checksums, commit record), so every vmsnap restore checks its pages.

QEMU >= 9 writes its own mapped-ram file (`migrate file:` with mapped-ram, multifd,
direct-io) faster than any stream receiver can; the pages' checksums then come from a
read-back: parallel O_DIRECT reads of every present page, hashed in the buffers they were
read into. The trailer is appended after QEMU's stream, which stays byte for byte as QEMU
wrote it, so QEMU can still load the file natively. A save can commit first (commit_pending:
metadata, signature, device-state checksums) and seal later.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import VmsnapError
from ..fileformat.journal import finish, replace_trailer
from ..fileformat.reader import PageRun, Snapshot, open_snapshot
from ..fileformat.trailer import (
    BlockChecksums,
    RangeChecksum,
    TrailerMetadata,
    encode_trailer,
    key_id,
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
    jobs = snap.page_runs(CHUNK)
    local = threading.local()
    buffers: list[AlignedBuffer] = []
    lock = threading.Lock()

    def work(job: PageRun) -> None:
        b, first, count, index = job.block, job.first, job.count, job.index
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


def seal(path: str, metadata: TrailerMetadata | None = None, key: bytes | None = None, *,
         direct: bool = True, progress: Callable[[int], None] | None = None) -> int:
    """Give the file at `path` its page checksums: a QEMU-native file gets a whole trailer
    (`metadata`, signed with `key` when given), a file committed with pending checksums
    gets its tables (its metadata kept; signed with `key` only if its signature is valid
    under `key`: sealing never vouches for another host's file). Journaled (see
    vmsnap.fileformat.journal), fsynced. Returns the number of pages checksummed; refuses
    a file whose checksums exist."""
    with open_snapshot(path, direct=direct) as snap:
        if snap.pages_checked:
            if finish(path):  # read through the journal of an interrupted seal: complete it
                return sum(b.present_count for b in snap.blocks)
            raise VmsnapError(f"{path} is already sealed (it has its page checksums)")
        if snap.trailer is not None:  # committed before its checksums: keep what it says
            sig = snap.trailer.signature
            if key is not None and not (sig is not None and sig.key_id == key_id(key)
                                        and sig.valid(key)):
                key = None
            metadata = snap.trailer.metadata
        elif metadata is None:
            metadata = TrailerMetadata()
        if metadata.machine_type is None:
            metadata.machine_type = snap.machine_type
        checks = page_tables(snap, progress=progress)
        ranges = stream_ranges(snap)
        stream_end = snap.stream_end
    offset, trailer = encode_trailer(stream_end, metadata, checks, ranges, key)
    replace_trailer(path, offset, trailer)
    return sum(c.pages for c in checks)


def commit_pending(path: str, metadata: TrailerMetadata, key: bytes | None = None, *,
                   direct: bool = True) -> None:
    """Give the QEMU-native file at `path` a trailer whose page checksums are pending: its
    metadata, signature and stream ranges (device state included) are there at once, the
    pages' checksums when `seal` has read them back."""
    with open_snapshot(path, direct=direct) as snap:
        if snap.trailer is not None:
            raise VmsnapError(f"{path} already has a vmsnap trailer")
        if metadata.machine_type is None:
            metadata.machine_type = snap.machine_type
        empty = [BlockChecksums(b.name, np.zeros(0, np.uint64)) for b in snap.blocks]
        ranges = stream_ranges(snap)
        stream_end = snap.stream_end
    offset, trailer = encode_trailer(stream_end, metadata, empty, ranges, key, sealed=False)
    replace_trailer(path, offset, trailer)
