"""Faults around a lazy restore, on real QEMU: a full disk under the hot-page record, QEMU
killed during --populate's copy, the snapshot cut short while postcopy still reads it."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_lazy_restore import (
    _kill,
    assert_waits_paused,
    check_done,
    saved,
    sha256,
    start_lazy,
    wait_event,
)
from test_save_restore import events, ok, qemu_pids_using, run_vmsnap

import vmsnap
from testbed.faultyfs import FaultyFile
from testbed.fullfs import as_root, fill, small_tmpfs
from testbed.guests import BootGuest
from testbed.pagecache import cached, evict, mapped
from testbed.qemu import PROC_GONE, Vm
from vmsnap import targets
from vmsnap.fileformat.hot import hot_path
from vmsnap.orchestration import lazy
from vmsnap.orchestration.qmp import Peer
from vmsnap.stream.constants import TARGET_PAGE_SIZE as PAGE


@pytest.mark.qemu
@as_root
@pytest.mark.parametrize("qemu", ["7.2", "10"], ids=["qemu7.2", "qemu10"])
def test_lazy_restore_on_a_full_disk(qemu, workdir):
    """The snapshot on a full filesystem: the lazy restore (postcopy, with preempt) cannot
    write its hot-page record beside it, says so in one line and brings the guest back
    whole all the same; the snapshot is untouched (not a byte changed, nothing left beside
    it) and restores again."""
    guest = BootGuest(memory_mb=256)  # 128 MiB: all pushed before the guest asked, once
    config = guest.config(qemu, workdir)
    with small_tmpfs(workdir / "full", "320m") as full:
        snap, _, held = saved(guest, qemu, workdir, full / "vm.snap")
        digest = sha256(snap)
        fill(full)
        listing = sorted(os.listdir(full))
        with Vm(config, workdir, "dst", incoming="defer") as dst:
            result = run_vmsnap(workdir, "restore", "--json", "--lazy", snap, "--qmp",
                                dst.tool_qmp_path)
            done = check_done(result)  # with preempt
            assert done["requests"] > 0  # pages to record
            guest.check_restored(dst, held, resumed=True)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "hot pages not recorded" in lines[0] and hot_path(snap) in lines[0], lines
        assert os.strerror(errno.ENOSPC) in lines[0], lines
        assert [e["message"] for e in events(result) if e["event"] == "note"] == lines
        assert sorted(os.listdir(full)) == listing  # no FILE.hot, no FILE.hot.partial
        assert sha256(snap) == digest
        with Vm(config, workdir, "again", incoming="defer") as again:
            ok(run_vmsnap(workdir, "restore", snap, "--qmp", again.tool_qmp_path, "--paused"))
            guest.check_restored(again, held)


@as_root
def test_a_record_that_does_not_fit_is_not_written(workdir):
    """A record with room for only part of it (4 KiB free, a short write): no record, rather
    than a cut one committed in its name."""
    with small_tmpfs(workdir / "full", "64k") as full:
        fill(full, leave=4096)
        with pytest.raises(OSError) as err:
            targets.write_beside(full / "vm.snap", ".hot", "1234567," * 2048)
        assert err.value.errno == errno.ENOSPC
        assert os.listdir(full) == ["filler"]


def spawn_vmsnap(workdir: Path, *args: object) -> subprocess.Popen:
    """The vmsnap command with `args`, started (TMPDIR=workdir, as run_vmsnap)."""
    return subprocess.Popen([sys.executable, "-m", "vmsnap.cli", *map(str, args)],
                            env={**os.environ, "TMPDIR": str(workdir)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ended_by(proc: subprocess.Popen, fault: Callable[[], None]) -> str:
    """Do `fault` to the restore the vmsnap command `proc` runs; its stderr once it ended
    (it is killed if the test fails first)."""
    try:
        fault()
        return proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def fails_in_one_line(proc: subprocess.Popen, fault: Callable[[], None]) -> str:
    """`fault` done to the restore `proc` runs; the one line it then fails with (exit 1,
    no traceback)."""
    err = ended_by(proc, fault)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copied(workdir: Path, snap: Path) -> tuple[int, int] | None:
    """(pid, bytes of `snap` it holds private copies of) of the QEMU of `workdir` once it
    has some; None before."""
    for pid in qemu_pids_using(workdir):
        try:
            private = mapped(pid, snap).get("Anonymous", 0)
        except PROC_GONE:  # gone meanwhile
            continue
        if private:
            return pid, private
    return None


@pytest.mark.qemu
def test_qemu_killed_during_populate(workdir):
    """QEMU SIGKILLed while it copies the guest's RAM (`--lazy=mmap --populate`, paused so
    that only the copy makes private pages: caught between its first and its last): vmsnap
    ends at once, non-zero, with one line saying what happened; the snapshot, which QEMU
    mapped, is byte-identical."""
    guest = BootGuest(memory_mb=1024)
    snap, _, _ = saved(guest, "10", workdir)
    digest = sha256(snap)
    with vmsnap.open(snap) as s:
        size = s.block("pc.ram").used_length
    argv = Vm(guest.config("10", workdir), workdir, "dst").argv()
    proc = spawn_vmsnap(workdir, "restore", "--lazy=mmap", "--populate", "--paused", snap,
                        "--", *argv)

    def kill_while_copying() -> None:
        deadline = time.monotonic() + 120
        while (copying := _copied(workdir, snap)) is None:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "QEMU never started copying"
            time.sleep(0.01)
        pid, private = copying
        assert private < size, "the copy was over before the test could kill QEMU"
        os.kill(pid, signal.SIGKILL)

    line = fails_in_one_line(proc, kill_while_copying)
    assert "QEMU ended while it copied the guest's RAM (--populate)" in line, line
    assert qemu_pids_using(workdir) == []
    assert sha256(snap) == digest


@pytest.mark.qemu
@pytest.mark.parametrize("qemu", ["7.2", "10"], ids=["qemu7.2", "qemu10"])
def test_lazy_restore_file_cut_short_then_resumed(qemu, workdir):
    """The snapshot cut short (truncated at its first guest page) once the guest runs, its
    pages still on their way: vmsnap stops, non-zero, in one line naming the block and
    saying that the guest waits for `--resume`; it does, in postcopy-paused, not spinning;
    once the file is whole again, `--resume` finishes the restore and the RAM checks."""
    guest = BootGuest(memory_mb=256, mode="random")
    snap, _, held = saved(guest, qemu, workdir)
    with vmsnap.open(snap) as s:
        cut = s.block("pc.ram").pages_offset
        snap_blocks = {b.name: b.pages_offset for b in s.blocks}
    whole = workdir / "whole.snap"
    shutil.copyfile(snap, whole)
    with Vm(guest.config(qemu, workdir), workdir, "dst", incoming="defer") as dst:
        proc = start_lazy(workdir, snap, dst.tool_qmp_path)

        def cut_once_running() -> None:
            wait_event(proc, "running")
            os.truncate(snap, cut)

        line = fails_in_one_line(proc, cut_once_running)
        assert "end of file" in line, line
        assert_names_a_page(snap_blocks, line)  # pc.ram or one after it
        assert "waits in postcopy-paused" in line and "--resume" in line, line
        assert_waits_paused(dst)
        shutil.copyfile(whole, snap)  # the same file (inode), whole again
        done = events(ok(run_vmsnap(workdir, "restore", "--json", "--lazy", "--resume", snap,
                                    "--qmp", dst.tool_qmp_path)))[-1]
        assert done["event"] == "done" and done["pages"] > 0, done
        assert dst.cmd("query-migrate")["status"] == "completed"
        guest.check_restored(dst, held, resumed=True)


#: how a read error names its page: "cannot read block 'pc.ram' page at offset 0x1000
#: (file offset 0x201000): Input/output error"
UNREADABLE = re.compile(r"cannot read block '([^']+)' page at offset (0x[0-9a-f]+) "
                        r"\(file offset (0x[0-9a-f]+)\): ")


def assert_names_a_page(pages_offsets: dict[str, int], line: str) -> tuple[str, int]:
    """(block, offset in it) of the page the read error `line` names, its file offset
    checked against the file's layout (`pages_offsets`: where each block's pages are)."""
    m = UNREADABLE.search(line)
    assert m is not None, line
    block, offset, foff = m.group(1), int(m.group(2), 16), int(m.group(3), 16)
    assert offset % PAGE == 0 and foff == pages_offsets[block] + offset, line
    return block, offset


def last_page_failing(snap: Path, workdir: Path) -> tuple[FaultyFile, int, int]:
    """`snap` served through FUSE with the last present page of pc.ram failing its reads
    with EIO (late in RAM: the guest runs before a pusher or check reaches it); (the
    served file, where pc.ram's pages start in the file, that page's number)."""
    with vmsnap.open(snap) as s:
        ram = s.block("pc.ram")
        first, count = (int(x) for x in s.present_runs(ram)[-1])
        page = first + count - 1
        foff = ram.pages_offset + page * PAGE
    faulty = FaultyFile(snap, workdir / "faulty", foff, foff + PAGE)
    faulty.failing.set()
    return faulty, ram.pages_offset, page


@pytest.mark.qemu
@as_root
@pytest.mark.parametrize("qemu", ["7.2", "10"], ids=["qemu7.2", "qemu10"])
def test_lazy_restore_page_unreadable_then_resumed(qemu, workdir):
    """A page of the snapshot that reads with EIO (a bad sector: the file served through a
    FUSE file system that fails that page's reads), late in RAM so the guest runs before
    the pushers reach it: vmsnap ends in one line naming the block, the page's offset in it
    and its file offset, saying the guest waits in postcopy-paused for `--resume`; once the
    page reads again, `--resume` finishes the restore and the RAM checks."""
    guest = BootGuest(memory_mb=1024, mode="random")
    snap, _, held = saved(guest, qemu, workdir)
    faulty, pages_at, page = last_page_failing(snap, workdir)
    with faulty.mounted() as served, \
            Vm(guest.config(qemu, workdir), workdir, "dst", incoming="defer") as dst:
        proc = start_lazy(workdir, served, dst.tool_qmp_path)
        line = fails_in_one_line(proc, lambda: None)
        assert faulty.failed_reads > 0
        assert assert_names_a_page({"pc.ram": pages_at}, line) == ("pc.ram", page * PAGE)
        assert os.strerror(errno.EIO) in line, line
        assert "waits in postcopy-paused" in line and "--resume" in line, line
        assert_waits_paused(dst)
        faulty.failing.clear()
        done = events(ok(run_vmsnap(workdir, "restore", "--json", "--lazy", "--resume",
                                    served, "--qmp", dst.tool_qmp_path)))[-1]
        assert done["event"] == "done" and done["pages"] > 0, done
        assert dst.cmd("query-migrate")["status"] == "completed"
        guest.check_restored(dst, held, resumed=True)


@pytest.mark.qemu
@as_root
def test_mmap_page_unreadable(workdir):
    """mmap (QEMU 10): a page of the snapshot that reads with EIO, late in RAM, the guest
    paused so that only the background check reads it: vmsnap ends in one line naming the
    block, the page's offset and its file offset, and ends the QEMU it launched (a guest
    touching that page would get no data for it)."""
    guest = BootGuest(memory_mb=256, mode="random")
    snap, argv, _ = saved(guest, "10", workdir)
    faulty, pages_at, page = last_page_failing(snap, workdir)
    with faulty.mounted() as served:
        proc = spawn_vmsnap(workdir, "restore", "--json", "--lazy=mmap", "--paused", served,
                            "--", *argv)
        line = fails_in_one_line(proc, lambda: None)
        assert faulty.failed_reads > 0
        assert qemu_pids_using(workdir) == []
    assert assert_names_a_page({"pc.ram": pages_at}, line) == ("pc.ram", page * PAGE)
    assert os.strerror(errno.EIO) in line, line


@pytest.mark.parametrize(("version", "why"), [
    ((7, 2, 0), None), ((8, 0, 0), "may drop"), ((8, 1, 5), "may drop"), ((8, 2, 0), None),
    ((10, 0, 0), None)])
def test_preempt_refused_on_qemu_8_0_and_8_1(version, why):
    """QEMU 8.0-8.1 may end a preempt restore before the last answers on that channel are
    in: those restores go on one channel (the one-channel path itself runs on real QEMU in
    test_lazy_restore_on_one_channel; no QEMU 8.0-8.1 on this test bed)."""
    peer = Peer(version, False, "inmigrate", None, None)
    got = lazy._preempt_refusal({"postcopy-preempt": True}, peer)
    assert (got is None) if why is None else (why in got), got
    assert "no postcopy-preempt" in lazy._preempt_refusal({}, peer)


def cached_share(snap: Path) -> float:
    """The share of the mapped block's pages of `snap` in the page cache."""
    with vmsnap.open(snap) as s:
        ram = s.block("pc.ram")
    return float(cached(snap, ram.pages_offset, ram.npages).astype(bool).mean())


@pytest.mark.qemu
def test_sigint_during_the_mmap_check(workdir, request):
    """mmap: an interrupt while the background check reads the file (1 GiB, cold) ends
    vmsnap (130) at once, not after reading the rest of the file, saying that the guest
    runs on with its pages not all checked; it does, its RAM whole."""
    guest = BootGuest(memory_mb=1024)
    snap, argv, held = saved(guest, "10", workdir)
    evict(snap)
    proc = spawn_vmsnap(workdir, "restore", "--json", "--lazy=mmap", snap, "--", *argv)

    def interrupt_once_running() -> None:
        wait_event(proc, "running")
        proc.send_signal(signal.SIGINT)

    err = ended_by(proc, interrupt_once_running)
    pids = qemu_pids_using(workdir)  # the guest runs on: ended by the test, whatever fails
    for pid in pids:
        request.addfinalizer(lambda pid=pid: _kill(pid))
    assert proc.returncode == 130, err
    assert err.strip() == "vmsnap restore: interrupted: the guest runs on, its pages not " \
        "all checked", err  # one line
    assert cached_share(snap) < 0.75, "the check read on after the interrupt"
    assert len(pids) == 1, pids
    with Vm(guest.config("10", workdir), workdir, "src").adopt(pids[0]) as vm:
        guest.check_restored(vm, held, resumed=True)
        vm.cmd("quit")


@pytest.mark.qemu
def test_qemu_killed_during_the_mmap_check(workdir):
    """mmap: QEMU SIGKILLed while the background check reads the file (1 GiB, cold; the
    guest paused, so that only the check reads it): vmsnap ends at once, non-zero, in one
    line saying that QEMU ended and the pages were not all checked (it used to read on
    and say `done`)."""
    guest = BootGuest(memory_mb=1024)
    snap, argv, _ = saved(guest, "10", workdir)
    evict(snap)
    proc = spawn_vmsnap(workdir, "restore", "--json", "--lazy=mmap", "--paused", snap, "--",
                        *argv)

    def kill_once_running() -> None:
        wait_event(proc, "running")
        pids = qemu_pids_using(workdir)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)

    line = fails_in_one_line(proc, kill_once_running)
    assert "QEMU ended while vmsnap checked the guest's pages" in line, line
    assert "not all checked" in line, line
    assert cached_share(snap) < 0.75, "the check read on after QEMU ended"
    assert qemu_pids_using(workdir) == []


@pytest.mark.qemu
@pytest.mark.parametrize("target", ["qmp", "command"])
def test_qemu_killed_during_postcopy(target, workdir):
    """The target QEMU SIGKILLed once the guest runs, its pages still on their way (a
    --qmp target, or a QEMU vmsnap launched from a given command line): vmsnap ends at once,
    non-zero, in one line saying that QEMU ended (not a bare "Broken pipe")."""
    guest = BootGuest(memory_mb=1024, mode="random")
    snap, argv, _ = saved(guest, "10", workdir)
    evict(snap)  # the push takes a while

    def kill_once_running(proc: subprocess.Popen) -> Callable[[], None]:
        def kill() -> None:
            wait_event(proc, "running")
            pids = qemu_pids_using(workdir)
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
        return kill

    if target == "qmp":
        with Vm(guest.config("10", workdir), workdir, "dst", incoming="defer") as dst:
            proc = start_lazy(workdir, snap, dst.tool_qmp_path)
            line = fails_in_one_line(proc, kill_once_running(proc))
            dst.proc.wait(30)
    else:
        proc = spawn_vmsnap(workdir, "restore", "--json", "--lazy=postcopy", snap, "--", *argv)
        line = fails_in_one_line(proc, kill_once_running(proc))
    assert "QEMU ended during the lazy restore" in line or "QEMU went away" in line, line
    assert qemu_pids_using(workdir) == []
