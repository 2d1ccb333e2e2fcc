"""A restore opens FILE once (issue 12): what it checked is what it loads. The file at the
path is replaced between the checks and the load (by the reporter's `start`, which comes
after the file was read and the target checked, right before the pages go): the restore
still loads the file it opened, whether vmsnap streams it or QEMU >= 9.1 reads it itself
(handed the very file, not its path). A reopen by path would read the replacement and fail."""

from __future__ import annotations

import os
import tempfile

import pytest

import vmsnap
from testbed.cli import save_quit
from testbed.guests import BootGuest
from testbed.qemu import Vm
from vmsnap.progress import Reporter

pytestmark = pytest.mark.qemu


class SwapAtStart(Reporter):
    """Replaces the snapshot at `path` with a file of zeros of its size when the load
    starts."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.swapped = False

    def start(self, op: str, total: int | None = None, **fields: object) -> None:
        decoy = self.path + ".decoy"
        with open(decoy, "wb") as f:
            f.truncate(os.path.getsize(self.path))
        os.replace(decoy, self.path)
        self.swapped = True
        super().start(op, total, **fields)


@pytest.mark.parametrize(("qemu", "channels", "verify", "ram_path"),
                         [("7.2", 0, True, "stream"), ("7.2", 2, True, "stream"),
                          ("10", 2, False, "qemu")],
                         ids=["stream", "multifd", "qemu-reads"])
def test_restore_loads_the_file_it_checked(workdir, monkeypatch, qemu, channels, verify,
                                           ram_path):
    monkeypatch.setattr(tempfile, "tempdir", str(workdir))  # a chroot QEMU 10 sees it
    guest = BootGuest(memory_mb=256)
    config = guest.config(qemu, workdir)
    snap = workdir / "vm.snap"
    saved = save_quit(guest, config, workdir, snap)
    rep = SwapAtStart(str(snap))
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        r = vmsnap.restore(snap, qmp_address=str(dst.tool_qmp_path), channels=channels,
                           verify=verify, reporter=rep, paused=True)
        assert rep.swapped and r.ram_path == ram_path, r
        guest.check_restored(dst, saved)
    assert not any(snap.read_bytes()[:1 << 20]), "the file at the path was not replaced"
