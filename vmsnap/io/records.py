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

    def read(self, buf: AlignedBuffer, prefix: bytes,
             check: Callable[[np.ndarray], int]) -> tuple[int, bytes]:
        """Fill `buf` with up to `slots` records whose first `prefix` bytes were read
        elsewhere. `check(headers)` says how many of the new complete headers, from the
        first, to accept. Returns (records accepted and complete, bytes read after them);
        fewer than `slots` at a rejected header or at end of input. `sums` holds the
        accepted records' page checksums."""
        stride = HEADER + self.page_size
        views, pages = self._views(buf)
        end = self.slots * stride
        pos = len(prefix)
        if pos >= stride:
            raise ValueError("prefix longer than one record")
        self._place(buf, prefix)
        good = 0  # headers accepted
        summed = 0  # pages checksummed
        while pos < end:
            i, r = divmod(pos, stride)
            j = 2 * i + (r >= HEADER)
            first = views[j][r - HEADER if r >= HEADER else r:]
            n = os.readv(self.fd, [first, *views[j + 1:j + IOVECS]])
            if not n:
                break
            pos += n
            done = min(self.slots, (pos - HEADER) // stride + 1) if pos >= HEADER else 0
            if done > good:
                good += check(self.headers[good:done])
                if good < done:
                    break
            summed = self._sum(pages, summed, min(good, pos // stride))
            if n < BATCH and pos < end and self.wait >= 1e-4:
                time.sleep(self.wait)  # let more come: fewer, longer reads
        full = min(good, pos // stride)
        self._sum(pages, summed, full)
        return full, self._gather(buf, full * stride, pos)

    def _sum(self, pages: list[memoryview], start: int, stop: int) -> int:
        """Checksum pages [start, stop) into `sums`; returns `stop`."""
        if stop > start:
            self.sums[start:stop] = np.fromiter(map(xxhash.xxh3_64_intdigest, pages[start:stop]),
                                                dtype=np.uint64, count=stop - start)
        return max(start, stop)

    def _place(self, buf: AlignedBuffer, data: bytes) -> None:
        """Copy `data` (a record's first bytes) to where record 0 would have put it."""
        h = min(HEADER, len(data))
        self._hviews[0][:h] = data[:h]
        buf.view[:len(data) - h] = data[h:]

    def _gather(self, buf: AlignedBuffer, start: int, stop: int) -> bytes:
        """The record bytes in [start, stop) in stream order."""
        stride = HEADER + self.page_size
        hb = memoryview(self.headers).cast("B")
        out = bytearray()
        while start < stop:
            i, r = divmod(start, stride)
            if r < HEADER:
                take = min(HEADER - r, stop - start)
                out += hb[i * HEADER + r:i * HEADER + r + take]
            else:
                take = min(stride - r, stop - start)
                at = i * self.page_size + r - HEADER
                out += buf.view[at:at + take]
            start += take
        return bytes(out)
