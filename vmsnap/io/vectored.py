"""Vectored writes: many buffers (record headers and page views) in few syscalls, no copy."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias, runtime_checkable

from ..lazy_numpy import np

#: Most buffers one writev/pwritev/preadv/sendmsg call takes (Linux: 1024).
try:
    IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError):  # pragma: no cover
    IOV_MAX = 1024

#: What vmsnap hands to memoryview(): bytes-likes and numpy arrays (page data).
Buffer: TypeAlias = "memoryview | bytes | bytearray | np.ndarray"


@runtime_checkable
class HasFileno(Protocol):
    def fileno(self) -> int: ...


def transfer_all(op: Callable[[list[memoryview], int], int], parts: Sequence[Buffer]) -> int:
    """Move every byte of `parts` with `op(views, done)`, which moves a prefix of `views`
    (at most IOV_MAX buffers; `done` bytes already moved) and returns how many bytes it
    moved: resumes partial transfers without copying. Returns the byte count."""
    pending = [memoryview(p).cast("B") for p in parts]
    total = i = 0
    while i < len(pending):
        n = op(pending[i:i + IOV_MAX], total)
        total += n
        while i < len(pending) and n >= pending[i].nbytes:
            n -= pending[i].nbytes
            i += 1
        if n:
            pending[i] = pending[i][n:]
    return total


def writev_all(fd: int, parts: Sequence[Buffer]) -> int:
    """Write every byte of `parts` to `fd` (pipe, socket or file), resuming partial writes."""
    return transfer_all(lambda views, _done: os.writev(fd, views), parts)


def widen_pipe(file: object, size: int = 1 << 20) -> None:
    """Grow the kernel buffer of a pipe (an fd or a file object; 64 KiB by default) so big
    writes/reads take fewer context switches; a no-op for anything else or if refused."""
    try:
        fd = file if isinstance(file, int) else file.fileno() if isinstance(file, HasFileno) \
            else None
        if fd is not None and stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        pass
