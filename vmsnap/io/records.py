"""Read runs of fixed-size records (an 8-byte header, then a page) straight into place.

Headers land in one small array, pages in the page slots of an aligned buffer, with one
`readv` per batch: the pages are never copied again before their O_DIRECT write. Each
batch's pages are checksummed right after the `readv`, while they are still in the CPU's
cache. What the headers mean is the caller's business (`check`); reading stops at the
first one it rejects, and the bytes read past the accepted records are handed back.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Callable

import numpy as np
import xxhash

from .aligned import AlignedBuffer
from .sockets import BATCH, BatchedReader

HEADER = 8
#: iovecs per readv (the kernel's IOV_MAX)
IOVECS = 1024


class PageRecordReader:
    """Reads up to `slots` records of `page_size` pages from `fd` per `read`."""

    def __init__(self, fd: int, page_size: int, slots: int, wait: float = 0.0) -> None:
        self.fd = fd
        #: a read shorter than BATCH sleeps this long before the next (see BatchedReader)
        self.wait = wait
        self.page_size = page_size
        self.slots = slots
        self.headers = np.zeros(slots, dtype=">u8")
        #: xxh3_64 of the pages of the records `read` accepted, in the same order
        self.sums = np.zeros(slots, dtype=np.uint64)
        hv = memoryview(self.headers).cast("B")
        self._hviews = [hv[i * HEADER:(i + 1) * HEADER] for i in range(slots)]
        #: per pool buffer: [header 0, page 0, header 1, page 1, ...] and [page 0, page 1,
        #: ...] (the buffer is a key so that its id is never reused while its views are cached)
        self._iovs: dict[AlignedBuffer, tuple[list[memoryview], list[memoryview]]] = {}
        self._rest: np.ndarray | None = None  # what `_gather` returns

    @classmethod
    def of(cls, source: object, page_size: int, slots: int) -> PageRecordReader | None:
        """A reader of the descriptor under `source` if reading it directly skips nothing:
        a blocking socket's SocketIO or an unbuffered file (a buffered one may hold bytes).
        A BatchedReader's reads are batched the same way."""
        if isinstance(source, socket.SocketIO):
            sock = getattr(source, "_sock", None)
            if isinstance(sock, socket.socket) and sock.gettimeout() is None:
                wait = source.wait if isinstance(source, BatchedReader) else 0.0
                return cls(sock.fileno(), page_size, slots, wait)
        elif isinstance(source, io.FileIO) and not source.closed:
            return cls(source.fileno(), page_size, slots)
        return None

    def _views(self, buf: AlignedBuffer) -> tuple[list[memoryview], list[memoryview]]:
        """The iovecs of `buf`'s records and its page views."""
        got = self._iovs.get(buf)
        if got is None:
            ps = self.page_size
            pages = [buf.view[i * ps:(i + 1) * ps] for i in range(self.slots)]
            views: list[memoryview] = []
            for hv, page in zip(self._hviews, pages, strict=True):
                views += (hv, page)
            got = self._iovs[buf] = (views, pages)
        return got

    def close(self) -> None:
        """Drop the cached views (the pool may unmap its buffers)."""
        for _, pages in self._iovs.values():
            for v in pages:
                v.release()
        self._iovs.clear()

    @property
    def capacity(self) -> int:
        """Bytes of records one `read` holds."""
        return self.slots * (HEADER + self.page_size)

    def read(self, buf: AlignedBuffer, prefix: bytes | memoryview,
             check: Callable[[np.ndarray], int]) -> tuple[int, memoryview]:
        """Fill `buf` with up to `slots` records whose first `prefix` bytes (at most
        `capacity`) were read elsewhere. `check(headers)` says how many of the new complete
        headers, from the first, to accept. Returns (records accepted and complete, bytes
        read after them, valid until the next `read`); fewer than `slots` at a rejected
        header or at end of input. `sums` holds the accepted records' page checksums."""
        stride = HEADER + self.page_size
        views, pages = self._views(buf)
        end = self.capacity
        pos = len(prefix)
        if pos > end:
            raise ValueError("prefix longer than the buffer")
        self._place(buf, prefix)
        good, summed, stop = self._take(pages, 0, 0, pos, check)
        while not stop and pos < end:
            i, r = divmod(pos, stride)
            j = 2 * i + (r >= HEADER)
            first = views[j][r - HEADER if r >= HEADER else r:]
            n = os.readv(self.fd, [first, *views[j + 1:j + IOVECS]])
            if not n:
                break
            pos += n
            good, summed, stop = self._take(pages, good, summed, pos, check)
            if not stop and n < BATCH and pos < end and self.wait >= 1e-4:
                time.sleep(self.wait)  # let more come: fewer, longer reads
        full = min(good, pos // stride)
        self._sum(pages, summed, full)
        return full, self._gather(buf, full * stride, pos)

    def _take(self, pages: list[memoryview], good: int, summed: int, pos: int,
              check: Callable[[np.ndarray], int]) -> tuple[int, int, bool]:
        """With `pos` bytes of records in place: check the new complete headers and
        checksum the new complete pages of accepted records. Returns (headers accepted,
        pages checksummed, whether a header was rejected)."""
        stride = HEADER + self.page_size
        done = min(self.slots, (pos - HEADER) // stride + 1) if pos >= HEADER else 0
        if done > good:
            good += check(self.headers[good:done])
            if good < done:
                return good, summed, True
        return good, self._sum(pages, summed, min(good, pos // stride)), False

    def _sum(self, pages: list[memoryview], start: int, stop: int) -> int:
        """Checksum pages [start, stop) into `sums`; returns `stop`."""
        if stop > start:
            self.sums[start:stop] = np.fromiter(map(xxhash.xxh3_64_intdigest, pages[start:stop]),
                                                dtype=np.uint64, count=stop - start)
        return max(start, stop)

    def _place(self, buf: AlignedBuffer, data: bytes | memoryview) -> None:
        """Copy `data` (records read elsewhere) to where `readv` would have put them."""
        ps, stride = self.page_size, HEADER + self.page_size
        k, tail = divmod(len(data), stride)
        src = np.frombuffer(data, dtype=np.uint8)
        if k:
            recs = src[:k * stride].reshape(k, stride)
            self.headers[:k].view(np.uint8).reshape(k, HEADER)[...] = recs[:, :HEADER]
            buf.array[:k * ps].reshape(k, ps)[...] = recs[:, HEADER:]
        if tail:
            rest = src[k * stride:]
            h = min(HEADER, tail)
            self.headers[k:k + 1].view(np.uint8)[:h] = rest[:h]
            buf.array[k * ps:k * ps + tail - h] = rest[h:]

    def _gather(self, buf: AlignedBuffer, start: int, stop: int) -> memoryview:
        """The record bytes in [start, stop) in stream order (in memory the reader keeps:
        a stream section ends every few MiB, with a MiB or two read past it)."""
        stride = HEADER + self.page_size
        first, last = start // stride, -(-stop // stride)
        if first >= last:
            return memoryview(b"")
        if self._rest is None:
            self._rest = np.empty(self.capacity, dtype=np.uint8)
        recs = self._rest[:(last - first) * stride].reshape(-1, stride)
        recs[:, :HEADER] = self.headers[first:last, None].view(np.uint8)
        recs[:, HEADER:] = buf.array[first * self.page_size:last * self.page_size].reshape(
            -1, self.page_size)
        at = first * stride
        return memoryview(self._rest)[start - at:stop - at]
