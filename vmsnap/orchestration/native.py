"""QEMU >= 9.1 writes the pages itself: `migrate file:/dev/fdset/N` with mapped-ram,
multifd and direct-io into vmsnap's FILE.partial, then vmsnap seals it (page checksums
from a parallel O_DIRECT read-back, metadata, commit record) and commits it.

The file goes to QEMU as two descriptors in an fdset (`add-fd` over the QMP socket): a
plain one for the main channel and an O_DIRECT one for the multifd channels (QEMU picks
by access mode and O_DIRECT). So a QEMU in another mount namespace, which cannot see
vmsnap's directory, writes it all the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qemu.qmp import QMPClient

from ..fileformat.reader import open_snapshot
from ..fileformat.writer import SnapshotWriter
from ..ops.receive import ReceiveStats
from ..ops.seal import seal
from ..stream.constants import CAP_MAPPED_RAM
from .qmp import Peer

#: file:/dev/fdset and the direct-io parameter are QEMU 9.1's.
MIN_VERSION = (9, 1, 0)


async def supported(client: QMPClient, peer: Peer, channels: int) -> bool:
    """Whether QEMU can write this save itself: a paused multifd save (the caller checks
    paused) over a local QMP socket to a QEMU with mapped-ram and fdsets."""
    if channels < 1 or peer.version < MIN_VERSION or peer.pid is None:
        return False
    caps = {c["capability"] for c in await client.execute("query-migrate-capabilities")}
    return CAP_MAPPED_RAM in caps


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


async def pass_file(client: QMPClient, path: str, direct_io: bool) -> FdSet:
    """Open `path` for QEMU (plain, and O_DIRECT for direct-io) and hand the descriptors
    to it in a new fdset."""
    fds = (os.open(path, os.O_WRONLY | os.O_CLOEXEC),)
    if direct_io:
        fds += (os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT),)
    fdset: int | None = None
    try:
        for fd in fds:
            client.send_fd_scm(fd)
            reply = await client.execute("add-fd", {} if fdset is None else {"fdset-id": fdset})
            fdset = int(reply["fdset-id"])
    except BaseException:
        await release(client, FdSet(fdset, fds) if fdset is not None else None, fds)
        raise
    assert fdset is not None
    return FdSet(fdset, fds)


async def release(client: QMPClient, fdset: FdSet | None, fds: tuple[int, ...] = ()) -> None:
    """Drop QEMU's copies (remove-fd) and close ours."""
    if fdset is not None:
        try:
            await client.execute("remove-fd", {"fdset-id": fdset.id})
        except Exception:  # noqa: BLE001 - QEMU gone or set already empty
            pass
    for fd in fdset.fds if fdset is not None else fds:
        os.close(fd)


def seal_and_commit(writer: SnapshotWriter, direct: bool) -> ReceiveStats:
    """Seal the FILE.partial QEMU wrote and commit it; figures for the save result."""
    path = writer.partial_path
    writer.metadata.extra["pages_by"] = "qemu"
    pages = seal(path, writer.metadata, writer.signing_key, direct=direct)
    with open_snapshot(path, direct=direct) as snap:
        stats = ReceiveStats(writer.path, snap.stream_end, pages,
                             sum(b.npages - b.present_count for b in snap.blocks),
                             len(snap.blocks), snap.machine_type, snap.direct)
    writer.commit_written()
    return stats
