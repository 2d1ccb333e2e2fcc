"""QEMU >= 9.1 writes the pages itself (mapped-ram, multifd, direct-io) into vmsnap's
FILE.partial, handed over as fds because QEMU 10 here runs in a chroot that cannot see the
file's directory; vmsnap seals and commits it. The file restores through vmsnap's stream and
through QEMU's own file: loader; a flipped page is caught; `vmsnap seal` covers a file QEMU
wrote on its own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import vmsnap
from testbed.cli import events, ok, one_line, run_vmsnap
from testbed.craft import flip_page_bit
from testbed.guests import BootGuest
from testbed.qemu import Vm

MB = 256


@pytest.fixture
def outside(tmp_path_factory) -> Path:
    """A directory the chroot QEMU does not have bound (vmsnap's files go there)."""
    d = Path("/var/tmp") / f"vmsnap-native-{tmp_path_factory.getbasetemp().name}"
    d.mkdir(mode=0o700, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.qemu
def test_qemu_writes_vmsnap_seals(workdir, outside):
    guest = BootGuest(memory_mb=MB, mode="random")
    cfg = guest.config("10", workdir)
    snap = outside / "vm.snap"
    with Vm(cfg, workdir, "src") as src:
        guest.boot(src)
        done = events(ok(run_vmsnap(workdir, "save", "--json", "--qmp", src.tool_qmp_path,
                                    snap, "--channels", 2)))[-1]
    assert done["ram_path"] == "qemu" and done["pages"] > MB * 256 * 0.9
    assert not Path(f"{snap}.partial").exists()
    with vmsnap.open(snap) as s:
        assert not s.native and s.metadata.extra["pages_by"] == "qemu"
        assert s.verify().pages == done["pages"]
    with Vm(cfg, workdir, "dst", incoming="defer") as dst:  # vmsnap's own restore
        ok(run_vmsnap(workdir, "restore", snap, "--qmp", dst.tool_qmp_path))
        guest.check_restored(dst)
    copy = workdir / "copy.snap"  # QEMU's loader ignores vmsnap's trailer
    shutil.copyfile(snap, copy)
    with Vm(cfg, workdir, "dst2", incoming="defer") as dst:
        dst.set_migration({"mapped-ram": True})
        dst.cmd("migrate-incoming", uri=f"file:{copy}")
        dst.wait_incoming()
        guest.check_restored(dst)
    page = flip_page_bit(snap, byte=7, mask=0x80)
    line = one_line(run_vmsnap(workdir, "restore", snap, "--", *cfg_argv(cfg, workdir)))
    assert f"{page * 4096:#x}" in line


def cfg_argv(cfg, workdir: Path) -> list[str]:
    return Vm(cfg, workdir, "dst3").argv()


@pytest.mark.qemu
def test_seal_a_file_qemu_wrote_alone(workdir):
    guest = BootGuest(memory_mb=MB, mode="random")
    cfg = guest.config("10", workdir)
    native = workdir / "native.img"
    with Vm(cfg, workdir, "src") as src:
        guest.boot(src)
        src.stop()
        src.migrate(f"file:{native}", capabilities={"mapped-ram": True})
    with vmsnap.open(native) as s:
        assert s.native
    line = one_line(run_vmsnap(workdir, "verify", native))
    assert "no checksums" in line
    ok(run_vmsnap(workdir, "seal", native))
    ok(run_vmsnap(workdir, "verify", native))
    assert "already sealed" in one_line(run_vmsnap(workdir, "seal", native))
    with Vm(cfg, workdir, "dst", incoming="defer") as dst:
        ok(run_vmsnap(workdir, "restore", native, "--qmp", dst.tool_qmp_path))
        guest.check_restored(dst)
