"""I/O engine: page-aligned buffers, O_DIRECT files with buffered fallback, atomic files."""

from .aligned import PAGE_SIZE, AlignedBuffer, BufferPool, is_aligned
from .atomic import AtomicFile, FileLockedError
from .direct import DirectFile, IOEngineError

__all__ = [
    "PAGE_SIZE",
    "AlignedBuffer",
    "BufferPool",
    "is_aligned",
    "AtomicFile",
    "FileLockedError",
    "DirectFile",
    "IOEngineError",
]
