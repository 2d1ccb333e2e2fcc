"""The stream path of an eager restore: vmsnap sends the snapshot as a migration stream (one
socket or multifd channels), each page checked against its checksum as it is read; shared RAM
is filled from the file first. Loaded only when a restore takes it (a restore that QEMU reads
itself, native.load, never needs this machinery)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
from collections.abc import Callable

from ..fileformat.reader import Snapshot
from ..io.sockets import shutdown_all
from ..ops.destination import Destination
from ..ops.multifd_send import send_multifd
from ..ops.send import SendStats, send
from ..ops.shared_ram import fill_from_file
from ..progress import Reporter
from ..stream.constants import CAP_IGNORE_SHARED as IGNORE_SHARED
from . import futures, shared
from . import qmp as qmpmod
from .modes import clean_capabilities
from .qmp import Monitor
from .relaunch import GuardedQemu
from .rendezvous import connect_incoming, incoming_listener, pass_socket
from .target import START_TIMEOUT, target_failure

log = logging.getLogger(__name__)


async def load_stream(client: Monitor, peer: qmpmod.Peer, snap: Snapshot, channels: int,
                      plan: shared.RestorePlan | None, fresh: set[str], target: Destination,
                      rep: Reporter, total: int, stack: contextlib.ExitStack,
                      launched: GuardedQemu | None, capabilities: dict[str, bool]) -> SendStats:
    """Send the snapshot as a migration stream (one socket or multifd channels), each page
    checked against its checksum as it is read; `plan`: shared RAM vmsnap fills itself;
    `fresh`: blocks whose zero pages need not be sent; `launched`: the target, if vmsnap
    launched it; `capabilities`: the target's migration capabilities, as already asked."""
    if plan:
        channels = 0  # the stream holds device state and small blocks only
    await qmpmod.set_capabilities(
        client, {**clean_capabilities(), "multifd": channels > 0,
                 IGNORE_SHARED: bool(plan)}, capabilities)
    if channels:
        await client.execute("migrate-set-parameters", {"multifd-channels": channels})
    if plan:
        rep.start("restore", total, channels=0, ram_path="shared")
        await asyncio.get_running_loop().run_in_executor(
            None, _fill, snap, plan, rep, total)
    if channels:  # multifd: QEMU listens where vmsnap connects
        meeting, uri, incoming = await incoming_listener(client, peer.version, peer.pid)
        stack.callback(meeting.close)
        await client.execute("migrate-incoming", {"uri": uri})
        try:
            socks = [await connect_incoming(client, incoming, START_TIMEOUT)
                     for _ in range(channels + 1)]
        except qmpmod.QemuGoneError:  # it died first: say how
            raise await target_failure(client, launched) from None
    else:  # one stream: our socket, passed by fd
        main, uri = await pass_socket(client)
        stack.callback(main.close)
        incoming = uri
        await client.execute("migrate-incoming", {"uri": uri})
        socks = [main]
    log.debug("restore: %d connections to %s, QEMU's migrate-incoming %s (%d multifd "
              "channels)", len(socks), incoming, uri, channels)
    if not plan:
        rep.start("restore", total, channels=channels)
    stop = threading.Event()
    send_all = functools.partial(_send, snap, socks, channels, plan, fresh, target, rep, stop)
    try:
        return await _stream(send_all, socks, stop)
    except ConnectionError as err:  # the target closed the stream: say why it did
        raise await target_failure(client, launched) from err


def _send(snap: Snapshot, socks: list[socket.socket], channels: int,
          plan: shared.RestorePlan | None, fresh: set[str], target: Destination,
          rep: Reporter, stop: threading.Event) -> SendStats:
    """Send the snapshot (in a thread): one plain stream, or main + multifd channels."""
    if not channels:
        return send(snap, socks[0].makefile("wb", buffering=0),
                    progress=None if plan else rep.update,
                    shared=plan.addrs if plan else None, fresh=fresh)
    return send_multifd(snap, socks[0], socks[1:], target.uuid, target.sync_mode,
                        progress=rep.update, stop=stop, fresh=fresh)


def _fill(snap: Snapshot, plan: shared.RestorePlan, rep: Reporter, total: int) -> None:
    """Fill the target's shared RAM from the file (checksums checked)."""
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        rep.update(done, total)

    plan.pages = fill_from_file(snap, plan.backings, progress=progress)


async def _stream(stream: Callable[[], SendStats], socks: list[socket.socket],
                  stop: threading.Event) -> SendStats:
    """Run the blocking sender in a thread. Its failure, or ours (Ctrl-C cancels this
    task), ends every socket at once: the sender stops within moments, and the target's
    load fails instead of waiting forever on a channel that is neither fed nor closed."""
    future = asyncio.get_running_loop().run_in_executor(None, stream)
    try:
        return await asyncio.shield(future)
    except BaseException:
        stop.set()
        if len(socks) > 1:  # multifd channels end between packets, with a SYNC QEMU needs
            await asyncio.wait([future], timeout=1)
        shutdown_all(socks)
        await asyncio.wait([future], timeout=10)
        futures.retrieve(future)  # the sender's broken pipe follows from this failure
        raise
    finally:
        for sock in socks:
            sock.close()
