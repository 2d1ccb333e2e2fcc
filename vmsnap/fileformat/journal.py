"""The seal journal: how a committed file gets its trailer replaced without a moment in which
a crash leaves it unreadable.

`vmsnap seal` replaces a trailer in place (a QEMU-native file gets one, a file committed with
pending page checksums gets the full one). Before it touches FILE it writes FILE.seal, the
new trailer's bytes and where they go (u64 little-endian file offset, then the bytes), and
fsyncs it; then it writes the trailer into FILE, fsyncs, and removes the journal. A reader
that finds FILE's own trailer unreadable reads FILE as the seal leaves it: the stream from
FILE (a seal never touches it), the trailer from the journal. Local files only.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from ..io.direct import pwritev_all
from .errors import SnapshotError
from .trailer import COMMIT_SIZE, TRAILER_ALIGN, max_body_length, read_trailer

SUFFIX = ".seal"
_OFFSET = struct.Struct("<Q")

Pread = Callable[[int, int], bytes]


def journal_path(path: str) -> str:
    return path + SUFFIX


def replace_trailer(path: str, offset: int, trailer: bytes) -> None:
    """Write `trailer` at `offset` of `path` (and cut the file there), journaled. A journal
    that cannot be written whole (a full disk) is removed and `path` left as it was."""
    jpath = journal_path(path)
    fd = os.open(jpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        pwritev_all(fd, [_OFFSET.pack(offset), trailer], 0)
        os.fsync(fd)
    except OSError as err:
        os.unlink(jpath)
        raise SnapshotError(f"{jpath}: {err.strerror}: {path} is left as it was") from None
    finally:
        os.close(fd)
    _fsync_dir(jpath)
    _apply(path, offset, trailer)


def finish(path: str) -> bool:
    """Complete the seal a crash interrupted (its journal is there and holds a valid trailer
    for this file); False if there was none."""
    if not os.path.lexists(journal_path(path)):
        return False
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        entry = _read(path, size)
        if entry is None:
            raise SnapshotError(f"{journal_path(path)} is not a seal journal of {path}")
        # CorruptTrailer if the journal's trailer is not whole: the bytes checked are the
        # bytes applied
        read_trailer(*_laid_over(lambda off, n: os.pread(f.fileno(), n, off), *entry))
    _apply(path, *entry)
    return True


def _apply(path: str, offset: int, trailer: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:  # the journal stays until the trailer is in whole: a reader reads through it
        pwritev_all(fd, [trailer], offset)
        os.ftruncate(fd, offset + len(trailer))
        os.fsync(fd)
    except OSError as err:
        raise SnapshotError(f"{path}: {err.strerror} while its trailer was replaced: it reads "
                            f"through {journal_path(path)}, and `vmsnap seal` completes it "
                            "once there is room") from None
    finally:
        os.close(fd)
    jpath = journal_path(path)
    os.unlink(jpath)
    _fsync_dir(jpath)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def overlay(path: str, pread: Pread, size: int) -> tuple[Pread, int] | None:
    """(pread, size) of `path` as an interrupted seal leaves it, from its journal; None if
    there is no usable journal. The journal's trailer is validated by the caller, as any."""
    entry = _read(path, size)
    return None if entry is None else _laid_over(pread, *entry)


def _read(path: str, size: int) -> tuple[int, bytes] | None:
    """(file offset, trailer bytes) of the journal of `path` (a file of `size` bytes), read
    once and bounded by what a trailer for that file can be; None if unusable."""
    limit = _OFFSET.size + max_body_length(size) + COMMIT_SIZE
    try:
        with open(journal_path(path), "rb") as j:
            data = j.read(limit + 1)
    except OSError:
        return None
    if not _OFFSET.size + COMMIT_SIZE <= len(data) <= limit:
        return None
    (offset,) = _OFFSET.unpack_from(data)
    if offset % TRAILER_ALIGN or offset > -(-size // TRAILER_ALIGN) * TRAILER_ALIGN:
        return None
    return offset, data[_OFFSET.size:]


def _laid_over(pread: Pread, offset: int, trailer: bytes) -> tuple[Pread, int]:
    """(pread, size) of a file whose bytes from `offset` on are `trailer`."""
    end = offset + len(trailer)

    def pread_overlaid(off: int, n: int) -> bytes:
        if off < 0 or n < 0 or off + n > end:
            return pread(off, n)  # out of range: the file's own reader says so
        if off + n <= offset:
            return pread(off, n)
        head = pread(off, offset - off) if off < offset else b""
        return head + trailer[max(off, offset) - offset:off + n - offset]

    return pread_overlaid, end
