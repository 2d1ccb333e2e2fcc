"""A filesystem that fills up: a small tmpfs mounted for a test (root only), and a file that
takes all but a given number of its bytes."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: a test that mounts one runs as root (CI does); skipped, saying so, otherwise
as_root = pytest.mark.skipif(os.geteuid() != 0,
                             reason="mounting a small tmpfs (a disk that fills) needs root")


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (made 0700) while the context lasts."""
    where.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(where)], check=True)
    try:
        yield where
    finally:  # lazily: a QEMU killed meanwhile may hold a file there for a moment more
        subprocess.run(["umount", "--lazy", str(where)], check=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill `directory`'s filesystem with a file, then free `leave` bytes of it (whole
    pages); the file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (b"\xff" * (1 << 20), b"\xff" * 4096):
            try:
                while True:
                    f.write(block)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    if leave:
        os.truncate(filler, filler.stat().st_size - leave)
    st = os.statvfs(directory)
    assert st.f_bavail * st.f_frsize == leave, (st.f_bavail, leave)
    return filler
