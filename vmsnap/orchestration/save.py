"""save: drive a running QEMU over QMP into a snapshot file, paused (default), live or in
the background (modes.py says what each asks of QEMU).

vmsnap stands where a migration destination would: it listens on a private unix socket,
asks QEMU to `migrate` there and lays the pages it receives at their fixed file offsets.
Whatever fails — QEMU, the disk, the user's Ctrl-C — the partial file is removed, an
existing FILE stays as it was, and the VM is put back in the run state it had.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import targets
from ..errors import VmsnapError, one_line
from ..fileformat.hot import RewriteTracker, save_rewrites
from ..fileformat.trailer import TrailerMetadata
from ..fileformat.writer import SnapshotWriter
from ..hostkey import load_or_create_key
from ..io.atomic import FileLockedError
from ..io.sockets import BatchedReader, shutdown_all
from ..ops.multifd_receive import identify_channels, receive_multifd
from ..ops.receive import ReceiveStats, receive
from ..ops.shared_ram import Backing
from ..progress import Reporter
from ..stream.constants import CAP_IGNORE_SHARED, CAP_MAPPED_RAM
from . import background, converge, futures, modes, native, shared
from . import qmp as qmpmod
from .modes import After, SaveMode
from .options import SEAL_WHEN, check_channels
from .qmp import MIGRATING, Client, Monitor, QemuGoneError
from .rendezvous import Meeting, meeting_place, pass_socket
from .vmlock import vm_lock

ACCEPT_TIMEOUT = 30.0
#: how long a failed migration waits for our receiver's own cause once QEMU found its pipe
#: broken (our side cut the stream: a target stuck in a Ceph op timeout, 60 s by default)
CAUSE_WAIT = 90.0
#: How often a save reports progress (and a live save's converger looks) between events.
PROGRESS_INTERVAL = 0.2
#: How long a failed save waits for QEMU to finish cancelling the migration it started.
CANCEL_WAIT = 5.0



@dataclass
class SaveResult:
    path: str
    seconds: float
    stream_bytes: int
    pages: int
    zero_pages: int
    live: bool
    qemu_version: str
    machine_type: str
    final_state: str
    direct_io: bool
    dirty_sync_count: int | None = None
    downtime_ms: int | None = None
    #: "stream": pages came through vmsnap's socket; "shared": vmsnap copied them from the
    #: shared backing; "qemu": QEMU wrote them into the file, vmsnap checksums them after
    #: the commit (see `seal`)
    ram_path: str = "stream"
    mode: str = SaveMode.PAUSED.value
    #: live saves: the guest's dirty rate, the highest CPU throttle, the final downtime limit
    dirty_mb_s: float | None = None
    throttle_pct: int | None = None
    downtime_limit_ms: int | None = None
    #: live saves: pages re-dirtied in the last rounds, recorded in FILE.hot (lazy restores
    #: of FILE send them first)
    hot_pages: int = 0
    #: passes over RAM: 1 for paused and background saves; a live save's rounds while the
    #: guest ran, the last of them ending in the final stop (downtime_ms)
    rounds: int | None = None
    #: seconds until FILE was durable and committed (ram_path "qemu": before its page
    #: checksums, whose read-back took seal_seconds or runs in process sealing_pid)
    committed_seconds: float | None = None
    pages_checked: bool = True
    seal_seconds: float | None = None
    sealing_pid: int | None = None


async def _set_parameters(client: Monitor, wanted: dict[str, Any]) -> dict[str, Any]:
    current = await client.execute("query-migrate-parameters")
    await client.execute("migrate-set-parameters", wanted)
    return {k: current[k] for k in wanted if k in current}


def _listen(meeting: Meeting) -> tuple[socket.socket, str]:
    """A listening socket for multifd, where the QEMU can connect (0600, QEMU's user)."""
    path = meeting.host("migrate.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    meeting.give(path)
    sock.listen(64)
    return sock, path


log = logging.getLogger(__name__)


#: QEMU before 8.1 busy-waits in its multifd sender while every channel is busy (fixed by
#: its commit "multifd: Fix the number of channels ready"): on a 7.2 source 2 channels cost
#: QEMU 1.0-1.7 CPU-s per GiB against 0.3 for one stream, and a 1 GiB save took 3.2 s against
#: 2.1 s on this 2-core host. Saves from such a QEMU default to one stream.
MULTIFD_SENDER_FIXED = (8, 1, 0)


def save_channels(asked: int | None, peer: qmpmod.Peer) -> int:
    """The channel count of a save: as asked, else one stream from a QEMU whose multifd
    sender busy-waits, else check_channels(None)."""
    if asked is not None:
        return asked
    return 0 if peer.version < MULTIFD_SENDER_FIXED else check_channels(None)


def prepare(path: str | os.PathLike[str], live: bool, background: bool,
            after: After | str | None,
            force: bool, direct: bool, limits: converge.LiveLimits, channels: int | None,
            seal: str) -> tuple[SaveMode, int | None, SnapshotWriter]:
    """Check a save's arguments and lock FILE.partial, before the VM is touched: the mode,
    the channel count (None: chosen by save_channels once the QEMU is known) and the reserved
    writer (abort it if the save does not happen)."""
    After.parse(after)
    if seal not in SEAL_WHEN:
        raise ValueError(f"seal must be one of {', '.join(SEAL_WHEN)}, not {seal!r}")
    mode = modes.select(live, background)
    limits.check(mode is SaveMode.LIVE)
    asked = modes.channels_for(mode, channels)
    channels = None if asked is None else check_channels(asked)  # None: from the QEMU
    path = targets.normalize(path)
    targets.refuse_overwrite(path, force)
    writer = SnapshotWriter(path, direct=direct, signing_key=load_or_create_key())
    try:
        writer.reserve()
    except FileLockedError as err:
        raise VmsnapError(f"{path} is being saved by another process") from err
    return mode, channels, writer


async def save(qmp_address: str, path: str | os.PathLike[str], *, live: bool = False,
               background: bool = False, after: After | str | None = None,
               force: bool = False,
               reporter: Reporter | None = None, direct: bool = True,
               limits: converge.LiveLimits = converge.NO_LIMITS,
               channels: int | None = None, seal: str = "now") -> SaveResult:
    """Save the VM behind `qmp_address` to `path`, paused, `live` or in the `background`.
    `after`: an After (or its value); None: PAUSE, except a background save keeps the VM's
    run state. `channels`: multifd channels (0: one plain stream; None: save_channels);
    a background save is always one stream. `limits`: a live save's user settings.
    `seal`: when QEMU wrote the pages itself (QEMU >= 9.1, paused, channels), when their
    checksums are added to the committed file: "now" (before returning), "background" or
    "later" (native.seal_after)."""
    mode, channels, writer = prepare(path, live, background, after, force, direct,
                                     limits, channels, seal)
    log.debug("save %s to %s: live=%s after=%s channels=%s", qmp_address, writer.path, live,
              after, channels)
    rep = reporter or Reporter()
    client: Client | None = None
    try:
        client, peer = await qmpmod.connect(qmp_address)
        with vm_lock(peer.pid):
            return await _save(client, peer, writer, mode, after, rep, limits,
                               channels, seal)
    finally:
        if not writer.finished:
            writer.abort()  # idempotent: removes FILE.partial and releases the lock
        if client is not None:
            await qmpmod.disconnect(client)


class Control(Protocol):
    """How the VM is paused and left after the save: over QMP (QmpControl), or through
    libvirt so that its view of the domain stays true (vmsnap.libvirt.save)."""

    async def stop(self) -> None: ...

    async def finish(self, after: After) -> str:
        """Leave the VM as `after` asks; its final state."""
        ...


@dataclass
class QmpControl:
    client: Monitor

    async def stop(self) -> None:
        await self.client.execute("stop")

    async def finish(self, after: After) -> str:
        return await _finish(self.client, after)


async def _save(client: Monitor, peer: qmpmod.Peer, writer: SnapshotWriter,
                mode: SaveMode, after: After | str | None, rep: Reporter,
                limits: converge.LiveLimits,
                channels: int | None, seal: str, control: Control | None = None,
                extra: dict[str, Any] | None = None) -> SaveResult:
    """The save itself. `control`: how to pause and finish (default: over `client`);
    `extra`: more metadata for the file (a libvirt domain's XML)."""
    control = control or QmpControl(client)
    await _check_state(client, peer)
    if mode is SaveMode.BACKGROUND and not peer.running:
        mode = SaveMode.PAUSED  # a paused guest's RAM stands still: a plain save is the same
    then = After.then(after, mode)
    channels = save_channels(channels, peer)
    live = mode is SaveMode.LIVE
    if live:
        writer.rewrites = RewriteTracker()
    writer.metadata = TrailerMetadata(
        qemu_version=peer.version_text, command_line=peer.cmdline,
        extra={"run_state": "running" if peer.running else "paused", "live": live,
               "mode": mode.value, "channels": channels, **(extra or {})})
    t0 = time.monotonic()
    run = await _plan(client, peer, writer, mode, channels)
    try:
        await _configure(run, limits)
        if peer.running and mode is SaveMode.PAUSED:
            await control.stop()
            run.stopped_by_us = True
        rep.start("save", None, live=live, mode=mode.value, channels=run.channels)
        converger = converge.Converger(time.monotonic(), limits.downtime_ms) if live else None
        info, stats = await _transfer(run, rep, converger)
        final = await control.finish(then)
    except BaseException as err:
        await _fail(run, err, rep)
        if isinstance(err, QemuGoneError):
            raise QemuGoneError("QEMU went away during the save") from err
        raise
    finally:
        await _close(run)
    return await _result(run, info, stats, final, converger, t0, seal, rep)


@dataclass
class _Run:
    """One save's plan and what it holds until it ends (released by `_close`)."""

    client: Monitor
    peer: qmpmod.Peer
    writer: SnapshotWriter
    mode: SaveMode
    channels: int
    #: shared RAM that vmsnap copies itself (x-ignore-shared), by block
    backings: dict[str, Backing] | None
    #: QEMU >= 9.1 writes FILE.partial itself (mapped-ram); vmsnap seals it
    by_qemu: bool
    #: QEMU's own writer uses O_DIRECT on FILE.partial
    direct_io: bool = False
    meeting: Meeting | None = None
    listener: socket.socket | None = None
    sock_path: str = ""
    fdset: native.FdSet | None = None
    conns: list[socket.socket] = field(default_factory=list)
    receiver: asyncio.Future[ReceiveStats] | None = None
    saved_caps: dict[str, bool] = field(default_factory=dict)
    saved_params: dict[str, Any] = field(default_factory=dict)
    stopped_by_us: bool = False
    #: the migration began: from here on it is ours to cancel
    started: bool = False


async def _check_state(client: Monitor, peer: qmpmod.Peer) -> None:
    status = await qmpmod.migration_status(client)
    if status.get("status") in MIGRATING:
        raise VmsnapError(f"a migration is already running on this VM ({status['status']})")
    if peer.status in ("inmigrate", "postmigrate", "shutdown", "internal-error"):
        raise VmsnapError(f"VM is in state {peer.status!r}; cannot save it")


async def _plan(client: Monitor, peer: qmpmod.Peer, writer: SnapshotWriter, mode: SaveMode,
                channels: int) -> _Run:
    """Which path the pages take: a shared backing copied by vmsnap, QEMU's own writer, or
    the stream (one socket passed by fd; multifd: a unix path this QEMU can reach)."""
    # RAM copied from a shared backing by vmsnap is neither point-in-time nor live
    backings = await shared.save_backings(client, peer) if mode is SaveMode.PAUSED else None
    if backings:
        channels = 0  # the stream holds device state and small blocks only
    by_qemu = (mode is SaveMode.PAUSED and not backings and targets.remote(writer.path) is None
               and await native.supported(client, peer, channels))
    run = _Run(client, peer, writer, mode, channels, backings, by_qemu)
    if channels and not by_qemu:
        run.meeting = meeting_place(peer.pid)
        run.listener, run.sock_path = _listen(run.meeting)
    return run


async def _configure(run: _Run, limits: converge.LiveLimits) -> None:
    """Capabilities and parameters for this path (the old values are kept to put back)."""
    run.saved_caps = await modes.apply_capabilities(
        run.client, run.peer, run.mode, run.channels,
        {CAP_IGNORE_SHARED: bool(run.backings), CAP_MAPPED_RAM: run.by_qemu})
    params = modes.base_parameters(run.channels)
    if run.by_qemu:
        w = run.writer
        run.direct_io = w.direct_requested and native.direct_io_ok(w.partial_path)
        params["direct-io"] = run.direct_io
    if run.mode is SaveMode.LIVE:
        params.update(limits.parameters())
    run.saved_params = await _set_parameters(run.client, params)


async def _transfer(run: _Run, rep: Reporter, converger: converge.Converger | None,
                    ) -> tuple[dict[str, Any], ReceiveStats]:
    """Start the migration and see it through: QEMU's query-migrate at the end and what
    reached the file."""
    client, writer = run.client, run.writer
    loop = asyncio.get_running_loop()
    if run.by_qemu:  # QEMU writes FILE.partial; vmsnap seals it once QEMU is done
        run.fdset = await native.pass_file(
            client, functools.partial(os.open, writer.partial_path), run.direct_io)
        await client.execute("migrate", {"uri": run.fdset.uri})
        run.started = True
        info = await _watch(client, loop.create_future(), rep, converger)
        stats: ReceiveStats = await loop.run_in_executor(
            None, native.commit_first, writer, writer.direct_requested)
        return info, stats
    if run.meeting:
        uri = f"unix:{run.meeting.qemu('migrate.sock')}"
    else:
        main, uri = await pass_socket(client)
        run.conns.append(main)
    await client.execute("migrate", {"uri": uri})
    run.started = True
    if run.listener is not None:
        for _ in range(run.channels + 1):
            run.conns.append(await _accept(client, run.listener, run.sock_path))
    run.receiver = loop.run_in_executor(None, _receive, run.conns, writer, run.backings,
                                        background.must_complete(run.peer, run.mode))
    info = await _watch(client, run.receiver, rep, converger)
    return info, await run.receiver


async def _fail(run: _Run, err: BaseException, rep: Reporter) -> None:
    """A failed or interrupted save: no partial file, the VM as it was."""
    if background.must_complete(run.peer, run.mode):
        await background.complete_into_nowhere(run.writer, run.conns, run.receiver)
    shutdown_all(run.conns)  # unblock the receiver so it aborts and removes the partial
    if run.receiver is not None:
        await asyncio.gather(run.receiver, return_exceptions=True)
    run.writer.abort()
    await _recover(run.client, run.started,
                   run.stopped_by_us or (run.started and run.peer.running))
    rep.error(one_line(err))


async def _close(run: _Run) -> None:
    for s in (*run.conns, *([run.listener] if run.listener else [])):
        s.close()
    for b in (run.backings or {}).values():
        b.close()
    await native.release(run.client, run.fdset)
    if run.meeting:
        run.meeting.close()
    await _restore_settings(run.client, run.saved_caps, run.saved_params)


async def _result(run: _Run, info: dict[str, Any], stats: ReceiveStats, final: str,
                  converger: converge.Converger | None, t0: float, seal: str,
                  rep: Reporter) -> SaveResult:
    """The committed save's figures (and its seal, when QEMU wrote the pages)."""
    path, writer = run.writer.path, run.writer
    hot_pages = save_rewrites(path, writer.rewrites) if writer.rewrites else 0
    committed = time.monotonic() - t0
    sealing = (await native.seal_after(path, seal, writer.signing_key,
                                       writer.direct_requested, rep) if run.by_qemu else {})
    ram = info.get("ram", {})
    result = SaveResult(path, time.monotonic() - t0, stats.stream_bytes, stats.pages,
                        stats.zero_pages, run.mode is SaveMode.LIVE, run.peer.version_text,
                        stats.machine_type, final, stats.direct,
                        ram.get("dirty-sync-count"), info.get("downtime"),
                        "shared" if run.backings else "qemu" if run.by_qemu else "stream",
                        run.mode.value, **(converger.figures() if converger else {}),
                        hot_pages=hot_pages, rounds=_rounds(run.mode, ram.get("dirty-sync-count")),
                        committed_seconds=round(committed, 3), **sealing)
    rep.done(**result.__dict__)
    return result


def _rounds(mode: SaveMode, syncs: int | None) -> int | None:
    """Passes over RAM from QEMU's dirty-sync-count, which also counts the sync at setup
    and the one at the final stop (a paused save: 3)."""
    if mode is not SaveMode.LIVE:
        return 1
    return max(1, syncs - 2) if syncs else None


def _receive(conns: list[socket.socket], writer: SnapshotWriter,
             backings: dict[str, Backing] | None = None,
             drain_on_failure: bool = False) -> ReceiveStats:
    """Receive one plain stream, or a main channel + multifd channels (told apart by magic).
    With `backings`, an x-ignore-shared stream whose shared RAM vmsnap copies itself.
    Any failure shuts every socket at once: QEMU's migration thread, which may hold the big
    lock while it writes, must see a broken pipe instead of blocking (and silencing QMP);
    `drain_on_failure` (background.must_complete) reads the stream to its end first."""
    try:
        if len(conns) == 1:
            conn = conns[0]  # both ends of the pair have the same buffers (pass_socket)
            source = BatchedReader(conn, conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
            return receive(source, writer, reply=conn.sendall, shared=backings)
        main, channels = identify_channels(conns)
        return receive_multifd(main, channels, writer)
    except BaseException:
        if drain_on_failure:
            background.drain(conns[0])
        shutdown_all(conns)
        raise


async def _accept(client: Monitor, listener: socket.socket, path: str) -> socket.socket:
    """Wait for QEMU's connection, failing early if its migration fails to start."""
    listener.setblocking(False)
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    accept = asyncio.ensure_future(asyncio.get_running_loop().sock_accept(listener))
    try:
        async with qmpmod.watch(client, poll=0.2) as changes:
            while True:
                waiting = asyncio.ensure_future(changes.wait(deadline - time.monotonic()))
                await asyncio.wait((accept, waiting), return_when=asyncio.FIRST_COMPLETED)
                futures.cancel(waiting)
                if accept.done():
                    conn, _ = accept.result()
                    conn.setblocking(True)
                    return conn
                info = await qmpmod.migration_status(client)
                if info.get("status") in ("failed", "cancelled"):
                    raise VmsnapError("QEMU could not start the migration" + (
                        f": {info['error-desc']}" if info.get("error-desc") else ""))
                if time.monotonic() > deadline:
                    raise VmsnapError(
                        f"QEMU did not connect to {path} within {ACCEPT_TIMEOUT:.0f}s")
    finally:
        futures.cancel(accept)


async def _watch(client: Monitor, receiver: asyncio.Future[ReceiveStats], rep: Reporter,
                 converger: converge.Converger | None = None) -> dict[str, Any]:
    """Follow QEMU's migration until it completes: ask its status at each MIGRATION or
    MIGRATION_PASS event (qmp.watch) and at least every PROGRESS_INTERVAL, to report live
    figures and let a live save's converger tune QEMU. The receiver's failure is checked
    first and ends a pending query: QEMU may not answer until it does."""
    async with qmpmod.watch(client, poll=PROGRESS_INTERVAL) as changes:
        return await _follow(client, receiver, rep, converger, changes)


async def _follow(client: Monitor, receiver: asyncio.Future[ReceiveStats], rep: Reporter,
                  converger: converge.Converger | None, changes: qmpmod.Watch
                  ) -> dict[str, Any]:
    last = None
    while True:
        if receiver.done() and (err := receiver.exception()) is not None:
            raise await _cause(client, err)
        query = asyncio.ensure_future(qmpmod.migration_status(client))
        try:
            await asyncio.wait((query, receiver), return_when=asyncio.FIRST_COMPLETED)
            if not query.done() and (err := receiver.exception()) is not None:
                raise await _cause(client, err)
            info = await query
        finally:
            futures.cancel(query)  # cut short by QEMU's death, it ends with QemuGoneError
        status = info.get("status")
        if status != last:
            log.debug("migration status: %s", status)
            last = status
        if converger is not None:
            await converger.step(client, info, time.monotonic())
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            # let the receiver tell its own cause, if it has one; a pipe QEMU found broken
            # is our cut: the receiver is still failing (a store stuck in its own timeout)
            cut = any(w in info.get("error-desc", "") for w in ("Broken pipe", "reset by peer"))
            await asyncio.wait([receiver], timeout=CAUSE_WAIT if cut else 0.2)
            if receiver.done() and (err := receiver.exception()) is not None:
                raise await _cause(client, err)
            raise _qemu_side(info)
        ram = info.get("ram", {})
        rep.update(ram.get("transferred", 0), ram.get("total"),
                   iteration=ram.get("dirty-sync-count"),
                   dirty_pages_rate=ram.get("dirty-pages-rate"))
        await changes.wait(PROGRESS_INTERVAL)


def _qemu_side(info: dict[str, Any]) -> VmsnapError:
    status = "cancelled" if info.get("status", "").startswith("cancel") else "failed"
    return VmsnapError(f"migration {status} on the QEMU side"
                       + (f": {info['error-desc']}" if info.get("error-desc") else ""))


async def _cause(client: Monitor, err: BaseException) -> BaseException:
    """The first cause of a receiver failure: our own I/O error (disk full) stands; a stream
    cut short is QEMU's doing (cancelled, failed, or QEMU gone)."""
    if isinstance(err, OSError) and not isinstance(err, ConnectionError):
        return err
    try:
        info = await qmpmod.migration_status(client)
    except QemuGoneError:
        return QemuGoneError("QEMU went away during the save")
    if info.get("status") in ("cancelling", "cancelled", "failed"):
        return _qemu_side(info)
    return err


async def _finish(client: Monitor, after: After) -> str:
    if after is After.RESUME:
        await client.execute("cont")
        return "running"
    if after is After.QUIT:
        try:
            await client.execute("quit")
        except QemuGoneError:
            pass
        return "quit"
    if (await client.execute("query-status"))["running"]:  # a background save runs on
        await client.execute("stop")
    return "paused"


async def _recover(client: Monitor, started: bool, resume: bool) -> None:
    """Put the VM back as it was: cancel the migration if we started it (never another
    client's), resume the VM if we stopped it or our migration did."""
    try:
        if started and (await qmpmod.migration_status(client)).get("status") in MIGRATING:
            async with qmpmod.watch(client) as changes:
                await client.execute("migrate_cancel")
                deadline = time.monotonic() + CANCEL_WAIT
                while ((await qmpmod.migration_status(client)).get("status") in MIGRATING
                       and time.monotonic() < deadline):
                    await changes.wait(deadline - time.monotonic())
        status = await client.execute("query-status")
        if resume and not status["running"]:
            await client.execute("cont")
    except Exception:  # noqa: BLE001 - QEMU is gone: nothing left to recover
        pass


async def _restore_settings(client: Monitor, caps: dict[str, bool],
                            params: dict[str, Any]) -> None:
    try:
        if caps:
            await qmpmod.set_capabilities(client, caps)
        if params:
            await client.execute("migrate-set-parameters", params)
    except Exception:  # noqa: BLE001 - QEMU is gone or quit
        pass

