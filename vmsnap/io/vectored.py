"""Vectored writes: many buffers (record headers and page views) in few syscalls, no copy."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Sequence

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def writev_all(fd: int, parts: Sequence[memoryview | bytes]) -> int:
    """Write every byte of `parts` to `fd` (pipe, socket or file), resuming partial writes."""
    total = 0
    i = 0
    pending = [memoryview(p).cast("B") for p in parts]
    while i < len(pending):
        n = os.writev(fd, pending[i:i + IOV_MAX])
        total += n
        while i < len(pending) and n >= pending[i].nbytes:
            n -= pending[i].nbytes
            i += 1
        if n:
            pending[i] = pending[i][n:]
    return total


def widen_pipe(file, size: int = 1 << 20) -> None:
    """Grow the kernel buffer of a pipe (an fd or a file object; 64 KiB by default) so big
    writes/reads take fewer context switches; a no-op for anything else or if refused."""
    try:
        fd = file if isinstance(file, int) else file.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (AttributeError, OSError, ValueError):
        pass
