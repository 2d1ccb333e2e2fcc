"""One vmsnap at a time per QEMU: a lock keyed by the QEMU process, whichever monitor is used.

Two saves of one VM through two monitors used to race: both set the migration capabilities,
one's `migrate` failed and its cleanup cancelled the other's migration. The lock is an
flock on a file named after the QEMU's PID and start time (PIDs are reused) in a private
per-user directory, so it is released when vmsnap dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator

from ..errors import VmsnapError


def _lock_dir() -> str:
    uid = os.geteuid()
    runtime = "/run" if uid == 0 else os.environ.get("XDG_RUNTIME_DIR", "")
    path = (os.path.join(runtime, "vmsnap") if runtime and os.path.isdir(runtime)
            else os.path.join(tempfile.gettempdir(), f"vmsnap-{uid}"))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise VmsnapError(f"{path} is not a private directory of this user: remove it")
    return path


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def vm_lock(pid: int | None) -> Iterator[None]:
    """Hold the lock of QEMU `pid` (no-op when the PID is unknown, e.g. QMP over TCP)."""
    start = _start_time(pid) if pid else None
    if start is None:
        yield
        return
    path = os.path.join(_lock_dir(), f"qemu-{pid}-{start}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VmsnapError(f"another vmsnap is saving or restoring this VM (QEMU pid {pid})"
                              ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while we opened it
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
