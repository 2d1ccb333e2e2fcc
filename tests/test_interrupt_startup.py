"""Ctrl-C at any moment of the `vmsnap` command's start-up (issue 11 item 7): while Python
loads numpy, qemu.qmp and the verb's modules, and after. It ends with one line and exit code
130, never a KeyboardInterrupt traceback. The command waits on a stream that never comes
(`receive` from a silent pipe), so each interrupt meets it either importing (~0.2-0.6 s
here) or waiting. The first delay leaves the interpreter's own start-up (tens of ms,
Python's) behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("delay", [0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.2])
def test_sigint_during_startup_is_one_line(tmp_path, delay):
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "vmsnap", "receive", str(tmp_path / "x.snap")],
                            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    os.close(r)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        os.close(w)
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err
    assert not (tmp_path / "x.snap").exists() and not (tmp_path / "x.snap.partial").exists()
