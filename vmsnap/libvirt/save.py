"""save --domain: save a libvirt domain into a snapshot whose metadata carries the domain's
migratable XML, with libvirt's view of the domain true afterwards.

The save is the QMP orchestration's own (modes, --live's converger, multifd, recovery), run
over libvirt's monitor (qemu-monitor-command): one stream reaches vmsnap without any path
in QEMU's reach (one end of a socketpair goes to QEMU with `getfd`, passed with the
command, and QEMU migrates to `fd:`). Multifd channels need a unix path QEMU connects to
(QEMU 7.2 has no fd: multifd): a 0700 directory of QEMU's user inside QEMU's own root, as
for --qmp (rendezvous.meeting_place), QEMU's pid found from its vCPU threads. Pausing,
resuming and quitting go through libvirt (suspend/resume/destroy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import VmsnapError
from ..orchestration.converge import NO_LIMITS, LiveLimits
from ..orchestration.modes import After
from ..orchestration.save import SaveResult, _save, prepare
from ..orchestration.vmlock import vm_lock
from ..progress import Reporter
from . import domain as dommod
from .incoming import without_incoming


async def save_domain(name: str, path: str | os.PathLike[str], *, uri: str | None = None,
                      live: bool = False, background: bool = False,
                      after: After | str | None = None,
                      force: bool = False, reporter: Reporter | None = None,
                      direct: bool = True, limits: LiveLimits = NO_LIMITS,
                      channels: int | None = 0, seal: str = "now") -> SaveResult:
    """Save libvirt domain `name` to `path`, paused, `live` or in the `background` (a
    point-in-time checkpoint; the guest runs on). `after`: an After (or its value); None:
    PAUSE, except a background save keeps the domain's run state. `channels`:
    multifd channels (default 0: one stream, passed by fd); the rest as for `save`."""
    mode, channels, writer = prepare(path, live, background, after, force, direct,
                                     limits, channels, seal)
    try:
        conn = dommod.connect(uri)
        try:
            dom = dommod.lookup(conn, name)
            if not dom.isActive():
                raise VmsnapError(f"libvirt domain {name!r} is not running")
            mon = dommod.DomainMonitor(dom)
            peer = await dommod.describe(mon, name)
            if channels and peer.pid is None:
                raise VmsnapError(f"QEMU of domain {name!r} is not visible from here (another "
                                  "host or pid namespace): its multifd channels need a "
                                  "directory in its root; use --channels 0")
            extra = {"libvirt": {"xml": without_incoming(dommod.migratable_xml(dom)),
                                 "cookie": None, "name": dom.name(), "uuid": dom.UUIDString()}}
            with vm_lock(peer.pid):
                return await _save(mon, peer, writer, mode, after, reporter or Reporter(),
                                   limits, channels, seal, _Libvirt(mon, dom),
                                   extra)
        finally:
            conn.close()
    finally:
        if not writer.finished:
            writer.abort()


@dataclass
class _Libvirt:
    """Pause and leave the domain through libvirt, so its state stays true (after a
    background save the guest is running already)."""

    mon: dommod.DomainMonitor
    dom: Any

    async def stop(self) -> None:
        await self.mon.call(self.dom.suspend)

    async def finish(self, after: After) -> str:
        running = dommod.is_running(self.dom)
        if after is After.RESUME:
            if not running:
                await self.mon.call(self.dom.resume)
            return "running"
        if after is After.QUIT:
            await self.mon.call(self.dom.destroy)
            return "quit"
        if running:
            await self.mon.call(self.dom.suspend)
        return "paused"
