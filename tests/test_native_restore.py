"""restore --no-verify (issue 10): a QEMU >= 9.1 target reads the snapshot itself (mapped-ram,
multifd, direct-io), handed over as fds in an fdset, so a QEMU in another mount namespace
that cannot see the file loads it. vmsnap checks the device state and the stream's other
non-page bytes first; where QEMU cannot (7.2) or must not (RAM that may hold old data) read
the file, the restore takes the stream path, every page checked."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from testbed.cli import events, ok, one_line, run_vmsnap, save_quit
from testbed.craft import flip_bit
from testbed.guests import BootGuest
from testbed.qemu import Vm
from vmsnap.fileformat.reader import open_snapshot

pytestmark = pytest.mark.qemu


@pytest.fixture
def outside():
    """A directory the chroot QEMU 10 cannot see (only the test's workdir is bound in)."""
    d = Path(tempfile.mkdtemp(prefix="vmsnap-native-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def done(result) -> dict:
    return next(e for e in events(ok(result)) if e["event"] == "done")


#: Modules of the stream path and of saves: a restore that QEMU loads itself needs none of
#: them before QEMU starts (each one imported first is start-up time added to the load's)
STREAM_PATH = {"vmsnap.ops.send", "vmsnap.ops.multifd_send", "vmsnap.ops.shared_ram",
               "vmsnap.ops.receive", "vmsnap.ops.seal", "vmsnap.fileformat.writer",
               "vmsnap.orchestration.save", "vmsnap.orchestration.streamed"}


def imported_before(stderr: str, mark: str) -> set[str]:
    """The modules a run with PYTHONPROFILEIMPORTTIME=1 imported before its first stderr
    line holding `mark`."""
    lines = stderr.splitlines()
    end = next(i for i, line in enumerate(lines) if mark in line)
    return {line.rsplit("|", 1)[1].strip() for line in lines[:end]
            if line.startswith("import time:")}


@pytest.mark.parametrize(("qemu", "ram_path"), [("10", "qemu"), ("7.2", "stream")])
def test_no_verify_restore(workdir, outside, qemu, ram_path):
    """QEMU 10 reads the file itself (it cannot see its directory) after vmsnap checked the
    device state, which refuses a flipped bit there in one line; QEMU 7.2 takes the stream."""
    guest = BootGuest(memory_mb=256)
    config = guest.config(qemu, workdir)
    snap = outside / "vm.snap"
    saved = save_quit(guest, config, workdir, snap)
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        run = run_vmsnap(workdir, "-v", "restore", "--json", "--no-verify", "--paused", snap,
                         "--qmp", dst.tool_qmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
        d = done(run)
        assert d["ram_path"] == ram_path and d["final_state"] == "paused", d
        if ram_path == "qemu":  # QEMU's load waits on none of the stream path's machinery
            early = imported_before(run.stderr, "-> migrate-incoming")
            assert not early & STREAM_PATH, sorted(early & STREAM_PATH)
            assert "numpy" not in early  # ~50 ms (vmsnap.lazy_numpy)
        assert 0 < d["load_seconds"] <= d["seconds"], d  # the loading part of the restore
        guest.check_restored(dst, saved)
    if qemu != "10":
        return
    with open_snapshot(str(snap)) as s:
        device_state = s.tail_offset + len(s.tail) // 2
    flip_bit(snap, device_state)
    with Vm(config, workdir, "dst2", incoming="defer") as dst:
        line = one_line(run_vmsnap(workdir, "restore", "--no-verify", snap, "--qmp",
                                   dst.tool_qmp_path))
        assert "corrupt" in line and "device state" in line, line
        assert dst.status() == "inmigrate"


def test_no_verify_is_for_eager_restores(workdir):
    line = one_line(run_vmsnap(workdir, "restore", "--lazy", "--no-verify", workdir / "x",
                               "--qmp", workdir / "q"))
    assert "--no-verify" in line
