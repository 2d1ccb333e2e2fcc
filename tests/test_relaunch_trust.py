"""Issue 11 item 1 on a real VM: a stored command line runs only when this host saved the
file. A file re-sealed by an attacker still passes `verify` but is refused before anything
runs; another host's file needs --trust-command-line; a shell is never run."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from testbed.cli import events, ok, one_line, run_vmsnap
from testbed.craft import reseal
from testbed.guests import BootGuest
from testbed.qemu import Vm

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A bootguest on QEMU 7.2 saved with --quit by `vmsnap save` (so signed by this host)."""
    workdir = tmp_path_factory.mktemp("trust")
    workdir.chmod(0o700)
    guest = BootGuest(memory_mb=256)
    config = guest.config("7.2", workdir)
    snap = workdir / "vm.snap"
    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        with guest.saving(src) as held:
            ok(run_vmsnap(workdir, "save", "--quit", "--qmp", src.tool_qmp_path, snap))
        src.proc.wait(timeout=60)
    return guest, config, workdir, snap, held


def info(workdir: Path, snap: Path, env: dict | None = None) -> dict:
    return json.loads(ok(run_vmsnap(workdir, "info", "--json", snap, env=env)).stdout)


def relaunched(result, request) -> int:
    pids = [e["pid"] for e in events(result) if e["event"] == "done" and e.get("pid")]
    for pid in pids:
        request.addfinalizer(lambda pid=pid: _kill(pid))
    ok(result)
    assert pids, result.stdout
    return pids[0]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_saved_file_is_signed_and_trusted(saved):
    _guest, _config, workdir, snap, _ = saved
    described = info(workdir, snap)
    assert described["command_line_trusted"] is True
    assert described["command_line_trust"] == "signed by this host's key"
    assert "NOT trusted" not in ok(run_vmsnap(workdir, "info", snap)).stdout


def test_resealed_shell_command_never_runs(saved, tmp_path):
    """The issue's attack: argv = /bin/sh -c ..., re-sealed. verify passes; restore refuses
    (altered), and even --trust-command-line refuses a program that is not QEMU."""
    _guest, _config, workdir, snap, _ = saved
    evil = shutil.copy(snap, tmp_path / "evil.snap")
    mark = tmp_path / "pwned"
    reseal(Path(evil), lambda md: md.update(command_line=["/bin/sh", "-c", f"touch {mark}"]))
    ok(run_vmsnap(workdir, "verify", evil))
    described = info(workdir, evil)
    assert described["command_line"][0] == "/bin/sh"
    assert described["command_line_trusted"] is False and "altered" in \
        described["command_line_trust"]
    assert "NOT trusted" in ok(run_vmsnap(workdir, "info", evil)).stdout
    line = one_line(run_vmsnap(workdir, "restore", evil))
    assert "altered" in line and "--trust-command-line" in line
    line = one_line(run_vmsnap(workdir, "restore", "--trust-command-line", evil))
    assert "not a QEMU system emulator" in line
    assert not mark.exists()


def test_resealed_tap_script_never_runs(saved, tmp_path):
    """The second attack: QEMU kept as the program, a tap netdev whose script= QEMU would run."""
    _guest, _config, workdir, snap, _ = saved
    evil = shutil.copy(snap, tmp_path / "evil.snap")
    mark = tmp_path / "pwned"
    script = tmp_path / "up.sh"
    script.write_text(f"#!/bin/sh\ntouch {mark}\n")
    script.chmod(0o755)
    reseal(Path(evil), lambda md: md.update(command_line=[
        *md["command_line"], "-netdev", f"tap,id=n0,script={script}"]))
    ok(run_vmsnap(workdir, "verify", evil))
    line = one_line(run_vmsnap(workdir, "restore", evil))
    assert "altered" in line
    assert not mark.exists()


def test_foreign_file_needs_trust_then_relaunches(saved, tmp_path, request):
    """A file from another host (here: another key directory) is refused as it is, and runs
    with --trust-command-line; the relaunched guest's RAM is checked."""
    guest, config, workdir, snap, held = saved
    other = tmp_path / "other-host-key"
    env = {"VMSNAP_KEY_DIR": str(other)}
    described = info(workdir, snap, env=env)
    assert described["command_line_trusted"] is False
    assert "another host" in described["command_line_trust"]
    line = one_line(run_vmsnap(workdir, "restore", snap, env=env))
    assert "another host" in line and "vmsnap info" in line
    assert not other.exists(), "reading a file must not create a host key"
    pid = relaunched(run_vmsnap(workdir, "restore", "--json", "--paused",
                                "--trust-command-line", snap, env=env), request)
    with Vm(config, workdir, "src").adopt(pid) as vm:
        guest.check_restored(vm, held)
