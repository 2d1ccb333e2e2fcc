"""Guest RAM in shared memory, moved by vmsnap itself: no socket hop, no copy in Python.

Save: the backing (a /dev/shm file, a memfd, any `share=on` memory backend) is mapped
read-only; parallel workers hash each 8 MiB chunk page by page (xxh3), take pages whose
hash is the zero page's (confirmed by comparison) as holes, and write the others with
O_DIRECT straight from the mapping to their fixed offsets in the snapshot's page area,
recording the same hashes in its checksum table. Ranges the backing has never allocated
(SEEK_HOLE) are not even read.

Restore: the backing's old content is dropped where the snapshot has no page (MADV_REMOVE
punches a hole, so those pages read as zero); then parallel workers take one run of present
pages (at most 8 MiB) each. Where the backing has no pages yet (a fresh one, as QEMU creates
it), the run is read with O_DIRECT into a buffer of vmsnap's, checked there against the
trailer's checksums and written into the backing with pwrite, which allocates its pages
without zeroing, mapping or unmapping them, and holds no GIL where mmap.madvise's
MADV_POPULATE_WRITE did (a fresh 1 GiB: 0.52-0.62 CPU-s, median 0.56, against 0.58-0.68,
median 0.66, mapped and populated). Where it holds old pages (a file QEMU reopened),
the run is mapped, faulted in at once (MADV_POPULATE_WRITE), read with O_DIRECT straight
into the mapping and checked there: the old pages are reused as they are (0.35-0.40 CPU-s
per GiB here against 0.61-0.66 for a pwrite over them).
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ..errors import VmsnapError
from ..fileformat.bitmap import contiguous_runs, runs
from ..fileformat.reader import PageRun, Snapshot
from ..fileformat.trailer import page_checksums, xxh3
from ..fileformat.writer import SnapshotWriter
from ..io.aligned import PAGE_SIZE, BufferPool
from ..io.direct import pwritev_all
from ..io.madvise import MADV_POPULATE_READ, MADV_POPULATE_WRITE, fault_in

#: Bytes per worker job.
CHUNK = 8 << 20
J = TypeVar("J")
ZERO_PAGE_XXH3 = xxh3(bytes(PAGE_SIZE))


def default_workers() -> int:
    """Enough parallel O_DIRECT requests to keep a disk busy, at least one per CPU."""
    return max(4, os.cpu_count() or 1)


@dataclass
class Backing:
    """An open shared-memory file holding one RAM block at `offset`."""

    block: str
    fd: int
    offset: int
    size: int

    def map(self, writable: bool) -> mmap.mmap:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, prot, offset=self.offset)

    @contextmanager
    def window(self, start: int, length: int) -> Iterator[memoryview]:
        """Bytes [start, start+length) of the block, mapped shared and writable while the
        context lasts, every page faulted in by one call (MADV_POPULATE_WRITE; older
        kernels fault them in as they are touched)."""
        m = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=self.offset + start)
        view = memoryview(m)
        try:
            fault_in(m, MADV_POPULATE_WRITE)
            yield view
        finally:
            view.release()
            try:
                m.close()
            except BufferError:  # a failing worker's traceback still holds a view
                pass

    def extents(self) -> Iterator[tuple[int, int]]:
        """(offset, length) of the block's allocated ranges, page aligned (the whole block
        if the filesystem cannot tell)."""
        end = self.offset + self.size
        pos = self.offset
        while pos < end:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno != errno.ENXIO:  # no SEEK_DATA here: read everything left
                    yield pos - self.offset, end - pos
                return
            if start >= end:
                return
            stop = min(os.lseek(self.fd, start, os.SEEK_HOLE), end)
            first = (start - self.offset) // PAGE_SIZE * PAGE_SIZE
            last = min(-(-(stop - self.offset) // PAGE_SIZE) * PAGE_SIZE, self.size)
            yield first, last - first
            pos = self.offset + last

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class CopyStats:
    pages: int = 0
    zero_pages: int = 0


def _chunks(extents: Iterator[tuple[int, int]], size: int = CHUNK
            ) -> Iterator[tuple[int, int]]:
    for start, length in extents:
        for off in range(start, start + length, size):
            yield off, min(size, start + length - off)


def _run(jobs: Sequence[J], work: Callable[[J], None], workers: int) -> None:
    """Run `work(job)` for every job on `workers` threads; the first failure stops the
    rest (jobs not yet started are skipped) and is raised."""
    failed = threading.Event()

    def guarded(job: J) -> None:
        if not failed.is_set():
            try:
                work(job)
            except BaseException:
                failed.set()
                raise

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="vmsnap-shm") as ex:
        futures = [ex.submit(guarded, job) for job in jobs]
        for fut in futures:
            fut.result()


@contextmanager
def _mapped(backings: Mapping[str, Backing], writable: bool
            ) -> Iterator[dict[str, tuple[mmap.mmap, memoryview]]]:
    maps: dict[str, tuple[mmap.mmap, memoryview]] = {}
    try:
        for name, b in backings.items():
            m = b.map(writable)
            maps[name] = (m, memoryview(m))
        yield maps
    finally:
        for m, view in maps.values():
            view.release()
            try:
                m.close()
            except BufferError:  # a failing worker's traceback still holds a view
                pass


def copy_to_file(writer: SnapshotWriter, backings: Mapping[str, Backing], *,
                 workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> CopyStats:
    """Write every non-zero page of each backing to its block's page area in `writer`."""
    stats = CopyStats()
    lock = threading.Lock()
    with _mapped(backings, writable=False) as maps:
        def work(job: tuple[str, int, int]) -> None:
            name, off, n = job
            m, view = maps[name]
            fault_in(m, MADV_POPULATE_READ, off, n)
            data = view[off:off + n]
            sums = page_checksums(data)
            zero = sums == np.uint64(ZERO_PAGE_XXH3)
            for i in np.flatnonzero(zero):  # a hash match: confirm with the bytes
                zero[i] = not np.frombuffer(data, np.uint64, PAGE_SIZE // 8,
                                            int(i) * PAGE_SIZE).any()
            pages = np.flatnonzero(~zero)
            for first, count in contiguous_runs(pages):
                sel = pages[first:first + count]
                lo = int(sel[0]) * PAGE_SIZE
                writer.write_aligned_pages(
                    name, off + sel.astype(np.uint64) * np.uint64(PAGE_SIZE),
                    data[lo:lo + count * PAGE_SIZE], sums=sums[sel])
            with lock:
                stats.pages += len(pages)
                stats.zero_pages += n // PAGE_SIZE - len(pages)
                if progress:
                    progress(n)

        _run([(name, off, n) for name, b in backings.items()
              for off, n in _chunks(b.extents())], work, workers or default_workers())
    return stats


def fill_from_file(snap: Snapshot, backings: Mapping[str, Backing], *, verify: bool = True,
                   workers: int | None = None,
                   progress: Callable[[int], None] | None = None) -> int:
    """Make each backing hold its block's pages from `snap` (absent pages zero), every
    page checked against the trailer first when `verify`. Returns pages read.
    Raises ChecksumMismatch naming the first bad page; the backing is then garbage."""
    blocks = {}
    for name, b in backings.items():
        try:
            blocks[name] = block = snap.block(name)
        except KeyError:
            raise VmsnapError(f"snapshot has no RAM block {name!r} (the target's shared "
                              "RAM)") from None
        if block.used_length != b.size:
            raise VmsnapError(f"RAM block {name!r}: snapshot has {block.used_length} bytes, "
                              f"the target's shared RAM {b.size}")
    old = {}
    for name, block in blocks.items():
        _clear(backings[name], block.present)
        old[name] = _Extents(backings[name].extents())
    jobs = [run for run in snap.page_runs(CHUNK) if run.block.name in blocks]
    lock = threading.Lock()
    workers = workers or default_workers()

    def work(job: PageRun) -> None:
        block, first, count = job.block, job.first, job.count
        backing = backings[block.name]
        start, length = first * block.page_size, count * block.page_size
        if old[block.name].overlap(start, length):  # read into the old pages in place
            with backing.window(start, length) as ram:
                snap.read_pages(block, first, count, into=ram)
                if verify:
                    snap.check_pages(block, first, count, ram, job.index)
        else:  # fresh memory: allocated by the write, never mapped here
            with pool.buffer() as buf:
                data = snap.read_pages(block, first, count, into=buf)
                if verify:
                    snap.check_pages(block, first, count, data, job.index)
                pwritev_all(backing.fd, [data], backing.offset + start)
        if progress:
            with lock:
                progress(length)

    with BufferPool(CHUNK, workers) as pool:
        _run(jobs, work, workers)
    return sum(job.count for job in jobs)


class _Extents:
    """The allocated ranges of a backing, (offset, length) ascending: which ranges hold
    old pages."""

    def __init__(self, extents: Iterator[tuple[int, int]]) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, length in extents:
            self._starts.append(start)
            self._ends.append(start + length)

    def overlap(self, start: int, length: int) -> bool:
        i = bisect.bisect_right(self._starts, start + length - 1)
        return i > 0 and self._ends[i - 1] > start


def _clear(backing: Backing, present: np.ndarray) -> None:
    """Zero the old content of the pages the snapshot does not hold, where the backing has
    any (SEEK_DATA): dropped from the backing (MADV_REMOVE punches a hole), or, where the
    filesystem cannot, overwritten with zeros. Old pages the snapshot holds stay for the
    fill to read into in place, rather than be freed and allocated again."""
    stale = []
    for start, length in backing.extents():
        first = start // PAGE_SIZE
        stale += [((first + int(a)) * PAGE_SIZE, int(n) * PAGE_SIZE)
                  for a, n in runs(~present[first:first + length // PAGE_SIZE])]
    if not stale:
        return
    with _mapped({backing.block: backing}, writable=True) as maps:
        m = maps[backing.block][0]
        for off, n in stale:
            try:
                m.madvise(mmap.MADV_REMOVE, off, n)
            except OSError:
                np.frombuffer(m, np.uint8, n, off)[:] = 0


def copy_left_out(writer: SnapshotWriter, streamed: set[str],
                  backings: Mapping[str, Backing]) -> CopyStats:
    """After an x-ignore-shared stream: copy every block the stream left out (no page or
    zero record: QEMU ignored it as shared) from its backing. A left-out block without
    a backing would be silently empty in the file: refused."""
    assert writer.layout is not None
    todo = {}
    for b in writer.layout.blocks:
        if b.name in streamed:
            continue
        if b.name not in backings:
            raise VmsnapError(f"RAM block {b.name!r} is shared memory QEMU left out of the "
                              "stream, and vmsnap cannot read it")
        todo[b.name] = backings[b.name]
    return copy_to_file(writer, todo)
