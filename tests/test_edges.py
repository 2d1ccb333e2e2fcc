"""The package's edges: one exception family, a light `import vmsnap`, the CLI's switches."""

from __future__ import annotations

import subprocess
import sys

import pytest

import vmsnap
from testbed.transfer import VMSNAP

FAMILY = ["StreamError", "SnapshotError", "NoCommitRecord", "CorruptTrailer",
          "UnsupportedVersion", "IncompleteSnapshot", "ChecksumMismatch", "IOEngineError",
          "FileLockedError", "QMPConnectError", "QmpCommandError", "QemuGoneError",
          "TargetError"]


@pytest.mark.parametrize("name", FAMILY)
def test_every_user_error_is_a_vmsnap_error(name):
    cls = getattr(vmsnap, name)
    assert issubclass(cls, vmsnap.VmsnapError) and name in vmsnap.__all__


def test_second_bases_kept():
    assert issubclass(vmsnap.StreamError, ValueError)
    assert issubclass(vmsnap.SnapshotError, ValueError)
    assert issubclass(vmsnap.IOEngineError, OSError)
    assert issubclass(vmsnap.FileLockedError, OSError)
    assert issubclass(vmsnap.QMPConnectError, ConnectionError)
    assert issubclass(vmsnap.TargetError, OSError)


def test_one_line():
    from vmsnap.errors import one_line

    assert one_line(vmsnap.VmsnapError("a\n  b")) == "a b"
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x/y")) == (
        "No such file or directory: /x/y")
    assert one_line(vmsnap.VmsnapError()) == "VmsnapError"


def test_import_is_light_and_star_keeps_builtins():
    code = ("import sys, builtins\nfrom vmsnap import *\n"
            "assert open is builtins.open\nassert 'rich' not in sys.modules, 'rich imported'\n"
            "import vmsnap\nassert vmsnap.open is not builtins.open\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_qmp_connect_error_is_caught_by_the_family(tmp_path):
    with pytest.raises(vmsnap.VmsnapError, match="cannot connect to QMP"):
        vmsnap.save(str(tmp_path / "no.qmp"), tmp_path / "x.vms", channels=0)
    assert not (tmp_path / "x.vms.partial").exists()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VMSNAP, *args], capture_output=True, text=True, timeout=60)


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vmsnap {vmsnap.__version__}"


def test_restore_usage_shows_the_qemu_command():
    proc = run("restore", "--help")
    assert proc.returncode == 0
    assert "[-- QEMU_COMMAND ...]" in proc.stdout and "--no-direct" in proc.stdout


@pytest.mark.parametrize("verbose", [[], ["-v"]], ids=["quiet", "verbose"])
def test_verbose_logs_debug_records(tmp_path, verbose):
    proc = run(*verbose, "save", "--qmp", str(tmp_path / "no.qmp"), str(tmp_path / "x.vms"))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("vmsnap save: error: cannot connect")
    assert len(lines) == 1 if not verbose else any(" DEBUG: " in x for x in lines), lines


def test_api_covers_the_file_verbs(small_snapshot, tmp_path):
    """info, verify, send, receive and import as Python calls (the CLI is a layer over
    them): a snapshot sent and received again holds the same pages, all checked."""
    info = vmsnap.info(small_snapshot)
    assert info["format"] == "vmsnap" and info["blocks"]
    checked = vmsnap.verify(small_snapshot)
    assert checked.pages == sum(b["present_pages"] for b in info["blocks"]) > 0
    stream = tmp_path / "stream"
    with open(stream, "wb") as sink:
        sent = vmsnap.send(small_snapshot, sink)
    with open(stream, "rb") as source:
        got = vmsnap.receive(source, tmp_path / "copy.vms")
    assert isinstance(sent, vmsnap.SendStats) and isinstance(got, vmsnap.ReceiveStats)
    assert got.pages == sent.pages == checked.pages
    assert vmsnap.verify(tmp_path / "copy.vms").pages == checked.pages
    imported, domain = vmsnap.import_stream(str(stream), tmp_path / "imported.vms")
    assert imported.pages == checked.pages and domain is None


def test_after_is_a_typed_choice(tmp_path):
    """`after` is vmsnap.After (a StrEnum: its values still work), refused in the same words."""
    assert "After" in vmsnap.__all__ and vmsnap.After("resume") is vmsnap.After.RESUME
    assert [a.value for a in vmsnap.After] == ["pause", "resume", "quit"]
    with pytest.raises(ValueError, match=r"^after must be pause, resume or quit, not 'later'$"):
        vmsnap.save(str(tmp_path / "no.qmp"), tmp_path / "x.vms", after="later")
    assert not (tmp_path / "x.vms.partial").exists()


@pytest.mark.parametrize("optimize", [[], ["-O"]], ids=["asserts-on", "asserts-stripped"])
def test_stream_without_configuration_is_one_line(tmp_path, optimize):
    """Untrusted input is checked explicitly, never by `assert` (gone under -O): a stream that
    lists RAM blocks before any configuration section is refused in one line."""
    from vmsnap.stream import RamBlock
    from vmsnap.stream import encoder as E

    stream = tmp_path / "stream.bin"
    stream.write_bytes(E.header() + E.ram_start(2, [RamBlock("pc.ram", 1 << 20)]) + E.eos()
                       + E.footer(2))
    out = tmp_path / "x.vms"
    proc = subprocess.run([sys.executable, *optimize, "-m", "vmsnap.cli", "import", str(stream),
                           str(out)], capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert "configuration" in lines[0], lines
    assert not out.exists() and not (tmp_path / "x.vms.partial").exists()
