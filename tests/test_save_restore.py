"""vmsnap save / restore end to end on real QEMU: both guests, both QEMU versions, paused
and live saves, restore into a waiting QEMU, relaunch from the stored command line, the
Python API and the --json events."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import vmsnap
from testbed.cases import ROUND_TRIPS, make_guest
from testbed.cli import events, ok, run_vmsnap
from testbed.craft import flip_page_bit
from testbed.guests import BootGuest
from testbed.qemu import Vm

MIB = 1 << 20


def size_bound(path: Path) -> tuple[int, int]:
    """(apparent size, RAM + 1 MiB per block + device state + trailer)."""
    with vmsnap.open(path) as snap:
        ram = sum(b.used_length for b in snap.blocks)
        trailer = snap.file_size - snap.stream_end
        return path.stat().st_size, ram + MIB * len(snap.blocks) + len(snap.tail) + trailer


#: The whole matrix with 2 multifd channels, and a plain single stream (0) on a few cases.
SAVE_CASES = ([(*case, 2) for case in ROUND_TRIPS]
              + [("boot", False, "7.2", 0), ("boot", True, "10", 0), ("linux", True, "10", 0)])


@pytest.mark.qemu
@pytest.mark.parametrize(("kind", "live", "qemu", "channels"), SAVE_CASES,
                         ids=[f"{k}-{'live' if lv else 'paused'}-qemu{q}-{c}ch"
                              for k, lv, q, c in SAVE_CASES])
def test_save_restore(kind, live, qemu, channels, workdir):
    guest = make_guest(kind, live)
    config = guest.config(qemu, workdir)
    snap = workdir / "vm.snap"
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        guest.wait_alive(src)
        extra = ["--live", "--resume"] if live else []
        with guest.saving(src) as saved:
            result = ok(run_vmsnap(workdir, "save", "--json", "--qmp", src.tool_qmp_path,
                                   snap, "--channels", channels, *extra))
        evs = events(result)
        assert [e["event"] for e in evs][0] == "start" and evs[-1]["event"] == "done"
        done = evs[-1]
        assert done["live"] is live and done["stream_bytes"] > 0 and done["pages"] > 0
        if live:  # --resume: the source runs on
            assert done["final_state"] == "running" and src.status() == "running"
            assert done["dirty_sync_count"] >= 2
            guest.wait_alive(src)
        else:  # default: left paused
            assert done["final_state"] == "paused"
            assert src.status() in ("paused", "postmigrate")  # stopped, state captured
    apparent, bound = size_bound(snap)
    assert apparent <= bound, f"file {apparent} > RAM + slack {bound}"
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        result = ok(run_vmsnap(workdir, "restore", "--json", snap, "--qmp",
                               dst.tool_qmp_path, "--channels", channels, "--paused"))
        done = events(result)[-1]
        assert done["event"] == "done" and done["final_state"] == "paused"
        guest.check_restored(dst, saved)
        dst.cont()
        guest.wait_alive(dst)  # the restored guest keeps running after the check
    snap.unlink()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.qemu
def test_restore_relaunches_from_stored_command_line(qemu_version, workdir, request):
    """`vmsnap restore FILE` alone (7.2), or with `-- COMMAND` (10: the stored chroot command
    line is not runnable on the host), brings the VM back on its old sockets."""
    guest = BootGuest(memory_mb=256)
    config = guest.config(qemu_version, workdir)
    snap = workdir / "vm.snap"
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        guest.wait_alive(src)
        argv = src.argv()
        with guest.saving(src) as saved:
            result = ok(run_vmsnap(workdir, "save", "--json", "--quit", "--qmp",
                                   src.tool_qmp_path, snap))
        assert events(result)[-1]["final_state"] == "quit"
        src.proc.wait(timeout=60)  # gone before its sockets are reused
    with vmsnap.open(snap) as s:
        assert s.metadata.command_line[-len(config.args):] == config.args
    tail = ["--", *argv] if qemu_version == "10" else []
    result = run_vmsnap(workdir, "restore", "--json", "--paused", snap, *tail)
    pids = [e["pid"] for e in events(result) if e["event"] == "done" and e.get("pid")]
    for pid in pids:
        request.addfinalizer(lambda pid=pid: kill_group(pid))
    ok(result)
    assert pids, result.stdout
    with Vm(config, workdir, "src").adopt(pids[0]) as vm:
        guest.check_restored(vm, saved)


@pytest.mark.qemu
def test_python_api(workdir):
    guest = BootGuest(memory_mb=256)
    config = guest.config("7.2", workdir)
    snap = workdir / "vm.snap"
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        with guest.saving(src) as saved:
            result = vmsnap.save(str(src.tool_qmp_path), snap, after="resume")
        assert result.final_state == "running" and src.status() == "running"
        assert result.pages > 0 and not result.live
    with vmsnap.open(snap) as s:
        assert s.metadata.extra["run_state"] == "running"
        assert s.machine_type.startswith("pc-q35")
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        r = vmsnap.restore(snap, qmp_address=str(dst.tool_qmp_path), paused=True)
        assert r.final_state == "paused" and dst.status() == "paused"
        guest.check_restored(dst, saved)


@pytest.mark.qemu
def test_json_progress_events(workdir):
    guest = BootGuest(memory_mb=512, mode="random")
    config = guest.config("7.2", workdir)
    snap = workdir / "vm.snap"
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        with guest.saving(src) as saved:
            save = ok(run_vmsnap(workdir, "save", "--json", "--qmp", src.tool_qmp_path, snap))
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        restore = ok(run_vmsnap(workdir, "restore", "--json", snap, "--qmp",
                                dst.tool_qmp_path, "--paused"))
        guest.check_restored(dst, saved)
    for result, op in ((save, "save"), (restore, "restore")):
        evs = events(result)
        kinds = [e["event"] for e in evs]
        assert kinds[0] == "start" and kinds[-1] == "done" and "error" not in kinds, kinds
        assert all(e["op"] == op for e in evs)
        done = evs[-1]
        assert done["seconds"] > 0 and done["stream_bytes"] > 500 * MIB
        assert done["pages"] >= 500 * MIB // 4096
    progress = [e for e in events(restore) if e["event"] == "progress"]
    assert progress and all(e["done"] <= e["total"] for e in progress)


def qemu_pids_using(workdir: Path) -> list[int]:
    """PIDs of live QEMU processes whose command line mentions `workdir`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and any(
                str(workdir).encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


@pytest.mark.qemu
@pytest.mark.parametrize("channels", [0, 2], ids=["1-stream", "2ch"])
def test_restore_refuses_corrupt_page(channels, workdir):
    """A page that fails its checksum stops the restore before the stream ends: the launched
    QEMU is ended, the error names the page, and no guest runs with bad RAM."""
    guest = BootGuest(memory_mb=256)
    config = guest.config("7.2", workdir)
    snap = workdir / "vm.snap"
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        ok(run_vmsnap(workdir, "save", "--quit", "--qmp", src.tool_qmp_path, snap))
        src.proc.wait(timeout=60)
    page = flip_page_bit(snap)
    result = run_vmsnap(workdir, "restore", snap, "--channels", channels)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "pc.ram" in lines[0] and f"{page * 4096:#x}" in lines[0], lines[0]
    assert qemu_pids_using(workdir) == [], "the QEMU vmsnap launched is still running"


@pytest.mark.qemu
@pytest.mark.parametrize(("qemu", "expected"), [("7.2", 0), ("10", None)])
def test_default_channels_follow_qemu(qemu, expected, workdir):
    """Without --channels a save from QEMU 7.2 (whose multifd sender busy-waits) is one
    stream; from QEMU 10 it uses one channel per CPU (2..8)."""
    guest = BootGuest(memory_mb=128)
    with Vm(guest.config(qemu, workdir), workdir, "src") as src:
        guest.boot(src)
        run = ok(run_vmsnap(workdir, "save", "--json", "--resume", "--qmp",
                            src.tool_qmp_path, workdir / "vm.snap"))
        channels = events(run)[0]["channels"]
        assert channels == expected if expected is not None else 2 <= channels <= 8, channels
