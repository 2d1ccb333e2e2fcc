"""A QMP session with the facts vmsnap needs about its peer: version, run state, PID, cmdline."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qemu.qmp import QMPClient

from ..errors import QMPConnectError

log = logging.getLogger(__name__)


class Client(QMPClient):
    """A QMPClient whose commands and replies are debug records of this module's logger."""

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                      oob: bool = False) -> object:
        log.debug("%s: -> %s %s", self.name, cmd, dict(arguments) if arguments else "")
        try:
            reply = await super().execute(cmd, arguments, oob)
        except Exception as err:
            log.debug("%s: <- %s failed: %s", self.name, cmd, err)
            raise
        log.debug("%s: <- %s %.500s", self.name, cmd, reply)
        return reply


@dataclass(frozen=True)
class Peer:
    """The QEMU at the other end of a QMP socket."""

    version: tuple[int, int, int]
    running: bool
    status: str
    pid: int | None
    cmdline: list[str] | None

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


def _peer_pid(sock: socket.socket) -> int | None:
    """PID of a local unix-socket peer from SO_PEERCRED (None for TCP or when unknown)."""
    if sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", creds)[0]
    return pid or None


def read_cmdline(pid: int) -> list[str] | None:
    """The launch command line of a local process, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]] or None


def resolve_address(address: str) -> str | tuple[str, int]:
    """`host:port` → TCP tuple; anything else is a unix socket path."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "/" not in address:
        return (host, int(port))
    return address


async def connect(address: str, name: str = "vmsnap") -> tuple[QMPClient, Peer]:
    """Connect to QMP at `address` and describe the QEMU behind it."""
    target = resolve_address(address)
    family = socket.AF_INET if isinstance(target, tuple) else socket.AF_UNIX
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.connect(target)
    except OSError as err:
        sock.close()
        raise QMPConnectError(f"cannot connect to QMP at {address}: {err.strerror}") from err
    pid = _peer_pid(sock)
    client = Client(name)
    await client.connect(sock)
    version = await client.execute("query-version")
    q = version["qemu"]
    status = await client.execute("query-status")
    cmdline = read_cmdline(pid) if pid and pid != os.getpid() else None
    peer = Peer((q["major"], q["minor"], q["micro"]), bool(status["running"]),
                str(status["status"]), pid, cmdline)
    log.debug("QMP %s: QEMU %s, pid %s, %s", address, peer.version_text, pid, peer.status)
    return client, peer


async def migration_status(client: QMPClient) -> dict[str, Any]:
    return await client.execute("query-migrate")


async def set_capabilities(client: QMPClient, wanted: dict[str, bool]) -> dict[str, bool]:
    """Apply `wanted` (only for capabilities this QEMU knows); return the previous values."""
    current = {c["capability"]: c["state"]
               for c in await client.execute("query-migrate-capabilities")}
    change = {k: v for k, v in wanted.items() if k in current and current[k] != v}
    if change:
        log.debug("migration capabilities: %s (were %s)", change,
                  {k: current[k] for k in change})
        await client.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": k, "state": v} for k, v in change.items()]})
    return {k: current[k] for k in change}


async def disconnect(client: QMPClient) -> None:
    try:
        await client.disconnect()
    except (EOFError, OSError):  # QEMU went away first
        pass
