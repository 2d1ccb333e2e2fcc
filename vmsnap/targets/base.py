"""The seam between the snapshot format and where its bytes live.

A snapshot is one address space of bytes at fixed offsets (header, bitmaps, page areas,
device state, trailer). `SnapshotWriter` and `open_snapshot` only need positional I/O on it,
so a target is anything that offers these few calls: a local file (O_DIRECT `pwritev`), an
RBD image (same offsets in a thin image) or S3 objects (fixed-size chunks + a manifest).
"""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from ..errors import VmsnapError
from ..io.direct import IOEngineError
from ..io.vectored import Buffer


class TargetError(VmsnapError, OSError):
    """A target cannot be reached or used (bad URL, credentials, missing pool or bucket)."""

    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


class PageSink(Protocol):
    """Where `SnapshotWriter` writes. Created exclusive to one writer (a second one fails with
    FileLockedError); nothing is visible at the final name before `commit`."""

    name: str
    direct: bool
    fallback_reason: str | None

    def write_at(self, offset: int, bufs: Sequence[Buffer]) -> int:
        """Write `bufs` contiguously at `offset`; thread-safe (multifd channels share it).
        The caller may reuse `bufs` once it returns."""

    def pwrite_meta(self, offset: int, data: Buffer) -> int:
        """Write unaligned metadata bytes at `offset`."""

    def truncate(self, length: int) -> None:
        """Set the size; bytes never written read as zeros (holes)."""

    def commit(self) -> None:
        """Make everything durable, then publish it atomically under the final name."""

    def abort(self) -> None:
        """Discard what was written; the previous snapshot stays as it was (idempotent)."""


class PageSource(Protocol):
    """What `open_snapshot` reads from."""

    direct: bool
    fallback_reason: str | None

    def size(self) -> int: ...

    def allocated(self) -> int:
        """Bytes actually stored (bounds what a hostile header may claim)."""

    def read_into(self, offset: int, bufs: Sequence[Buffer]) -> int:
        """Fill `bufs` from `offset` (IOEngineError, naming the bytes, if they are missing)."""

    def read_urgent(self, offset: int, bufs: Sequence[Buffer]) -> int:
        """`read_into` for a read someone waits on (a lazy restore's page request): the
        fewest bytes and round trips, ahead of any read-ahead."""

    def pread_meta(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


def pieces(offset: int, bufs: Sequence[Buffer], unit: int) -> Iterator[tuple[int, memoryview]]:
    """Split a contiguous write/read of `bufs` at `offset` into (offset, view) pieces that do
    not cross a multiple of `unit` (an RBD object, an S3 chunk)."""
    for b in bufs:
        mv = memoryview(b).cast("B")
        while mv.nbytes:
            n = min(mv.nbytes, unit - offset % unit)
            yield offset, mv[:n]
            offset += n
            mv = mv[n:]


class RangeReader:
    """Positional reads from a remote store through `fetch(offset, view)` (one ranged GET or
    RBD read), BLOCK-aligned and in parallel. Whole blocks go straight into the caller's
    buffer; a smaller read (a run of one page among zero pages) fetches its whole block and
    the next `ahead` ones into a small LRU cache, so scattered pages in address order cost one
    round trip per block, not one per page."""

    BLOCK = 1 << 20
    direct = False
    fallback_reason: str | None = "remote store"

    def __init__(self, name: str, size: int, fetch: Callable[[int, memoryview], None], *,
                 threads: int = 8, keep: int = 32, ahead: int = 8) -> None:
        self.name = name
        self.size_bytes = size
        self._fetch = fetch
        self._keep, self._ahead = keep, ahead
        self._nblocks = -(-size // self.BLOCK)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vmsnap-range")
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, Future[bytearray]] = OrderedDict()

    def _whole(self, start: int, n: int) -> bytearray:
        buf = bytearray(n)
        self._fetch(start, memoryview(buf))
        return buf

    def _block(self, k: int) -> Future[bytearray]:
        """The cached fetch of block `k` (lock held), started if missing."""
        fut = self._blocks.get(k)
        if fut is None:
            start = k * self.BLOCK
            fut = self._pool.submit(self._whole, start, min(self.BLOCK, self.size_bytes - start))
            self._blocks[k] = fut
            while len(self._blocks) > self._keep:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(k)
        return fut

    def read_into(self, offset: int, bufs: Sequence[Buffer]) -> int:
        direct: list[Future[None]] = []
        cached: list[tuple[Future[bytearray], int, memoryview]] = []
        total = 0
        with self._lock:
            for off, view in pieces(offset, bufs, self.BLOCK):
                self._check_end(off, view.nbytes)
                k, at = divmod(off, self.BLOCK)
                total += view.nbytes
                if view.nbytes == self.BLOCK and k not in self._blocks:
                    direct.append(self._pool.submit(self._fetch, off, view))
                    continue
                cached.append((self._block(k), at, view))
                for j in range(k + 1, min(k + 1 + self._ahead, self._nblocks)):
                    if j not in self._blocks:
                        self._block(j)
        for fut in direct:
            fut.result()
        for block, at, view in cached:
            view[:] = block.result()[at:at + view.nbytes]
        return total

    def read_urgent(self, offset: int, bufs: Sequence[Buffer]) -> int:
        """Pieces whose block is already fetched come from the cache; the others are fetched
        exactly (no whole block, no read-ahead) in the caller's thread, so a page request
        never queues behind the pool's read-ahead."""
        total = 0
        for off, view in pieces(offset, bufs, self.BLOCK):
            self._check_end(off, view.nbytes)
            k, at = divmod(off, self.BLOCK)
            with self._lock:
                fut = self._blocks.get(k)
            if fut is not None and fut.done() and fut.exception() is None:
                view[:] = fut.result()[at:at + view.nbytes]
            else:
                self._fetch(off, view)
            total += view.nbytes
        return total

    def _check_end(self, off: int, n: int) -> None:
        if off + n > self.size_bytes:
            raise IOEngineError(errno.EIO, f"{self.name}: read of {n} bytes at {off:#x} is "
                                f"beyond the end ({self.size_bytes:#x})")

    def size(self) -> int:
        return self.size_bytes

    def allocated(self) -> int:
        return self.size_bytes

    def pread_meta(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        if length:
            self.read_into(offset, [buf])
        return bytes(buf)

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
