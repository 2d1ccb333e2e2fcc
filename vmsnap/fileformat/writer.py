"""SnapshotWriter: lays out a mapped-ram file and fills it as the receive path decodes pages.

    w = SnapshotWriter(path, TrailerMetadata(machine_type=..., ...))
    w.begin(prefix_bytes, [(name, used_length), ...])
    w.write_pages("pc.ram", offsets, data)      # any number of times, any order
    w.zero_pages("pc.ram", offsets)
    w.finish(tail_bytes)                          # bitmaps, tail, trailer, fsync, rename

The file is created as FILE.partial (0600), sized once in `begin` (sparse) and never grows
while pages arrive: re-sent pages overwrite in place.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..io.aligned import PAGE_SIZE, AlignedBuffer, BufferPool, buffer_address
from ..io.vectored import Buffer
from ..targets import PageSink, open_sink
from ..targets.local import LocalSink
from .bitmap import contiguous_runs, pack_bitmap
from .errors import SnapshotError
from .layout import BlockLayout, FileLayout, compute_layout
from .trailer import (
    BlockChecksums,
    RangeChecksum,
    TrailerMetadata,
    encode_trailer,
    page_checksums,
    xxh3,
)

if TYPE_CHECKING:
    from .hot import RewriteTracker

log = logging.getLogger(__name__)
#: Runs of pages shorter than this are written buffered (SnapshotWriter._write_run).
SCATTERED_RUN = 64 << 10


#: Page writes the I/O thread makes from a pool buffer: (file offset, view) runs, buffer.
_WriteJob = tuple[list[tuple[int, memoryview]], AlignedBuffer]


@dataclass
class AlignedPages:
    """Pages in page-aligned memory for `SnapshotWriter.write_aligned_set`: `data` holds
    len(offsets) pages in offsets order; `sums` their xxh3 if already known."""

    block: str
    offsets: npt.ArrayLike
    data: Buffer
    sums: np.ndarray | None = None


def _last_copies(got: Sequence[tuple[_BlockState, np.ndarray, memoryview, np.ndarray]]
                 ) -> list[np.ndarray]:
    """For each part's pages: True where this is the page's last copy in `got`."""
    keep = [np.ones(len(pages), dtype=bool) for _, pages, _, _ in got]
    by_block: dict[int, list[int]] = {}
    for i, (st, _, _, _) in enumerate(got):
        by_block.setdefault(id(st), []).append(i)
    for idx in by_block.values():
        pages = np.concatenate([got[i][1] for i in idx])
        _, first_from_end = np.unique(pages[::-1], return_index=True)
        if len(first_from_end) == len(pages):
            continue  # no page twice
        last = np.zeros(len(pages), dtype=bool)
        last[len(pages) - 1 - first_from_end] = True
        for i, part in zip(idx, np.split(last, np.cumsum([len(got[i][1]) for i in idx])[:-1]),
                           strict=True):
            keep[i] = part
    return keep


def _kept_runs(pages: np.ndarray, keep: np.ndarray) -> list[tuple[int, int]]:
    """(first index, count) of the runs of kept `pages` that are consecutive both in
    `pages` (memory) and in page number (file)."""
    idx = np.flatnonzero(keep)
    if not len(idx):
        return []
    cut = np.flatnonzero((np.diff(pages[idx]) != 1) | (np.diff(idx) != 1)) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [len(idx)]))
    return [(int(idx[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def _joined(runs: list[tuple[int, memoryview]]) -> list[tuple[int, list[memoryview]]]:
    """(file offset, views) runs in file order, a run that starts where the previous one
    ends joined to it."""
    out: list[tuple[int, list[memoryview]]] = []
    end = -1
    for offset, view in sorted(runs, key=lambda r: r[0]):
        if offset == end:
            out[-1][1].append(view)
        else:
            out.append((offset, [view]))
        end = offset + view.nbytes
    return out


@dataclass
class _BlockState:
    layout: BlockLayout
    present: np.ndarray  # bool[npages]
    sums: np.ndarray  # uint64[npages]


class SnapshotWriter:
    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: TrailerMetadata | None = None,
        *,
        page_size: int = PAGE_SIZE,
        direct: bool = True,
        buffer_size: int = 8 << 20,
        queue_depth: int = 3,
        signing_key: bytes | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.signing_key = signing_key  # host key: signs the trailer (see vmsnap.hostkey)
        self.metadata = metadata or TrailerMetadata()
        self.page_size = page_size
        self._direct = direct
        self._buffer_size = buffer_size
        self._depth = max(1, queue_depth)
        self._jobs: queue.Queue[_WriteJob | None] | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        #: guards bitmap/checksum state and counters: multifd channel threads share a writer
        self._lock = threading.Lock()
        self._file: PageSink | None = None
        self._pool: BufferPool | None = None
        self._prefix = b""
        self.layout: FileLayout | None = None
        self._blocks: dict[str, _BlockState] = {}
        self.bytes_written = 0
        self.finished = False
        #: live saves: sees every page write, to tell the rounds apart (hot pages)
        self.rewrites: RewriteTracker | None = None

    # -- properties -------------------------------------------------------------------
    @property
    def direct(self) -> bool:
        """True if page data goes through O_DIRECT (False after a fallback)."""
        return bool(self._file and self._file.direct)

    @property
    def direct_requested(self) -> bool:
        """True if O_DIRECT was asked for (a fallback may still happen)."""
        return self._direct

    @property
    def buffer_pages(self) -> int:
        """Pages that one buffer of `page_buffer` holds."""
        return self._buffer_size // self.page_size

    @property
    def fallback_reason(self) -> str | None:
        return self._file.fallback_reason if self._file else None

    # -- lifecycle --------------------------------------------------------------------
    def reserve(self) -> PageSink:
        """Create and lock the target now (FILE.partial for a file), before any data is
        known, so a second writer to the same FILE fails at once (FileLockedError) instead
        of interleaving."""
        if self._file is None:
            self._file = open_sink(self.path, direct=self._direct, alignment=self.page_size)
        return self._file

    @property
    def partial_path(self) -> str:
        """FILE.partial (created and locked by `reserve`)."""
        self.reserve()
        if not isinstance(self._file, LocalSink):
            raise ValueError(f"{self.path} is not a local file")
        return self._file.partial_path

    def commit_written(self) -> str:
        """Commit a FILE.partial that was written and sealed without `begin` (QEMU wrote
        the stream, vmsnap.ops.seal the trailer): fsync, rename, fsync the directory."""
        if self.layout is not None or self.finished or self._file is None:
            raise ValueError("nothing written outside the writer to commit")
        self._file.commit()
        self.finished = True
        return self.path

    def begin(self, prefix: bytes, blocks: Sequence[tuple[str, int]]) -> FileLayout:
        """Create FILE.partial and write `prefix` (stream bytes up to the first block idstr)
        plus every block's idstr, used_length and MappedRamHeader."""
        if self.layout is not None:
            raise ValueError("begin() called twice")
        if not blocks:
            raise ValueError("need at least one RAM block")
        names = [n for n, _ in blocks]
        if len(set(names)) != len(names):
            raise ValueError("duplicate RAM block names")
        layout = compute_layout(blocks, len(prefix), self.page_size)
        sink = self.reserve()
        try:
            self._pool = BufferPool(self._buffer_size, self._depth)
            self._jobs = queue.Queue()
            self._worker = threading.Thread(target=self._run, name="vmsnap-writer", daemon=True)
            self._worker.start()
            self._prefix = bytes(prefix)
            sink.truncate(layout.tail_offset)
            sink.pwrite_meta(0, self._prefix)
            for b in layout.blocks:
                sink.pwrite_meta(b.idstr_offset, b.record())
                self._blocks[b.name] = _BlockState(
                    b, np.zeros(b.npages, dtype=bool), np.zeros(b.npages, dtype=np.uint64)
                )
        except BaseException:
            self.abort()
            raise
        self.layout = layout
        return layout

    def _state(self, block: str) -> _BlockState:
        if self.layout is None or self.finished:
            raise ValueError("writer is not active (call begin() first)")
        try:
            return self._blocks[block]
        except KeyError:
            raise SnapshotError(f"unknown RAM block {block!r}") from None

    def _pages(self, st: _BlockState, offsets: npt.ArrayLike) -> np.ndarray:
        try:
            off = np.asarray(offsets, dtype=np.uint64)
        except (OverflowError, ValueError, TypeError):
            raise SnapshotError("page offsets must be non-negative integers") from None
        if off.ndim != 1:
            raise ValueError("offsets must be one-dimensional")
        if len(off) and (
            (off % np.uint64(self.page_size)).any() or off.max() >= st.layout.used_length
        ):
            raise SnapshotError(
                f"page offset not page aligned or beyond {st.layout.name!r} "
                f"(used_length {st.layout.used_length:#x})"
            )
        return (off // np.uint64(self.page_size)).astype(np.int64)

    def _note(self, st: _BlockState, pages: np.ndarray) -> None:
        if self.rewrites is not None and len(pages):
            self.rewrites.note(st.layout.name, st.layout.npages, pages)

    def write_pages(self, block: str, offsets: npt.ArrayLike, data: Buffer) -> None:
        """Write len(offsets) pages (`data` = n*page_size bytes, in offsets order) to their
        fixed file offsets; sets bitmap bits and records xxh3 of exactly what is written."""
        st = self._state(block)
        pages = self._pages(st, offsets)
        self._note(st, pages)
        ps = self.page_size
        mv = memoryview(data).cast("B")
        if mv.nbytes != len(pages) * ps:
            raise ValueError(f"data has {mv.nbytes} bytes for {len(pages)} pages")
        if not len(pages):
            return
        assert self._file is not None and self._pool is not None and self._jobs is not None
        self._check_error()
        src_aligned = buffer_address(mv) % ps == 0
        per_buf = self._pool.size // ps
        if src_aligned:
            self._drain()  # keep file order: earlier queued writes land first
        for i0 in range(0, len(pages), per_buf):
            chunk = pages[i0:i0 + per_buf]
            n = len(chunk)
            src = mv[i0 * ps:(i0 + n) * ps]
            buf = None
            if not src_aligned:
                buf = self._pool.acquire()
                buf.array[: n * ps] = np.frombuffer(src, dtype=np.uint8)
                src = buf.view[: n * ps]
            self._put(st, chunk, src, buf)

    def page_buffer(self) -> AlignedBuffer:
        """A free buffer of the writer's pool (waits while every one is being written), to
        fill with pages and hand to `write_buffer`."""
        if self._pool is None:
            raise ValueError("writer is not active (call begin() first)")
        self._check_error()
        return self._pool.acquire()

    def write_buffer(self, block: str, offsets: npt.ArrayLike, buf: AlignedBuffer,
                     sums: np.ndarray | None = None) -> None:
        """`write_pages` of the first len(offsets) pages of `buf` (from `page_buffer`),
        without a copy: the I/O thread writes them and returns `buf` to the pool. `sums`:
        the pages' xxh3 if the caller has already computed them from `buf`."""
        assert self._pool is not None
        try:
            st = self._state(block)
            pages = self._pages(st, offsets)
            self._note(st, pages)
            if len(pages) * self.page_size > buf.size:
                raise ValueError(f"{len(pages)} pages do not fit the buffer")
            if sums is not None and len(sums) != len(pages):
                raise ValueError(f"{len(sums)} checksums for {len(pages)} pages")
        except BaseException:
            self._pool.release(buf)
            raise
        if not len(pages):
            self._pool.release(buf)
            return
        self._put(st, pages, buf.view[:len(pages) * self.page_size], buf, sums)

    def _put(self, st: _BlockState, chunk: np.ndarray, src: memoryview,
             buf: AlignedBuffer | None, sums: np.ndarray | None = None) -> None:
        """Checksum pages `chunk` of `src` (unless `sums` has them) and write them: now if
        `buf` is None (the caller's memory, which it may reuse), else by the I/O thread
        (`buf` goes back to the pool after), overlapping the caller's next pages."""
        assert self._jobs is not None and self._pool is not None
        ps = self.page_size
        if sums is None:
            sums = page_checksums(src, ps)
        ios = [
            (st.layout.pages_offset + int(chunk[first]) * ps,
             src[first * ps:(first + count) * ps])
            for first, count in contiguous_runs(chunk)
        ]
        if buf is None:
            for foff, view in ios:
                self._write_run(foff, [view])
        else:
            try:
                self._check_error()
            except BaseException:
                self._pool.release(buf)
                raise
            self._jobs.put((ios, buf))
        with self._lock:
            st.present[chunk] = True
            st.sums[chunk] = sums  # duplicates: numpy keeps the last, as the file does
            self.bytes_written += len(chunk) * ps

    def write_aligned_pages(self, block: str, offsets: npt.ArrayLike, data: Buffer,
                            sums: np.ndarray | None = None) -> None:
        """Thread-safe variant of `write_pages` for page-aligned `data` (an AlignedBuffer
        view): checksums and `pwritev` (O_DIRECT) run in the calling thread straight from
        `data`, no copy; only the bitmap/checksum update is serialized. Several threads may
        call it at once (multifd channels); the caller orders writes of the same page.
        `sums`: the pages' xxh3 if the caller has already computed them from `data`."""
        self.write_aligned_set([AlignedPages(block, offsets, data, sums)])

    def write_aligned_set(self, parts: Sequence[AlignedPages]) -> None:
        """`write_aligned_pages` of several buffers at once. A page found more than once
        (QEMU 7.2 sends the last page of a multifd packet again as the first of the next)
        is written and checksummed from its last copy only, so runs that continue each
        other across buffers go out as one `pwritev`: a multifd channel's buffer holds 8
        packets, each starting with the page the previous one ended with, and channels
        hold every other packet of a range (8 MiB writes instead of 512 KiB ones)."""
        ps = self.page_size
        got: list[tuple[_BlockState, np.ndarray, memoryview, np.ndarray]] = []
        for part in parts:
            st = self._state(part.block)
            pages = self._pages(st, part.offsets)
            self._note(st, pages)
            mv = memoryview(part.data).cast("B")
            n = len(pages)
            if mv.nbytes != n * ps:
                raise ValueError(f"data has {mv.nbytes} bytes for {n} pages")
            if not n:
                continue
            if buffer_address(mv) % ps:
                raise ValueError("write_aligned_pages needs page-aligned memory")
            sums = page_checksums(mv, ps) if part.sums is None else part.sums
            if len(sums) != n:
                raise ValueError(f"{len(sums)} checksums for {n} pages")
            got.append((st, pages, mv, sums))
        runs: list[tuple[int, memoryview]] = []
        for (st, pages, mv, _), keep in zip(got, _last_copies(got), strict=True):
            base = st.layout.pages_offset
            runs += [(base + int(pages[first]) * ps, mv[first * ps:(first + count) * ps])
                     for first, count in _kept_runs(pages, keep)]
        self._check_error()
        for offset, views in _joined(runs):
            self._write_run(offset, views)
        with self._lock:
            for st, pages, _, sums in got:
                st.present[pages] = True
                st.sums[pages] = sums  # a page twice: numpy keeps the last, as the file does
                self.bytes_written += len(pages) * ps

    def _write_run(self, offset: int, views: list[memoryview]) -> None:
        """Write one run of pages (`views` back to back). Short runs (pages a live save sends
        again, scattered over RAM) go through the page cache: the commit's fsync writes them
        back sorted and many at a time, where O_DIRECT would wait for each 4 KiB write in
        turn (15k against 180k writes/s on this host's disk: a live save's final round took
        seconds)."""
        assert self._file is not None
        if sum(v.nbytes for v in views) >= SCATTERED_RUN:
            self._file.write_at(offset, views)
            return
        for view in views:
            self._file.pwrite_meta(offset, view)
            offset += view.nbytes

    def flush(self) -> None:
        """Wait until every queued page write has reached the file (raises its error)."""
        self._drain()

    # -- I/O thread ---------------------------------------------------------------------
    def _run(self) -> None:
        assert self._jobs is not None and self._pool is not None and self._file is not None
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                ios, buf = job
                try:
                    if self._error is None:
                        for foff, view in ios:
                            self._write_run(foff, [view])
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                    self._error = e
                finally:
                    self._pool.release(buf)
            finally:
                self._jobs.task_done()

    def _check_error(self) -> None:
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Make the next write or finish() raise, from any thread: whoever feeds this writer
        stops at its next page, with the file never committed."""
        if self._error is None:
            self._error = SnapshotError("the save was abandoned")

    def _drain(self) -> None:
        if self._jobs is not None:
            self._jobs.join()
        self._check_error()

    def _stop_worker(self) -> None:
        if self._worker is not None and self._jobs is not None:
            self._jobs.put(None)
            self._worker.join()
        self._worker = None

    def zero_pages(self, block: str, offsets: npt.ArrayLike) -> None:
        """Mark pages as zero: clear their bits and forget their checksums (no write)."""
        self._check_error()
        st = self._state(block)
        pages = self._pages(st, offsets)
        self._note(st, pages)
        with self._lock:
            st.present[pages] = False
            st.sums[pages] = 0

    def present(self, block: str) -> np.ndarray:
        return self._state(block).present.copy()

    def finish(self, tail: bytes) -> str:
        """Write bitmaps, the stream `tail` at the last block's end, the trailer; fsync and
        atomically rename FILE.partial to FILE. Returns the final path."""
        if self.layout is None or self.finished:
            raise ValueError("writer is not active")
        assert self._file is not None
        try:
            self._drain()
            f = self._file
            ranges: list[RangeChecksum] = []
            region_start = 0
            region = bytearray(self._prefix)
            checks = []
            for b in self.layout.blocks:
                st = self._blocks[b.name]
                bm = pack_bitmap(st.present)
                f.pwrite_meta(b.bitmap_offset, bm)
                region += b.record() + bm
                ranges.append(RangeChecksum(region_start, len(region), xxh3(region)))
                region_start, region = b.end, bytearray()
                checks.append(BlockChecksums(b.name, st.sums[st.present]))
            tail = bytes(tail)
            tail_off = self.layout.tail_offset
            f.pwrite_meta(tail_off, tail)
            ranges.append(RangeChecksum(tail_off, len(tail), xxh3(tail)))
            stream_end = tail_off + len(tail)
            off, trailer = encode_trailer(stream_end, self.metadata, checks, ranges,
                                         self.signing_key)
            f.pwrite_meta(off, trailer)
            f.truncate(off + len(trailer))
            f.commit()
        except BaseException:
            self.abort()
            raise
        self.finished = True
        self._cleanup()
        return self.path

    def abort(self) -> None:
        """Discard everything written (removes FILE.partial; FILE is untouched)."""
        self._stop_worker()
        if self._file is not None:
            self._file.abort()
        self._cleanup()

    def _cleanup(self) -> None:
        self._stop_worker()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.layout = None if not self.finished else self.layout

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.finished:
            self.abort()
