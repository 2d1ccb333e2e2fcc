"""`rbd:POOL/IMAGE`: the snapshot file's bytes at the same offsets in a thin RBD image.

Commit is an RBD snapshot: a save writes the image head (emptied first: pages never written
stay unallocated), snapshots it as `vmsnap-<id>` and then records that name in the image
metadata key `vmsnap.snapshot`, one atomic update. Readers open that snapshot read-only, so a
crashed or failing save leaves the previous snapshot readable and nothing half written is
ever taken for good. One writer per image: an advisory exclusive lock, broken only when its
holder no longer watches the image (a crashed client).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import rbd

from ..io.atomic import FileLockedError
from ..io.direct import IOEngineError
from ..io.vectored import Buffer
from . import Remote
from .base import RangeReader, TargetError, pieces
from .ceph import ioctx

log = logging.getLogger(__name__)

SNAP_KEY = "vmsnap.snapshot"
SNAP_PREFIX = "vmsnap-"
#: write/read pieces never cross this (RBD's default object size)
UNIT = 4 << 20
#: bytes of asynchronous writes in flight per sink
MAX_INFLIGHT = 64 << 20


def exists(r: Remote) -> bool:
    try:
        with rbd.Image(ioctx(r.container), r.name, read_only=True) as img:
            img.metadata_get(SNAP_KEY)
        return True
    except (rbd.ImageNotFound, KeyError):
        return False


def read_beside(r: Remote, suffix: str, limit: int) -> str | None:
    """`targets.read_beside`: the image metadata key vmsnap+SUFFIX (removed with the image)."""
    try:
        with rbd.Image(ioctx(r.container), r.name, read_only=True) as img:
            text = img.metadata_get(f"vmsnap{suffix}")
    except (rbd.ImageNotFound, KeyError):
        return None
    except rbd.Error as e:
        raise TargetError(f"{r}: cannot read metadata: {e}") from None
    return text if len(text.encode()) <= limit else None


def write_beside(r: Remote, suffix: str, text: str) -> None:
    try:
        with rbd.Image(ioctx(r.container), r.name) as img:
            img.metadata_set(f"vmsnap{suffix}", text)
    except rbd.Error as e:
        raise TargetError(f"{r}: cannot write metadata: {e}") from None


class Sink:
    """`PageSink` on an RBD image head; `commit` snapshots it."""

    direct = False
    fallback_reason: str | None = None

    def __init__(self, r: Remote) -> None:
        self.name = str(r)
        io = ioctx(r.container)
        try:
            rbd.RBD().create(io, r.name, 0, features=rbd.RBD_FEATURE_LAYERING)
        except rbd.ImageExists:
            pass
        except rbd.Error as e:
            raise TargetError(f"{self.name}: cannot create image: {e}") from None
        self._image = rbd.Image(io, r.name)
        self._cookie = f"vmsnap-save-{uuid.uuid4().hex}"
        self._cond = threading.Condition()
        self._inflight = 0
        #: byte ranges of writes not yet completed, by ticket: librbd does not order
        #: overlapping asynchronous writes, and a live save writes a page again
        self._ranges: dict[int, tuple[int, int]] = {}
        self._tickets = 0
        self._error: BaseException | None = None
        self._done = False
        self._size = 0
        try:
            self._lock()
            self._image.resize(0)  # the head only: committed data lives in the snapshot
        except BaseException:
            self._close()
            raise

    def _lock(self) -> None:
        for _ in range(2):
            try:
                self._image.lock_exclusive(self._cookie)
                return
            except rbd.ImageBusy:
                pass
            live = {f"client.{w['id']}" for w in self._image.watchers_list()}
            for client, cookie, _addr in self._image.list_lockers().get("lockers", []):
                if client in live:
                    raise FileLockedError(errno.EBUSY,
                                          f"{self.name} is being saved by another process")
                self._image.break_lock(client, cookie)  # its holder crashed
        raise FileLockedError(errno.EBUSY, f"{self.name}: cannot lock the image")

    # -- writes ------------------------------------------------------------------
    def write_at(self, offset: int, bufs: Sequence[Buffer]) -> int:
        total = 0
        for off, view in pieces(offset, bufs, UNIT):
            data = bytes(view)  # librbd takes bytes; the caller may reuse its buffer
            if off + len(data) > self._size:  # a file grows when written past its end
                self.truncate(off + len(data))  # (only the metadata at the end does)
            end = off + len(data)
            with self._cond:
                self._raise()
                while self._inflight and (self._inflight + len(data) > MAX_INFLIGHT
                                          or self._overlaps(off, end)):
                    self._cond.wait()
                    self._raise()
                self._inflight += len(data)
                self._tickets += 1
                ticket = self._tickets
                self._ranges[ticket] = (off, end)
            try:
                self._call(f"write at {off:#x}", self._image.aio_write, data, off,
                           self._completion(ticket, off))
            except BaseException:  # never queued: nothing will complete it
                self._forget(ticket)
                raise
            total += len(data)
        return total

    def _overlaps(self, start: int, end: int) -> bool:
        """Whether a write in flight touches [start, end): the new one must wait for it
        (the last write of a page must be the one that stays)."""
        return any(s < end and start < e for s, e in self._ranges.values())

    def _forget(self, ticket: int) -> None:
        with self._cond:
            s, e = self._ranges.pop(ticket)
            self._inflight -= e - s
            self._cond.notify_all()

    def _completion(self, ticket: int, off: int) -> Callable[[Any], None]:
        def done(comp: Any) -> None:  # rbd.Completion
            rc = comp.get_return_value()
            with self._cond:  # the error is set before _forget wakes the waiters
                if rc < 0 and self._error is None:
                    self._error = TargetError(
                        f"{self.name}: write at {off:#x} failed: {os.strerror(-rc)}", -rc)
                self._forget(ticket)
        return done

    def _call(self, what: str, fn: Callable[..., Any], *args: object) -> Any:  # librbd
        """A synchronous librbd call; its failure (a dead OSD: the op timeout) names the
        image, as an OSError the save reports as its cause."""
        try:
            return fn(*args)
        except rbd.Error as e:
            code = getattr(e, "errno", None)
            raise TargetError(f"{self.name}: {what} failed: "
                              f"{os.strerror(code) if code else e}", code or errno.EIO) from None

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        with self._cond:
            while self._inflight:
                self._cond.wait()
            self._raise()

    def pwrite_meta(self, offset: int, data: Buffer) -> int:
        return self.write_at(offset, [data])

    def truncate(self, length: int) -> None:
        self._drain()
        self._call("resize", self._image.resize, length)
        self._size = length

    def commit(self) -> None:
        self._drain()
        img = self._image
        self._call("flush", img.flush)
        name = f"{SNAP_PREFIX}{time.time_ns():x}"
        self._call("snapshot", img.create_snap, name)
        self._call("commit", img.metadata_set, SNAP_KEY, name)  # the commit point
        try:  # committed: a failure from here on leaves an old snapshot, nothing worse
            for s in img.list_snaps():
                if s["name"].startswith(SNAP_PREFIX) and s["name"] != name:
                    img.remove_snap(s["name"])
        except rbd.Error as e:
            log.warning("%s: old snapshot not removed: %s", self.name, e)
        self._done = True
        self._close()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            with self._cond:
                while self._inflight:
                    self._cond.wait()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self._image.unlock(self._cookie)
        except rbd.Error:
            pass  # not locked, or the cluster is gone: the lock dies with our watch
        self._image.close()


class Source(RangeReader):
    """`PageSource` on the snapshot a save committed, read in parallel pieces."""

    def __init__(self, r: Remote) -> None:
        io = ioctx(r.container)
        try:
            with rbd.Image(io, r.name, read_only=True) as head:
                snap = head.metadata_get(SNAP_KEY)
            self._image = rbd.Image(io, r.name, snapshot=snap, read_only=True)
        except rbd.ImageNotFound:
            raise TargetError(f"{r}: no such image", errno.ENOENT) from None
        except KeyError:
            raise TargetError(f"{r}: no committed vmsnap snapshot in this image",
                              errno.ENOENT) from None
        super().__init__(str(r), self._image.size(), self._read)

    def _read(self, offset: int, view: memoryview) -> None:
        try:
            data = self._image.read(offset, view.nbytes)
        except rbd.Error as e:
            raise IOEngineError(errno.EIO, f"{self.name}: read at {offset:#x} failed: {e}"
                                ) from None
        if len(data) != view.nbytes:
            raise IOEngineError(errno.EIO, f"{self.name}: short read at {offset:#x}")
        view[:] = data

    def close(self) -> None:
        super().close()
        self._image.close()
