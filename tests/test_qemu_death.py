"""QEMU SIGKILLed at the worst moments of a restore, on real QEMU: right after vmsnap
spawned it (before its QMP socket answers: a lazy restore's QEMU started before the file is
opened, an eager relaunch's), right after `migrate-incoming` (of a restore QEMU reads
itself, --no-verify: the fdset released at once; or of one whose channels vmsnap connects
next), right after `cont` of a mapped lazy restore (the guest lives without vmsnap from
there on). Each time vmsnap ends promptly, non-zero, in one
line saying that QEMU ended, leaves no QEMU, temporary directory or lock behind, and the
snapshot is byte-identical."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_lazy_restore import saved, sha256
from test_save_restore import qemu_pids_using

from testbed.guests import BootGuest
from testbed.qemu import Vm, process_alive

pytestmark = pytest.mark.qemu

#: Runs the `vmsnap` command (argv after the script's name and the moment) with QEMU
#: SIGKILLed at that moment: "spawn" (as soon as vmsnap started it), or right after QEMU
#: answered the QMP command of that name; it waits until QEMU is gone, then notes when.
KILL_PROBE = """
import json, os, select, signal, sys, time
from vmsnap.orchestration import qmp, relaunch
AT = sys.argv.pop(1)
pids = []
def kill(pid):
    fd = os.pidfd_open(pid)
    signal.pidfd_send_signal(fd, signal.SIGKILL)
    select.select([fd], [], [])
    os.close(fd)
    print(json.dumps({"event": "killed", "at": AT, "pid": pid, "time": time.time()}),
          flush=True)
init, connect, execute = relaunch.GuardedQemu.__init__, qmp.connect, qmp.Client.execute
def spawned(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if AT == "spawn":
        kill(self.pid)
async def connecting(*args, **kwargs):
    client, peer = await connect(*args, **kwargs)
    pids.append(peer.pid)
    return client, peer
async def executing(self, cmd, *args, **kwargs):
    reply = await execute(self, cmd, *args, **kwargs)
    if cmd == AT:
        kill(pids[-1])
    return reply
relaunch.GuardedQemu.__init__, qmp.connect, qmp.Client.execute = spawned, connecting, executing
from vmsnap.__main__ import main
sys.argv[0] = "vmsnap"
sys.exit(main())
"""

#: From QEMU's death to vmsnap's end, at most (it takes well under a second)
PROMPT = 30.0


def vm_lock_dir(workdir: Path) -> Path:
    """Where vmsnap (TMPDIR=workdir) keeps its per-QEMU locks (see orchestration.vmlock)."""
    if os.geteuid() == 0:
        return Path("/run/vmsnap")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    return (Path(runtime, "vmsnap") if runtime and os.path.isdir(runtime)
            else workdir / f"vmsnap-{os.geteuid()}")


def killed_at(workdir: Path, snap: Path, at: str, *args: object) -> str:
    """`vmsnap restore --json SNAP ARGS` with QEMU SIGKILLed at `at`; the one line it fails
    with, once everything a failed restore must leave as it was is checked."""
    digest = sha256(snap)
    before = set(os.listdir(workdir))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_PROBE, at, "restore", "--json", str(snap), *map(str, args)],
        env={**os.environ, "TMPDIR": str(workdir)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ended = time.time()
    evs = [json.loads(line) for line in out.splitlines()]
    kills = [e for e in evs if e["event"] == "killed"]
    assert len(kills) == 1, (out, err)  # the probe struck, once
    assert ended - kills[0]["time"] < PROMPT, f"vmsnap took {ended - kills[0]['time']:.1f}s"
    assert proc.returncode == 1, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "done" not in [e["event"] for e in evs]
    pid = kills[0]["pid"]
    assert not process_alive(pid) and qemu_pids_using(workdir) == []
    lock_dir = vm_lock_dir(workdir)
    new = set(os.listdir(workdir)) - before - {lock_dir.name}
    # its vmsnap-* directory; but the sockets a QEMU of the command line made stay (a QEMU
    # killed removes none; a relaunch sees they no longer answer: check_not_running)
    assert [n for n in new if not stat.S_ISSOCK((workdir / n).lstat().st_mode)] == []
    assert list(lock_dir.glob(f"qemu-{pid}-*")) == []  # the VM lock
    with open(snap, "rb") as f:  # no relaunch lock held
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert sha256(snap) == digest
    return lines[0]


#: (QEMU, what vmsnap is asked to do): the stored command line (7.2: QEMU 10's runs
#: through the test bed's chroot wrapper, which a relaunch refuses) eagerly and lazily
#: (QEMU started before the file is opened), a given one mapped (started early too) and
#: read by QEMU itself
SPAWN_CASES = [("7.2", "eager", []), ("7.2", "lazy", ["--lazy"]),
               ("10", "mmap", ["--lazy=mmap"]), ("10", "no-verify", ["--no-verify"])]


@pytest.mark.parametrize(("qemu", "how", "args"), SPAWN_CASES,
                         ids=[f"qemu{q}-{h}" for q, h, _ in SPAWN_CASES])
def test_qemu_killed_right_after_spawn(workdir, qemu, how, args):
    guest = BootGuest(memory_mb=256)
    snap, argv, _ = saved(guest, qemu, workdir)
    command = ["--", *argv] if qemu == "10" else []
    line = killed_at(workdir, snap, "spawn", *args, *command)
    assert "QEMU was killed by SIGKILL at start" in line, line  # was "exited ...: no message"


KILLED = "target QEMU was killed by SIGKILL while loading the snapshot"
EXITED = "target QEMU exited while loading the snapshot"  # a --qmp target: not our child
GONE = "target QEMU went away before it took the incoming connections"
#: (QEMU, target, restore arguments, what vmsnap says): QEMU 10 reads the file itself
#: (--no-verify) as a --qmp target or launched from a given command line; 7.2 relaunched
#: from the stored command line, streamed to on multifd channels, or lazily (postcopy with
#: preempt, as a --qmp QEMU 10): vmsnap connects channels QEMU listens for
INCOMING_CASES = [("10", "qmp", ["--no-verify"], EXITED),
                  ("10", "command", ["--no-verify"], KILLED),
                  ("7.2", "relaunch", ["--channels", "2"], KILLED),
                  ("7.2", "relaunch", ["--lazy"], GONE), ("10", "qmp", ["--lazy"], GONE)]


@pytest.mark.parametrize(("qemu", "target", "args", "says"), INCOMING_CASES,
                         ids=[f"qemu{q}-{t}-{a[-1].strip('-')}"
                              for q, t, a, _ in INCOMING_CASES])
def test_qemu_killed_right_after_migrate_incoming(workdir, qemu, target, args, says):
    """Killed once it has taken `migrate-incoming`: with --no-verify vmsnap has released
    the fdset and waits for QEMU's load; else it connects the channels QEMU was to listen
    for (it used to retry for 60 s). A QEMU vmsnap launched is said to be killed (it used
    to be "exited ... (its log tells why)", of a log vmsnap then removed)."""
    guest = BootGuest(memory_mb=256)
    snap, argv, _ = saved(guest, qemu, workdir)
    if target == "qmp":
        with Vm(guest.config(qemu, workdir), workdir, "dst", incoming="defer") as dst:
            line = killed_at(workdir, snap, "migrate-incoming", *args, "--qmp",
                             dst.tool_qmp_path)
    else:
        command = ["--", *argv] if target == "command" else []
        line = killed_at(workdir, snap, "migrate-incoming", *args, *command)
    assert says in line, line


def test_qemu_killed_right_after_cont(workdir):
    """--lazy=mmap (QEMU 10): the guest runs on its own from `cont` on, vmsnap checks its
    pages in the background."""
    guest = BootGuest(memory_mb=256)
    snap, argv, _ = saved(guest, "10", workdir)
    line = killed_at(workdir, snap, "cont", "--lazy=mmap", "--", *argv)
    assert "QEMU ended" in line and "not all checked" in line, line
