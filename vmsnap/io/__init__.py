"""I/O engine: page-aligned buffers, O_DIRECT files with buffered fallback, atomic files.

The names below load on first use (see vmsnap.exports): `vmsnap.io.madvise` and
`vmsnap.io.atomic` load without numpy."""

from typing import TYPE_CHECKING

from ..exports import load_export

#: public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("PAGE_SIZE", "AlignedBuffer", "BufferPool", "is_aligned"), ".aligned"),
    **dict.fromkeys(("AtomicFile", "FileLockedError"), ".atomic"),
    **dict.fromkeys(("DirectFile", "IOEngineError"), ".direct"),
}

if TYPE_CHECKING:
    from .aligned import PAGE_SIZE, AlignedBuffer, BufferPool, is_aligned
    from .atomic import AtomicFile, FileLockedError
    from .direct import DirectFile, IOEngineError


def __getattr__(name: str) -> object:
    return load_export(__name__, _EXPORTS, globals(), name)


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
