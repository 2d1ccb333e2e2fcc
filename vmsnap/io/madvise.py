"""madvise advice that Python 3.11's mmap module lacks: MADV_POPULATE_READ and
MADV_POPULATE_WRITE (Linux >= 5.14) fault a whole range of a mapping in with one call.

Standard library only: the check that QEMU can populate a lazily restored guest's RAM
(orchestration.populate) runs before QEMU starts, ahead of numpy."""

from __future__ import annotations

import mmap

MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23


def fault_in(m: mmap.mmap, advice: int, start: int = 0, length: int = 0) -> bool:
    """Fault in `length` bytes of `m` from `start` (0: to its end) at once, `advice`
    MADV_POPULATE_READ or _WRITE; False where the kernel refuses (older than 5.14: the
    pages then fault in as they are touched)."""
    try:
        m.madvise(advice, start, length)
    except OSError:
        return False
    return True
