"""A QMP session with the facts vmsnap needs about its peer: version, run state, PID, cmdline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    Runstate,
    StateError,
)

from ..errors import QMPConnectError, VmsnapError, one_line
from . import futures

log = logging.getLogger(__name__)

#: The greeting and first queries: a monitor that another client holds, or a socket that is
#: no QMP monitor at all, never answers; say so in seconds instead of waiting forever.
CONNECT_TIMEOUT = 5.0
#: Any one command. QEMU answers in milliseconds unless it is stuck (stop drains disk I/O).
COMMAND_TIMEOUT = 60.0

#: Migration states in which QEMU is busy with a migration (ours or someone else's).
MIGRATING = ("setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug",
             "postcopy-active")

#: The migration capability under which QEMU sends MIGRATION (each status change) and
#: MIGRATION_PASS (each pass over RAM) events, as a source and as an -incoming target.
CAP_EVENTS = "events"
MIGRATION_EVENTS = ("MIGRATION", "MIGRATION_PASS")
#: The longest a Watch waits for an event before its loop asks QEMU anyway: a safety net
#: (an event that never comes costs a second, not the loop's whole timeout), not a poll.
EVENT_WAIT_MAX = 1.0
#: Without events: the first poll interval, doubling up to the Watch's `poll`.
FIRST_POLL = 0.002

# qemu.qmp logs connection failures itself; vmsnap reports them as one line of its own.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())


class QemuGoneError(VmsnapError):
    """QEMU closed its monitor (it quit, crashed or was killed)."""


class QmpCommandError(VmsnapError):
    """QEMU refused a command; the message is QEMU's own reason."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class Monitor(Protocol):
    """What most steps need of a QMP connection: `execute` (with fds: to hand QEMU a socket
    or file). A Client, or libvirt's DomainMonitor (vmsnap.libvirt.domain), which passes
    commands through libvirt."""

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None, *,
                      timeout: float = ...) -> Any: ...

    async def execute_with_fds(self, cmd: str, arguments: Mapping[str, object] | None,
                               fds: list[int]) -> Any: ...


class Client(QMPClient):
    """A QMPClient whose commands time out and fail as one-line VmsnapErrors; commands and
    replies are debug records of this module's logger."""

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                      oob: bool = False, timeout: float = COMMAND_TIMEOUT) -> Any:
        log.debug("%s: -> %s %s", self.name, cmd, dict(arguments) if arguments else "")
        try:
            reply = await asyncio.wait_for(super().execute(cmd, arguments, oob), timeout)
        except ExecuteError as err:
            log.debug("%s: <- %s failed: %s", self.name, cmd, err)
            raise QmpCommandError(cmd, err.error_class, str(err)) from err
        except TimeoutError:
            raise VmsnapError(f"QEMU did not answer {cmd} within {timeout:.0f}s") from None
        except (EOFError, ConnectionError, ExecInterruptedError, StateError) as err:
            raise QemuGoneError(f"QEMU went away (its monitor closed during {cmd})") from err
        log.debug("%s: <- %s %.500s", self.name, cmd, reply)
        return reply

    async def execute_with_fds(self, cmd: str, arguments: Mapping[str, object] | None,
                               fds: list[int]) -> Any:
        """`cmd` with `fds` passed along (SCM_RIGHTS; QEMU keeps the last: one per command)."""
        for fd in fds:
            self.send_fd_scm(fd)
        return await self.execute(cmd, arguments)


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


async def connect(address: str, name: str = "vmsnap",
                  timeout: float = CONNECT_TIMEOUT) -> tuple[Client, Peer]:
    """Connect to QMP at `address` and describe the QEMU behind it, within `timeout`."""
    target = resolve_address(address)
    family = socket.AF_INET if isinstance(target, tuple) else socket.AF_UNIX
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except (OSError, OverflowError) as err:  # OverflowError: a port beyond 65535
        sock.close()
        # "timed out", "AF_UNIX path too long", "connect(): port must be 0-65535."
        reason = getattr(err, "strerror", None) or str(err)
        raise QMPConnectError(f"cannot connect to QMP at {address}: {reason}") from err
    pid = _peer_pid(sock)
    client = Client(name)
    try:
        async with asyncio.timeout(timeout):
            await client.connect(sock)
            version, status = await asyncio.gather(client.execute("query-version"),
                                                   client.execute("query-status"))
    except TimeoutError:
        await disconnect(client)
        sock.close()
        raise QMPConnectError(f"no QMP answer from {address} within {timeout:.0f}s (QEMU is "
                             "busy, another client holds this monitor, or it is not QMP)") from None
    except (ConnectError, VmsnapError) as err:
        await disconnect(client)
        sock.close()
        cause = err.exc if isinstance(err, ConnectError) else err
        raise QMPConnectError(f"{address} is not a usable QMP monitor: "
                             f"{one_line(cause)}") from err
    q = version["qemu"]
    cmdline = read_cmdline(pid) if pid and pid != os.getpid() else None
    peer = Peer((q["major"], q["minor"], q["micro"]), bool(status["running"]),
                str(status["status"]), pid, cmdline)
    log.debug("QMP %s: QEMU %s, pid %s, %s", address, peer.version_text, pid, peer.status)
    return client, peer


async def migration_status(client: Monitor) -> dict[str, Any]:
    status: dict[str, Any] = await client.execute("query-migrate")
    return status


async def capabilities(client: Monitor) -> dict[str, bool]:
    """The migration capabilities this QEMU knows, and their states."""
    return {c["capability"]: c["state"]
            for c in await client.execute("query-migrate-capabilities")}


async def set_capabilities(client: Monitor, wanted: dict[str, bool],
                           current: Mapping[str, bool] | None = None) -> dict[str, bool]:
    """Apply `wanted` (only for capabilities this QEMU knows: `current`, queried unless
    given); return the previous values."""
    if current is None:
        current = await capabilities(client)
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
    except Exception:  # noqa: BLE001 - QEMU went away first, or the session never began
        pass


class Watch:
    """Wakes a waiting loop when QEMU's state may have changed, so that it asks QEMU
    (`query-migrate`, `query-status`) then instead of on a timer: at each event it listens
    to, on a Client (the loop's caller has turned the `events` capability on with the
    others: modes.clean_capabilities); on a monitor that passes no events (libvirt's), after
    FIRST_POLL, then twice as long each time up to `poll`. So each waiting loop is written
    once, for both."""

    def __init__(self, client: Client | None, listener: EventListener | None,
                 poll: float) -> None:
        self._client = client
        self._listener = listener
        self._poll = poll
        self._delay = min(FIRST_POLL, poll)

    async def wait(self, timeout: float) -> str | None:
        """Return at the next event (one that came since the last call counts) with its
        name; None when the monitor closes, or after `timeout` seconds (EVENT_WAIT_MAX at
        most; without events, the current poll interval at most)."""
        timeout = max(0.0, timeout)
        if self._client is None or self._listener is None:
            await asyncio.sleep(min(timeout, self._delay))
            self._delay = min(2 * self._delay, self._poll)
            return None
        got = asyncio.ensure_future(self._listener.get())
        gone = asyncio.ensure_future(closed(self._client))
        try:
            await asyncio.wait((got, gone), timeout=min(timeout, EVENT_WAIT_MAX),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            futures.cancel(got, gone)
        name = None
        if got.done() and not got.cancelled():
            event = got.result()
            name = str(event["event"])
            log.debug("%s: event %s %s", self._client.name, name, event.get("data", ""))
        self._listener.clear()  # a burst of events wakes the loop once: it asks anyway
        return name


def gone(client: Monitor) -> bool:
    """Whether QEMU's monitor `client` has closed (QEMU quit or died); a monitor vmsnap
    does not hold itself (libvirt's) never says so."""
    return isinstance(client, Client) and client.runstate is not Runstate.RUNNING


async def closed(client: Client) -> None:
    """Return once the monitor is no longer connected (QEMU quit or died)."""
    while not gone(client):
        await client.runstate_changed()


@contextlib.asynccontextmanager
async def watch(client: Monitor, events: Sequence[str] = MIGRATION_EVENTS,
                poll: float = 0.05) -> AsyncIterator[Watch]:
    """A Watch for `events`, listening from here on: an event that comes before the loop's
    first question is not lost."""
    if not isinstance(client, Client):
        yield Watch(None, None, poll)
        return
    listener = EventListener(events)
    with client.listen(listener):
        yield Watch(client, listener, poll)
