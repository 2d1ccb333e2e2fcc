"""Launch and drive real QEMU processes: 7.2 from Debian on the host, 10.x from the trixie chroot.

Every VM lives in a private 0700 work directory (QMP socket, serial socket, files); QMP goes
through `qemu.qmp`'s synchronous client. Every process started here is recorded so a test
session can assert that none survives it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from testbed.paths import QEMU10_ROOT
from testbed.serial import SerialConsole

#: run by path (testbed.chroot_exec): standard library only, without site
CHROOT_EXEC = Path(__file__).with_name("chroot_exec.py")

QEMU_VERSIONS = ("7.2", "10")
#: Any QMP command of the test bed. QEMU answers in milliseconds unless its main loop is
#: stuck: a vCPU that cannot be paused (left faulting on its own page tables by a lazy
#: restore killed early, on this nested host) makes `stop` wait forever, and QMP with it.
QMP_TIMEOUT = 60.0
#: `quit` when a VM is closed: a QEMU that does not answer it by then is killed (SIGKILL).
QUIT_TIMEOUT = 10.0
_started: list[subprocess.Popen] = []
_adopted: list[int] = []


#: What reading /proc/PID/... raises once PID has ended: the entry is gone, or (opened just
#: before) the read fails with ESRCH. Catch both, or a test races the process it watches.
PROC_GONE = (FileNotFoundError, ProcessLookupError)


class QemuError(RuntimeError):
    """QEMU did not do what the test bed asked, with QEMU's own words attached."""


def process_alive(pid: int) -> bool:
    """Whether any thread of process `pid` still runs. A zombie is dead for our purpose once
    it is alone: its leader turns zombie first, while another thread may still be freeing
    the process's memory (an 8 GiB QEMU's: ~0.6 s at 100% of a CPU), which a restore timed
    right after would share the machine with."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        threads = os.listdir(f"/proc/{pid}/task")
    except PROC_GONE:
        return False
    return state != "Z" or threads != [str(pid)]


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL is asynchronous: wait until the process is really gone (or a lone zombie)."""
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def leftover_processes() -> list[int]:
    """PIDs of QEMU processes started or adopted by this test bed that are still alive."""
    return [p.pid for p in _started if p.poll() is None] + [p for p in _adopted if process_alive(p)]


def kill_leftovers() -> None:
    for proc in _started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    for pid in _adopted:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
            _wait_dead(pid)


def qemu_argv_prefix(version: str, workdir: Path, binds: Sequence[Path] = ()) -> list[str]:
    """The argv that runs qemu-system-x86_64 of `version`, seeing `workdir` at the same path."""
    if version == "7.2":
        return ["qemu-system-x86_64"]
    if version == "10":
        if not (QEMU10_ROOT / "usr/bin/qemu-system-x86_64").exists():
            raise QemuError(f"QEMU 10 chroot missing at {QEMU10_ROOT}: run scripts/install.sh")
        argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-I", "-S",
                str(CHROOT_EXEC), str(QEMU10_ROOT)]
        for directory in (workdir, *binds):
            argv += ["--bind", str(directory)]
        return [*argv, "--", "qemu-system-x86_64"]
    raise ValueError(f"unknown QEMU version {version!r}, expected one of {QEMU_VERSIONS}")


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@dataclass
class VmConfig:
    """What to launch. `args` carries the guest-specific part of the command line."""

    qemu: str = "7.2"
    accel: str = "tcg"
    machine: str = "q35"
    memory_mb: int = 256
    cpu: str | None = None
    args: list[str] = field(default_factory=list)
    binds: list[Path] = field(default_factory=list)  # extra dirs visible inside the chroot

    def accel_args(self) -> list[str]:
        cpu = self.cpu or ("qemu64" if self.accel == "tcg" else "host")
        return ["-accel", self.accel, "-cpu", cpu]


class Vm:
    """One QEMU process with QMP and a serial console on unix sockets in `workdir`."""

    def __init__(self, config: VmConfig, workdir: Path, name: str = "vm",
                 incoming: str | None = None):
        self.config = config
        self.workdir = workdir
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.tool_qmp_path = workdir / f"{name}.tool.qmp"  # a second monitor, for vmsnap
        self.serial_path = workdir / f"{name}.serial"
        self.log_path = workdir / f"{name}.log"
        self.incoming = incoming
        self.proc: subprocess.Popen | None = None
        self.qmp: QEMUMonitorProtocol | None = None
        self.serial: SerialConsole | None = None
        self.adopted_pid: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def argv(self) -> list[str]:
        c = self.config
        argv = qemu_argv_prefix(c.qemu, self.workdir, c.binds)
        argv += ["-name", self.name, "-machine", c.machine, *c.accel_args(),
                 "-m", str(c.memory_mb), "-nodefaults", "-display", "none",
                 "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                 "-qmp", f"unix:{self.tool_qmp_path},server=on,wait=off",
                 "-chardev", f"socket,id=serial0,path={self.serial_path},server=on,wait=off",
                 "-serial", "chardev:serial0", "-S", *c.args]
        if self.incoming is not None:
            argv += ["-incoming", self.incoming]
        return argv

    def start(self, timeout: float = 30.0) -> Vm:
        """Start QEMU stopped (-S), connect QMP and the serial console; the guest runs on cont()."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        _started.append(self.proc)
        deadline = time.monotonic() + timeout
        while not (self.qmp_path.exists() and self.serial_path.exists()):
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU {self.config.qemu} exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise QemuError(f"QEMU {self.config.qemu} did not open its sockets in {timeout}s")
            time.sleep(0.02)
        self._connect()
        return self

    def adopt(self, pid: int) -> Vm:
        """Take over a QEMU started elsewhere with this VM's sockets (e.g. relaunched by
        `vmsnap restore` from the stored command line); close() ends it."""
        _adopted.append(pid)
        self.adopted_pid = pid
        self._connect()
        return self

    def _connect(self) -> None:
        self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
        self.qmp.connect()
        self.qmp.settimeout(QMP_TIMEOUT)
        self.serial = SerialConsole(self.serial_path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self.adopted_pid

    def _alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.adopted_pid is not None and process_alive(self.adopted_pid)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.adopted_pid is not None and process_alive(self.adopted_pid):
            os.kill(self.adopted_pid, signal.SIGKILL)
            _wait_dead(self.adopted_pid)

    def close(self) -> str | None:
        """Quit QEMU (politely, then by force) and release sockets. A QEMU that does not
        answer `quit` within QUIT_TIMEOUT is killed at once: returns why (else None)."""
        hung = None
        if self.qmp is not None:
            try:
                if self._alive():
                    self.qmp.settimeout(QUIT_TIMEOUT)
                    self.qmp.cmd("quit")
            except TimeoutError:
                hung = self._stuck("quit", QUIT_TIMEOUT) + ": killed with SIGKILL"
                print(f"testbed: {hung}", file=sys.stderr)
                self.kill()  # before closing QMP: QEMU's end of the socket closes with it
            except Exception:  # noqa: BLE001 - QEMU may already be gone; we kill below
                pass
            try:
                self.qmp.close()
            except (EOFError, OSError):  # QEMU quit first: nothing left to close
                pass
            self.qmp = None
        if self.serial is not None:
            self.serial.close()
            self.serial = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.adopted_pid is not None:
            _wait_dead(self.adopted_pid)  # it quits by itself; killed if it has not by then
            self.kill()
        return hung

    def __enter__(self) -> Vm:
        return self if self.qmp is not None else self.start()  # adopted VMs are running

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        hung = self.close()
        if hung is not None and exc_type is None:  # else the block's own error goes on
            raise QemuError(hung)

    # -- QMP helpers -----------------------------------------------------------------------
    def cmd(self, name: str, **args: Any) -> Any:
        assert self.qmp is not None, "VM not started"
        try:
            return self.qmp.cmd(name, **args)
        except TimeoutError:
            raise QemuError(self._stuck(name, QMP_TIMEOUT)) from None
        except Exception as err:
            raise QemuError(f"QMP {name} failed: {err}") from err

    def _stuck(self, command: str, timeout: float) -> str:
        return (f"QEMU {self.config.qemu} {self.name!r} (pid {self.pid}) did not answer QMP "
                f"{command} within {timeout:.0f}s (its main loop is stuck)")

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def cont(self) -> None:
        self.cmd("cont")

    def stop(self) -> None:
        self.cmd("stop")

    def migrate(self, uri: str, timeout: float = 600.0, capabilities: dict[str, bool] | None = None,
                parameters: dict[str, Any] | None = None) -> dict:
        """Run an outgoing migration to `uri` and wait for it to complete."""
        self.set_migration(capabilities, parameters)
        self.cmd("migrate", uri=uri)
        return self.wait_migration(timeout)

    def set_migration(self, capabilities: dict[str, bool] | None = None,
                      parameters: dict[str, Any] | None = None) -> None:
        if capabilities:
            caps = [{"capability": k, "state": v} for k, v in capabilities.items()]
            self.cmd("migrate-set-capabilities", capabilities=caps)
        if parameters:
            self.cmd("migrate-set-parameters", **parameters)

    def wait_migration(self, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration {status}: {info.get('error-desc', '')} "
                                f"{self.log_tail()}")
            if self.proc is not None and self.proc.poll() is not None:
                raise QemuError(f"QEMU exited during migration: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise QemuError(f"migration not finished after {timeout}s (status {status})")
            time.sleep(0.05)

    def wait_incoming(self, timeout: float = 600.0) -> None:
        """Wait until an -incoming VM has loaded its state (status leaves 'inmigrate')."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise QemuError(f"incoming QEMU exited: {self.log_tail()}")
            status = self.status()
            if status not in ("inmigrate", "prelaunch") or self._incoming_done():
                return
            if time.monotonic() > deadline:
                raise QemuError(f"incoming migration not finished after {timeout}s")
            time.sleep(0.05)

    def _incoming_done(self) -> bool:
        return self.cmd("query-migrate").get("status") == "completed"

    def pmemsave(self, address: int, size: int, path: Path) -> Path:
        """Dump guest-physical memory [address, address+size) to `path` (inside workdir)."""
        self.cmd("pmemsave", val=address, size=size, filename=str(path))
        return path


def exec_uri(*argv: str | os.PathLike, stdout: Path | None = None) -> str:
    """An `exec:` migration URI running argv (optionally > stdout), every word quoted."""
    command = shlex.join(os.fspath(a) for a in argv)
    if stdout is not None:
        command += " > " + shlex.quote(os.fspath(stdout))
    return "exec:" + command
