"""Atomic replacement of a file: write `FILE.partial`, fsync, rename over FILE, fsync dir.

    with AtomicFile("snap.vms") as af:
        os.pwrite(af.fd, b"...", 0)      # or open af.partial_path again (O_DIRECT)
        af.commit()
    # leaving the block without commit() (or with an exception) removes the partial file

The partial file is created with O_CREAT|O_EXCL and mode 0600 and is `flock`ed
exclusively for its whole life. An existing partial file that is locked belongs to a live
writer: `FileLockedError`. An unlocked one is a leftover of a crash and is replaced.
A crash at any point leaves either the old FILE or the new complete one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from ..errors import VmsnapError

PARTIAL_SUFFIX = ".partial"


class FileLockedError(VmsnapError, OSError):
    """Another live process is writing the same file."""


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    def __init__(self, path: str | os.PathLike[str], mode: int = 0o600) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.partial_path = self.path + PARTIAL_SUFFIX
        self.mode = mode
        self.fd = -1
        self.committed = False
        self.aborted = False

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> AtomicFile:
        if self.fd >= 0:
            raise ValueError("already open")
        if os.path.isdir(self.path):  # the final rename would fail: say so before any work
            raise IsADirectoryError(errno.EISDIR, "Is a directory", self.path)
        for _ in range(10):
            try:
                fd = os.open(
                    self.partial_path,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    self.mode,
                )
            except FileExistsError:
                self._reclaim_stale()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.fchmod(fd, self.mode)
                # make sure nobody replaced the path between create and lock
                st, cur = os.fstat(fd), os.stat(self.partial_path)
                if (st.st_dev, st.st_ino) != (cur.st_dev, cur.st_ino):
                    raise BlockingIOError(errno.EAGAIN, "partial file replaced")
            except (BlockingIOError, FileNotFoundError):
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise FileLockedError(errno.EBUSY, f"cannot create {self.partial_path}")

    def _reclaim_stale(self) -> None:
        """Remove a leftover partial file of a crashed writer. Anything else at that path
        (a FIFO, whose open would block, a symlink, a directory) is refused, not touched."""
        try:
            fd = os.open(self.partial_path,
                         os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise VmsnapError(f"{self.partial_path} is a symbolic link, not a partial "
                              "snapshot: remove it") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise VmsnapError(f"{self.partial_path} is not a regular file (a FIFO, "
                                  "device, socket or directory): remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FileLockedError(
                    errno.EBUSY,
                    f"{self.partial_path} is being written by another process",
                ) from None
            st = os.fstat(fd)
            try:
                cur = os.stat(self.partial_path)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino):
                os.unlink(self.partial_path)  # stale leftover of a crashed writer
        finally:
            os.close(fd)

    def commit(self) -> None:
        """fsync the data, rename the partial file over the final path, fsync the dir."""
        if self.fd < 0 or self.committed or self.aborted:
            raise ValueError("nothing to commit")
        os.fsync(self.fd)
        os.rename(self.partial_path, self.path)
        self.committed = True
        fsync_dir(os.path.dirname(self.path))
        self._close()

    def abort(self) -> None:
        """Remove the partial file (idempotent; no-op after commit)."""
        if self.committed or self.aborted:
            return
        self.aborted = True
        if self.fd >= 0:
            try:
                st, cur = os.fstat(self.fd), os.stat(self.partial_path)
                if (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino):
                    os.unlink(self.partial_path)
            except FileNotFoundError:
                pass
            self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # releases the flock

    def __enter__(self) -> AtomicFile:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()
