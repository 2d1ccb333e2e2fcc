"""Run the vmsnap CLI as a user would, and read its results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .guests import Saved


def run_vmsnap(workdir: Path, *args, timeout: float = 900,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the vmsnap CLI (extra `env` on top of ours); TMPDIR=workdir so a chroot QEMU 10
    sees vmsnap's sockets."""
    env = {**os.environ, "TMPDIR": str(workdir), **(env or {})}
    return subprocess.run([sys.executable, "-m", "vmsnap.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"vmsnap failed ({result.returncode}): {result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def one_line(result: subprocess.CompletedProcess) -> str:
    """Assert a clean failure: non-zero exit, one line on stderr, no traceback; return it."""
    assert result.returncode != 0, f"exit 0: {result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def save_quit(guest, config, workdir: Path, snap: Path) -> Saved:
    """Boot `guest` in a QEMU from `config` and `vmsnap save --quit` it to `snap`; returns
    what was saved (for check_restored)."""
    from .qemu import Vm

    with Vm(config, workdir, "src") as src:
        guest.boot(src)
        with guest.saving(src) as saved:
            ok(run_vmsnap(workdir, "save", "--quit", "--qmp", src.tool_qmp_path, snap))
    return saved


def events(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def signal_twice(proc: subprocess.Popen, sig: int, timeout: float = 10) -> None:
    """Send `sig` to `proc`, wait until the kernel has handed it over (no longer pending in
    /proc/PID/status), then send it again: the second one reaches a vmsnap that is already
    cleaning up after the first, whatever the machine's load (two signals sent back to
    back could merge into one; a fixed sleep could find vmsnap gone)."""
    proc.send_signal(sig)
    mask = 1 << (sig - 1)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except FileNotFoundError:
            break
        pending = 0
        for line in status.splitlines():
            if line.startswith(("SigPnd:", "ShdPnd:")):
                pending |= int(line.split()[1], 16)
        if not pending & mask:
            proc.send_signal(sig)
            return
        assert time.monotonic() < deadline, f"signal {sig} still pending after {timeout}s"
        time.sleep(0.001)
    raise AssertionError(f"vmsnap ended before its second signal (exit {proc.returncode})")


@contextmanager
def frozen(proc: subprocess.Popen) -> Iterator[None]:
    """`proc` stopped (SIGSTOP) meanwhile, so it cannot finish before what the block does to
    it lands, however fast the host or slow the block (a second vmsnap's start-up, on a
    loaded host, can outlast a whole save); it goes on (SIGCONT) afterwards."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)
