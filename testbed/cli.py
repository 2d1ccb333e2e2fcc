"""Run the vmsnap CLI as a user would, and read its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


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


def events(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
