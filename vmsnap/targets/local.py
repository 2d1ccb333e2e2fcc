"""A local file target: FILE.partial (flock'ed, O_DIRECT) renamed over FILE on commit."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..io.aligned import PAGE_SIZE
from ..io.atomic import AtomicFile
from ..io.direct import DirectFile, pwritev_all
from ..io.vectored import Buffer


class LocalSink:
    """`PageSink` on a file: page data by O_DIRECT `pwritev`, metadata buffered."""

    def __init__(self, path: str | os.PathLike[str], *, direct: bool = True,
                 alignment: int = PAGE_SIZE) -> None:
        self._atomic = AtomicFile(path).open()
        self.name = self._atomic.path
        try:
            self._file = DirectFile(self._atomic.partial_path, writable=True, direct=direct,
                                    alignment=alignment)
        except BaseException:
            self._atomic.abort()
            raise
        self.direct = self._file.direct
        self.fallback_reason = self._file.fallback_reason

    @property
    def partial_path(self) -> str:
        """FILE.partial, for a writer outside vmsnap (QEMU's own mapped-ram)."""
        return self._atomic.partial_path

    def write_at(self, offset: int, bufs: Sequence[Buffer]) -> int:
        n = self._file.write_at(offset, bufs)
        self.direct, self.fallback_reason = self._file.direct, self._file.fallback_reason
        return n

    def pwrite_meta(self, offset: int, data: Buffer) -> int:
        return self._file.pwrite_meta(offset, data)

    def truncate(self, length: int) -> None:
        self._file.truncate(length)

    def commit(self) -> None:
        self._file.fsync()
        self._file.close()
        self._atomic.commit()

    def abort(self) -> None:
        self._file.close()
        self._atomic.abort()


def read_local_beside(path: str, limit: int) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        return None
    return raw.decode() if len(raw) <= limit else None


def write_local_beside(path: str, text: str) -> None:
    with AtomicFile(path) as af:
        pwritev_all(af.fd, [text.encode()], 0)  # whole or not at all (a full disk)
        af.commit()
