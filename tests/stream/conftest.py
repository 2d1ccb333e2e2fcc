"""Session fixtures: real migration streams captured from QEMU at test time.

Each capture runs a paused QEMU (``-S``, no guest, 128 MiB) and migrates it to a file:
QEMU 7.2 from the host, QEMU 10 from the chroot ``build/qemu10-root`` with
``-machine pc-q35-7.2`` and the default ``q35``, and a QEMU 10 mapped-ram ``file:``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ._capture import CHROOT, capture

MEM_MB = 128

CAPTURES = {
    "qemu72-q35": dict(qemu10=False, machine="q35"),
    "qemu10-pc-q35-7.2": dict(qemu10=True, machine="pc-q35-7.2"),
    "qemu10-q35": dict(qemu10=True, machine="q35"),
    "qemu10-mapped-ram": dict(qemu10=True, machine="q35", mapped_ram=True),
}


def _check_prereqs(qemu10: bool) -> None:
    if qemu10:
        if not (CHROOT / "usr/bin/qemu-system-x86_64").exists():
            pytest.fail(f"QEMU 10 chroot missing at {CHROOT} (run the chroot build script)")
    elif shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 (QEMU 7.2) not installed on the host")


@pytest.fixture(scope="session")
def capture_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("captures")


_cache: dict[str, Path] = {}


def get_capture(name: str, capture_dir: Path) -> Path:
    if name not in _cache:
        kw = CAPTURES[name]
        _check_prereqs(kw["qemu10"])
        _cache[name] = capture(capture_dir / f"{name}.bin", mem_mb=MEM_MB, **kw)
    return _cache[name]


@pytest.fixture(scope="session", params=["qemu72-q35", "qemu10-pc-q35-7.2", "qemu10-q35"])
def sequential_stream(request, capture_dir) -> tuple[str, bytes]:
    """(name, bytes) of each sequential (exec:cat) capture."""
    return request.param, get_capture(request.param, capture_dir).read_bytes()


@pytest.fixture(scope="session")
def stream72(capture_dir) -> bytes:
    return get_capture("qemu72-q35", capture_dir).read_bytes()


@pytest.fixture(scope="session")
def stream10(capture_dir) -> bytes:
    return get_capture("qemu10-q35", capture_dir).read_bytes()


@pytest.fixture(scope="session")
def mapped_ram_file(capture_dir) -> Path:
    return get_capture("qemu10-mapped-ram", capture_dir)
