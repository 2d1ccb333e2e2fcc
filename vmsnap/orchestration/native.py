"""QEMU >= 9.1 moves the pages itself. Save: `migrate file:/dev/fdset/N` with mapped-ram,
multifd and direct-io into vmsnap's FILE.partial; vmsnap commits it at once with its
metadata, signature and device-state checksums (the guest may run on), then seals it: page
checksums from a parallel O_DIRECT read-back, now, in the background or later. Restore with
`verify=False`: `migrate-incoming file:/dev/fdset/N`, QEMU reads each present page once at
its offset (vmsnap files are QEMU's mapped-ram layout); vmsnap checks only the device
state and the stream's other non-page bytes first.

The file goes to QEMU as two descriptors in an fdset (`add-fd` over the QMP socket): a
plain one for the main channel and an O_DIRECT one for the multifd channels (QEMU picks
by access mode and O_DIRECT). So a QEMU in another mount namespace, which cannot see
vmsnap's directory, writes it all the same.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import targets
from ..fileformat.reader import Snapshot, open_snapshot
from ..progress import Reporter
from ..stream.constants import CAP_MAPPED_RAM
from . import qmp as qmpmod
from .modes import clean_capabilities
from .qmp import Monitor, Peer

if TYPE_CHECKING:  # a save's and the stream path's machinery load only where they run
    from ..fileformat.writer import SnapshotWriter
    from ..ops.receive import ReceiveStats
    from ..ops.send import SendStats

log = logging.getLogger(__name__)

#: file:/dev/fdset and the direct-io parameter are QEMU 9.1's.
MIN_VERSION = (9, 1, 0)


async def supported(client: Monitor, peer: Peer, channels: int,
                    capabilities: Collection[str] | None = None) -> bool:
    """Whether QEMU can write this save itself: a paused multifd save (the caller checks
    paused) over a local QMP socket to a QEMU with mapped-ram and fdsets (its migration
    `capabilities`, asked unless given)."""
    if channels < 1 or peer.version < MIN_VERSION or peer.pid is None:
        return False
    if capabilities is None:
        capabilities = await qmpmod.capabilities(client)
    return CAP_MAPPED_RAM in capabilities


@dataclass
class FdSet:
    id: int
    fds: tuple[int, ...]

    @property
    def uri(self) -> str:
        return f"file:/dev/fdset/{self.id}"


def direct_io_ok(path: str) -> bool:
    """Whether the file system takes O_DIRECT (QEMU's direct-io fails where it does not)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT))
    except OSError:
        return False
    return True


async def pass_file(client: Monitor, opener: Callable[[int], int], direct_io: bool,
                    access: int = os.O_WRONLY) -> FdSet:
    """Hand QEMU a file as descriptors in a new fdset: `opener(flags)` opens it, plain and
    (for direct-io) O_DIRECT; `access` O_WRONLY to save, O_RDONLY to load."""
    flags = [access | os.O_CLOEXEC] + ([access | os.O_CLOEXEC | os.O_DIRECT] if direct_io
                                       else [])
    fds: tuple[int, ...] = ()
    fdset: int | None = None
    try:
        for f in flags:
            fds += (opener(f),)
            reply = await client.execute_with_fds(
                "add-fd", {} if fdset is None else {"fdset-id": fdset}, [fds[-1]])
            fdset = int(reply["fdset-id"])
    except BaseException:
        await release(client, FdSet(fdset, fds) if fdset is not None else None, fds)
        raise
    assert fdset is not None
    return FdSet(fdset, fds)


async def release(client: Monitor, fdset: FdSet | None, fds: tuple[int, ...] = ()) -> None:
    """Drop QEMU's copies (remove-fd) and close ours."""
    if fdset is not None:
        try:
            await client.execute("remove-fd", {"fdset-id": fdset.id})
        except Exception:  # noqa: BLE001 - QEMU gone or set already empty
            pass
    for fd in fdset.fds if fdset is not None else fds:
        os.close(fd)


def commit_first(writer: SnapshotWriter, direct: bool) -> ReceiveStats:
    """Commit the FILE.partial QEMU wrote with its page checksums pending (metadata,
    signature, device state and other non-page bytes checksummed): the file is durable and
    restorable at once; `seal_after` adds the page checksums."""
    from ..ops.receive import ReceiveStats
    from ..ops.seal import commit_pending

    path = writer.partial_path
    writer.metadata.extra["pages_by"] = "qemu"
    commit_pending(path, writer.metadata, writer.signing_key, direct=direct)
    with open_snapshot(path, direct=direct) as snap:
        stats = ReceiveStats(writer.path, snap.stream_end,
                             sum(b.present_count for b in snap.blocks),
                             sum(b.npages - b.present_count for b in snap.blocks),
                             len(snap.blocks), snap.machine_type, snap.direct)
    writer.commit_written()
    return stats


async def seal_after(path: str, how: str, key: bytes | None, direct: bool,
                     rep: Reporter) -> dict[str, Any]:
    """Add the page checksums to a file `commit_first` committed: `how` is "now" (a
    parallel O_DIRECT read-back before returning), "background" (a detached `vmsnap seal`
    that outlives this process) or "later" (the user runs `vmsnap seal`). Result fields."""
    if how == "now":
        from ..ops.seal import seal

        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: seal(path, key=key, direct=direct))
        return {"pages_checked": True, "seal_seconds": round(time.monotonic() - t0, 3)}
    if how == "background":
        argv = [sys.executable, "-m", "vmsnap", "seal", *([] if direct else ["--no-direct"]),
                path]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        return {"pages_checked": False, "sealing_pid": proc.pid}
    return {"pages_checked": False}


async def can_load(client: Monitor, peer: Peer, path: str, stale: set[str],
                   capabilities: Collection[str]) -> bool:
    """Whether QEMU (its migration `capabilities`) can load the local file at `path`
    itself: QEMU >= 9.1 with mapped-ram, and no RAM block of the snapshot in memory that
    may hold old data (`stale`): QEMU's loader writes present pages only, so a zero page
    must land on zeroed memory."""
    if stale:
        log.debug("native load: not into %s (may hold old data)", sorted(stale))
        return False
    return targets.remote(path) is None and await supported(client, peer, 1, capabilities)


async def load(client: Monitor, snap: Snapshot, channels: int, rep: Reporter, total: int,
               capabilities: Mapping[str, bool], wait: Callable[[], Awaitable[None]]
               ) -> SendStats:
    """Check the device state and other non-page bytes of the open snapshot `snap`, then let
    QEMU (its migration `capabilities`) read the pages from that very file itself
    (`migrate-incoming file:` with mapped-ram, multifd, and direct-io where `snap` reads
    with O_DIRECT) and `wait` until it has. QEMU opens every channel of a file: URI at
    `migrate-incoming`, from its own copies of the fdset's descriptors: the set is
    released at once, its round trip inside QEMU's load."""
    snap.check_stream_ranges()  # read at the open: in the page cache (0.1 ms at 4 GiB)
    await asyncio.gather(  # one round trip
        qmpmod.set_capabilities(client, {**clean_capabilities(), CAP_MAPPED_RAM: True,
                                         "multifd": True}, capabilities),
        client.execute("migrate-set-parameters",
                       {"multifd-channels": channels, "direct-io": snap.direct}))
    rep.start("restore", total, channels=channels, ram_path="qemu")
    fdset = await pass_file(client, snap.reopen, snap.direct, os.O_RDONLY)
    try:
        await client.execute("migrate-incoming", {"uri": fdset.uri})
    finally:
        await release(client, fdset)
    from ..ops.send import SendStats  # not before: QEMU loads meanwhile

    await wait()
    rep.update(total, total)
    return SendStats(snap.stream_end, sum(b.present_count for b in snap.blocks), 0)
