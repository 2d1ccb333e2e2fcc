"""Moving a migration stream between QEMU and a host process: QEMU's own exec:cat, and
vmsnap's `receive`/`send` either run by QEMU itself (QEMU on the host) or through a FIFO in
the work directory (QEMU 10 in its chroot, where vmsnap is not installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.guests import Saved
from testbed.qemu import Vm, exec_uri

UNLIMITED = {"max-bandwidth": 1 << 40}
#: The vmsnap of the running interpreter's venv (absolute: QEMU's exec: has no PATH of ours).
VMSNAP = str(Path(sys.executable).with_name("vmsnap"))


def migrate_parameters(live: bool) -> dict[str, Any]:
    """Unlimited bandwidth; live saves may stop the guest for up to 2 s to converge."""
    return {**UNLIMITED, "downtime-limit": 2000} if live else dict(UNLIMITED)


def save_with_cat(vm: Vm, stream, live: bool) -> dict:
    """Save the VM into a plain stream file with QEMU's exec:cat (stopping it first unless live)."""
    if not live:
        vm.stop()
    return vm.migrate(exec_uri("cat", stdout=stream), parameters=migrate_parameters(live))


def wait_committed(snap: Path, vm: Vm, timeout: float = 300.0) -> None:
    """QEMU reports a migration complete once it has written the stream; a vmsnap it exec'd
    may still be committing (fsync, rename). Wait for FILE without FILE.partial."""
    partial = Path(f"{snap}.partial")
    deadline = time.monotonic() + timeout
    while not (snap.exists() and not partial.exists()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{snap} not committed after {timeout}s: {vm.log_tail()}")
        time.sleep(0.05)


class HostCommand:
    """A vmsnap (or other) process on the host, one end of a FIFO whose other end QEMU opens.

    Opening a FIFO blocks until both ends are open, so the process is started first and
    QEMU's exec:cat completes the rendezvous."""

    def __init__(self, argv: list[str], fifo: Path, *, reads_fifo: bool):
        self.fifo = fifo
        self.argv = argv
        if fifo.exists():
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        self.err_path = fifo.with_name(fifo.name + ".stderr")
        self.out_path = fifo.with_name(fifo.name + ".stdout")
        shell = f'exec "$@" {"<" if reads_fifo else ">"} "$FIFO"'
        with open(self.err_path, "wb") as err, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                ["sh", "-c", shell, "sh", *argv], env={**os.environ, "FIFO": str(fifo)},
                stdin=subprocess.DEVNULL, stdout=out if reads_fifo else None, stderr=err)
        self.rusage = None

    def wait(self, timeout: float = 600.0) -> int:
        """Wait for the process (its CPU time lands in `rusage`); raise with its stderr if it
        failed or did not finish in time."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.argv} still running after {timeout}s: "
                                   f"{self.stderr()}")
            time.sleep(0.02)
        self.rusage = rusage
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.argv} exited {self.proc.returncode}: {self.stderr()}")
        return self.proc.returncode

    @property
    def cpu_seconds(self) -> float:
        return self.rusage.ru_utime + self.rusage.ru_stime if self.rusage else 0.0

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace").strip()

    def kill(self) -> None:
        if self.proc.returncode is None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def vmsnap_receive_via_fifo(snapshot: Path, fifo: Path, *extra: str) -> HostCommand:
    """Host `vmsnap receive SNAPSHOT < FIFO`; point QEMU at `exec:cat > FIFO`."""
    return HostCommand([VMSNAP, "receive", *extra, str(snapshot)], fifo, reads_fifo=True)


def vmsnap_send_via_fifo(snapshot: Path, fifo: Path) -> HostCommand:
    """Host `vmsnap send SNAPSHOT > FIFO`; start QEMU with `-incoming exec:cat FIFO`."""
    return HostCommand([VMSNAP, "send", str(snapshot)], fifo, reads_fifo=False)


def save_with_vmsnap(vm: Vm, snap: Path, live: bool) -> None:
    """`migrate exec:vmsnap receive FILE` (7.2), or exec:cat into a FIFO read by vmsnap (10)."""
    if not live:
        vm.stop()
    params = migrate_parameters(live)
    if vm.config.qemu == "7.2":
        vm.migrate(exec_uri(VMSNAP, "receive", snap), parameters=params)
        wait_committed(snap, vm)
        return
    host = vmsnap_receive_via_fifo(snap, vm.workdir / "save.fifo")
    try:
        vm.migrate(exec_uri("cat", stdout=host.fifo), parameters=params)
        host.wait()
    finally:
        host.kill()


def restore_with_vmsnap(guest, config, workdir: Path, snap: Path, saved: Saved) -> None:
    """Start a destination on `-incoming exec:vmsnap send FILE` (or cat of a FIFO that a host
    vmsnap send fills) and check its RAM against `saved` (it stays paused: -S)."""
    if config.qemu == "7.2":
        with Vm(config, workdir, "dst", incoming=exec_uri(VMSNAP, "send", snap)) as vm:
            vm.wait_incoming()
            guest.check_restored(vm, saved)
        return
    host = vmsnap_send_via_fifo(snap, workdir / "restore.fifo")
    try:
        with Vm(config, workdir, "dst", incoming=exec_uri("cat", host.fifo)) as vm:
            vm.wait_incoming()
            host.wait()
            guest.check_restored(vm, saved)
    finally:
        host.kill()
