"""O_DIRECT file access with a buffered fallback, and coalesced pwritev/preadv helpers.

A `DirectFile` holds two descriptors on the same file:

* `fd`      – opened with O_DIRECT when the filesystem allows it (page data: aligned
              buffers, page-aligned offsets and lengths);
* `meta_fd` – an ordinary buffered descriptor for unaligned metadata (stream bytes,
              bitmaps, trailer).

If the filesystem refuses O_DIRECT (EINVAL at open or at the first I/O), the data
descriptor is reopened buffered and `posix_fadvise(POSIX_FADV_DONTNEED)` is issued after
data writes/reads so a snapshot does not evict the page cache. `direct` tells which mode
is active and `fallback_reason` why; the fallback is logged once.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence

from ..errors import VmsnapError
from .aligned import PAGE_SIZE, buffer_address
from .vectored import IOV_MAX, Buffer, transfer_all

log = logging.getLogger(__name__)

#: Upper bound for one pwritev/preadv call (bytes); IOV_MAX bounds its iovec count.
MAX_IO_BYTES = 8 << 20


class IOEngineError(VmsnapError, OSError):
    """I/O failed in a way the engine cannot repair (short read at EOF, zero-byte write)."""


def _aligned_io(offset: int, bufs: Sequence[memoryview], alignment: int) -> bool:
    if offset % alignment:
        return False
    for b in bufs:
        if b.nbytes % alignment or buffer_address(b) % alignment:
            return False
    return True


def _chunks(bufs: Sequence[memoryview]) -> Iterator[list[memoryview]]:
    """Group buffers into lists that respect IOV_MAX and MAX_IO_BYTES (a single larger
    buffer is split)."""
    group: list[memoryview] = []
    size = 0
    for b in bufs:
        while b.nbytes:
            room = MAX_IO_BYTES - size
            piece = b[:room] if b.nbytes > room else b
            b = b[piece.nbytes:]
            group.append(piece)
            size += piece.nbytes
            if size >= MAX_IO_BYTES or len(group) >= IOV_MAX:
                yield group
                group, size = [], 0
    if group:
        yield group


def pwritev_all(fd: int, bufs: Sequence[Buffer], offset: int) -> int:
    """Write all buffers contiguously at `offset`; handles partial writes. Returns bytes."""
    total = 0
    for group in _chunks([memoryview(b).cast("B") for b in bufs]):
        def pwritev(views: list[memoryview], done: int, start: int = offset + total) -> int:
            n = os.pwritev(fd, views, start + done)
            if n <= 0:
                raise IOEngineError(errno.EIO, f"pwritev wrote {n} bytes at {start + done}")
            return n
        total += transfer_all(pwritev, group)
    return total


def preadv_all(fd: int, bufs: Sequence[Buffer], offset: int) -> int:
    """Fill all buffers from `offset`; handles partial reads; EOF before the end is an error."""
    total = 0
    views = [memoryview(b).cast("B") for b in bufs]
    for v in views:
        if v.readonly:
            raise ValueError("preadv target buffer is read-only")
    for group in _chunks(views):
        want = sum(v.nbytes for v in group)

        def preadv(views: list[memoryview], done: int, start: int = offset + total,
                   want: int = want) -> int:
            n = os.preadv(fd, views, start + done)
            if n == 0:
                raise IOEngineError(errno.EIO, f"unexpected end of file at offset {start + done:#x}"
                                               f" (wanted {want - done} more bytes)")
            return n
        total += transfer_all(preadv, group)
    return total


class DirectFile:
    """A file opened for page I/O (O_DIRECT if possible) plus a buffered metadata fd.

    `path` must exist unless `create=True`. `writable` opens read-write.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        create: bool = False,
        direct: bool = True,
        alignment: int = PAGE_SIZE,
    ) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self.alignment = alignment
        self.direct = False
        self.fallback_reason: str | None = None
        self._warned = False
        base = os.O_RDWR if writable else os.O_RDONLY
        base |= os.O_CLOEXEC
        if create:
            base |= os.O_CREAT
        # O_NONBLOCK: opening a FIFO must not wait for a writer (no effect on files)
        self.meta_fd = os.open(self.path, base | os.O_NONBLOCK, 0o600)
        mode = os.fstat(self.meta_fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(self.meta_fd)
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory", self.path)
            raise OSError(errno.EINVAL, "Not a regular file", self.path)
        self._base_flags = base & ~os.O_CREAT
        self.fd = -1
        try:
            if direct and hasattr(os, "O_DIRECT"):
                try:
                    self.fd = self.reopen(self._base_flags | os.O_DIRECT)
                    self.direct = True
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self._fall_back(f"O_DIRECT refused at open: {e.strerror}")
            else:
                self._fall_back("O_DIRECT not requested" if not direct
                                else "O_DIRECT unsupported on this platform", quiet=not direct)
        except BaseException:
            os.close(self.meta_fd)
            raise

    def reopen(self, flags: int) -> int:
        """A new descriptor (open flags `flags`) on this very file, never on whatever its
        path names by now: through /proc/self/fd, which reopens the inode."""
        return os.open(f"/proc/self/fd/{self.meta_fd}", flags | os.O_CLOEXEC)

    # -- mode handling -------------------------------------------------------------
    def _fall_back(self, reason: str, quiet: bool = False) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = self.reopen(self._base_flags)
        self.direct = False
        self.fallback_reason = reason
        if not quiet and not self._warned:
            self._warned = True
            log.warning("%s: using buffered I/O + fadvise(DONTNEED): %s", self.path, reason)

    def _dontneed(self, offset: int, length: int) -> None:
        if not self.direct and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
            except OSError:  # pragma: no cover - advisory only
                pass

    # -- page data ------------------------------------------------------------------
    def write_at(self, offset: int, bufs: Sequence[Buffer], *, dontneed: bool = True) -> int:
        """Write `bufs` contiguously at `offset` with coalesced pwritev calls.

        With O_DIRECT, unaligned requests (offset, length or memory) go through the
        buffered descriptor instead.
        """
        return self._vectored(pwritev_all, "write", offset, bufs, dontneed)

    def read_into(self, offset: int, bufs: Sequence[Buffer], *, dontneed: bool = True) -> int:
        """Fill `bufs` from `offset` with coalesced preadv calls (EOF is an error)."""
        return self._vectored(preadv_all, "read", offset, bufs, dontneed)

    def _vectored(self, transfer: Callable[[int, Sequence[Buffer], int], int], what: str,
                  offset: int, bufs: Sequence[Buffer], dontneed: bool) -> int:
        """`transfer` (pwritev_all or preadv_all) of `bufs` at `offset`: on the O_DIRECT fd
        when the request is aligned, else on the buffered one; a filesystem that refuses
        O_DIRECT (EINVAL) turns this file buffered for good and the request is retried."""
        views = [memoryview(b).cast("B") for b in bufs]
        fd = self.fd
        if self.direct and not _aligned_io(offset, views, self.alignment):
            fd = self.meta_fd
        try:
            n = transfer(fd, views, offset)
        except OSError as e:
            if not (self.direct and fd == self.fd and e.errno == errno.EINVAL):
                raise
            self._fall_back(f"O_DIRECT {what} refused: {e.strerror}")
            n = transfer(self.fd, views, offset)
        if dontneed and fd == self.fd:
            self._dontneed(offset, n)
        return n

    def read_urgent(self, offset: int, bufs: Sequence[Buffer]) -> int:
        """A read someone waits on (targets.PageSource): a file has no faster way."""
        return self.read_into(offset, bufs)

    def prefetch(self, offset: int, length: int) -> None:
        """Have the kernel start reading these bytes into the page cache and return at once
        (readahead: many such reads are in flight together, where O_DIRECT reads of
        scattered pages go one at a time per thread), for read_cached."""
        os.posix_fadvise(self.meta_fd, offset, length, os.POSIX_FADV_WILLNEED)

    def read_cached(self, offset: int, bufs: Sequence[Buffer], *, keep: bool = False) -> int:
        """Read through the page cache (what prefetch brought in), dropped from it after
        unless `keep` (a file a guest maps: its first touches find the pages there)."""
        n = preadv_all(self.meta_fd, [memoryview(b).cast("B") for b in bufs], offset)
        if not keep:
            os.posix_fadvise(self.meta_fd, offset, n, os.POSIX_FADV_DONTNEED)
        return n

    # -- metadata -----------------------------------------------------------------
    def pwrite_meta(self, offset: int, data: Buffer) -> int:
        return pwritev_all(self.meta_fd, [data], offset)

    def pread_meta(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (os.pread: the result is filled by the kernel, not
        zeroed and copied under the interpreter's lock: the checksum tables are 2 MiB per
        GiB of RAM, read while a restore's main thread works)."""
        data = os.pread(self.meta_fd, length, offset)
        if len(data) < length:  # a signal, or the end of the file
            rest = bytearray(length - len(data))
            preadv_all(self.meta_fd, [rest], offset + len(data))
            data += rest
        return data

    # -- whole file -----------------------------------------------------------------
    def size(self) -> int:
        return os.fstat(self.meta_fd).st_size

    def allocated(self) -> int:
        """Bytes the file occupies on disk."""
        return os.fstat(self.meta_fd).st_blocks * 512

    def truncate(self, length: int) -> None:
        os.ftruncate(self.meta_fd, length)

    def fsync(self) -> None:
        """Make the file durable and drop what the page cache holds of it (metadata and
        short runs written buffered): vmsnap's files do not crowd out the host's cache."""
        os.fsync(self.meta_fd)
        if self.fd >= 0:
            os.fsync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.meta_fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for name in ("fd", "meta_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    @property
    def closed(self) -> bool:
        return self.meta_fd < 0

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
