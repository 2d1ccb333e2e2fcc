"""Session fixtures: real migration streams captured from QEMU at test time.

Each capture runs a paused QEMU (``-S``, no guest, 128 MiB) and migrates it to a file:
QEMU 7.2 from the host, QEMU 10 from the chroot ``build/qemu10-root`` with
``-machine pc-q35-7.2`` and the default ``q35``, and a QEMU 10 mapped-ram ``file:``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.capture import capture

MEM_MB = 128

CAPTURES = {
    "qemu72-q35": dict(qemu="7.2", machine="q35"),
    "qemu10-pc-q35-7.2": dict(qemu="10", machine="pc-q35-7.2"),
    "qemu10-q35": dict(qemu="10", machine="q35"),
    "qemu10-mapped-ram": dict(qemu="10", machine="q35", mapped_ram=True),
}


@pytest.fixture(scope="session")
def capture_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("captures")


_cache: dict[str, Path] = {}


def get_capture(name: str, capture_dir: Path) -> Path:
    if name not in _cache:
        _cache[name] = capture(capture_dir / f"{name}.bin", memory_mb=MEM_MB, **CAPTURES[name])
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
