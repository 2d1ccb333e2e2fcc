"""The relaunch guard (vmsnap.orchestration.guard) without QEMU: the program it starts gets
its stdio and the descriptors passed, with the signals Python ignores back to their
defaults; it is ended when vmsnap lets go of the guard unreleased (also before the guard
could report its PID), and outlives it once released; a program that cannot start is one
line in the log."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from testbed.qemu import process_alive
from vmsnap.orchestration.relaunch import GuardedQemu

#: the shell's descriptors, one a line, then its ignored signals (a hex mask); then it waits
REPORT = "ls /proc/$$/fd; grep SigIgn /proc/$$/status; exec sleep 30"


def _wait(what, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_guard_starts_the_program_with_only_what_it_passes(tmp_path: Path) -> None:
    log = tmp_path / "log"
    passed = os.open(tmp_path, os.O_RDONLY)
    try:
        guard = GuardedQemu(["sh", "-c", REPORT], "/bin/sh", str(log), pass_fds=(passed,))
    finally:
        os.close(passed)
    pid = guard.pid
    assert pid is not None
    _wait(lambda: "SigIgn" in log.read_text())
    *fds, ignored = log.read_text().splitlines()
    assert sorted(map(int, fds)) == [0, 1, 2, passed]
    mask = int(ignored.split()[1], 16)
    assert not mask & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
    guard.kill()  # vmsnap lets go unreleased: the program is ended
    assert guard.poll() == 1
    _wait(lambda: not process_alive(pid))  # not our child: /proc may vanish mid-read


def test_guard_let_go_at_once_ends_the_program(tmp_path: Path) -> None:
    """vmsnap lets go of the guard before it reported the PID (an early-started QEMU whose
    restore failed at once): the guard cannot write the PID and ends the program all the
    same, instead of leaving it running without a guard."""
    for i in range(5):  # the window: while the guard's Python starts
        pidfile = tmp_path / f"pid{i}"
        guard = GuardedQemu(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], "/bin/sh",
                            str(tmp_path / f"log{i}"))
        guard.kill()
        assert guard.poll() == 1, (tmp_path / f"log{i}").read_text()
        time.sleep(0.2)  # a program still running writes its PID meanwhile
        if pidfile.exists():
            pid = int(pidfile.read_text())
            alive = process_alive(pid)
            if alive:
                os.kill(pid, signal.SIGKILL)
            assert not alive, f"the program outlived its guard (round {i})"


def test_guard_released_program_outlives_it(tmp_path: Path) -> None:
    guard = GuardedQemu(["sleep", "30"], None, str(tmp_path / "log"))
    pid = guard.pid
    assert pid is not None
    guard.release()
    assert guard.poll() == 0
    try:
        assert process_alive(pid)
    finally:
        os.kill(pid, signal.SIGKILL)


def test_guard_program_that_cannot_start(tmp_path: Path) -> None:
    log = tmp_path / "log"
    guard = GuardedQemu(["qemu-system-none"], str(tmp_path / "none"), str(log))
    assert guard.pid is None
    _wait(lambda: guard.poll() is not None)
    assert guard.poll() == 127
    assert log.read_text() == f"cannot start {tmp_path / 'none'}: No such file or directory\n"
