"""Issue 11 items 7 (in part), 11 and 13 (in part): odd things at FILE or FILE.partial, and
odd text inside a file. Each ends in one line naming the path or the problem; a save fails
before it touches the VM; `info` shows names and command lines as text, never as markup or
terminal escapes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from testbed.cli import ok, one_line, run_vmsnap
from testbed.craft import rename_block, resign
from testbed.guests import BootGuest
from testbed.qemu import Vm
from vmsnap.hostkey import load_or_create_key

pytestmark = pytest.mark.qemu


@pytest.fixture
def vm(workdir):
    """A running bootguest (QEMU 7.2, KVM) to save."""
    guest = BootGuest(memory_mb=256)
    with Vm(guest.config("7.2", workdir), workdir, "src") as src:
        guest.boot(src)
        yield src


def fails_before_touching(vm: Vm, workdir: Path, target: Path, *args: str) -> str:
    """`vmsnap save` to `target` fails with one line, the VM runs on untouched."""
    line = one_line(run_vmsnap(workdir, "save", "--qmp", vm.tool_qmp_path, target, *args,
                               timeout=120))
    assert vm.status() == "running"
    assert vm.cmd("query-migrate") == {}, "a migration was started"
    return line


def test_odd_partial_files_and_directory_target(vm, workdir):
    """FILE.partial a FIFO, a symlink to one, a dangling symlink: one line each, no hang, no
    false "being saved by another process"; FILE a directory (even with --force): one line
    naming it, before the VM is touched. Then a normal save over a 0644 file: 0600."""
    target = workdir / "vm.snap"
    partial = workdir / "vm.snap.partial"
    os.mkfifo(partial)
    assert "not a regular file" in fails_before_touching(vm, workdir, target)
    partial.unlink()
    os.mkfifo(workdir / "fifo")
    partial.symlink_to(workdir / "fifo")
    assert "symbolic link" in fails_before_touching(vm, workdir, target)
    partial.unlink()
    partial.symlink_to(workdir / "nowhere")
    line = fails_before_touching(vm, workdir, target)
    assert "symbolic link" in line and "another process" not in line
    partial.unlink()
    (workdir / "dir.snap").mkdir()
    line = fails_before_touching(vm, workdir, workdir / "dir.snap", "--force")
    assert "Is a directory" in line and str(workdir / "dir.snap") in line, line
    assert not (workdir / "dir.snap.partial").exists()
    target.write_bytes(b"old")
    target.chmod(0o644)
    ok(run_vmsnap(workdir, "save", "--resume", "--force", "--qmp", vm.tool_qmp_path, target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # snapshots hold guest RAM
    assert vm.status() == "running"


@pytest.mark.parametrize("verb", ["info", "verify", "send", "restore"])
def test_directory_or_fifo_as_file(workdir, verb):
    (workdir / "d").mkdir()
    line = one_line(run_vmsnap(workdir, verb, workdir / "d", timeout=120))
    assert line.endswith(f"Is a directory: {workdir / 'd'}"), line
    os.mkfifo(workdir / "f")
    line = one_line(run_vmsnap(workdir, verb, workdir / "f", timeout=120))
    assert "Not a regular file" in line and str(workdir / "f") in line, line


def test_markup_and_escapes_in_block_names(small_snapshot, workdir):
    """Block names from the file are shown as they are: `[/bold]` (which made rich raise) and
    an ANSI escape (which reached the terminal) print as text. The file still verifies."""
    f = Path(shutil.copy(small_snapshot, workdir / "names.vms"))
    rename_block(f, "pc.bios", "[/bold]", None)
    rename_block(f, "pc.rom", "\x1b[31mX", None)
    ok(run_vmsnap(workdir, "verify", f))
    out = ok(run_vmsnap(workdir, "info", f)).stdout
    assert "[/bold]" in out and "\x1b" not in out and "\\x1b[31mX" in out
    names = [b["name"] for b in json.loads(ok(run_vmsnap(workdir, "info", "--json", f))
                                           .stdout)["blocks"]]
    assert "[/bold]" in names and "\x1b[31mX" in names


@pytest.mark.parametrize(("arg", "runnable"), [
    ("-name\0evil", False), ("\ud800", False), ("\udcff", True), ("[/bold][red]x", True),
], ids=["nul", "lone-surrogate", "undecodable-byte", "markup"])
def test_odd_text_in_signed_command_line(small_snapshot, workdir, arg, runnable):
    """A command line this host signed (so trusted) with a NUL byte or a lone surrogate: the
    relaunch fails with one line before anything runs. `info` shows every such argument
    escaped (an undecodable byte, kept as a surrogate escape, is a valid argument), and markup
    as plain text."""
    f = Path(shutil.copy(small_snapshot, workdir / "cmd.vms"))

    def edit(trailer) -> None:
        trailer.metadata.command_line = ["qemu-system-x86_64", "-name", arg]
    resign(f, edit, load_or_create_key())
    out = ok(run_vmsnap(workdir, "info", f)).stdout
    assert "trusted: signed by this host" in out
    assert (arg if arg.isprintable() else ascii(arg)[1:-1]) in out, out
    if not runnable:
        line = one_line(run_vmsnap(workdir, "restore", f, timeout=120))
        assert "cannot be passed to a program" in line, line
