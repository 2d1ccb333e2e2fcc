"""Zero pages on restore (issue 11 item 3): a page that is zero in the snapshot must be zero
in the restored VM even when the target's RAM is a memory-backend-file whose file already
holds data (a VM that ran on, an earlier restore). vmsnap skips zero pages only in blocks the
target backs with fresh anonymous memory, which it asks the target QEMU about."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import vmsnap
from testbed.guests import BootGuest
from testbed.qemu import Vm

MIB = 1 << 20
#: (channels, QEMU, extra restore options): --no-verify on QEMU 10 must not let QEMU's own
#: loader (present pages only) restore into such RAM
CASES = [(0, "7.2", ()), (2, "7.2", ()), (2, "10", ()), (2, "10", ("--no-verify",))]


def run_ok(workdir, *args) -> None:
    r = subprocess.run([sys.executable, "-m", "vmsnap.cli", *map(str, args)],
                       env={**os.environ, "TMPDIR": str(workdir)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.qemu
@pytest.mark.parametrize(("channels", "qemu_version", "extra"), CASES,
                         ids=[f"{c}ch-qemu{q}{''.join(e)}" for c, q, e in CASES])
def test_restore_into_file_backed_ram_holding_old_data(workdir, channels, qemu_version, extra):
    guest = BootGuest(memory_mb=256, limit_mb=32)  # 224 MiB of zero pages in pc.ram
    snap = workdir / "vm.snap"
    with Vm(guest.config(qemu_version, workdir), workdir, "src") as src:
        guest.boot(src)
        with guest.saving(src) as saved:
            run_ok(workdir, "save", "--quit", "--qmp", src.tool_qmp_path, snap)
        src.proc.wait(timeout=60)
    backing = workdir / "ram.img"
    with open(backing, "wb") as f:  # stale bytes everywhere, as a VM that ran on leaves
        f.write(b"\xa5" * (guest.memory_mb * MIB))
    config = guest.config(qemu_version, workdir)
    config.machine += ",memory-backend=pc.ram"
    config.args += ["-object", f"memory-backend-file,id=pc.ram,size={guest.memory_mb}M,"
                               f"mem-path={backing},share=on"]
    with Vm(config, workdir, "dst", incoming="defer") as dst:
        run_ok(workdir, "restore", "--paused", snap, "--qmp", dst.tool_qmp_path,
               "--channels", channels, *extra)
        ram = np.fromfile(backing, np.uint8).reshape(-1, 4096)  # the guest's RAM itself
        with vmsnap.open(snap) as s:
            zero = ~s.block("pc.ram").present
        assert zero.sum() > 200 * MIB // 4096
        stale = np.flatnonzero(ram[zero].any(axis=1))
        assert len(stale) == 0, f"{len(stale)} zero pages kept stale data, first {stale[:4]}"
        guest.check_restored(dst, saved)
    backing.unlink()
    snap.unlink()
