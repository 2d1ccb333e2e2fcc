"""Ctrl-C at any moment of the `vmsnap` command's start-up (issue 11 item 7): while Python
loads numpy, qemu.qmp and the verb's modules, and after. It ends with one line and exit code
130, never a KeyboardInterrupt traceback. The command waits on a stream that never comes
(`receive` from a silent pipe), so each interrupt meets it either importing (~0.2-0.6 s
here) or waiting. The interpreter's own start-up (tens of ms, Python's) is left behind
whatever the host's load: no interrupt is sent before the command has had PAST_PYTHON of
CPU time or waits on its pipe (a delay on the wall clock alone can end inside it on a
loaded host, where SIGINT is a KeyboardInterrupt traceback of Python's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: CPU time of the command past which Python's own start-up (21-90 ms of CPU here, on a
#: busy host) is surely over, and vmsnap.__main__ has taken SIGINT over
PAST_PYTHON = 0.15


def wait_past_python(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until the command `proc` has had PAST_PYTHON of CPU time, or sleeps with its CPU time
    standing still for half a second (it waits on its pipe: its start-up is over either
    way); a host's load only makes this take longer."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        # our child, not reaped before poll(): its /proc entry stays while we read it
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        state, ticks = fields[0], int(fields[11]) + int(fields[12])
        now = time.monotonic()
        if ticks / os.sysconf("SC_CLK_TCK") >= PAST_PYTHON:
            return
        if ticks != last or state != "S":
            last, since = ticks, now
        elif now - since > 0.5:
            return
        assert proc.poll() is None, proc.communicate()
        assert now < deadline, f"the command's start-up is not over after {timeout} s"
        time.sleep(0.002)


@pytest.mark.parametrize("delay", [0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.2])
def test_sigint_during_startup_is_one_line(tmp_path, delay):
    r, w = os.pipe()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "vmsnap", "receive", str(tmp_path / "x.snap")],
                            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    os.close(r)
    try:
        wait_past_python(proc)
        time.sleep(max(0.0, started + delay - time.monotonic()))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        os.close(w)
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err
    assert not (tmp_path / "x.snap").exists() and not (tmp_path / "x.snap.partial").exists()
