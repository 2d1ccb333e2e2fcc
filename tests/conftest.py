"""Fixtures shared by the whole suite: private work dirs, QEMU versions, leak checks."""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, settings

from testbed.qemu import QEMU_VERSIONS, kill_leftovers, leftover_processes
from vmsnap.hostkey import KEY_DIR_ENV

# Hypothesis times every example (200 ms by default) and calls one that ran slow, then fast,
# flaky, as it does data generation that runs slow: on a loaded CI host a stalled machine is
# no bug. For every property test, here once.
settings.register_profile("vmsnap", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vmsnap")


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


@pytest.fixture(autouse=True, scope="session")
def private_host_key(tmp_path_factory):
    """vmsnap's host key (which signs saved files) lives in a private directory for the
    session, never in the real /var/lib/vmsnap; subprocesses inherit the variable."""
    directory = tmp_path_factory.mktemp("hostkey")
    directory.chmod(0o700)
    os.environ[KEY_DIR_ENV] = str(directory)
    return directory


@pytest.fixture(scope="session")
def small_snapshot(tmp_path_factory):
    """A real vmsnap file to craft from: QEMU 7.2 (-S, 128 MiB) saved by exec:cat, imported
    with `vmsnap import` (unsigned, no command line). Copy it before changing it."""
    from testbed.capture import capture
    from testbed.transfer import VMSNAP

    d = tmp_path_factory.mktemp("small-snapshot")
    stream = capture(d / "stream", qemu="7.2", memory_mb=128)
    out = d / "snap.vms"
    subprocess.run([VMSNAP, "import", str(stream), str(out)], check=True, capture_output=True)
    return out
