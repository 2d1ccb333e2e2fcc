"""QEMU >= 9.1 writes the pages itself (mapped-ram, multifd, direct-io) into vmsnap's
FILE.partial, handed over as fds because QEMU 10 here runs in a chroot that cannot see the
file's directory; vmsnap seals and commits it. The file restores through vmsnap's stream and
through QEMU's own file: loader; a flipped page is caught; `vmsnap seal` covers a file QEMU
wrote on its own."""

from __future__ import annotations

import errno
import filecmp
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

import vmsnap
from testbed.cli import events, ok, one_line, run_vmsnap
from testbed.craft import flip_page_bit
from testbed.fullfs import as_root, fill, small_tmpfs
from testbed.guests import BootGuest
from testbed.qemu import Vm

MB = 256
PAGE = 4096


@pytest.fixture
def outside() -> Path:
    """A directory the chroot QEMU does not have bound (vmsnap's files go there), this
    test's own."""
    d = Path(tempfile.mkdtemp(prefix="vmsnap-native-", dir="/var/tmp"))  # 0700
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.qemu
def test_qemu_writes_vmsnap_seals(workdir, outside):
    guest = BootGuest(memory_mb=MB, mode="random")
    cfg = guest.config("10", workdir)
    snap = outside / "vm.snap"
    with Vm(cfg, workdir, "src") as src:
        guest.boot(src)
        with guest.saving(src) as saved:
            done = events(ok(run_vmsnap(workdir, "save", "--json", "--qmp",
                                        src.tool_qmp_path, snap, "--channels", 2)))[-1]
    assert done["ram_path"] == "qemu" and done["pages"] > MB * 256 * 0.9
    assert not Path(f"{snap}.partial").exists()
    with vmsnap.open(snap) as s:
        assert not s.native and s.metadata.extra["pages_by"] == "qemu"
        assert s.verify().pages == done["pages"]
    with Vm(cfg, workdir, "dst", incoming="defer") as dst:  # vmsnap's own restore
        ok(run_vmsnap(workdir, "restore", snap, "--paused", "--qmp", dst.tool_qmp_path))
        guest.check_restored(dst, saved)
    copy = workdir / "copy.snap"  # QEMU's loader ignores vmsnap's trailer
    shutil.copyfile(snap, copy)
    with Vm(cfg, workdir, "dst2", incoming="defer") as dst:
        dst.set_migration({"mapped-ram": True})
        dst.cmd("migrate-incoming", uri=f"file:{copy}")
        dst.wait_incoming()
        guest.check_restored(dst, saved)
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
        with guest.saving(src) as saved:
            src.migrate(f"file:{native}", capabilities={"mapped-ram": True})
    with vmsnap.open(native) as s:
        assert s.native
    line = one_line(run_vmsnap(workdir, "verify", native))
    assert "no checksums" in line
    ok(run_vmsnap(workdir, "seal", native))
    ok(run_vmsnap(workdir, "verify", native))
    assert "already sealed" in one_line(run_vmsnap(workdir, "seal", native))
    with Vm(cfg, workdir, "dst", incoming="defer") as dst:
        ok(run_vmsnap(workdir, "restore", native, "--paused", "--qmp", dst.tool_qmp_path))
        guest.check_restored(dst, saved)


def _info(workdir: Path, snap: Path) -> dict:
    return json.loads(ok(run_vmsnap(workdir, "info", "--json", snap)).stdout)


@pytest.mark.qemu
def test_commit_first_seal_later_and_background(workdir, outside):
    """--seal later: FILE is committed, signed and restorable before its page checksums
    exist; info and verify say so; `vmsnap seal` adds them and keeps the signature (the
    stored command line stays trusted). --seal background: a detached `vmsnap seal` does."""
    guest = BootGuest(memory_mb=MB, mode="random")
    cfg = guest.config("10", workdir)
    later, bg = outside / "later.snap", outside / "bg.snap"
    with Vm(cfg, workdir, "src") as src:
        guest.boot(src)
        with guest.saving(src) as saved:
            done = events(ok(run_vmsnap(workdir, "save", "--json", "--resume", "--seal",
                                        "later", "--qmp", src.tool_qmp_path, later)))[-1]
        assert done["ram_path"] == "qemu" and not done["pages_checked"], done
        assert done["committed_seconds"] <= done["seconds"] + 0.001
        bg_done = events(ok(run_vmsnap(workdir, "save", "--json", "--seal", "background",
                                       "--qmp", src.tool_qmp_path, bg)))[-1]
    info = _info(workdir, later)
    assert info["pages_checked"] is False and "pending" in info["integrity"], info
    assert info["command_line_trusted"] is True
    assert "pending" in one_line(run_vmsnap(workdir, "verify", later))
    with Vm(cfg, workdir, "dst", incoming="defer") as dst:  # restorable at once, unchecked
        r = ok(run_vmsnap(workdir, "restore", later, "--paused", "--qmp", dst.tool_qmp_path))
        assert "pending" in r.stderr
        guest.check_restored(dst, saved)
    ok(run_vmsnap(workdir, "seal", later))
    info = _info(workdir, later)
    assert info["pages_checked"] is True and info["command_line_trusted"] is True, info
    ok(run_vmsnap(workdir, "verify", later))
    pid = bg_done["sealing_pid"]
    deadline = time.monotonic() + 120
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _info(workdir, bg)["pages_checked"] is True
    ok(run_vmsnap(workdir, "verify", bg))


@pytest.mark.qemu
def test_interrupted_seal_is_read_through_its_journal(workdir, outside):
    """A seal that crashed while it rewrote the trailer: the file reads as sealed through
    FILE.seal (the stream is untouched), verifies, and `vmsnap seal` completes it."""
    guest = BootGuest(memory_mb=MB, mode="random")
    cfg = guest.config("10", workdir)
    snap, sealed = outside / "vm.snap", outside / "sealed.snap"
    with Vm(cfg, workdir, "src") as src:
        guest.boot(src)
        ok(run_vmsnap(workdir, "save", "--seal", "later", "--qmp", src.tool_qmp_path, snap))
    shutil.copyfile(snap, sealed)
    ok(run_vmsnap(workdir, "seal", sealed))
    with vmsnap.open(snap) as s:
        offset = s.trailer.commit.body_offset
    trailer = sealed.read_bytes()[offset:]
    Path(f"{snap}.seal").write_bytes(offset.to_bytes(8, "little") + trailer)
    with open(snap, "r+b") as f:  # the crash: half the new trailer over the old one
        f.seek(offset)
        f.write(trailer[:len(trailer) // 2])
    with vmsnap.open(snap) as s:
        assert s.pages_checked
    ok(run_vmsnap(workdir, "verify", snap))
    ok(run_vmsnap(workdir, "seal", snap))  # completes the journaled seal
    assert not Path(f"{snap}.seal").exists()
    assert snap.read_bytes() == sealed.read_bytes()
    Path(f"{snap}.seal").write_bytes(b"\0" * 100)  # a stray journal of garbage: ignored
    ok(run_vmsnap(workdir, "verify", snap))


@pytest.mark.qemu
@as_root
@pytest.mark.parametrize("room", ["none", "journal"], ids=["no-room", "room-for-the-journal"])
def test_seal_on_a_full_disk(workdir, room):
    """`vmsnap seal` of a file whose sealed trailer does not fit: one line, non-zero, and
    the file is never spoiled. With no room for the journal, the file is left as it was
    (and no FILE.seal); with room for the journal but not for the trailer in the file, the
    file reads through its journal, sealed. Once there is room, `vmsnap seal` seals (or
    completes) it as a seal with room does, and it verifies."""
    guest = BootGuest(memory_mb=128, mode="random")
    with small_tmpfs(workdir / "full", "192m") as full:
        snap = full / "vm.snap"
        with Vm(guest.config("10", workdir), workdir, "src") as src:
            guest.boot(src)
            done = events(ok(run_vmsnap(workdir, "save", "--json", "--seal", "later",
                                        "--qmp", src.tool_qmp_path, snap)))[-1]
        assert done["ram_path"] == "qemu" and not done["pages_checked"], done
        sealed = workdir / "sealed.snap"  # the same sealed with room
        shutil.copyfile(snap, sealed)
        ok(run_vmsnap(workdir, "seal", sealed))
        with vmsnap.open(snap) as s:
            offset = s.trailer.commit.body_offset
        journal = 8 + sealed.stat().st_size - offset
        growth = sealed.stat().st_size - snap.stat().st_size
        assert growth > 8 * PAGE, growth  # 8 bytes per page of RAM
        before = snap.read_bytes()
        # room for the journal (whole pages), and half of what the file grows by
        leave = 0 if room == "none" else -(-journal // PAGE) * PAGE + growth // 2 // PAGE * PAGE
        filler = fill(full, leave)
        failed = run_vmsnap(workdir, "seal", snap)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and os.strerror(errno.ENOSPC) in lines[0], lines
        if room == "none":
            assert snap.read_bytes() == before
            assert sorted(os.listdir(full)) == ["filler", "vm.snap"]
        else:
            assert "vmsnap seal" in lines[0], lines  # what completes it
            with vmsnap.open(snap) as s:
                assert s.pages_checked  # through the journal
        filler.unlink()
        ok(run_vmsnap(workdir, "seal", snap))
        assert not Path(f"{snap}.seal").exists()
        assert filecmp.cmp(snap, sealed, shallow=False)
        ok(run_vmsnap(workdir, "verify", snap))
