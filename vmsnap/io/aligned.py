"""Page-aligned buffers backed by anonymous mmap, and a bounded pool of them."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..lazy_numpy import np
from .vectored import Buffer

PAGE_SIZE = 4096


def buffer_address(buf: Buffer) -> int:
    """Address of the first byte of a buffer-protocol object (readonly allowed)."""
    mv = memoryview(buf)
    if mv.nbytes == 0:
        return 0
    return np.frombuffer(mv.cast("B"), dtype=np.uint8).ctypes.data


def is_aligned(buf: Buffer, alignment: int = PAGE_SIZE) -> bool:
    """True if the buffer starts on an `alignment` boundary and its size is a multiple of it."""
    mv = memoryview(buf)
    return mv.nbytes % alignment == 0 and buffer_address(mv) % alignment == 0


class AlignedBuffer:
    """`size` bytes (rounded up to a page) of page-aligned, zero-initialised memory.

    `view` is a writable memoryview, `array` a numpy uint8 view of the same memory.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("buffer size must be positive")
        self.size = -(-size // PAGE_SIZE) * PAGE_SIZE
        self._mmap = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._mmap)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        if self._mmap is None:
            return
        self.array = None  # type: ignore[assignment]
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:  # someone still holds a view; let GC unmap it
            pass
        self._mmap = None  # type: ignore[assignment]

    def __enter__(self) -> AlignedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BufferPool:
    """A bounded pool of `count` AlignedBuffers of `size` bytes each (thread safe).

    `acquire()` blocks while all buffers are in use; use `with pool.buffer() as buf:`.
    """

    def __init__(self, size: int, count: int) -> None:
        if count <= 0:
            raise ValueError("pool needs at least one buffer")
        self.size = -(-size // PAGE_SIZE) * PAGE_SIZE
        self.count = count
        self._free = [AlignedBuffer(self.size) for _ in range(count)]
        self._all = list(self._free)
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, timeout: float | None = None) -> AlignedBuffer:
        with self._cond:
            if not self._cond.wait_for(lambda: self._free or self._closed, timeout):
                raise TimeoutError("no free buffer in pool")
            if self._closed:
                raise ValueError("buffer pool is closed")
            return self._free.pop()

    def release(self, buf: AlignedBuffer) -> None:
        with self._cond:
            if buf not in self._all:
                raise ValueError("buffer does not belong to this pool")
            if any(b is buf for b in self._free):
                raise ValueError("buffer released twice")
            self._free.append(buf)
            self._cond.notify()

    @contextmanager
    def buffer(self, timeout: float | None = None) -> Iterator[AlignedBuffer]:
        buf = self.acquire(timeout)
        try:
            yield buf
        finally:
            self.release(buf)

    @property
    def available(self) -> int:
        with self._cond:
            return len(self._free)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for b in self._all:
                b.close()
            self._free.clear()
            self._cond.notify_all()

    def __enter__(self) -> BufferPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
