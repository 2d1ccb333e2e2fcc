"""Faults during `vmsnap restore --qmp` into a QEMU the user started (issue 11 items 4, 5, 7):
a corrupt page, SIGINT or SIGTERM, with one stream or with channels, on QEMU 7.2 and 10.
vmsnap ends with one line, in about a second after a signal, and the target QEMU is never
wedged: it exits (its load failed) or still answers QMP, and SIGTERM ends it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.craft import flip_page_bit
from testbed.guests import BootGuest
from testbed.qemu import Vm

#: Big enough that a restore streams for a few seconds: time to strike while bytes move.
GUEST = BootGuest(memory_mb=2048, mode="random")


def vmsnap_argv(*args) -> list[str]:
    return [sys.executable, "-m", "vmsnap.cli", *map(str, args)]


def env(workdir: Path) -> dict:
    return {**os.environ, "TMPDIR": str(workdir)}  # a chroot QEMU 10 sees the workdir


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """One saved bootguest per QEMU version (saved with --quit)."""
    made: dict[str, Path] = {}

    def get(version: str) -> Path:
        if version not in made:
            d = tmp_path_factory.mktemp(f"snap{version}")
            d.chmod(0o700)
            snap = d / "vm.snap"
            guest = BootGuest(memory_mb=GUEST.memory_mb, mode=GUEST.mode)
            with Vm(guest.config(version, d), d, "src") as src:
                guest.boot(src)
                r = subprocess.run(vmsnap_argv("save", "--quit", "--qmp", src.tool_qmp_path,
                                               snap), env=env(d), capture_output=True,
                                   text=True, timeout=300)
                assert r.returncode == 0, r.stderr
                src.proc.wait(timeout=60)
            made[version] = snap
        return made[version]

    yield get
    for snap in made.values():
        shutil.rmtree(snap.parent, ignore_errors=True)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def not_wedged(vm: Vm) -> str:
    """The target exits on its own (its load failed) or at least ends on SIGTERM."""
    try:
        vm.proc.wait(timeout=20)
        return "exited"
    except subprocess.TimeoutExpired:
        pass
    vm.proc.terminate()
    try:
        vm.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("the target QEMU is wedged: alive 20 s after the failed restore "
                    f"and deaf to SIGTERM ({vm.log_tail()})")
    return "terminated"


def start_restore(workdir: Path, snap: Path, dst: Vm, channels: int) -> subprocess.Popen:
    """Start `restore --qmp` and return once its progress shows bytes moving."""
    proc = subprocess.Popen(vmsnap_argv("restore", "--json", snap, "--qmp", dst.tool_qmp_path,
                                        "--channels", channels),
                            env=env(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["done"] > 0:
            return proc
        assert event["event"] in ("start", "progress"), f"restore ended first: {event}"
    pytest.fail(f"restore ended before the fault: {proc.communicate()[1]}")


#: (signal, channels, QEMU): every QEMU and channel mode with SIGINT, SIGTERM on a few.
SIGNAL_CASES = [(signal.SIGINT, ch, q) for q in ("7.2", "10") for ch in (0, 2)] + [
    (signal.SIGTERM, 2, "7.2"), (signal.SIGTERM, 0, "10")]


@pytest.mark.qemu
@pytest.mark.parametrize(("sig", "channels", "qemu_version"), SIGNAL_CASES,
                         ids=[f"{s.name}-{c}ch-qemu{q}" for s, c, q in SIGNAL_CASES])
def test_interrupted_restore_never_wedges_target(snapshots, workdir, qemu_version, sig,
                                                 channels):
    snap = snapshots(qemu_version)
    config = GUEST.config(qemu_version, workdir)
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        proc = start_restore(workdir, snap, dst, channels)
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
        stopped = time.monotonic() - t0
        assert proc.returncode == 130 and "interrupted" in one_line(stderr), stderr
        assert stopped < 3, f"vmsnap took {stopped:.2f}s to stop after {sig.name}"
        print(f"{sig.name} {channels}ch qemu{qemu_version}: vmsnap stopped in {stopped:.2f}s, "
              f"target {not_wedged(dst)}")


CORRUPT_CASES = [(2, "7.2"), (2, "10"), (0, "10")]


@pytest.mark.qemu
@pytest.mark.parametrize(("channels", "qemu_version"), CORRUPT_CASES,
                         ids=[f"{c}ch-qemu{q}" for c, q in CORRUPT_CASES])
def test_corrupt_page_restore_never_wedges_target(snapshots, workdir, qemu_version,
                                                  channels):
    snap = workdir / "vm.snap"
    shutil.copyfile(snapshots(qemu_version), snap)
    page = flip_page_bit(snap, run=-1)
    config = GUEST.config(qemu_version, workdir)
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        r = subprocess.run(vmsnap_argv("restore", snap, "--qmp", dst.tool_qmp_path,
                                       "--channels", channels),
                           env=env(workdir), capture_output=True, text=True, timeout=120)
        assert r.returncode == 1
        message = one_line(r.stderr)
        assert "pc.ram" in message and f"{page * 4096:#x}" in message, message
        print(f"corrupt {channels}ch qemu{qemu_version}: target {not_wedged(dst)}")
    snap.unlink()
