"""What of a file the page cache holds: drop it (a cold read next), ask which pages are in."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def evict(path: str | Path) -> None:
    """Drop one file's pages from the page cache, so its next read is cold while the
    programs reading it (Python, QEMU) stay warm."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached(path: str | Path, offset: int, npages: int) -> np.ndarray:
    """Which of the `npages` 4 KiB pages of `path` from `offset` (page aligned) are in the
    page cache (mincore on a mapping of the file; nothing is read)."""
    vec = np.zeros(npages, np.uint8)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), offset + npages * mmap.PAGESIZE, access=mmap.ACCESS_COPY)
    try:
        view = ctypes.c_char.from_buffer(m)
        try:
            if _libc.mincore(ctypes.addressof(view) + offset, npages * mmap.PAGESIZE,
                             vec.ctypes.data):
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del view
    finally:
        m.close()
    return (vec & 1).astype(bool)
