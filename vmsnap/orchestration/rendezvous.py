"""Where vmsnap and a QEMU meet, whatever QEMU's mount namespace or user.

vmsnap's own temporary directory is private (0700) and lives in vmsnap's mount namespace: a
QEMU in a container or chroot cannot see it, one running as another user (Debian's libvirt
runs QEMU as libvirt-qemu) cannot enter it. The main channel therefore goes by fd (QMP
`getfd` + `fd:`), which needs no path at all. Multifd channels need a unix path QEMU can
reach, so for such a QEMU their directory is made inside QEMU's own root (/proc/PID/root)
and given to QEMU's uid, mode 0700: that QEMU can reach it, other users cannot; a restore
into QEMU 7.x needs no path at all (pass_listener). The same goes for the second channel of
a postcopy-preempt restore (incoming_listener). Never a TCP port.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import VmsnapError
from ..io.sockets import widen
from .qmp import Monitor, QemuGoneError, gone

MAIN_FD_NAME = "vmsnap-migration"
LISTENER_FD_NAME = "vmsnap-incoming"
#: QEMU 7.x takes `tcp:fd:NAME` for an incoming migration and listens on the socket passed
#: as NAME (its socket_parse reads "fd:NAME"), multifd channels included; QEMU 10 parses it
#: as a host name and refuses a plain `fd:` with multifd (both tested). Its outgoing side
#: reads NAME as an fd number ("Unable to parse FD number"): no use for saves.
LISTEN_BY_FD_BEFORE = (8, 0, 0)
#: how long QEMU may take to listen where vmsnap connects (seconds)
CONNECT_TIMEOUT = 60.0


@dataclass
class Meeting:
    """A private directory, as vmsnap opens it (`host_dir`) and as QEMU names it."""

    host_dir: str
    qemu_dir: str
    owner: tuple[int, int] | None = None  # (uid, gid) to hand our sockets to

    def host(self, name: str) -> str:
        return os.path.join(self.host_dir, name)

    def qemu(self, name: str) -> str:
        return os.path.join(self.qemu_dir, name)

    def give(self, path: str) -> None:
        """Let QEMU's user connect to a socket we bound at `path`."""
        if self.owner is not None:
            os.chown(path, *self.owner)

    def close(self) -> None:
        shutil.rmtree(self.host_dir, ignore_errors=True)


def process_ids(pid: int) -> tuple[int, int] | None:
    """Effective (uid, gid) of process `pid` (QEMU's -runas drops to them after start)."""
    ids = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Uid", "Gid"):
                    ids[key] = int(value.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return (ids["Uid"], ids["Gid"]) if len(ids) == 2 else None


def meeting_place(pid: int | None) -> Meeting:
    """A private directory that both vmsnap and QEMU `pid` can reach (None: a local QEMU of
    ours, e.g. one vmsnap launched or behind TCP QMP: vmsnap's own temporary directory)."""
    ids = process_ids(pid) if pid else None
    root = f"/proc/{pid}/root"
    try:
        same_root = ids is None or os.path.samestat(os.stat(root), os.stat("/"))
    except OSError:
        same_root = True  # cannot look inside: assume it sees what we see
    if ids is None or (same_root and ids[0] == os.geteuid()):
        d = tempfile.mkdtemp(prefix="vmsnap-")  # 0700
        return Meeting(d, d)
    try:
        d = tempfile.mkdtemp(prefix="vmsnap-", dir=os.path.join(root, "tmp"))
        os.chown(d, *ids)
    except OSError as err:
        raise VmsnapError(f"cannot make a directory QEMU (pid {pid}, uid {ids[0]}) can reach "
                          f"for its multifd channels: {err.strerror}; use --channels 0"
                          ) from err
    return Meeting(d, "/tmp/" + os.path.basename(d), None if ids[0] == os.geteuid() else ids)


async def _hand_over(client: Monitor, name: str, sock: socket.socket,
                     undo: Callable[[], None]) -> None:
    """Give QEMU `sock` as `name` (SCM_RIGHTS + `getfd`, over QMP or libvirt's monitor); our
    copy is closed either way, `undo` runs if QEMU did not take it."""
    try:
        await client.execute_with_fds("getfd", {"fdname": name}, [sock.fileno()])
    except BaseException:
        undo()
        raise
    finally:
        sock.close()


async def pass_socket(client: Monitor) -> tuple[socket.socket, str]:
    """A connected socket pair whose far end is handed to QEMU over its monitor: returns our
    end and the `fd:` URI QEMU's migrate/migrate-incoming take. Both ends get the same wide
    buffers (io.sockets.widen)."""
    ours, theirs = socket.socketpair()
    widen(ours, theirs)
    await _hand_over(client, MAIN_FD_NAME, theirs, ours.close)
    return ours, f"fd:{MAIN_FD_NAME}"


async def pass_listener(client: Monitor) -> tuple[Meeting, str, str]:
    """A unix socket bound in vmsnap's own private directory and handed to QEMU (< 8) by fd,
    for it to listen on: multifd channels of a restore with no path in QEMU's reach.
    Returns the meeting (to close), the URI for migrate-incoming and the path vmsnap
    connects to."""
    d = tempfile.mkdtemp(prefix="vmsnap-")  # 0700
    meeting = Meeting(d, d)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(meeting.host("incoming.sock"))
    except OSError:
        sock.close()
        meeting.close()
        raise
    await _hand_over(client, LISTENER_FD_NAME, sock, meeting.close)
    return meeting, f"tcp:fd:{LISTENER_FD_NAME}", meeting.host("incoming.sock")


async def incoming_listener(client: Monitor, version: tuple[int, int, int], pid: int | None,
                            ) -> tuple[Meeting, str, str]:
    """Where a QEMU of `version` (process `pid`) can listen for the several connections of
    one incoming migration (multifd or postcopy-preempt channels): our socket passed by fd
    before 8.0, else a unix path in its reach. Returns the meeting (to close), the URI for
    migrate-incoming (or migrate-recover) and the path vmsnap connects to."""
    if version < LISTEN_BY_FD_BEFORE:
        return await pass_listener(client)
    meeting = meeting_place(pid)
    return meeting, f"unix:{meeting.qemu('incoming.sock')}", meeting.host("incoming.sock")


async def connect_incoming(client: Monitor, path: str, timeout: float = CONNECT_TIMEOUT
                           ) -> socket.socket:
    """A connection to the incoming migration QEMU listens for at `path`; QEMU takes them in
    the order they are made (the first is its main channel). QemuGoneError once QEMU's
    monitor `client` closed: a QEMU that died never listens (a socket passed to QEMU 7.x
    stays bound, refusing, until the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if gone(client):
                raise QemuGoneError("target QEMU went away before it took the incoming "
                                    "connections") from None
            if time.monotonic() > deadline:
                raise VmsnapError("target QEMU did not open its incoming socket") from None
            await asyncio.sleep(0.02)
