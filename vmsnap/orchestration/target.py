"""The target of a restore: a QEMU waiting for an incoming stream, launched by vmsnap or
given (--qmp); checked before anything is sent, and watched until it has loaded. Shared by
the eager and the lazy restore (which loads only this, not what an eager one needs)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .. import targets
from ..errors import VmsnapError
from ..fileformat.trailer import Trailer, TrailerMetadata
from ..hostkey import trust_of
from ..ops.destination import Destination, destination
from . import qmp as qmpmod
from .qmp import MIGRATING, Monitor, QemuGoneError
from .relaunch import GuardedQemu, RelaunchLock, Started, approve, start_qemu

START_TIMEOUT = 60.0
#: how often a starting QEMU's QMP socket is tried: every ms counts before a lazy restore's
#: guest runs (a connect attempt costs microseconds)
POLL = 0.002
log = logging.getLogger(__name__)


@dataclass
class RestoreResult:
    path: str
    seconds: float
    stream_bytes: int
    pages: int
    final_state: str
    pid: int | None
    qmp: str
    ram_path: str = "stream"  # "shared": vmsnap filled the target's shared RAM itself
    #: of `seconds`, those from the end of the checks of file and target until QEMU had
    #: loaded RAM and device state (the rest is vmsnap's own: open, QMP, checks)
    load_seconds: float | None = None


class Target(Protocol):
    """A QEMU waiting for an incoming stream that another program started (a libvirt
    domain): its monitor and facts; `kill` ends it if the restore fails before the guest
    could run on its own, `release` once it can."""

    @property
    def monitor(self) -> Monitor: ...

    @property
    def peer(self) -> qmpmod.Peer: ...

    @property
    def label(self) -> str: ...  # what the result's `qmp` names

    @property
    def pid(self) -> int | None: ...

    def kill(self) -> None: ...

    def release(self) -> None: ...


def _listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    finally:
        probe.close()


async def wait_started(started: Started) -> None:
    """Until the QEMU `started` listens on its QMP socket (ended if it never does)."""
    deadline = time.monotonic() + START_TIMEOUT
    while not _listening(started.qmp):  # the file appears at bind(), before listen()
        if started.proc.poll() is not None:
            if killed := started.proc.killed_by():
                raise QemuGoneError(f"QEMU was killed by {killed} at start")
            with open(started.proc.log_path, errors="replace") as f:
                lines = f.read().strip().splitlines()
            raise VmsnapError(f"QEMU exited at start: {lines[-1] if lines else 'no message'}")
        if time.monotonic() > deadline:
            started.proc.kill()
            raise VmsnapError(f"QEMU did not open its QMP socket in {START_TIMEOUT:.0f}s")
        await asyncio.sleep(POLL)


def launch_argv(path: str, command: Sequence[str] | None,
                meta: TrailerMetadata | None) -> list[str]:
    """The QEMU command line to launch for a restore of `path`: `command` if given, else
    the one stored in the snapshot."""
    argv = list(command) if command else (meta.command_line if meta else None)
    if not argv:
        raise VmsnapError(f"{path} stores no QEMU command line: give --qmp SOCKET "
                          "or -- QEMU_COMMAND...")
    return argv


async def launch_target(path: str, argv: list[str], given: bool, trailer: Trailer | None,
                        trust_command_line: bool, workdir: str,
                        launch_argv: list[str] | None = None, pass_fds: Sequence[int] = (),
                        ) -> tuple[GuardedQemu, RelaunchLock | None, str]:
    """Start a QEMU waiting for an incoming stream on a QMP socket in `workdir`: the
    command line stored in the snapshot at `path` (`given` False: approved, after the check
    of the signature of its `trailer`, one relaunch at a time) or one the user gave, never
    beside a running original. `launch_argv`, `pass_fds`: see start_qemu. Returns (QEMU,
    lock or None, QMP path) once QEMU listens."""
    program = None if given else approve(argv, trust_of(trailer), trust_command_line, path)
    lock = None if given else RelaunchLock(targets.lock_path(path))
    try:
        log.debug("relaunch: %s (program %s)", argv, program)
        started = start_qemu(argv, path, program, workdir, launch_argv, pass_fds)
        await wait_started(started)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return started.proc, lock, started.qmp


async def check_target(client: Monitor, peer: qmpmod.Peer, machine: str,
                        sizes: dict[str, int]) -> Destination:
    """Refuse, before anything is sent, a target that cannot take this snapshot (QEMU would
    only say so in its log, and exit). `sizes`: the snapshot's RAM block sizes by name."""
    if peer.status != "inmigrate":
        raise VmsnapError(f"target QEMU is {peer.status!r}, not waiting for an incoming "
                          "migration (start it with -incoming defer)")
    migration, uuid, machine_type, memdevs = await asyncio.gather(  # one round trip
        qmpmod.migration_status(client), client.execute("query-uuid"),
        client.execute("qom-get", {"path": "/machine", "property": "type"}),
        client.execute("query-memdev"))
    status = migration.get("status")
    if status in MIGRATING:
        raise VmsnapError(f"target QEMU is already loading a migration ({status})")
    target = destination(uuid, machine_type)
    if target.machine != machine:
        raise VmsnapError(f"machine type mismatch: snapshot is {machine}, target is "
                          f"{target.machine}")
    for memdev in memdevs:  # a backend's block bears its id
        want = sizes.get(memdev.get("id", ""))
        if want is not None and memdev["size"] != want:
            raise VmsnapError(
                f"RAM size mismatch: the snapshot's {memdev['id']} is {want >> 20} MiB, the "
                f"target's is {memdev['size'] >> 20} MiB (start it with the saved -m or "
                "backend size)")
    return target


def _log_reason(launched: GuardedQemu | None) -> str | None:
    """QEMU's first error line in the log of the QEMU vmsnap `launched` (e.g. "Size
    mismatch: ..."), without the prefix."""
    try:
        with open(launched.log_path if launched else "", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        m = re.match(r"\S*qemu-system-\S+: (.+)", line)
        if m and not m.group(1).startswith("warning:"):
            return m.group(1).strip()
    return None


async def target_failure(client: Monitor, launched: GuardedQemu | None) -> VmsnapError:
    """Why the target stopped loading, in QEMU's own words where it gives them; `launched`:
    the QEMU vmsnap launched (its log, and the signal that killed it), if it did."""
    try:
        info = await client.execute("query-migrate", timeout=5)
    except (QemuGoneError, VmsnapError):
        if launched is not None and (killed := launched.killed_by()):
            return QemuGoneError(f"target QEMU was killed by {killed} while loading the "
                                 "snapshot")
        reason = _log_reason(launched)
        return VmsnapError("target QEMU exited while loading the snapshot"
                           + (f": {reason}" if reason else " (its log tells why)"))
    desc = info.get("error-desc") or _log_reason(launched)
    return VmsnapError("target QEMU rejected the snapshot" + (f": {desc}" if desc else ""))


async def wait_loaded(client: Monitor, launched: GuardedQemu | None = None,
                       timeout: float = 600.0) -> None:
    """Until the target has loaded the stream: asked at each of its MIGRATION events
    (qmp.watch: a short load ends in milliseconds, and a lazy restore's guest waits on it;
    a monitor without events is asked every 2 ms at first, then less often, up to 50 ms)."""
    deadline = time.monotonic() + timeout
    async with qmpmod.watch(client) as changes:
        while True:
            try:
                info = await qmpmod.migration_status(client)
            except QemuGoneError:
                raise await target_failure(client, launched) from None
            status = info.get("status")
            if status == "completed":
                return
            if status == "failed":
                raise await target_failure(client, launched)
            if time.monotonic() > deadline:
                raise VmsnapError("target QEMU did not finish loading the snapshot")
            await changes.wait(deadline - time.monotonic())
