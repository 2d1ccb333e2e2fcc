"""Snapshot targets: a local FILE, `rbd:POOL/IMAGE` (Ceph RBD) or `s3://BUCKET/KEY` (S3, e.g.
Ceph RGW), accepted wherever a snapshot FILE is. Ceph is configured the usual way (CEPH_CONF
or /etc/ceph/ceph.conf, its keyring, CEPH_ARGS); S3 by AWS_ENDPOINT_URL and the usual AWS
credential variables or files. The Ceph and S3 modules load only when such a URL is used."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import VmsnapError
from ..io.aligned import PAGE_SIZE
from ..io.direct import DirectFile
from .base import PageSink, PageSource, TargetError
from .local import LocalSink, read_local_beside, write_local_beside

_RBD = re.compile(r"rbd:(?P<a>[^/@\s]+)/(?P<b>[^/@\s]+)")
_S3 = re.compile(r"s3://(?P<a>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<b>\S+)")


@dataclass(frozen=True)
class Remote:
    kind: str  # "rbd" | "s3"
    container: str  # pool or bucket
    name: str  # image or key

    def __str__(self) -> str:
        sep = ":" if self.kind == "rbd" else "://"
        return f"{self.kind}{sep}{self.container}/{self.name}"


def remote(path: str | os.PathLike[str]) -> Remote | None:
    """The parsed URL if `path` names an RBD image or S3 object, else None (a local path).
    A string that starts like a URL but is malformed is refused rather than taken as a file."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text.startswith(("rbd:", "s3://")):
        return None
    kind = "rbd" if text.startswith("rbd:") else "s3"
    m = (_RBD if kind == "rbd" else _S3).fullmatch(text)
    if m is None or (kind == "s3" and m["b"].endswith("/")):
        form = "rbd:POOL/IMAGE" if kind == "rbd" else "s3://BUCKET/KEY"
        raise TargetError(f"malformed target {text!r} (expected {form})", errno.EINVAL)
    return Remote(kind, m["a"], m["b"])


def normalize(path: str | os.PathLike[str]) -> str:
    """An absolute path for a local file; a URL as given."""
    r = remote(path)
    return str(r) if r else os.path.abspath(os.fspath(path))


def exists(path: str | os.PathLike[str]) -> bool:
    """True if a committed snapshot (or, locally, any file) is at `path`."""
    r = remote(path)
    if r is None:
        return os.path.lexists(os.fspath(path))
    return _module(r).exists(r)


def refuse_overwrite(path: str | os.PathLike[str], force: bool) -> None:
    """Refuse to write `path` where a directory is (whatever `force`), or a snapshot or file
    already is, unless `force`."""
    if remote(path) is None and os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    if not force and exists(path):
        raise VmsnapError(f"{os.fspath(path)} exists (use --force to overwrite)")


def lock_path(path: str | os.PathLike[str]) -> str:
    """A local file to flock for per-host mutual exclusion on `path`: the file itself, or
    for a URL a 0600 file named by its hash in a private per-user directory."""
    if remote(path) is None:
        return os.fspath(path)
    directory = os.path.join(tempfile.gettempdir(), f"vmsnap-locks-{os.getuid()}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise TargetError(f"{directory} is not a private directory of this user",
                          errno.EPERM)
    name = os.path.join(directory, hashlib.sha256(normalize(path).encode()).hexdigest()[:24])
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    return name


def open_sink(path: str | os.PathLike[str], *, direct: bool = True,
              alignment: int = PAGE_SIZE) -> PageSink:
    """Reserve `path` for one writer (FileLockedError if another one holds it)."""
    r = remote(path)
    if r is None:
        return LocalSink(path, direct=direct, alignment=alignment)
    return _module(r).Sink(r)


def open_source(path: str | os.PathLike[str], *, direct: bool = True) -> PageSource:
    r = remote(path)
    if r is None:
        return DirectFile(path, writable=False, direct=direct)
    return _module(r).Source(r)


def read_beside(path: str | os.PathLike[str], suffix: str, limit: int) -> str | None:
    """A small text kept beside the snapshot at `path` (a hint like the hot pages): the file
    PATH+SUFFIX, the S3 object KEY+SUFFIX or the RBD image's metadata key vmsnap+SUFFIX.
    None if there is none, or it is longer than `limit` bytes."""
    r = remote(path)
    if r is None:
        return read_local_beside(os.fspath(path) + suffix, limit)
    return _module(r).read_beside(r, suffix, limit)


def write_beside(path: str | os.PathLike[str], suffix: str, text: str) -> None:
    """Replace the text beside `path` (atomically; a file is 0600)."""
    r = remote(path)
    if r is None:
        write_local_beside(os.fspath(path) + suffix, text)
    else:
        _module(r).write_beside(r, suffix, text)


class _Backend(Protocol):
    """What a remote target module (rbd_image, s3_objects) offers."""

    @property
    def Sink(self) -> Callable[[Remote], PageSink]: ...  # noqa: N802 - the module's class

    @property
    def Source(self) -> Callable[[Remote], PageSource]: ...  # noqa: N802

    def exists(self, r: Remote) -> bool: ...

    def read_beside(self, r: Remote, suffix: str, limit: int) -> str | None: ...

    def write_beside(self, r: Remote, suffix: str, text: str) -> None: ...


def _module(r: Remote) -> _Backend:
    try:
        if r.kind == "rbd":
            from . import rbd_image
            return rbd_image
        from . import s3_objects
        return s3_objects
    except ImportError as e:
        need = "python3-rbd" if r.kind == "rbd" else "boto3 (pip install 'vmsnap[ceph]')"
        raise TargetError(f"{r.kind} targets need {need}: {e}", errno.ENOSYS) from None


__all__ = ["PageSink", "PageSource", "Remote", "TargetError", "exists", "normalize",
           "open_sink", "open_source", "read_beside", "remote", "write_beside"]
