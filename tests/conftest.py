"""Fixtures shared by the whole suite: private work dirs, QEMU versions, leak checks."""

from __future__ import annotations

import pytest

from testbed.qemu import QEMU_VERSIONS, kill_leftovers, leftover_processes


@pytest.fixture
def workdir(tmp_path):
    """A private (0700) directory for sockets and files of one test."""
    tmp_path.chmod(0o700)
    return tmp_path


@pytest.fixture(params=QEMU_VERSIONS, ids=lambda v: f"qemu{v}")
def qemu_version(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def no_qemu_survives():
    """Fail the test if any QEMU it started is still alive after it (and kill it)."""
    yield
    alive = leftover_processes()
    kill_leftovers()
    assert not alive, f"QEMU processes survived the test: {alive}"
