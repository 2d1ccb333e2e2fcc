"""A QEMU that cannot see or enter vmsnap's temporary directory (issue 11): QEMU 10 in the
test bed's chroot (its own mount namespace) with vmsnap's TMPDIR not bound into it, and QEMU
running as another user (-runas nobody) while vmsnap's TMPDIR is root's 0700 work dir. One
stream goes by fd (getfd + fd:); multifd channels meet in a 0700 directory inside QEMU's
root, owned by QEMU's user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.guests import BootGuest
from testbed.paths import QEMU10_ROOT
from testbed.qemu import Vm, VmConfig


def run_ok(env: dict, *args) -> None:
    r = subprocess.run([sys.executable, "-m", "vmsnap.cli", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.qemu
@pytest.mark.parametrize("channels", [0, 2], ids=["1-stream", "2ch"])
def test_qemu10_in_chroot_without_shared_tmpdir(workdir, channels):
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}  # /tmp: not in the chroot
    before = set((QEMU10_ROOT / "tmp").glob("vmsnap-*"))
    guest = BootGuest(memory_mb=256)
    config = guest.config("10", workdir)
    snap = workdir / "vm.snap"
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        with guest.saving(src) as saved:
            run_ok(env, "save", "--resume", "--channels", channels, "--qmp",
                   src.tool_qmp_path, snap)
        guest.wait_alive(src)
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        run_ok(env, "restore", snap, "--paused", "--channels", channels, "--qmp",
               dst.tool_qmp_path)
        guest.check_restored(dst, saved)
    left = {p for p in set((QEMU10_ROOT / "tmp").glob("vmsnap-*")) - before
            if not p.name.startswith("vmsnap-capture-")}  # the test bed's, maybe another test's
    assert not left, f"meeting directory left behind: {left}"


def as_nobody(workdir: Path) -> tuple[dict[str, str], BootGuest, VmConfig, Path]:
    """vmsnap's environment, a bootguest and its QEMU 7.2 config dropping to nobody, and the
    snapshot's path (in the 0700 work dir, closed to nobody)."""
    guest = BootGuest(memory_mb=256)
    config = guest.config("7.2", workdir)
    config.args += ["-runas", "nobody"]
    return {**os.environ, "TMPDIR": str(workdir)}, guest, config, workdir / "vm.snap"


@pytest.mark.qemu
@pytest.mark.parametrize("channels", [0, 2], ids=["1-stream", "2ch"])
def test_qemu_running_as_another_user(workdir, channels):
    """QEMU drops to nobody after start; vmsnap's TMPDIR (the 0700 work dir) is closed to it.
    (The RAM check's pmemsave cannot write there as nobody: the guest proves it runs.)"""
    env, guest, config, snap = as_nobody(workdir)
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        run_ok(env, "save", "--resume", "--channels", channels, "--qmp", src.tool_qmp_path,
               snap)
        guest.wait_alive(src)
    run_ok(env, "verify", snap)
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        run_ok(env, "restore", snap, "--channels", channels, "--qmp", dst.tool_qmp_path)
        assert dst.status() == "running"
        guest.wait_alive(dst)
        guest.wait_alive(dst)


@pytest.mark.qemu
def test_lazy_restore_into_qemu_that_cannot_see_tmpdir(workdir):
    """restore --lazy --qmp hands the postcopy stream (and its return path) over by fd too."""
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}  # /tmp: not in the chroot
    guest = BootGuest(memory_mb=256)
    config = guest.config("10", workdir)
    snap = workdir / "vm.snap"
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        with guest.saving(src) as saved:
            run_ok(env, "save", "--quit", "--qmp", src.tool_qmp_path, snap)
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        run_ok(env, "restore", snap, "--lazy", "--qmp", dst.tool_qmp_path)
        guest.check_restored(dst, saved, resumed=True)  # the point of --lazy: it runs


@pytest.mark.qemu
def test_lazy_restore_refused_for_qemu_without_userfaultfd(workdir):
    """QEMU as nobody gets no userfaultfd (vm.unprivileged_userfaultfd=0): --lazy says so in
    one line before touching the target, which still takes an eager restore."""
    env, guest, config, snap = as_nobody(workdir)
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        run_ok(env, "save", "--quit", "--qmp", src.tool_qmp_path, snap)
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        r = subprocess.run([sys.executable, "-m", "vmsnap.cli", "restore", str(snap), "--lazy",
                            "--qmp", str(dst.tool_qmp_path)], env=env, capture_output=True,
                           text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "userfaultfd" in lines[0], r.stderr
        assert dst.status() == "inmigrate"
        run_ok(env, "restore", snap, "--qmp", dst.tool_qmp_path)
        assert dst.status() == "running"
        guest.wait_alive(dst)
