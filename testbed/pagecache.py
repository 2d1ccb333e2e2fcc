"""What of a file the page cache holds: drop it (a cold read next), ask which pages are in,
and how a process maps it (shared page-cache pages or private copies)."""

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


def mapped(pid: int, path: str | Path) -> dict[str, int]:
    """Bytes of `path` (matched by device and inode) that process `pid` maps, summed over
    its mappings of it, by /proc/PID/smaps field: "Rss", "Anonymous" (private copies, e.g.
    copy-on-write pages of a MAP_PRIVATE mapping), "Shared_Clean", "Private_Clean", ..."""
    st = os.stat(path)
    want = (f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", str(st.st_ino))
    total: dict[str, int] = {}
    ours = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                ours = (head[3], head[4]) == want
            elif ours and len(head) == 3 and head[2] == "kB":
                total[head[0].rstrip(":")] = total.get(head[0].rstrip(":"), 0) + int(head[1]) * 1024
    return total
