"""The save fault matrix on real VMs: whatever goes wrong — QEMU killed, disk full, vmsnap
interrupted, migration cancelled by QEMU, overwrite without --force, two saves at once — no
FILE.partial is left, an existing FILE is untouched, and the VM is back in the run state it
had before. Every error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from testbed.cli import frozen, signal_twice
from testbed.guests import BootGuest
from testbed.qemu import Vm

#: A guest large enough that a save takes a few seconds: time to strike while bytes move.
BIG_MB = 3072


def vmsnap_argv(*args) -> list[str]:
    return [sys.executable, "-m", "vmsnap.cli", *map(str, args)]


def env(workdir: Path) -> dict:
    return {**os.environ, "TMPDIR": str(workdir)}


def run_vmsnap(workdir: Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(vmsnap_argv(*args), env=env(workdir), capture_output=True,
                          text=True, timeout=timeout)


def good_save(workdir: Path, vm: Vm, path: Path) -> str:
    """An earlier, successful save (the VM runs on); returns the file's hash."""
    r = run_vmsnap(workdir, "save", "--resume", "--force", "--qmp", vm.tool_qmp_path, path)
    assert r.returncode == 0, r.stderr
    return digest(path)


def digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


#: the saves below use multifd, whose faults differ from one stream's (the default from 7.2)
MULTIFD = ("--channels", "2")


def start_save(workdir: Path, vm: Vm, path: Path, *extra) -> subprocess.Popen:
    """Start a save and return once its progress shows bytes moving."""
    proc = subprocess.Popen(vmsnap_argv("save", "--json", "--force", "--qmp", vm.tool_qmp_path,
                                        path, *extra),
                            env=env(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["done"] > 0:
            return proc
        assert event["event"] in ("start", "progress"), f"save ended before the fault: {event}"
    pytest.fail(f"save ended before the fault: {proc.communicate()[1]}")


def failed(proc: subprocess.Popen | subprocess.CompletedProcess, timeout: float = 120) -> str:
    """Wait for a failed vmsnap; its error must be one line, no traceback. Returns it."""
    if isinstance(proc, subprocess.Popen):
        _, stderr = proc.communicate(timeout=timeout)
    else:
        stderr = proc.stderr
    assert proc.returncode != 0, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def assert_file_side(path: Path, before: str | None) -> None:
    assert not Path(f"{path}.partial").exists(), "FILE.partial left behind"
    if before is not None:
        assert digest(path) == before, "the existing FILE was changed"


def assert_running(guest: BootGuest, vm: Vm) -> None:
    assert vm.cmd("query-status")["running"], vm.status()
    guest.wait_alive(vm)
    guest.wait_alive(vm)  # still stamping


@pytest.fixture
def big(workdir):
    guest = BootGuest(memory_mb=BIG_MB, mode="random")
    with Vm(guest.config("7.2", workdir), workdir, "src") as vm:
        guest.boot(vm)
        yield guest, vm
    for f in workdir.glob("vm.snap*"):  # GiBs: do not leave them to pytest's retention
        f.unlink()


@pytest.mark.qemu
def test_qemu_killed_mid_save(big, workdir):
    guest, vm = big
    snap = workdir / "vm.snap"
    before = good_save(workdir, vm, snap)
    proc = start_save(workdir, vm, snap, *MULTIFD)
    vm.kill()
    message = failed(proc)
    assert "QEMU" in message, message
    assert_file_side(snap, before)


@pytest.mark.qemu
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("live", [False, True], ids=["paused", "live"])
def test_vmsnap_interrupted(big, workdir, sig, live):
    guest, vm = big
    snap = workdir / "vm.snap"
    before = good_save(workdir, vm, snap)
    proc = start_save(workdir, vm, snap, *MULTIFD, *(["--live"] if live else []))
    signal_twice(proc, sig)  # a second signal must not cut the cleanup short
    assert "interrupted" in failed(proc)
    assert_file_side(snap, before)
    assert vm.cmd("query-migrate")["status"] in ("cancelled", "failed")
    assert_running(guest, vm)


@pytest.mark.qemu
@pytest.mark.parametrize("was_running", [True, False], ids=["running", "paused"])
def test_migration_cancelled_by_qemu(big, workdir, was_running):
    guest, vm = big
    snap = workdir / "vm.snap"
    before = good_save(workdir, vm, snap)
    if not was_running:
        vm.stop()
    proc = start_save(workdir, vm, snap, *MULTIFD)
    vm.cmd("migrate_cancel")
    assert "cancelled" in failed(proc)
    assert_file_side(snap, before)
    if was_running:
        assert_running(guest, vm)
    else:
        assert vm.status() == "paused"
        vm.cont()
        guest.wait_alive(vm)


@pytest.mark.qemu
def test_two_saves_to_one_file(big, workdir):
    guest, vm = big
    snap = workdir / "vm.snap"
    first = start_save(workdir, vm, snap, *MULTIFD, "--resume")
    with frozen(first):  # still saving when the second asks, whatever the host's load
        second = run_vmsnap(workdir, "save", "--force", "--qmp", vm.tool_qmp_path, snap,
                            timeout=30)
    assert "being saved by another process" in failed(second)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["event"] == "done"
    assert_file_side(snap, None)
    assert run_vmsnap(workdir, "verify", snap).returncode == 0
    assert_running(guest, vm)


@pytest.mark.qemu
def test_refuses_overwrite_without_force(workdir):
    guest = BootGuest(memory_mb=256)
    snap = workdir / "vm.snap"
    with Vm(guest.config("7.2", workdir), workdir, "src") as vm:
        guest.boot(vm)
        before = good_save(workdir, vm, snap)
        message = failed(run_vmsnap(workdir, "save", "--qmp", vm.tool_qmp_path, snap))
        assert "exists" in message and "--force" in message
        assert_file_side(snap, before)
        assert_running(guest, vm)


@pytest.fixture
def small_fs(workdir):
    """A 64 MiB tmpfs: smaller than the guest's RAM."""
    mount = workdir / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", mount],
                   check=True)
    yield mount
    subprocess.run(["umount", "-l", mount], check=True)


@pytest.mark.qemu
def test_disk_full(workdir, small_fs):
    snap = small_fs / "vm.snap"
    tiny = BootGuest(memory_mb=256, limit_mb=8)  # 8 MiB stamped: a sparse file that fits
    with Vm(tiny.config("7.2", workdir), workdir, "tiny") as vm:
        tiny.boot(vm)
        before = good_save(workdir, vm, snap)
    guest = BootGuest(memory_mb=256)
    with Vm(guest.config("7.2", workdir), workdir, "src") as vm:
        guest.boot(vm)
        message = failed(run_vmsnap(workdir, "save", "--force", *MULTIFD,
                                    "--qmp", vm.tool_qmp_path, snap))
        assert "No space left" in message, message
        assert_file_side(snap, before)
        assert_running(guest, vm)


@pytest.mark.qemu
@pytest.mark.parametrize("mode", ["paused", "quit", "live"])
def test_disk_full_one_stream_never_hangs(workdir, small_fs, mode):
    """Issue 11 item 2: with one stream, a disk filling up while QEMU sends its last pages
    with its big lock held (a 5 s downtime limit puts all of them there) left QEMU's
    migration thread blocked on the socket, QMP silent and vmsnap waiting forever. Now the
    receiver shuts its socket at once and the watcher sees its failure before asking QMP."""
    snap = small_fs / "vm.snap"
    extra = {"paused": [], "quit": ["--quit"], "live": ["--live"]}[mode]
    guest = BootGuest(memory_mb=256)
    with Vm(guest.config("7.2", workdir), workdir, "src") as vm:
        guest.boot(vm)
        vm.cmd("migrate-set-parameters", **{"downtime-limit": 5000})
        for _ in range(2):
            message = failed(run_vmsnap(workdir, "save", "--force", "--channels", 0,
                                        "--qmp", vm.tool_qmp_path, snap, *extra, timeout=60))
            assert "No space left" in message, message
            assert_file_side(snap, None)
            assert vm.cmd("query-migrate")["status"] in ("failed", "cancelled")
            assert_running(guest, vm)
