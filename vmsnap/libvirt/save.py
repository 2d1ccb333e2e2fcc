"""save --domain: save a libvirt domain into a snapshot whose metadata carries the domain's
migratable XML, with libvirt's view of the domain true afterwards.

The stream reaches vmsnap without any path in QEMU's reach: one end of a socketpair goes to
QEMU with `getfd` through libvirt's monitor (qemu-monitor-command with files, by
rendezvous.pass_socket) and QEMU migrates to `fd:`; pausing and resuming go through libvirt
(suspend/resume), quitting is libvirt's destroy once the stream is complete. The QMP steps
(capabilities, parameters, watching the migration, recovery) are the QMP orchestration's
own, run over that monitor.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from ..errors import VmsnapError, one_line
from ..fileformat.trailer import TrailerMetadata
from ..fileformat.writer import SnapshotWriter
from ..hostkey import load_or_create_key
from ..io.atomic import FileLockedError
from ..io.sockets import shutdown_all
from ..ops.receive import ReceiveStats
from ..orchestration import background, modes
from ..orchestration import qmp as qmpmod
from ..orchestration.modes import UNLIMITED_BANDWIDTH, SaveMode
from ..orchestration.rendezvous import pass_socket
from ..orchestration.save import (
    SaveResult,
    _receive,
    _recover,
    _restore_settings,
    _rounds,
    _set_parameters,
    _watch,
)
from ..progress import Reporter
from . import domain as dommod
from .incoming import without_incoming


async def save_domain(name: str, path: str | os.PathLike[str], *, uri: str | None = None,
                      live: bool = False, background: bool = False, after: str | None = None,
                      force: bool = False, reporter: Reporter | None = None,
                      direct: bool = True, downtime_limit_ms: int = 300) -> SaveResult:
    """Save libvirt domain `name` to `path`, paused, `live` or in the `background` (a
    point-in-time checkpoint; the guest runs on). `after`: "pause" | "resume" | "quit";
    None: "pause", except a background save keeps the domain's run state."""
    if after not in (None, "pause", "resume", "quit"):
        raise ValueError(f"after must be pause, resume or quit, not {after!r}")
    mode = modes.select(live, background)
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not force:
        raise VmsnapError(f"{path} exists (use --force to overwrite)")
    conn = dommod.connect(uri)
    try:
        dom = dommod.lookup(conn, name)
        if not dom.isActive():
            raise VmsnapError(f"libvirt domain {name!r} is not running")
        writer = SnapshotWriter(path, direct=direct, signing_key=load_or_create_key())
        try:
            writer.reserve()
        except FileLockedError as err:
            raise VmsnapError(f"{path} is being saved by another process") from err
        try:
            return await _save(dom, writer, mode, after, reporter or Reporter(),
                               downtime_limit_ms)
        finally:
            if not writer.finished:
                writer.abort()
    finally:
        conn.close()


async def _save(dom: Any, writer: SnapshotWriter, mode: SaveMode, after: str | None,
                rep: Reporter, downtime_limit_ms: int) -> SaveResult:
    live = mode is SaveMode.LIVE
    mon = dommod.DomainMonitor(dom)
    status = await qmpmod.migration_status(mon)
    if status.get("status") in ("setup", "active", "pre-switchover", "device", "cancelling"):
        raise VmsnapError(f"a migration is already running on this domain ({status['status']})")
    q = (await mon.execute("query-version"))["qemu"]
    version = f"{q['major']}.{q['minor']}.{q['micro']}"
    running = dommod.is_running(dom)
    peer = qmpmod.Peer((q["major"], q["minor"], q["micro"]), running,
                       "running" if running else "paused", None, None)
    if mode is SaveMode.BACKGROUND and not running:
        mode = SaveMode.PAUSED  # a paused guest's RAM stands still: a plain save is the same
    if after is None:
        after = "resume" if mode is SaveMode.BACKGROUND else "pause"
    writer.metadata = TrailerMetadata(
        qemu_version=version,
        extra={"run_state": "running" if running else "paused", "live": live, "channels": 0,
               "libvirt": {"xml": without_incoming(dommod.migratable_xml(dom)), "cookie": None,
                           "name": dom.name(), "uuid": dom.UUIDString()}})
    conns: list[socket.socket] = []
    saved_caps: dict[str, bool] = {}
    saved_params: dict[str, Any] = {}
    stopped_by_us = started = False
    receiver: asyncio.Future[ReceiveStats] | None = None
    t0 = time.monotonic()
    try:
        saved_caps = await modes.apply_capabilities(mon, peer, mode, 0)
        params: dict[str, Any] = {"max-bandwidth": UNLIMITED_BANDWIDTH}
        if live:
            params["downtime-limit"] = downtime_limit_ms
        saved_params = await _set_parameters(mon, params)
        if running and mode is SaveMode.PAUSED:
            await mon.call(dom.suspend)
            stopped_by_us = True
        rep.start("save", None, live=live, mode=mode.value, channels=0)
        main, uri = await pass_socket(mon)
        conns.append(main)
        await mon.execute("migrate", {"uri": uri})
        started = True
        receiver = asyncio.get_running_loop().run_in_executor(
            None, _receive, conns, writer, None, background.must_complete(peer, mode))
        info = await _watch(mon, receiver, rep)
        stats = await receiver
        final = await _finish(mon, dom, after)
    except BaseException as err:
        if background.must_complete(peer, mode):  # QEMU 7.2 freezes on a cancel
            await background.complete_into_nowhere(writer, conns, receiver)
        shutdown_all(conns)
        if receiver is not None:
            await asyncio.gather(receiver, return_exceptions=True)
        writer.abort()
        await _recover(mon, started, stopped_by_us or (started and running))
        rep.error(one_line(err))
        raise
    finally:
        for conn in conns:
            conn.close()
        await _restore_settings(mon, saved_caps, saved_params)
    seconds = time.monotonic() - t0
    ram = info.get("ram", {})
    result = SaveResult(writer.path, seconds, stats.stream_bytes, stats.pages, stats.zero_pages,
                        live, version, stats.machine_type, final, stats.direct,
                        ram.get("dirty-sync-count"), info.get("downtime"), mode=mode.value,
                        downtime_limit_ms=downtime_limit_ms if live else None,
                        rounds=_rounds(mode, ram.get("dirty-sync-count")))
    rep.done(**result.__dict__)
    return result


async def _finish(mon: dommod.DomainMonitor, dom: Any, after: str) -> str:
    """The domain as asked, through libvirt so its state stays true (after a background
    save the guest is running already)."""
    running = dommod.is_running(dom)
    if after == "resume":
        if not running:
            await mon.call(dom.resume)
        return "running"
    if after == "quit":
        await mon.call(dom.destroy)
        return "quit"
    if running:
        await mon.call(dom.suspend)
    return "paused"
