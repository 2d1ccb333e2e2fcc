"""Shared guest RAM (memory-backend-file / memfd, share=on): vmsnap copies RAM straight
between the backing and the file while QEMU's x-ignore-shared stream carries only device
state, on QEMU 7.2 and 10; files cross freely between this path and the stream path; a
corrupt page stops the restore; --live and unreachable backings fall back or refuse."""

from __future__ import annotations

import os
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import vmsnap
from testbed.cli import events, ok, run_vmsnap
from testbed.craft import flip_page_bit
from testbed.guests import BootGuest, Saved, shared_ram_args
from testbed.qemu import Vm
from vmsnap.errors import VmsnapError
from vmsnap.fileformat.reader import open_snapshot
from vmsnap.ops.shared_ram import CHUNK, Backing, fill_from_file
from vmsnap.orchestration import relaunch, shared

MB = 256
DEVICE_STATE_MAX = 1 << 20


def config(guest: BootGuest, qemu: str, workdir: Path, kind: str, name: str):
    c = guest.config(qemu, workdir)
    c.args += shared_ram_args(kind, guest.memory_mb, workdir / f"{name}.ram")
    return c


def save(workdir: Path, vm: Vm, snap: Path, *extra) -> dict:
    return events(ok(run_vmsnap(workdir, "save", "--json", "--qmp", vm.tool_qmp_path, snap,
                                *extra)))[-1]


def restore_into(guest, cfg, workdir: Path, snap: Path, saved: Saved) -> dict:
    with Vm(cfg, workdir, "dst", incoming="defer") as dst:
        done = events(ok(run_vmsnap(workdir, "restore", "--json", "--paused", snap, "--qmp",
                                    dst.tool_qmp_path)))[-1]
        guest.check_restored(dst, saved)
    return done


#: (QEMU, source RAM, target RAM, RAM path expected for the save). QEMU >= 8.1 keeps memfd
#: RAM in an x-ignore-shared stream, so vmsnap saves it like anonymous RAM there: QEMU >= 9.1
#: writes the pages itself ("qemu" path) in a paused save with channels.
CASES = [("7.2", "file", "file", "shared"), ("7.2", "memfd", "anon", "shared"),
         ("10", "file", "memfd", "shared"), ("10", "anon", "file", "qemu")]


@pytest.mark.qemu
@pytest.mark.parametrize(("qemu", "src", "dst", "path"), CASES,
                         ids=[f"qemu{q}-{s}-to-{d}" for q, s, d, _ in CASES])
def test_shared_ram_round_trip(qemu, src, dst, path, workdir):
    guest = BootGuest(memory_mb=MB, mode="random")
    snap = workdir / "vm.snap"
    with Vm(config(guest, qemu, workdir, src, "src"), workdir, "src") as vm:
        guest.boot(vm)
        with guest.saving(vm) as saved:
            done = save(workdir, vm, snap)
    assert done["ram_path"] == path
    assert done["pages"] > MB * 256 * 0.9  # the RAM is in the file either way
    if path == "shared":
        assert done["stream_bytes"] < DEVICE_STATE_MAX
    with vmsnap.open(snap) as s:
        assert s.verify().pages == sum(b.present_count for b in s.blocks)
    done = restore_into(guest, config(guest, qemu, workdir, dst, "dst"), workdir, snap, saved)
    assert done["ram_path"] == ("stream" if dst == "anon" else "shared")
    if dst != "anon":
        assert done["stream_bytes"] < DEVICE_STATE_MAX


@pytest.mark.qemu
def test_live_save_of_shared_ram_uses_the_stream(workdir):
    """x-ignore-shared drops the dirty tracking a live save needs: --live streams RAM."""
    guest = BootGuest(memory_mb=MB, limit_mb=64)
    snap = workdir / "vm.snap"
    cfg = config(guest, "7.2", workdir, "file", "src")
    with Vm(cfg, workdir, "src") as vm:
        guest.boot(vm)
        with guest.saving(vm) as saved:
            done = save(workdir, vm, snap, "--live", "--resume")
        assert done["ram_path"] == "stream" and done["live"]
        guest.wait_alive(vm)
    restore_into(guest, config(guest, "7.2", workdir, "file", "dst"), workdir, snap, saved)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.qemu
def test_relaunch_fills_a_fresh_backing_and_refuses_a_corrupt_page(workdir, request):
    """`vmsnap restore FILE` relaunches QEMU on a new file at the stored mem-path (the old
    inode, which the original could still be using, is left alone), fills it, and brings
    the VM back; a flipped page stops the restore and ends the QEMU it launched."""
    guest = BootGuest(memory_mb=MB, mode="random")
    snap = workdir / "vm.snap"
    cfg = config(guest, "7.2", workdir, "file", "src")
    with Vm(cfg, workdir, "src") as vm:
        guest.boot(vm)
        with guest.saving(vm) as saved:
            ok(run_vmsnap(workdir, "save", "--quit", "--qmp", vm.tool_qmp_path, snap))
        vm.proc.wait(timeout=60)
    old = os.open(workdir / "src.ram", os.O_RDONLY)
    request.addfinalizer(lambda: os.close(old))
    before = os.pread(old, 1 << 20, 0)
    result = run_vmsnap(workdir, "restore", "--json", "--paused", snap)
    pids = [e["pid"] for e in events(result) if e["event"] == "done"]
    for pid in pids:
        request.addfinalizer(lambda pid=pid: kill(pid))
    done = events(ok(result))[-1]
    assert done["ram_path"] == "shared"
    assert os.stat(workdir / "src.ram").st_ino != os.fstat(old).st_ino
    assert os.pread(old, 1 << 20, 0) == before
    with Vm(cfg, workdir, "src").adopt(pids[0]) as restored:
        guest.check_restored(restored, saved)

    page = flip_page_bit(snap)
    result = run_vmsnap(workdir, "restore", snap)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "pc.ram" in lines[0] and f"{page * 4096:#x}" in lines[0], lines[0]


@pytest.mark.qemu
def test_corrupt_page_caught_filling_a_waiting_target(workdir):
    """Into a --qmp target: the bad page is named, the target is never started. (memfd RAM
    on QEMU 10 is saved through the stream, the target's file RAM filled by vmsnap.)"""
    guest = BootGuest(memory_mb=MB, mode="random")
    snap = workdir / "vm.snap"
    with Vm(config(guest, "10", workdir, "memfd", "src"), workdir, "src") as vm:
        guest.boot(vm)
        assert save(workdir, vm, snap)["ram_path"] == "qemu"  # QEMU 10 writes the pages
    page = flip_page_bit(snap)
    with Vm(config(guest, "10", workdir, "file", "dst"), workdir, "dst",
            incoming="defer") as dst:
        result = run_vmsnap(workdir, "restore", snap, "--qmp", dst.tool_qmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert f"{page * 4096:#x}" in result.stderr, result.stderr
        assert dst.status() == "inmigrate"


@dataclass
class WindowLog(Backing):
    """A backing that notes each window (start, length) the fill maps."""

    windows: list[tuple[int, int]] = field(default_factory=list)

    def window(self, start: int, length: int):
        self.windows.append((start, length))
        return super().window(start, length)


#: Old content a backing holds before the fill (MiB from its start, of 64).
OLD_MB = {"old": 64, "fresh": 0, "half-old": 32}


@pytest.mark.qemu
@pytest.mark.parametrize("old_mb", OLD_MB.values(), ids=OLD_MB.keys())
def test_fill_reads_into_old_pages_writes_fresh_ones_and_punches_out_the_rest(old_mb, workdir):
    """A restore into a backing that holds old data (a file QEMU reopened) reads each run
    of pages with O_DIRECT straight into a mapping of it, at most one chunk per worker
    mapped at a time, into the old pages in place; where the backing has no pages yet (a
    fresh one) the pages are read into vmsnap's buffers, checked there and written, the
    backing never mapped. The pages the snapshot lacks become holes: they read 0 and take
    no memory."""
    guest = BootGuest(memory_mb=64, mode="random")
    snap = workdir / "vm.snap"
    with Vm(config(guest, "7.2", workdir, "file", "src"), workdir, "src") as vm:
        guest.boot(vm)
        assert save(workdir, vm, snap)["ram_path"] == "shared"
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="vmsnap-test-")
    try:
        os.ftruncate(fd, 64 << 20)
        for off in range(0, old_mb << 20, 1 << 20):  # old content in these pages
            os.pwrite(fd, b"\xa5" * (1 << 20), off)
        st = os.fstat(fd)

        def bounded_mapping(n: int) -> None:
            with open("/proc/self/maps") as f:
                spans = [line.split()[0].split("-") for line in f
                         if line.split()[4] == str(st.st_ino)]
            assert sum(int(b, 16) - int(a, 16) for a, b in spans) <= 4 * CHUNK

        backing = WindowLog("pc.ram", fd, 0, 64 << 20)
        with open_snapshot(snap) as s:
            block = s.block("pc.ram")
            pages = fill_from_file(s, {"pc.ram": backing}, workers=4,
                                   progress=bounded_mapping)
            assert pages == block.present_count
            for run in s.page_runs(8 << 20):  # every present page as the trailer says
                if run.block is not block:
                    continue
                data = os.pread(fd, run.count * 4096, run.first * 4096)
                s.check_pages(block, run.first, run.count, memoryview(data), run.index)
            absent = [i for i in range(block.npages) if not block.present[i]]
            runs = [(r.first * 4096, r.count * 4096) for r in s.page_runs(CHUNK)
                    if r.block is block]
        assert absent and all(os.pread(fd, 4096, i * 4096) == bytes(4096) for i in absent)
        assert os.fstat(fd).st_blocks * 512 == pages * 4096  # the absent pages are holes
        # mapped: exactly the runs with old pages; a fresh backing never
        assert sorted(backing.windows) == [r for r in runs if r[0] < old_mb << 20]
    finally:
        os.close(fd)
        os.unlink(path)


def test_unreachable_backing_is_refused():
    dev = shared.Memdev("pc.ram", "memory-backend-memfd", 1 << 20, None, 0)
    with pytest.raises(VmsnapError, match="QMP over TCP"):
        shared.open_backings(None, [dev], writable=True)
    with pytest.raises(VmsnapError, match="not found"):
        shared.open_backings(os.getpid(), [dev], writable=True)


def test_object_options():
    assert relaunch._object_options("memory-backend-file,id=m,mem-path=/a,,b,share=on") == {
        "qom-type": "memory-backend-file", "id": "m", "mem-path": "/a,b", "share": "on"}
    assert relaunch._object_options('{"qom-type":"memory-backend-file","share":true}') == {
        "qom-type": "memory-backend-file", "share": "true"}
